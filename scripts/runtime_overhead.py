"""CPU time of full compute and TaylorSeer on the embedded model, for comparing two checkouts of the runtime.

CPU time (``time.process_time``) of one process is much less sensitive than wall time to other jobs on a shared
machine; the methods run interleaved over 3 rounds and the minimum is kept. Run it once per checkout:

    python scripts/runtime_overhead.py                       # this checkout
    git worktree add /tmp/old d68c9aa && python scripts/runtime_overhead.py /tmp/old/src
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> None:
    if len(sys.argv) > 1:
        sys.path.insert(0, sys.argv[1])  # another checkout's src/
    import taylorseer
    from taylorseer import TaylorSeerConfig
    from taylorseer.models.pretrained import load_reference
    from taylorseer.models.sampler import sample

    torch.set_num_threads(1)
    taylorseer.tune_cpu_allocator()
    print(f"taylorseer from {taylorseer.__file__}")
    model, labels = load_reference(), torch.arange(16) % 10
    configs = {"full": None,
               "O=2, N=5": TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2),
               "O=1, N=5": TaylorSeerConfig(interval=5, warmup_steps=2, max_order=1),
               "O=2, N=5, reference": TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, scheme="reference")}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(3):
        for name, config in configs.items():
            start = time.process_time()
            if config is None:
                sample(model, labels, num_steps=50)
            else:
                with taylorseer.apply(model, config) as handle:
                    sample(model, labels, num_steps=50, listener=handle)
            cpu[name].append(time.process_time() - start)
    full = min(cpu["full"])
    for name, times in cpu.items():
        print(f"{name:24s} CPU {min(times):6.3f} s   speedup {full / min(times):.2f}x")


if __name__ == "__main__":
    main()
