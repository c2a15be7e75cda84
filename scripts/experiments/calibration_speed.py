"""Wall-clock vs FLOPs speedup of calibrated methods next to fixed-interval TaylorSeer of the same full steps.

The learned linear forecaster is one multiply-add per anchor (K <= 4), the same number of tensor passes as a Taylor
forecast of order K - 1, so its wall speedup should be as close to its FLOPs speedup as Taylor's is. Each method's
FLOPs are counted once (``torch.utils.flop_counter``); then the methods run interleaved for ``--rounds`` rounds
(1 torch thread, the allocator tuned as the bench does) and the median wall time and the minimum CPU time are kept.
Ratios are full compute's over the method's, measured in the same process. The model's calls are timed too
(forward hooks on the model): the median full call, the median forecast call as a share of the full-compute
run's median call, and the wall speedup those two predict, ``50 / (F + (50 - F) * share)`` for F full steps
(what remains is the sampler's own time).

    python scripts/experiments/calibration_speed.py --calibration docs/results/calibration/cal-b8-s50.safetensors \\
        --calibration docs/results/calibration/cal-b6-s50.safetensors --baselines ts-O2-N7-divided,ts-O2-N10-divided
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import taylorseer
from taylorseer.eval.bench import Method, calibrated_methods, default_grid, installer_for, machine_facts
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample
from taylorseer.runtime.measure import count_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", action="append", default=[], help="calibration file (repeatable)")
    p.add_argument("--baselines", default="ts-O2-N7-divided", help="comma-separated bench grid method names")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--with-taylor2", action="store_true", help="also each file's '-taylor2' method (its schedule with "
                   "Taylor O=2 instead of the fitted weights)")
    args = p.parse_args()
    torch.set_num_threads(1)
    taylorseer.tune_cpu_allocator()
    model, labels = load_reference(), torch.arange(args.images) % 10
    grid = {m.name: m for m in default_grid(num_steps=50)}
    methods: list[Method] = [grid["full"]] + [grid[n] for n in args.baselines.split(",") if n]
    for path in args.calibration:
        methods += [m for m in calibrated_methods(path, model, 50)
                    if args.with_taylor2 or not m.name.endswith("-taylor2")]

    calls: dict[str, list[float]] = {m.name: [] for m in methods}
    started: list[float] = []

    def before(module: torch.nn.Module, args: tuple) -> None:
        started.append(time.perf_counter())

    def run(method: Method, count: bool = False) -> tuple[float, float, int | None]:
        """One generation (install and removal not timed, as in the bench): wall s, CPU s, FLOPs if counted."""
        installed = installer_for(method)(model, method)

        def after(module: torch.nn.Module, args: tuple, output: object) -> None:
            if not count:
                calls[method.name].append(time.perf_counter() - started.pop())

        hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
        try:
            def call() -> torch.Tensor:
                return sample(installed.model, labels, num_steps=method.num_steps, seed=0,
                              listener=installed.listener)

            w0, c0 = time.perf_counter(), time.process_time()
            flops = count_flops(call)[1] if count else (call(), None)[1]
            return time.perf_counter() - w0, time.process_time() - c0, flops
        finally:
            for hook in hooks:
                hook.remove()
            started.clear()
            installed.remove()

    flops = {m.name: run(m, count=True)[2] for m in methods}
    wall: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu: dict[str, list[float]] = {m.name: [] for m in methods}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for m in methods:
            w, c, _ = run(m)
            wall[m.name].append(w)
            cpu[m.name].append(c)
    facts = machine_facts()
    print(f"{facts['date']}, {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}, 1 thread, "
          f"{args.images} images, DDIM-50, CFG 1.5, {args.rounds} interleaved rounds; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| method | full steps | FLOPs speedup | wall speedup (median) | wall / FLOPs | CPU speedup (min) | "
          "CPU / FLOPs | full call ms | forecast call / full | predicted wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    full_wall, full_cpu = statistics.median(wall["full"]), min(cpu["full"])
    full_call = statistics.median(calls["full"])
    for m in methods:
        f = (flops["full"] or 0) / (flops[m.name] or 1)
        w = full_wall / statistics.median(wall[m.name])
        c = full_cpu / min(cpu[m.name])
        n, k = m.num_steps, m.full_steps()
        # A run's calls in order: its k slowest per generation are its full steps.
        per_run = [calls[m.name][i:i + n] for i in range(0, len(calls[m.name]), n)]
        full_calls = [t for r in per_run for t in sorted(r)[n - k:]]
        forecast_calls = [t for r in per_run for t in sorted(r)[:n - k]]
        own_full = statistics.median(full_calls)
        share = statistics.median(forecast_calls) / full_call if forecast_calls else 0.0
        predicted = n / (k * own_full / full_call + (n - k) * share)
        print(f"| {m.name} | {k} | {f:.2f}x | {w:.2f}x | {w / f:.3f} | {c:.2f}x | {c / f:.3f} | {own_full * 1e3:.1f} | "
              f"{share:.3f} | {predicted:.2f}x |")


if __name__ == "__main__":
    main()
