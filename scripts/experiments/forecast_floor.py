"""How far a faster forecast could take the wall/FLOPs efficiency on this machine: the forecast steps' time with
the library's forecast made free, against the real one (embedded DiT, batch 32, DDIM-50, O=2, N=5, 1 thread).

Per granularity and variant, one generation's steps are timed with the thread's CPU clock, interleaved over
``--rounds`` rounds (medians), against pure full compute on the same inputs:

- ``real``: the method as shipped;
- ``free``: the batched forecast pass hands out tensors made once before the timed steps (no arithmetic), and at
  block granularity the residual add is skipped (the block returns its input); what remains of a forecast step is
  the model's own work that no forecast removes (embeddings, the output layer, and at module granularity the
  blocks' gates and residual adds) and the library's host work. The images are wrong; only the time counts.

Printed per granularity: the measured efficiency (pure generation time / method's / FLOPs speedup), and the bound
with the full steps at pure full compute's time (no recording cost) and the forecast steps at their ``real`` or
``free`` time: with ``free``, what an infinitely fast forecast and recording would reach here. Experiment code
(argparse and loading boilerplate as in the other scripts):

    python scripts/experiments/forecast_floor.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import taylorseer
from taylorseer.forecast import base
from taylorseer.models.pretrained import load_reference
from taylorseer.runtime import targets


def setup(batch: int = 32, steps: int = 50, tune: bool = True) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor,
                                                                         list[float]]:
    """One torch thread, the tuned allocator (``tune=False``: glibc's defaults), the embedded DiT, ``batch`` noise
    images (seed 0), labels and the DDIM-50 timesteps: the inputs every experiment of this folder on the hot path
    times."""
    torch.set_num_threads(1)
    if tune:
        taylorseer.tune_cpu_allocator()
    x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return load_reference(), x, torch.arange(batch) % 11, [999.0 - 20 * i for i in range(steps)]


def timed_generation(model: torch.nn.Module, config: taylorseer.TaylorSeerConfig, x: torch.Tensor, y: torch.Tensor,
                     points: list[float], outputs: list | None = None) -> tuple[list[bool], list[float]]:
    """One generation's model calls under ``config`` with told steps: the plan (True = full step) and each step's
    thread CPU time in seconds (the last step's model output appended to ``outputs`` when given)."""
    times = []
    with taylorseer.apply(model, config) as handle:
        plan = handle.plan(len(points))
        handle.begin(len(points))
        for i, point in enumerate(points):
            start = time.thread_time()
            with handle.step(i):
                out = model(x, timestep=torch.full((x.shape[0],), float(point)), class_labels=y)
            times.append(time.thread_time() - start)
    if outputs is not None:
        outputs.append(out.sample)
    return plan, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    steps, batch = args.steps, args.batch
    model, x, y, points = setup(batch, steps)
    clock = time.thread_time
    real_run, real_residual = base.BatchPlan.run, targets.residual_leaves

    def config(granularity: str) -> taylorseer.TaylorSeerConfig:
        return taylorseer.TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, granularity=granularity)

    def call(i: int, rows: int = batch) -> None:
        model(x[:rows], timestep=torch.full((rows,), float(points[i])), class_labels=y[:rows])

    def generation(granularity: str, free: bool) -> tuple[list[bool], list[float]]:
        made: dict[int, list[torch.Tensor]] = {}

        def free_run(plan: base.BatchPlan, point: float) -> list[torch.Tensor]:
            if id(plan) not in made:  # once per plan (per full step): the forecast steps between reuse it
                made[id(plan)] = real_run(plan, point)
            return made[id(plan)]

        def free_residual(path, names, parameters, args, kwargs, leaves, constants):  # noqa: ANN001, ANN202
            return [args[0]]  # the block returns its input: no residual add

        base.BatchPlan.run = free_run if free else real_run  # type: ignore[method-assign]
        targets.residual_leaves = free_residual if free else real_residual
        try:
            plan, times = timed_generation(model, config(granularity), x, y, points)
        finally:
            base.BatchPlan.run = real_run  # type: ignore[method-assign]
            targets.residual_leaves = real_residual
        return plan, times

    grans = ("module", "block", "output")
    flops: dict[str, float] = {}
    results: dict[tuple, list] = {}
    with torch.no_grad():
        for granularity in grans:
            with taylorseer.apply(model, config(granularity)) as handle, handle.count_flops():
                handle.begin(steps)
                for i in range(steps):
                    with handle.step(i):
                        call(i, 2)
            flops[granularity] = handle.stats.flops_speedup or float("nan")
        for _ in range(args.rounds):
            pure = []
            for i in range(steps):
                start = clock()
                call(i)
                pure.append(clock() - start)
            results.setdefault(("pure",), []).append(pure)
            for granularity in grans:
                for free in (False, True):
                    results.setdefault((granularity, free), []).append(generation(granularity, free))
    pure_steps = [statistics.median(r[i] for r in results[("pure",)]) for i in range(steps)]
    full_step = statistics.median(pure_steps)
    print(f"torch {torch.__version__}, batch {batch}, {steps} steps, {args.rounds} rounds (medians); a pure full "
          f"step {full_step * 1e3:.1f} ms, a pure generation {sum(pure_steps):.3f} s (thread CPU time)")
    for granularity in grans:
        row = []
        for free in (False, True):
            runs = results[(granularity, free)]
            plan = runs[0][0]
            times = [statistics.median(r[1][i] for r in runs) for i in range(steps)]
            forecast = statistics.median(t for t, full in zip(times, plan) if not full)
            n_full, n_fore = sum(plan), steps - sum(plan)
            bound = (steps / flops[granularity]) / (n_full + n_fore * forecast / full_step)
            if free:
                row.append(f"free forecast: a forecast step {forecast * 1e3:.2f} ms ({forecast / full_step:.3f}), "
                           f"bound with free recording too {bound:.3f}")
            else:
                measured = sum(pure_steps) / sum(times) / flops[granularity]
                row.append(f"real: a forecast step {forecast * 1e3:.2f} ms ({forecast / full_step:.3f} of a full "
                           f"step), efficiency {measured:.3f} (with free recording {bound:.3f})")
        print(f"{granularity:6s} FLOPs {flops[granularity]:.2f}x | " + " | ".join(row))


if __name__ == "__main__":
    main()
