"""What each way of cheapening the schedule search costs, on one recording: calibrations of the embedded DiT for
TaylorSeer O=2 on the model output (the shipped method) at ``--budget`` of ``--steps``, one per variant, each with
its cost (model calls x batch, full image steps, projected FLUX.1-dev H100 minutes) and its search-image PSNR.

Variants (all on the same ``--images`` recorded trajectories, noise seed 1000):
  fast             the default search (``calibrate(search="fast")``)
  fast-4img        the same on 4 search images
  8img-full        8 search images, the thorough refinement (200 candidates, no early stop)
  proxy-greedy     no sampled candidate: the greedy schedule on the recording's fit proxy (cost: the recording)
Held-out quality is measured afterwards by ``scripts/calibration_eval.py`` on the written files (images and seeds
disjoint from these: evaluation seeds 0.., calibration seeds 1000..).

    OMP_NUM_THREADS=1 python scripts/experiments/calibration_cost.py --out /work/runs/calcost/cost --images 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from taylorseer.calibration import record_trajectories
from taylorseer.calibration.calibrate import (
    DEFAULT_SEED,
    FLUX_H100_SECONDS_PER_IMAGE_CALL,
    calibrate,
    calibration_cost,
    calibration_labels,
)
from taylorseer.calibration.io import new_header, save_calibration
from taylorseer.forecast import TaylorForecast
from taylorseer.models.pretrained import load_reference
from taylorseer.parts import CacheConfig
from taylorseer.policy import FixedSchedule

VARIANTS = {
    "fast": {"search": "fast"},
    "fast-4img": {"search": "fast", "search_images": 4},
    "8img-full": {"search": "thorough", "search_images": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=16, help="recorded calibration images")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--variants", default=",".join([*VARIANTS, "proxy-greedy"]))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_reference()
    forecaster = TaylorForecast(max_order=2)
    stats = record_trajectories(model, calibration_labels(args.images), num_steps=args.steps, seed=DEFAULT_SEED,
                                guidance_scale=1.5, cfg_mode="batch", granularity="output", progress=False)
    rows = []
    greedy = None
    for name in args.variants.split(","):
        path = args.out / f"{name}-b{args.budget}-s{args.steps}.safetensors"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        if name == "proxy-greedy":
            if greedy is None:
                raise SystemExit("proxy-greedy needs a searched variant before it (its greedy pass)")
            schedule = FixedSchedule(tuple(greedy), args.steps, name=name)
            searched_with = CacheConfig(FixedSchedule((0,), 1), forecaster).to_dict()["forecaster"]
            cost = calibration_cost(stats, None, 0)
            header = new_header("schedule", name, model, schedule, granularity="output",
                                forecaster={"searched_with": searched_with},
                                calibration_data={"images": stats.images, "cost": cost})
            save_calibration(path, header)
            search: dict = {"evaluations": 0, "model_calls": 0, "full_calls": 0, "psnr_db": None}
        else:
            cal = calibrate(model, args.budget, path, num_steps=args.steps, stats=stats, forecaster=forecaster,
                            granularity="output", name=name, progress=False, **VARIANTS[name])
            search, cost = cal.header["search"], cal.header["calibration_data"]["cost"]
            schedule = cal.schedule
            greedy = search["greedy_steps"]
        rows.append({"variant": name, "full_steps": list(schedule.full_steps), "seconds": time.perf_counter() - start,
                     "sampled_candidates": search["model_calls"] // args.steps - (1 if search["model_calls"] else 0),
                     "search_model_calls": search["model_calls"], "search_full_calls": search["full_calls"],
                     "search_psnr_db": search["psnr_db"], "cost": cost, "file": str(path)})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out / "cost.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"| variant | full steps | sampled candidates | image calls | full image steps | FLUX.1-dev H100 min "
          f"(x {FLUX_H100_SECONDS_PER_IMAGE_CALL:.3f} s) | search-image PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cost"]
        psnr = "-" if r["search_psnr_db"] is None else f"{r['search_psnr_db']:.2f}"
        print(f"| {r['variant']} | {r['full_steps']} | {r['sampled_candidates']} | {c['image_calls']} | "
              f"{c['full_image_steps']} | {c['flux_dev_1024_h100_minutes']} | {psnr} |")


if __name__ == "__main__":
    main()
