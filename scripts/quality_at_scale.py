"""Quality of a few bench methods on many images, without timing: PSNR/SSIM vs full compute, FID-FMNIST and class
accuracy. FID-FMNIST differences between methods are within noise at 200 images (full compute itself moves by
~0.4 between seeds); this is the check with enough images to separate them.

    python scripts/quality_at_scale.py --images 1000 --threads 2 \\
        --methods ddim-11,fora-N5,ts-O1-N5-divided,ts-O2-N5-divided,ts-O1-N5-divided-sigma

``--save DIR`` also writes each method's images to ``DIR/seed{S}/{method}.safetensors`` (float32, [N, 1, 16, 16] in
[-1, 1]), so ``scripts/fid_intervals.py`` can compute paired bootstrap intervals offline; existing files are
reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taylorseer.eval.bench import Method, _Context, _quality, _run, default_grid, select_methods
from taylorseer.models.pretrained import load_reference
from taylorseer.models.reference import NUM_CLASSES
from taylorseer.models.sampler import sample


def _images(ctx: _Context, method: Method, labels: torch.Tensor, path: Path | None) -> tuple[torch.Tensor, int | None]:
    """The method's images, from ``path`` if a previous run saved them there (steps: None then)."""
    if path is not None and path.exists():
        return load_file(str(path))["images"].float(), None
    run = _run(ctx, method, labels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"images": run.images.float().contiguous(), "labels": labels.contiguous()}, str(tmp))
        tmp.replace(path)
    return run.images, run.stats.get("steps_full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one table per seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--save", type=Path, default=None, help="directory for the images (see module docstring)")
    parser.add_argument("--methods", required=True, help="comma-separated bench method names (full is added)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = select_methods(default_grid(), [n.strip() for n in args.methods.split(",") if n.strip()])
    labels = torch.arange(args.images) % NUM_CLASSES
    model = load_reference()
    for seed in args.seed:
        ctx = _Context(model, sample, labels, seed, args.cfg_scale, "batch")
        print(f"\n{args.images} images, seed {seed}, DDIM-50, CFG {args.cfg_scale} at every step\n")
        print("| method | full steps | PSNR dB | SSIM | FID-FMNIST | class acc | seconds |")
        print("|---|---|---|---|---|---|---|")
        reference = None
        for method in methods:  # full first (select_methods keeps grid order, and the grid starts with it)
            start = time.perf_counter()
            path = None if args.save is None else args.save / f"cfg{args.cfg_scale:g}-n{args.images}" / \
                f"seed{seed}" / f"{method.name}.safetensors"
            images, steps = _images(ctx, method, labels, path)
            is_ref = reference is None
            reference = images if is_ref else reference
            q, _ = _quality(images, reference, labels, is_reference=is_ref)  # the bench's own metric calls
            psnr = "ref" if is_ref else f"{q['psnr']:.2f}"
            print(f"| {method.name} | {steps} | {psnr} | {q['ssim']:.4f} | {q['fid_fmnist']:.3f} | "
                  f"{q['class_accuracy']:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
