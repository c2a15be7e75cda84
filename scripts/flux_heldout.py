"""Held-out quality of methods on the flow-matching reference: PSNR to full compute over many images.

    python scripts/flux_heldout.py --steps 28 --images 500 --methods ts-O2-N6-output,fora-N6 \
        --calibration docs/results/flux/calibration/ts2-output-b6-s28.safetensors --out docs/results/flux/heldout.jsonl

Methods are named as in ``taylorseer bench --model flux`` (``eval.flux.flux_grid``, plus the methods of each
``--calibration`` file, and ``anchor1@NAME`` for each ``--anchored`` file: the hybrid with anchored weights). The
noise seed (default 5000) is disjoint from the bench's (0), the calibrations' (1000+), the anchored search's dev
images (3000) and the model card's (2000): these images were seen by no search or fit. Images are generated in
batches of ``--batch`` (the seed of batch k is ``seed + k``); full compute runs once per step count. One JSON line
per method: PSNR (dB, on all images at once), class accuracy, FID-FMNIST, FID to full, FLOPs fraction from one
counted image.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from taylorseer.api import apply
from taylorseer.calibration.anchor_fit import anchored_config
from taylorseer.eval import metrics
from taylorseer.eval.bench import calibrated_methods, schedule_companions
from taylorseer.eval.flux import FluxSampler, flux_grid
from taylorseer.eval.methods import Method
from taylorseer.models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference
from taylorseer.runtime.measure import count_flops


def _generate(sampler: FluxSampler, method, labels: torch.Tensor, seed: int, scale: float, batch: int):
    images = []
    for k, start in enumerate(range(0, len(labels), batch)):
        chunk = labels[start:start + batch]
        if method is None or method.config is None:
            steps = method.num_steps if method is not None else None
            images.append(sampler(sampler.ref.transformer, chunk, num_steps=steps, guidance_scale=scale,
                                  seed=seed + k))
        else:
            with apply(sampler.ref.transformer, method.cache_config()) as handle:
                images.append(sampler(sampler.ref.transformer, chunk, num_steps=method.num_steps,
                                      guidance_scale=scale, seed=seed + k, listener=handle))
    return torch.cat(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--cfg-scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--methods", required=True, help="comma-separated method names")
    parser.add_argument("--calibration", action="append", default=[])
    parser.add_argument("--anchored", action="append", default=[],
                        help="an anchored calibration (scripts/flux_anchor.py): method anchor1@NAME, the hybrid with "
                             "its fitted anchored weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSONL file, appended to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_flux_reference()
    sampler = FluxSampler(ref)
    grid = {m.name: m for m in flux_grid(args.steps)}
    for path in args.calibration:
        grid.update({m.name: m for m in calibrated_methods(path, ref.transformer, args.steps,
                                                          guidance_scale=args.cfg_scale, cfg_mode="split")})
    grid.update({m.name: m for m in schedule_companions(list(grid.values()))})  # anchor1@..., spectrum-fc@...
    for path in args.anchored:
        config = anchored_config(path)
        grid[f"anchor1@{config.name}"] = Method(f"anchor1@{config.name}", config, args.steps)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in grid]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {sorted(grid)}")
    labels = torch.arange(args.images) % 10
    start = time.perf_counter()
    full = _generate(sampler, grid["full"], labels, args.seed, args.cfg_scale, args.batch)
    full_flops = count_flops(lambda: _generate(sampler, grid["full"], labels[:1], 0, args.cfg_scale, 1))[1]
    full_row = {"model": "flux", "steps": args.steps, "method": "full", "images": args.images, "seed": args.seed,
                "cfg_scale": args.cfg_scale, "full_steps": args.steps, "psnr": None, "flops_fraction": 1.0,
                "flops_speedup": 1.0, "class_accuracy": round(metrics.class_accuracy(full, labels), 4),
                "fid_fmnist": round(metrics.fid_fmnist(full), 3), "fid_to_full": 0.0,
                "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(full_row), flush=True)
    with open(args.out, "a", encoding="utf-8") as out:
        out.write(json.dumps(full_row) + "\n")
        for name in names:
            method = grid[name]
            start = time.perf_counter()
            images = _generate(sampler, method, labels, args.seed, args.cfg_scale, args.batch)
            flops = count_flops(lambda m=method: _generate(sampler, m, labels[:1], 0, args.cfg_scale, 1))[1]
            row = {"model": "flux", "steps": args.steps, "method": name, "images": args.images, "seed": args.seed,
                   "cfg_scale": args.cfg_scale, "full_steps": method.full_steps(),
                   "psnr": round(metrics.psnr(images, full), 3),
                   "flops_fraction": round(flops / full_flops, 4), "flops_speedup": round(full_flops / flops, 3),
                   "class_accuracy": round(metrics.class_accuracy(images, labels), 4),
                   "fid_fmnist": round(metrics.fid_fmnist(images), 3),
                   "fid_to_full": round(metrics.fid_between(images, full), 4),
                   "seconds": round(time.perf_counter() - start, 1)}
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
