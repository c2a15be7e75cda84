"""Which refinement order and early stop the fast plan should use: on one recording (16 images, noise seed 1000),
the fast plan's variants search a schedule for TaylorSeer O=2 on the model output; each prints its schedule, its
sampled candidates and its PSNR on the 8 search images (the search's own objective, no held-out image).

    OMP_NUM_THREADS=1 python scripts/experiments/fast_search_moves.py --model flux --out /work/runs/lead/moves
    OMP_NUM_THREADS=1 python scripts/experiments/fast_search_moves.py --model dit --out /work/runs/lead/moves
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from taylorseer.calibration import record_trajectories
from taylorseer.calibration.calibrate import DEFAULT_SEED, calibrate, calibration_labels
from taylorseer.calibration.search import SEARCH_PLANS
from taylorseer.forecast import TaylorForecast

VARIANTS = {
    "random-p12": {"moves": "random", "patience": 12},
    "random-none": {"moves": "random", "patience": None},
    "nearest-none": {"moves": "nearest", "patience": None},
    "nearest-p14": {"moves": "nearest", "patience": 14},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["dit", "flux"], default="flux")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "flux":
        from taylorseer.eval.flux import FluxSampler
        from taylorseer.models.flux_pipeline import load_flux_reference

        ref = load_flux_reference()
        model, sampler, guidance, cfg_mode = ref.transformer, FluxSampler(ref), 2.0, "split"
    else:
        from taylorseer.models.pretrained import load_reference

        model, sampler, guidance, cfg_mode = load_reference(), None, 1.5, "batch"
    base = SEARCH_PLANS["fast"]
    stats = record_trajectories(model, calibration_labels(base.images), num_steps=args.steps, seed=DEFAULT_SEED,
                                guidance_scale=guidance, cfg_mode=cfg_mode, sampler=sampler, progress=False,
                                granularity="output")
    for name in args.variants.split(","):
        SEARCH_PLANS[name] = dataclasses.replace(base, name=name, **VARIANTS[name])
        path = out / f"{args.model}-{name}-b{args.budget}-s{args.steps}.safetensors"
        cal = calibrate(model, args.budget, path, num_steps=args.steps, stats=stats, search=name, sampler=sampler,
                        guidance_scale=guidance, cfg_mode=cfg_mode, forecaster=TaylorForecast(max_order=2),
                        granularity="output", progress=False, name=f"{name}-b{args.budget}-s{args.steps}")
        search = cal.header["search"]
        row = {"model": args.model, "variant": name, "full_steps": search["full_steps"],
               "search_psnr_db": search["psnr_db"], "sampled": len(search["trace"]),
               "model_calls": search["model_calls"],
               "h100_min": cal.header["calibration_data"]["cost"]["flux_dev_1024_h100_minutes"]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
