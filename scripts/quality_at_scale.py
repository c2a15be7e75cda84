"""Quality of a few bench methods on many images, without timing: PSNR/SSIM and FID vs full compute, FID-FMNIST and
class accuracy. FID-FMNIST differences between methods are within noise at 200 images (full compute itself moves by
~0.4 between seeds); this is the check with enough images to separate them.

    python scripts/quality_at_scale.py --images 1000 --threads 1 \\
        --methods ddim-11,fora-N5,ts-O1-N5-divided,ts-O2-N5-divided,ts-O1-N5-divided-sigma
    torchrun --nproc-per-node 2 scripts/quality_at_scale.py --images 1000 --methods ... --save DIR   # same numbers

Every method is sampled through ``taylorseer.eval.sample`` (what ``taylorseer sample`` runs): sample i starts from
noise seeded by (seed, i) in fixed batches of ``--batch-size``, so the images, and the table, are the same for any
number of processes (docs/sampling.md). The sample folders are ``DIR/cfg{G}-n{N}/seed{S}/{method}/`` (resumable: an
interrupted run continues where it stopped); each method's merged images are also written to
``DIR/cfg{G}-n{N}/seed{S}/{method}.safetensors`` (float32, [N, 1, 16, 16] in [-1, 1], with labels), so
``scripts/experiments/fid_intervals.py`` can compute paired bootstrap intervals offline. Without ``--save`` (one
process only) the folders go to a temporary directory that is removed at the end.

Before this path existed (docs/results/quality_1000.md and the fid_intervals tables) all the noise of a seed came
from one generator in one batch of N; the per-sample noise draws other images, so those tables' values are not
reproduced to the digit by this script (same model and method, another draw of 1,000 samples).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from taylorseer.eval.bench import Method, default_grid, select_methods
from taylorseer.eval.sample import SampleSpec, distributed, load_samples, run_sample, sample_labels


def _export(folder: Path, path: Path) -> None:
    """The merged images of a sample folder as the safetensors file fid_intervals.py reads."""
    images, indices, _ = load_samples(folder)
    save_file({"images": images.float().contiguous(), "labels": sample_labels(indices.tolist()).contiguous()},
              str(path))


def _row(method: Method, result: dict, is_ref: bool) -> str:
    steps = result["steps_full_mean"]
    steps_text = f"{steps:.0f}" if result["steps_full_min"] == result["steps_full_max"] else f"{steps:.2f}"
    psnr = "ref" if is_ref else "inf" if result["psnr"] is None else f"{result['psnr']:.2f}"
    ssim = "1" if is_ref else f"{result['ssim']:.4f}"
    to_full = "0" if is_ref else f"{result['fid_to_reference']:.3f}"
    return (f"| {method.name} | {steps_text} | {psnr} | {ssim} | {result['fid_fmnist']:.3f} | {to_full} | "
            f"{result['class_accuracy']:.3f} | {result['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one table per seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--save", type=Path, default=None, help="directory for the samples (see module docstring)")
    parser.add_argument("--batch-size", type=int, default=50, help="samples per model call and shard")
    parser.add_argument("--methods", required=True, help="comma-separated bench method names (full is added)")
    args = parser.parse_args()
    methods = select_methods(default_grid(), [n.strip() for n in args.methods.split(",") if n.strip()])
    with distributed("cpu") as ranks, tempfile.TemporaryDirectory() as scratch:
        if args.save is None and ranks.world_size > 1:
            raise SystemExit("with several processes give --save DIR (a folder every rank can reach)")
        root = (args.save or Path(scratch)) / f"cfg{args.cfg_scale:g}-n{args.images}"
        for seed in args.seed:
            if ranks.rank == 0:
                print(f"\n{args.images} images, seed {seed}, DDIM-50, CFG {args.cfg_scale} at every step, "
                      f"{ranks.world_size} process(es) x {args.threads} thread(s)\n")
                print("| method | full steps | PSNR dB | SSIM | FID-FMNIST | FID to full | class acc | seconds |")
                print("|---|---|---|---|---|---|---|---|")
            full_dir = None
            for method in methods:  # full first (select_methods keeps grid order, and the grid starts with it)
                folder = root / f"seed{seed}" / method.name
                spec = SampleSpec(method, args.images, seed=seed, batch_size=args.batch_size,
                                  guidance_scale=args.cfg_scale, image_dtype="float32")
                result = run_sample(spec, folder, threads=args.threads, reference=full_dir)
                is_ref = full_dir is None
                full_dir = folder if is_ref else full_dir
                if result is not None:  # rank 0
                    _export(folder, root / f"seed{seed}" / f"{method.name}.safetensors")
                    print(_row(method, result, is_ref), flush=True)


if __name__ == "__main__":
    main()
