"""Guidance cache (FasterCache's CFG cache) next to TaylorSeer at equal model compute, on the shipped model.

Rows: full compute; the guidance cache alone (both CFG branches every N steps after 2 warm-up steps, the
conditional branch only in between, the guidance difference reused or extrapolated linearly); TaylorSeer O2 from
the bench grid and at the guidance cache's exact costs (interval 2 with a longer warm-up); TaylorSeer with the
guidance cache (``cfg_mode="split"``: both branches on every k-th TaylorSeer full step after the warm-up, the
conditional one only on the others) next to the plain TaylorSeer interval of equal cost.

``units``: model evaluations in full-step equivalents (a CFG branch computed counts 0.5, a forecast 0), out of
the steps. ``FLOPs speedup``: full compute's FLOPs over the method's, counted by ``torch.utils.flop_counter``
(the bench's ``count_flops``) on the first ``--flop-images`` images (FLOPs are linear in the batch). PSNR and
FID are to the full-compute images (``taylorseer.eval.metrics``); FID-FMNIST to the Fashion-MNIST test set.

    python scripts/experiments/guidance_cache_eval.py --images 200 --seed 0
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from taylorseer import TaylorSeerConfig
from taylorseer.eval import metrics
from taylorseer.eval.bench import Method, RunContext, default_grid, run_method
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample
from taylorseer.parts import parts_of
from taylorseer.policy import GuidanceCache, IntervalPolicy

WARMUP = 2  # the bench grid's TaylorSeer warm-up, used for the guidance cache too


@dataclass
class Row:
    """One measured method: what to install, how to sample, its cost in full-step units."""

    method: Method
    cache: GuidanceCache | None
    cfg_mode: str
    units: float
    label: str


def _units(num_steps: int, ts_plan: list[bool] | None, gc_plan: list[bool] | None) -> float:
    """Full-step equivalents: per step 0.5 for the conditional branch if computed, 0.5 for the unconditional."""
    total = 0.0
    for i in range(num_steps):
        full = ts_plan is None or ts_plan[i]
        both = gc_plan is None or gc_plan[i]
        total += 0.5 * full + 0.5 * (full and both)
    return total


def _ts(interval: int, warmup: int, steps: int) -> Method:
    name = f"ts-O2-N{interval}-divided" + ("" if warmup == WARMUP else f"-w{warmup}")
    config = TaylorSeerConfig(interval=interval, warmup_steps=warmup, max_order=2, scheme="divided", name=name)
    return Method(name, parts_of(config), steps)


def _rows(steps: int) -> list[Row]:
    grid = {m.name: m for m in default_grid(num_steps=steps)}
    full = grid["full"]
    rows = [Row(full, None, "batch", float(steps), "full"),
            Row(full, None, "split", float(steps), "full (cfg split)")]
    costs = []
    for interval in (2, 3, 5):
        for estimate in ("reuse", "linear"):
            cache = GuidanceCache(interval=interval, warmup_steps=WARMUP, estimate=estimate)
            rows.append(Row(full, cache, "batch", cache.cost(steps), f"gc-N{interval}-{estimate}"))
        costs.append(cache.cost(steps))
    for cost in costs:  # TaylorSeer O2, interval 2, with the warm-up that makes its cost equal
        warmup = next(w for w in range(steps + 1) if w + (steps - w) // 2 >= cost)
        method = _ts(2, warmup, steps)
        if any(r.label == method.name for r in rows):
            continue
        rows.append(Row(method, None, "batch", float(method.full_steps() or 0), method.name))
    for name in ("ts-O2-N2-divided", "ts-O2-N3-divided", "ts-O2-N4-divided"):
        method = grid[name]
        rows.append(Row(method, None, "batch", float(method.full_steps() or 0), name))
    for interval, every in ((2, 3), (3, 2)):  # equal in cost to ts-O2-N3 and ts-O2-N4
        method = grid[f"ts-O2-N{interval}-divided"]
        config = method.cache_config()
        assert isinstance(config, TaylorSeerConfig)
        ts_plan = IntervalPolicy.from_config(config).plan(steps)
        full_steps = [i for i, f in enumerate(ts_plan) if f]
        both = tuple(full_steps[:WARMUP] + full_steps[WARMUP::every])
        for estimate in ("reuse", "linear"):
            cache = GuidanceCache(both_steps=both, estimate=estimate)
            rows.append(Row(method, cache, "split", _units(steps, ts_plan, cache.plan(steps)),
                            f"{method.name} + gc-every{every}-{estimate}"))
    return rows


def _sampler(cache: GuidanceCache | None) -> Callable[..., torch.Tensor]:
    return sample if cache is None else functools.partial(sample, guidance_cache=cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--flop-images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated row labels (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference()
    labels = torch.arange(args.images) % 10
    rows = _rows(args.steps)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        rows = [rows[0]] + [r for r in rows[1:] if r.label in wanted]
    print(f"\n{args.images} images (labels i % 10), seed {args.seed}, DDIM-{args.steps}, CFG {args.cfg_scale}, "
          f"{torch.get_num_threads()} torch thread(s)\n")
    print("| method | cfg | units | FLOPs speedup | PSNR dB | FID to full | FID-FMNIST | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    reference, full_flops = None, None
    for row in rows:
        def context(count: int, row: Row = row) -> RunContext:
            return RunContext(model, _sampler(row.cache), labels[:count], args.seed, args.cfg_scale, row.cfg_mode)

        flops = run_method(context(args.flop_images), row.method, labels[:args.flop_images], count=True).flops
        run = run_method(context(args.images), row.method, labels)
        full_flops = flops if full_flops is None else full_flops
        if reference is None:
            reference = run.images
            psnr, fid = "ref", "0"
        else:
            psnr = f"{metrics.psnr(run.images, reference):.2f}"
            fid = f"{metrics.fid_between(run.images, reference):.4f}"
        speedup = f"{full_flops / flops:.2f}x" if flops and full_flops else "?"
        print(f"| {row.label} | {row.cfg_mode} | {row.units:g} | {speedup} | {psnr} | {fid} | "
              f"{metrics.fid_fmnist(run.images):.3f} | {run.wall_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
