"""Where a method's full steps spend their extra time (embedded DiT, batch 32, DDIM-50, O=2, N=5, 1 thread): the full
steps of pure full compute against the method as shipped (``real``), the method with the Taylor update made free
(every factor a reference to the feature: no arithmetic; the finiteness norm and the bookkeeping stay), with
nothing recorded at all (``no-record``: no factors, no norm), and with the same recording deferred to the step's end
(``deferred``: the same operations on the same tensors after the model's forward, so the model's own work is not
interleaved with the updates; not what the runtime does). Thread CPU time of the full steps from step 6 on (the
ones every variant shares), medians over ``ROUNDS`` interleaved rounds. Experiment code:

    python scripts/experiments/record_cost.py 5 module,block
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from forecast_floor import setup, timed_generation  # this folder (run as a script)

import taylorseer
import taylorseer.forecast.taylor as taylor
import taylorseer.runtime.engine as engine

VARIANTS = ("real", "free-update", "no-record", "deferred")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    grans = sys.argv[2].split(",") if len(sys.argv) > 2 else ["module", "block"]
    model, x, y, points = setup()
    real_update, real_record = taylor.update, engine.Engine._record

    def free_update(state, feature, point, max_order, scheme="divided", keep_history=True,  # noqa: ANN001, ANN202
                    factor_dtype=None):
        kept = state.points if keep_history else ()
        n = min(max_order, len(state.factors) if keep_history else 0) + 1
        return taylor.TaylorState(tuple([feature] * n), ((point,) + tuple(kept))[:max_order + 1])

    real_close = engine.Engine.close
    pending: list[tuple] = []

    def deferred_record(self: engine.Engine, *args: object) -> None:
        pending.append((self, args))

    def deferred_close(self: engine.Engine) -> None:
        while pending:
            owner, args = pending.pop(0)
            real_record(owner, *args)
        real_close(self)

    def variant(name: str) -> None:
        taylor.update = free_update if name == "free-update" else real_update
        engine.Engine._record = {"no-record": lambda self, *a: None,  # type: ignore[method-assign]
                                 "deferred": deferred_record}.get(name, real_record)
        engine.Engine.close = deferred_close if name == "deferred" else real_close  # type: ignore[method-assign]

    results: dict[object, list] = {}
    plan: list[bool] = []
    with torch.no_grad():
        for _ in range(rounds):
            pure = []
            for point in points:
                start = time.thread_time()
                model(x, timestep=torch.full((x.shape[0],), float(point)), class_labels=y)
                pure.append(time.thread_time() - start)
            results.setdefault("pure", []).append(pure)
            for granularity in grans:
                for name in VARIANTS:
                    variant(name)
                    try:
                        config = taylorseer.TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2,
                                                             granularity=granularity)
                        plan, times = timed_generation(model, config, x, y, points)
                    finally:
                        variant("real")
                    results.setdefault((granularity, name), []).append(times)
    full = [i for i, computed in enumerate(plan) if computed and i >= 6]

    def total(runs: list) -> float:
        return statistics.median(sum(t[i] for i in full) for t in runs)

    pure_total = total(results["pure"])
    print(f"torch {torch.__version__}, {rounds} rounds; full steps {full}: pure {pure_total * 1e3:.0f} ms")
    for granularity in grans:
        for name in VARIANTS:
            t = total(results[(granularity, name)])
            print(f"{granularity:6s} {name:12s} {t * 1e3:.0f} ms  (+{(t / pure_total - 1) * 100:.1f} % over pure; "
                  f"+{(t - pure_total) / len(full) * 1e3:.2f} ms per full step)")


if __name__ == "__main__":
    main()
