"""Which part of the schedule moves a cached method's images away from full compute in the classifier's feature
space? Forecast only inside one window of steps (computing every step outside it) and measure the pixel RMSE and the
shift of the mean classifier feature against full compute (docs/design.md, "FID-FMNIST at scale").

    python scripts/experiments/forecast_windows.py --images 200 --order 2 --windows 6-11,26-46,46-50
"""

from __future__ import annotations

import argparse

import torch

import taylorseer
from taylorseer.eval.metrics import classifier_features
from taylorseer.models.pretrained import load_reference
from taylorseer.models.reference import NUM_CLASSES
from taylorseer.models.sampler import sample


class WindowPlan:
    """The interval schedule inside ``[lo, hi)``; every step outside it is computed in full."""

    def __init__(self, base, lo: int, hi: int) -> None:
        self.base, self.lo, self.hi = base, lo, hi

    def plan(self, num_steps: int) -> list[bool]:
        return [full or not self.lo <= i < self.hi for i, full in enumerate(self.base.plan(num_steps))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--order", type=int, default=2)
    parser.add_argument("--abscissa", default="step")
    parser.add_argument("--windows", default="0-50,6-11,26-46,46-50", help="comma-separated lo-hi step windows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, labels = load_reference(), torch.arange(args.images) % NUM_CLASSES
    full = sample(model, labels, num_steps=50, guidance_scale=1.5, seed=0)
    full_mean = classifier_features(full).mean(0)
    config = taylorseer.TaylorSeerConfig(interval=5, warmup_steps=2, max_order=args.order, abscissa=args.abscissa,
                                         scheme="reference" if args.order == 0 else "divided")
    for lo, hi in (tuple(int(v) for v in w.split("-")) for w in args.windows.split(",")):
        with taylorseer.apply(model, config) as handle:
            handle.policy = WindowPlan(handle.policy, lo, hi)
            images = sample(model, labels, num_steps=50, guidance_scale=1.5, seed=0, listener=handle)
            steps = handle.stats.steps_full
        shift = float((classifier_features(images).mean(0) - full_mean).norm())
        rmse = float((images - full).pow(2).mean().sqrt())
        print(f"forecast only in steps [{lo}, {hi}): {steps} full steps, pixel RMSE {rmse:.4f}, "
              f"mean-feature shift {shift:.4f}", flush=True)


if __name__ == "__main__":
    main()
