"""Quality of a few bench methods on many images, without timing: PSNR/SSIM vs full compute, FID-FMNIST and class
accuracy. FID-FMNIST differences between methods are within noise at 200 images (full compute itself moves by
~0.4 between seeds); this is the check with enough images to separate them.

    python scripts/quality_at_scale.py --images 1000 --threads 2 \\
        --methods ddim-11,fora-N5,ts-O1-N5-divided,ts-O2-N5-divided,ts-O1-N5-divided-sigma
"""

from __future__ import annotations

import argparse
import time

import torch

from taylorseer.eval.bench import _Context, _quality, _run, default_grid, select_methods
from taylorseer.models.pretrained import load_reference
from taylorseer.models.reference import NUM_CLASSES
from taylorseer.models.sampler import sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", required=True, help="comma-separated bench method names (full is added)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = select_methods(default_grid(), [n.strip() for n in args.methods.split(",") if n.strip()])
    labels = torch.arange(args.images) % NUM_CLASSES
    ctx = _Context(load_reference(), sample, labels, args.seed, 1.5, "batch")
    print(f"{args.images} images, seed {args.seed}, DDIM-50, CFG 1.5 at every step\n")
    print("| method | full steps | PSNR dB | SSIM | FID-FMNIST | class acc | seconds |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for method in methods:  # full first (select_methods keeps grid order, and the grid starts with it)
        start = time.perf_counter()
        run = _run(ctx, method, labels)
        is_ref = reference is None
        reference = run.images if is_ref else reference
        q, _ = _quality(run.images, reference, labels, is_reference=is_ref)  # the bench's own metric calls
        psnr = "ref" if is_ref else f"{q['psnr']:.2f}"
        print(f"| {method.name} | {run.stats.get('steps_full')} | {psnr} | {q['ssim']:.4f} | {q['fid_fmnist']:.3f} | "
              f"{q['class_accuracy']:.3f} | {time.perf_counter() - start:.0f} |", flush=True)

if __name__ == "__main__":
    main()
