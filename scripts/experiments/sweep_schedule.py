"""How the warm-up length and the abscissa change forecast fidelity on the embedded model (docs/design.md).

For each interval N and warm-up W, samples with FORA (O=0) and TaylorSeer O=1, 2 (divided differences) and prints
the PSNR (dB) of each against the full-compute images of the same seeds, with the number of full steps.

    python scripts/experiments/sweep_schedule.py --per-class 2 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from taylorseer import TaylorSeerConfig, apply
from taylorseer.eval.metrics import psnr
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample
from taylorseer.policy.interval import IntervalPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--intervals", default="5,6")
    parser.add_argument("--warmups", default="1,2,3,4,5")
    parser.add_argument("--abscissae", default="step,sigma")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=None, help="an exported reference file instead of the shipped one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference(args.weights)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    full = sample(model, labels, num_steps=args.steps, seed=0)
    columns = [(0, "step")] + [(o, a) for o in (1, 2) for a in args.abscissae.split(",")]
    print(f"PSNR (dB) vs full compute, {len(labels)} images, DDIM-{args.steps}, CFG 1.5\n")
    print("| N | warm-up | full steps | pattern (first 16) | " + " | ".join(f"O{o} {a}" for o, a in columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    for n in map(int, args.intervals.split(",")):
        for w in map(int, args.warmups.split(",")):
            cells = []
            for order, abscissa in columns:
                cfg = TaylorSeerConfig(interval=n, warmup_steps=w, max_order=order, abscissa=abscissa)
                with apply(model, cfg) as handle:
                    images = sample(model, labels, num_steps=args.steps, seed=0, listener=handle)
                cells.append(f"{psnr(images, full):.2f}")
            pattern = IntervalPolicy.from_config(cfg).pattern(args.steps)
            print(f"| {n} | {w} | {cfg.full_steps(args.steps)} | `{pattern[:16]}` | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
