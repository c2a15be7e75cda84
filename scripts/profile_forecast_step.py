"""Cost of one forecast step relative to one full step of the embedded DiT (batch 100, 1 thread by default).

    python scripts/profile_forecast_step.py

Prints the median wall time of a full model call and of a forecast call, and their ratio, for module granularity
with and without block shortcuts and for block-residual granularity (O = 2, divided). Ratios from one process.
"""

import argparse
import time

import torch

import taylorseer
from taylorseer.models.pretrained import load_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_reference()
    size = model.config.sample_size
    x = torch.randn(args.batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(args.batch) % 11

    def call(t: int) -> torch.Tensor:
        return model(x, timestep=torch.full((args.batch,), t), class_labels=y).sample

    with torch.no_grad():
        for granularity, shortcuts in (("module", False), ("module", True), ("block", True)):
            cfg = taylorseer.TaylorSeerConfig(interval=1000, warmup_steps=3, max_order=2, granularity=granularity,
                                              block_shortcuts=shortcuts)
            with taylorseer.apply(model, cfg) as handle:
                handle.begin(None)
                for i in range(3):
                    with handle.step(i, 999 - 20 * i):
                        call(999 - 20 * i)
                full, fore = [], []
                for r in range(args.repeats):  # interleaved
                    start = time.perf_counter()
                    call(500)
                    full.append(time.perf_counter() - start)
                    with handle.step(3 + r):
                        start = time.perf_counter()
                        call(900 - r)
                        fore.append(time.perf_counter() - start)
            f, g = sorted(full)[len(full) // 2], sorted(fore)[len(fore) // 2]
            print(f"{granularity:6s} shortcuts={shortcuts!s:5s} full {f * 1e3:7.1f} ms  forecast {g * 1e3:6.1f} ms  "
                  f"ratio {g / f:.3f}")


if __name__ == "__main__":
    main()
