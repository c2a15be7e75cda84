"""Does an on-policy score on the search images rank nearby schedules as a development set does?

For each candidate schedule (same calibration recording: 40 images, seed 1000): its teacher-forced search objective
(30 search images, as ``calibrate`` scores candidates), the search-image PSNR after the on-policy refit, and the
PSNR on a development set (``--dev-images`` images, seed 7, neither calibration nor test). PSNR is to full compute
of the same images (``taylorseer.eval.metrics.psnr``).

    python scripts/experiments/calibration_neighbours.py --budget 6 --plain 0,3,8,18,31,43 0,3,8,18,32,43 0,3,9,20,32,43

(``--plain``: plain least squares, the fit before variance matching became the default; the committed log
docs/results/calibration/logs/evals/rerank6.log was made that way.)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

import taylorseer
from taylorseer.calibration import FitOptions, calibrate, calibration_labels, record_trajectories
from taylorseer.calibration.search import SampledObjective
from taylorseer.eval.metrics import psnr
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample
from taylorseer.policy import FixedSchedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("schedules", nargs="+", help="candidate schedules, comma-separated full steps of 50")
    p.add_argument("--dev-images", type=int, default=200)
    p.add_argument("--plain", action="store_true", help="plain least squares (no variance matching)")
    args = p.parse_args()
    torch.set_num_threads(1)
    taylorseer.tune_cpu_allocator()
    model = load_reference()
    options = FitOptions(match_variance=not args.plain)
    stats = record_trajectories(model, calibration_labels(40), num_steps=50, seed=1000, progress=False)
    objective = SampledObjective(model, stats, images=30, options=options)
    dev_labels = torch.arange(args.dev_images) % 10
    dev_full = sample(model, dev_labels, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(args.schedules):
            start = time.perf_counter()
            steps = tuple(int(s) for s in text.split(","))
            teacher = objective.evaluate(steps)
            cal = calibrate(model, args.budget, f"{tmp}/{i}.safetensors", schedule=FixedSchedule(steps, 50),
                            stats=stats, options=options, progress=False)
            with taylorseer.apply(model, cal.cache_config()) as handle:
                search = sample(model, objective.labels, seed=objective.seed, listener=handle)
            with taylorseer.apply(model, cal.cache_config()) as handle:
                dev = sample(model, dev_labels, seed=7, listener=handle)
            print(f"{steps} search TF {10 * math.log10(4 / teacher):.2f} dB  search on-policy "
                  f"{psnr(search, objective.reference):.2f} dB  dev {psnr(dev, dev_full):.2f} dB  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
