"""Held-out quality of calibrated methods (``taylorseer calibrate`` files) next to fixed-interval baselines.

Images and seeds are disjoint from the calibration's (calibration noise seeds start at 1000; evaluation seeds
are 0..99; ``--classes`` restricts the evaluation images' classes, e.g. 5-9 for a file calibrated on 0-4).
Each method's images are saved to ``DIR/cfg{G}-n{N}{-classes}/seed{S}/{method}.safetensors`` (float32,
[N, 1, 16, 16] in [-1, 1], as ``scripts/quality_at_scale.py --save`` does), so
``scripts/experiments/fid_intervals.py DIR/...`` computes paired bootstrap intervals for FID-FMNIST differences;
existing files are reused (resumable).

A calibration the generation does not fit (other number of steps, unguided sampling for weights fitted on a
CFG batch) is reported as refused, with the library's error message.

    python scripts/calibration_eval.py --calibration docs/results/calibration/cal-b8-s50.safetensors \\
        --baselines ts-O2-N7-divided,fora-N7,ddim-8 --images 1000 --seed 0 --save /root/runs/cal
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taylorseer.calibration import CalibrationError
from taylorseer.eval.bench import Method, RunContext, calibrated_methods, default_grid, quality, run_method
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample


def _classes(text: str | None) -> list[int]:
    if not text:
        return list(range(10))
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out += list(range(int(low), int(high) + 1)) if high else [int(low)]
    return out


def _images(ctx: RunContext, method: Method, path: Path | None) -> tuple[torch.Tensor, int | None]:
    if path is not None and path.exists():
        return load_file(str(path))["images"].float(), None
    run = run_method(ctx, method)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"images": run.images.float().contiguous(), "labels": ctx.labels.contiguous()}, str(tmp))
        tmp.replace(path)
    return run.images, run.stats.get("steps_full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", action="append", default=[], help="calibration file (repeatable)")
    parser.add_argument("--baselines", default="", help="comma-separated bench grid method names")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--classes", default=None, help="evaluation classes, e.g. 5-9 (default: 0-9)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", type=Path, default=None)
    parser.add_argument("--weights-only", action="store_true", help="skip each file's '-taylor2' method (its schedule "
                        "with Taylor O=2 instead of the fitted weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference()
    pool = _classes(args.classes)
    labels = torch.tensor([pool[i % len(pool)] for i in range(args.images)])
    grid = {m.name: m for m in default_grid(num_steps=args.steps)}
    methods: list[Method] = [grid["full"]] + [grid[n.strip()] for n in args.baselines.split(",") if n.strip()]
    refused: list[tuple[str, str]] = []
    for path in args.calibration:
        try:
            methods += [m for m in calibrated_methods(path, model, args.steps, guidance_scale=args.cfg_scale)
                        if not (args.weights_only and m.name.endswith("-taylor2"))]
        except CalibrationError as err:
            refused.append((Path(path).name, str(err)))
    suffix = f"-c{args.classes}" if args.classes else ""
    for seed in args.seed:
        ctx = RunContext(model, sample, labels, seed, args.cfg_scale, "batch")
        print(f"\n{args.images} images (classes {args.classes or '0-9'}), seed {seed}, DDIM-{args.steps}, "
              f"CFG {args.cfg_scale}\n")
        print("| method | full steps | PSNR dB | SSIM | FID to full | FID-FMNIST | class acc | seconds |")
        print("|---|---|---|---|---|---|---|---|")
        reference = None
        for method in methods:
            start = time.perf_counter()
            path = None if args.save is None else (args.save / f"cfg{args.cfg_scale:g}-n{args.images}{suffix}" /
                                                   f"seed{seed}" / f"{method.name}.safetensors")
            images, _ = _images(ctx, method, path)
            is_ref = reference is None
            reference = images if is_ref else reference
            q, _ = quality(images, reference, labels, is_reference=is_ref)
            psnr = "ref" if is_ref else f"{q['psnr']:.2f}"
            print(f"| {method.name} | {method.full_steps()} | {psnr} | {q['ssim']:.4f} | {q['fid_to_full']:.4f} | "
                  f"{q['fid_fmnist']:.3f} | {q['class_accuracy']:.3f} | {time.perf_counter() - start:.0f} |",
                  flush=True)
        for name, message in refused:
            print(f"| {name} | - | refused: {message} | | | | | |")


if __name__ == "__main__":
    main()
