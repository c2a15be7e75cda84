"""The per-tensor costs our hot-path docs quote, on one [32, 64, 128] factor (the embedded DiT's module output at
batch 32), back to back in cache, 1 thread, ``tune_cpu_allocator()``, medians of ``--repeats`` alternating calls:

- ``torch._foreach_norm`` of order 1 against order 2 (the finiteness check's norm; float32 accumulation), on a
  float32 and a bfloat16 factor;
- an out-of-place add ``input + r`` against the in-place ``r.add_(input)`` (the block residual's add, float32);
- one Taylor update of order 2 (``taylor.update`` with a full state: two subtractions and two divisions).

Experiment code:

    python scripts/experiments/elementwise_micro.py --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import taylorseer
from taylorseer.forecast import taylor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    taylorseer.tune_cpu_allocator()
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(32, 64, 128, generator=g) for _ in range(2))
    x16 = x.to(torch.bfloat16)
    state = taylor.TaylorState.empty()
    for point in (0.0, 1.0, 2.0):
        state = taylor.update(state, torch.randn(32, 64, 128, generator=g), point, 2)
    feature = torch.randn(32, 64, 128, generator=g)
    cases: dict[str, Callable[[], object]] = {
        "foreach_norm L1, float32": lambda: torch._foreach_norm([x], 1, dtype=torch.float32),
        "foreach_norm L2, float32": lambda: torch._foreach_norm([x], 2, dtype=torch.float32),
        "foreach_norm L1, bfloat16": lambda: torch._foreach_norm([x16], 1, dtype=torch.float32),
        "foreach_norm L2, bfloat16": lambda: torch._foreach_norm([x16], 2, dtype=torch.float32),
        "add, out of place (x + r)": lambda: x + r,
        "add, in place (r.add_(x))": lambda: r.add_(x),
        "Taylor update, order 2": lambda: taylor.update(state, feature, 3.0, 2),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # warm-up
        for fn in cases.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, one [32, 64, 128] tensor, 1 thread, medians of {args.repeats} alternating calls")
    for name, values in times.items():
        print(f"{name:28s} {statistics.median(values) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
