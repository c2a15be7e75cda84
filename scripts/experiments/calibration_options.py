"""Held-out PSNR of teacher-forced linear fits with other options (history K, bias, per-channel, ridge), for one
schedule, from one recording of calibration trajectories (what docs/design.md "Calibrated forecasting" quotes).

Calibration: ``--images`` images of classes 0-9, noise seed 1000 (batches of 8); evaluation: ``--eval-images``
images, seed 0, DDIM-50, CFG 1.5; PSNR to full compute of the same seed.

    python scripts/experiments/calibration_options.py --schedule 0,2,5,10,20,31,38,46
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from taylorseer.api import apply
from taylorseer.calibration import (
    FitOptions,
    calibration_labels,
    fit_linear,
    new_header,
    record_trajectories,
    save_calibration,
)
from taylorseer.eval import metrics
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample
from taylorseer.policy.schedule import FixedSchedule

OPTIONS = {"K=4, per channel (default)": FitOptions(), "K=4 + bias": FitOptions(bias=True),
           "K=4, ridge 1e-3": FitOptions(ridge=1e-3), "K=3": FitOptions(history=3), "K=2": FitOptions(history=2),
           "K=4, one weight per anchor": FitOptions(channelwise=False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", required=True, help="comma-separated full steps of 50")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference()
    schedule = FixedSchedule(tuple(int(s) for s in args.schedule.split(",")), 50)
    labels = torch.arange(args.eval_images) % 10
    reference = sample(model, labels, seed=0)
    stats = record_trajectories(model, calibration_labels(args.images), seed=1000, progress=False)
    print(f"schedule {list(schedule.full_steps)}, {args.images} calibration images (seed 1000), {args.eval_images} "
          f"held-out images (seed 0), teacher-forced fits\n")
    print("| fit options | fit relative L2 error | held-out PSNR dB |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(OPTIONS.items()):
            table, error = fit_linear(stats, schedule.full_steps, options)
            cal = save_calibration(f"{tmp}/{i}.safetensors", new_header("linear", name, model, schedule), table)
            with apply(model, cal.cache_config()) as handle:
                images = sample(model, labels, seed=0, listener=handle)
            print(f"| {name} | {error['rel_error']:.4f} | {float(metrics.psnr(images, reference)):.2f} |", flush=True)


if __name__ == "__main__":
    main()
