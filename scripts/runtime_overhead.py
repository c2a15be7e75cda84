"""CPU time and FLOPs of full compute and TaylorSeer on the embedded model: efficiency (CPU-time speedup / FLOPs
speedup) per granularity, for comparing two checkouts of the runtime.

CPU time (``time.process_time``) of one process is much less sensitive than wall time to other jobs on a shared
machine; the methods run interleaved over ``--rounds`` rounds and the minimum is kept. The FLOPs speedup of each
method is counted once (``handle.count_flops``). Run it once per checkout:

    python scripts/runtime_overhead.py                       # this checkout
    git worktree add /tmp/old d68c9aa && python scripts/runtime_overhead.py /tmp/old/src
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", nargs="?", help="another checkout's src/ to import taylorseer from")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
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
        for _ in range(args.rounds):
            for name, config in configs.items():
                start = time.process_time()
                if config is None:
                    sample(model, labels, num_steps=args.steps)
                else:
                    with taylorseer.apply(model, config) as handle:
                        sample(model, labels, num_steps=args.steps, listener=handle)
                cpu[name].append(time.process_time() - start)
    full = min(cpu["full"])
    for name, times in cpu.items():
        speedup = full / min(times)
        print(f"{name:30s} CPU {min(times):6.3f} s   speedup {speedup:5.2f}x   FLOPs {flops[name]:5.2f}x   "
              f"efficiency {speedup / flops[name]:.3f}")


if __name__ == "__main__":
    main()
