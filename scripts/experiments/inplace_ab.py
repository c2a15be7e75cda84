"""Before/after of e8189b8 in one process: fresh forecasts written in place and the L2 finiteness norm ("new")
against the out-of-place adds and the L1 norm ("old", restored by patching ``writable`` to refuse and the norm's
order to 1). Embedded DiT, batch 32, DDIM-50, O=2, N=5, 1 thread; thread CPU time per step, the variants alternating
in order within each of ``ROUNDS`` rounds; medians. The images of both variants are equal to the bit (tested in
tests/runtime/test_inplace_forecasts.py); only the time differs. Experiment code:

    python scripts/experiments/inplace_ab.py 7 module,block
"""

from __future__ import annotations

import statistics
import sys

import torch
from forecast_floor import setup, timed_generation  # this folder (run as a script)

import taylorseer
import taylorseer.adapters.shortcuts as shortcuts
import taylorseer.runtime.state as state


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    grans = sys.argv[2].split(",") if len(sys.argv) > 2 else ["module", "block"]
    model, x, y, points = setup()
    real_writable, real_norm = state.writable, torch._foreach_norm

    def old_norm(tensors, ord=2, dtype=None):  # noqa: A002, ANN001, ANN202
        return real_norm(tensors, 1, dtype=dtype)

    def variant(name: str) -> None:
        old = name == "old"
        state.writable = shortcuts.writable = (lambda *a: False) if old else real_writable
        torch._foreach_norm = old_norm if old else real_norm

    res: dict[tuple, list] = {}
    with torch.no_grad():
        for r in range(rounds):
            for gran in grans:
                for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    variant(name)
                    config = taylorseer.TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, granularity=gran)
                    plan, times = timed_generation(model, config, x, y, points)
                    full = sum(t for t, computed in zip(times, plan) if computed)
                    fore = sum(t for t, computed in zip(times, plan) if not computed)
                    res.setdefault((gran, name), []).append((full, fore, full + fore, len(plan) - sum(plan)))
    variant("new")
    for gran in grans:
        o, n = res[(gran, "old")], res[(gran, "new")]

        def med(v: list, k: int) -> float:
            return statistics.median(t[k] for t in v)

        forecasts = o[0][3]
        print(f"{gran}: full steps old {med(o, 0) * 1e3:.0f} ms new {med(n, 0) * 1e3:.0f} ms; a forecast step old "
              f"{med(o, 1) / forecasts * 1e3:.2f} ms new {med(n, 1) / forecasts * 1e3:.2f} ms; generation old "
              f"{med(o, 2) * 1e3:.0f} ms new {med(n, 2) * 1e3:.0f} ms (new/old {med(n, 2) / med(o, 2):.3f}; per round "
              f"{[round(b[2] / a[2], 3) for a, b in zip(o, n)]})")


if __name__ == "__main__":
    main()
