"""Calibrate the anchored hybrid on the flow-matching reference: record, search a schedule, fit, save.

    python scripts/flux_anchor.py --steps 50 --budget 5 --images 64 \
        --out docs/results/flux/calibration/anchor1-b5-s50.safetensors

1. Record full-compute block-residual trajectories of ``--images`` calibration images (noise seeds ``--seed``,
   ``--seed + 1``, ... per batch of 8; default 1000) with ``transformer_blocks.0`` (the first double-stream block,
   the hybrid's k=1 probe) as the anchor: every other block's Gram is over its own trajectory and the anchor's.
2. Search the ``--budget`` full steps: each candidate schedule is fitted in closed form (``fit_anchored``) and run as
   the hybrid (``AnchorSchedule(full, probe_blocks=1)`` + ``AnchoredLinearForecast``) on ``--dev-images`` images of
   noise seed ``--dev-seed`` (default 3000: disjoint from the calibration seeds, the bench's 0 and the held-out
   5000); PSNR to full compute of those images. Start: the best of a few spread schedules; then moves of one full
   step by +-1, 2, 4 while they improve, up to ``--evals`` candidates.
3. Fit the chosen schedule and write the file (the ``LinearForecast`` file format; header ``forecaster.anchor``).

Measure it on held-out images with ``scripts/flux_heldout.py --anchored FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from taylorseer.api import apply
from taylorseer.calibration.anchor_fit import anchored_config, fit_anchored, save_anchored
from taylorseer.calibration.fit import FitOptions
from taylorseer.calibration.record import TrajectoryStats, record_trajectories
from taylorseer.eval import metrics
from taylorseer.eval.flux import FluxSampler
from taylorseer.models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference

ANCHOR = "transformer_blocks.0"


def spread(budget: int, num_steps: int, power: float) -> tuple[int, ...]:
    """``budget`` full steps from 0, spaced as ``(i / budget) ** power`` of the steps (denser early for power > 1)."""
    steps = sorted({0, *(round((num_steps - 1) * (i / budget) ** power) for i in range(1, budget))})
    return tuple(steps)


def save_stats(path: str, stats: TrajectoryStats) -> None:
    """The recorded Grams (safetensors) and the other fields (JSON metadata), to fit again without recording."""
    meta = {k: v for k, v in vars(stats).items() if k != "gram"}
    names = sorted(stats.gram)
    save_file({f"g{i}": stats.gram[n].contiguous() for i, n in enumerate(names)}, path,
              {"stats": json.dumps({**meta, "groups": names})})


def load_stats(path: str) -> TrajectoryStats:
    """``save_stats``'s file read back."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})["stats"])
        gram = {n: f.get_tensor(f"g{i}") for i, n in enumerate(meta.pop("groups"))}
    return TrajectoryStats(gram=gram, **meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budget", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--dev-images", type=int, default=16)
    parser.add_argument("--dev-seed", type=int, default=3000)
    parser.add_argument("--history", type=int, default=3, help="own cached features per forecast (K)")
    parser.add_argument("--anchor-history", type=int, default=1, help="the anchor's cached features (M)")
    parser.add_argument("--no-match-variance", action="store_true")
    parser.add_argument("--evals", type=int, default=60)
    parser.add_argument("--schedule", default="", help="comma-separated full steps: skip the search")
    parser.add_argument("--name", default="")
    parser.add_argument("--stats", default="", help="a file of the recorded Grams: read if it exists, else written")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = load_flux_reference()
    sampler = FluxSampler(ref)
    options = FitOptions(history=args.history, match_variance=not args.no_match_variance)
    start = time.perf_counter()
    if args.stats and os.path.exists(args.stats):
        stats = load_stats(args.stats)
        print(f"read the trajectories of {stats.images} images from {args.stats}", flush=True)
    else:
        labels = torch.arange(args.images) % 10
        stats = record_trajectories(ref.transformer, labels, num_steps=args.steps, seed=args.seed,
                                    guidance_scale=DEFAULT_GUIDANCE, cfg_mode="split", batch_size=8,
                                    sampler=sampler, granularity="block", anchor=ANCHOR, progress=False)
        print(f"recorded {args.images} images in {time.perf_counter() - start:.0f} s", flush=True)
        if args.stats:
            save_stats(args.stats, stats)
    dev_labels = torch.arange(args.dev_images) % 10
    dev_full = sampler(ref.transformer, dev_labels, num_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                       seed=args.dev_seed)
    tmp = tempfile.mkdtemp(prefix="flux_anchor_")
    seen: dict[tuple[int, ...], float] = {}

    def evaluate(full: tuple[int, ...]) -> float:
        if full in seen:
            return seen[full]
        table, error = fit_anchored(stats, full, options, args.anchor_history)
        path = os.path.join(tmp, f"c{len(seen)}.safetensors")
        save_anchored(path, stats, table, error, ref.transformer, name="candidate", options=options,
                      anchor_history=args.anchor_history)
        with apply(ref.transformer, anchored_config(path)) as handle:
            images = sampler(ref.transformer, dev_labels, num_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                             seed=args.dev_seed, listener=handle)
        seen[full] = psnr = float(metrics.psnr(images, dev_full))
        print(json.dumps({"full_steps": list(full), "dev_psnr": round(psnr, 3), "fit": error}), flush=True)
        return psnr

    if args.schedule:
        best = tuple(int(s) for s in args.schedule.split(","))
        evaluate(best)
    else:
        best = max((spread(args.budget, args.steps, p) for p in (1.0, 1.3, 1.6, 2.0)), key=evaluate)
        improved = True
        while improved and len(seen) < args.evals:
            improved = False
            for i in range(1, len(best)):
                for delta in (1, -1, 2, -2, 4, -4):
                    cand = sorted(set(best[:i] + (best[i] + delta,) + best[i + 1:]))
                    if len(cand) != len(best) or cand[-1] >= args.steps or cand[i] <= 0 or len(seen) >= args.evals:
                        continue
                    if evaluate(tuple(cand)) > seen[best]:
                        best, improved = tuple(cand), True
    table, error = fit_anchored(stats, best, options, args.anchor_history)
    search = {"method": "coordinate moves on dev PSNR", "dev_images": args.dev_images, "dev_seed": args.dev_seed,
              "candidates": len(seen), "dev_psnr": round(seen[best], 3)}
    name = args.name or os.path.splitext(os.path.basename(args.out))[0]
    cal = save_anchored(args.out, stats, table, error, ref.transformer, name=name, options=options,
                        anchor_history=args.anchor_history, search=search)
    print(json.dumps({"out": args.out, "sha256": cal.sha256, "full_steps": list(best), "fit": error, **search,
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
