"""Wall time, CPU time and FLOPs of full compute and TaylorSeer on the embedded model: efficiency (wall speedup /
FLOPs speedup, and CPU-time speedup / FLOPs speedup) per granularity, for comparing two checkouts of the runtime.

The issue's measure is wall time on a quiet machine. CPU time (``time.process_time``) of one process is much less
sensitive than wall time to other jobs on a shared machine, so both are printed. The methods run interleaved over
``--rounds`` rounds (full, A, B, ..., full, A, B, ...) and the median of each is kept. The FLOPs speedup of each
method is counted once (``handle.count_flops``). Run it once per checkout:

    python scripts/runtime_overhead.py                       # this checkout
    git worktree add /tmp/old d68c9aa && python scripts/runtime_overhead.py /tmp/old/src
"""

from __future__ import annotations

import argparse
import sys
import time
from statistics import median

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", nargs="?", help="another checkout's src/ to import taylorseer from")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: per-step CPU time of one generation (batch 32, 3 rounds, medians) at module, "
                             "block and output granularity against pure full compute, split into full and forecast "
                             "steps")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    import taylorseer
    from taylorseer import TaylorSeerConfig
    from taylorseer.models.pretrained import load_reference
    from taylorseer.models.sampler import sample

    torch.set_num_threads(1)
    taylorseer.tune_cpu_allocator()
    print(f"taylorseer from {taylorseer.__file__}")
    if args.breakdown:
        for granularity in ("module", "block", "output"):
            _breakdown(taylorseer, load_reference(), granularity, args.steps)
        return
    model, labels = load_reference(), torch.arange(args.images) % 10
    configs = {"full": None}
    for granularity in ("module", "block", "output"):
        configs[f"O=2, N=5, {granularity}"] = TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2,
                                                                 granularity=granularity)
    configs["O=2, N=5, module, reference"] = TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2,
                                                               scheme="reference")
    flops: dict[str, float] = {"full": 1.0}
    with torch.no_grad():
        for name, config in configs.items():
            if config is not None:
                with taylorseer.apply(model, config) as handle, handle.count_flops():
                    sample(model, labels[:2], num_steps=args.steps, listener=handle)
                flops[name] = handle.stats.flops_speedup or float("nan")
        cpu: dict[str, list[float]] = {name: [] for name in configs}
        wall: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, config in configs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                if config is None:
                    sample(model, labels, num_steps=args.steps)
                else:
                    with taylorseer.apply(model, config) as handle:
                        sample(model, labels, num_steps=args.steps, listener=handle)
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
    full_wall, full_cpu = median(wall["full"]), median(cpu["full"])
    for name in configs:
        w, c = full_wall / median(wall[name]), full_cpu / median(cpu[name])
        print(f"{name:30s} wall {median(wall[name]):6.3f} s  speedup {w:5.2f}x  efficiency {w / flops[name]:.3f}   "
              f"CPU {median(cpu[name]):6.3f} s  speedup {c:5.2f}x  efficiency {c / flops[name]:.3f}   "
              f"FLOPs {flops[name]:5.2f}x")


def _breakdown(taylorseer, model, granularity: str, steps: int, batch: int = 32) -> None:
    """Per-step thread CPU time of a method's generation and of pure full compute on the same inputs (medians of 3
    rounds, interleaved): the method's full steps against the same steps of full compute (the recording's cost),
    and its forecast steps as a fraction of a full step."""
    x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y, points = torch.arange(batch) % 11, [999 - 20 * i for i in range(steps)]
    config = taylorseer.TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, granularity=granularity)
    pure: list[list[float]] = [[] for _ in range(steps)]
    method: list[list[float]] = [[] for _ in range(steps)]
    clock = time.thread_time
    with torch.no_grad():
        for _ in range(3):
            for i in range(steps):
                start = clock()
                model(x, timestep=torch.full((batch,), float(points[i])), class_labels=y)
                pure[i].append(clock() - start)
            with taylorseer.apply(model, config) as handle:
                plan = handle.plan(steps)
                handle.begin(steps)
                for i in range(steps):
                    start = clock()
                    with handle.step(i):
                        model(x, timestep=torch.full((batch,), float(points[i])), class_labels=y)
                    method[i].append(clock() - start)
    p, m = [median(v) for v in pure], [median(v) for v in method]
    full_p = sum(t for t, full in zip(p, plan) if full)
    full_m = sum(t for t, full in zip(m, plan) if full)
    fore_m = sum(t for t, full in zip(m, plan) if not full)
    n_full = sum(plan)
    print(f"{granularity}: {n_full} full / {steps - n_full} forecast steps; full steps {full_p * 1e3:.0f} ms pure, "
          f"{full_m * 1e3:.0f} ms with the method (+{(full_m / full_p - 1) * 100:.1f} %); a forecast step "
          f"{fore_m / (steps - n_full) * 1e3:.2f} ms = {fore_m / (steps - n_full) / (full_p / n_full):.3f} of a full "
          f"step; CPU speedup {sum(p) / sum(m):.2f}x")


if __name__ == "__main__":
    main()
