"""An idea measured and not adopted: the Taylor update writing its new differences into the retired state's memory
(``torch.sub(..., out=old)``, the same bits, no allocation) against new tensors (the runtime). The thread CPU time
spent inside ``FactorStore.record`` over a generation of the embedded DiT (batch 32, DDIM-50, O=2, N=5, 1 thread),
the two alternating within ``ROUNDS`` rounds, medians. The recycling update lives here only (patched over
``TaylorForecaster.update``; its images equal the runtime's to the bit, checked below). With ``--untuned`` glibc's
allocator keeps its defaults instead of ``taylorseer.tune_cpu_allocator()``, which every timing of ours applies.
Experiment code:

    python scripts/experiments/recycle_ab.py 9 module,block
    python scripts/experiments/recycle_ab.py 9 module,block --untuned
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from forecast_floor import setup, timed_generation  # this folder (run as a script)

import taylorseer
import taylorseer.forecast.taylor as taylor
from taylorseer.forecast.base import FactorState
from taylorseer.runtime.state import FactorStore

RUNTIME_UPDATE = taylor.TaylorForecaster.update


def recycling_update(self: taylor.TaylorForecaster, state: FactorState, feature: torch.Tensor, point: float, *,
                     keep_history: bool = True, factor_dtype: torch.dtype | None = None) -> FactorState:
    """``taylor.update`` (divided scheme, no factor dtype) with difference 1 written into the dropped old[O] and
    difference i + 1 >= 2 into old[i], its own input; the feature (factor 0) is the caller's and never written.
    Valid here because the store drops the old state on every record (nothing else holds it in this experiment)."""
    order, old = self.config.max_order, state.factors if keep_history else ()
    if factor_dtype is not None or self.config.scheme != "divided" or len(old) <= order:
        return RUNTIME_UPDATE(self, state, feature, point, keep_history=keep_history, factor_dtype=factor_dtype)
    points = state.points
    new = [feature]
    for i in range(order):
        spare = old[i] if i else old[order]
        new.append(torch.sub(new[i], old[i], out=spare).div_(point - points[i]))
    return FactorState(tuple(new), ((point,) + tuple(points))[: order + 1])


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rounds = int(args[0]) if args else 9
    grans = args[1].split(",") if len(args) > 1 else ["module", "block"]
    model, x, y, points = setup(tune="--untuned" not in sys.argv)
    real_record = FactorStore.record
    spent: list[float] = []

    def timed_record(self: FactorStore, *a: object, **k: object) -> object:
        start = time.thread_time()
        try:
            return real_record(self, *a, **k)  # type: ignore[arg-type]
        finally:
            spent.append(time.thread_time() - start)

    def generation(granularity: str, recycle: bool, outputs: list | None = None) -> None:
        taylor.TaylorForecaster.update = recycling_update if recycle else RUNTIME_UPDATE  # type: ignore[method-assign]
        config = taylorseer.TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, granularity=granularity)
        try:
            timed_generation(model, config, x, y, points, outputs)
        finally:
            taylor.TaylorForecaster.update = RUNTIME_UPDATE  # type: ignore[method-assign]

    FactorStore.record = timed_record  # type: ignore[method-assign]
    results: dict[tuple, list[float]] = {}
    with torch.no_grad():
        for granularity in grans:  # the same bits (the last step's model output)
            last: list[torch.Tensor] = []
            generation(granularity, True, last)
            generation(granularity, False, last)
            assert torch.equal(*last), granularity
        for r in range(rounds):
            for granularity in grans:
                for recycle in ((True, False) if r % 2 else (False, True)):
                    spent.clear()
                    generation(granularity, recycle)
                    results.setdefault((granularity, recycle), []).append(sum(spent))
    FactorStore.record = real_record  # type: ignore[method-assign]
    tuned = "untuned allocator" if "--untuned" in sys.argv else "tune_cpu_allocator()"
    print(f"torch {torch.__version__}, {tuned}, {rounds} rounds; thread CPU time in FactorStore.record per "
          f"generation (the same bits: checked)")
    for granularity in grans:
        new, old = (statistics.median(results[(granularity, flag)]) for flag in (True, False))
        print(f"{granularity:6s} recycled {new * 1e3:7.1f} ms   new tensors {old * 1e3:7.1f} ms   "
              f"ratio {new / old:.3f}")


if __name__ == "__main__":
    main()
