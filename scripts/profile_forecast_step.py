"""Cost of one forecast step relative to one full step of the embedded DiT (batch 100, 1 thread by default).

    python scripts/profile_forecast_step.py

Prints the median wall time of a full model call and of a forecast call, and their ratio, for module granularity
with and without block shortcuts and for block-residual granularity (O = 2, divided). Ratios from one process.

``--ops``: also the cost of the forecast arithmetic alone, for one module target's feature ([batch, tokens,
channels] float32): the learned linear forecast of K = 4 anchors as ``LinearForecaster`` computes it (one multiply,
three fused multiply-adds with per-channel weights), three plain in-place adds of the same tensors (no weights),
and one copy of a feature; each with the bytes it moves and the rate. When the weighted forecast runs at the rate
of the plain adds, the forecast is bound by memory bandwidth, not by its arithmetic.
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
    parser.add_argument("--ops", action="store_true", help="also time the forecast arithmetic alone")
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
    if args.ops:
        _ops(model, args.batch, args.repeats)


def _ops(model: torch.nn.Module, batch: int, repeats: int) -> None:
    """The forecast arithmetic of one module target, alone (see the module docstring)."""
    size = model.config.sample_size // model.config.patch_size
    channels = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(1)
    anchors = [torch.randn(2, batch // 2 * size * size, channels, generator=g) for _ in range(4)]
    weights = [torch.randn(2, 1, channels, generator=g) for _ in range(4)]
    mb = anchors[0].numel() * 4 / 2**20

    def linear() -> None:
        out = torch.mul(anchors[0], weights[0])
        for a, w in zip(anchors[1:], weights[1:]):
            out.addcmul_(a, w)

    def adds() -> None:
        out = anchors[0].clone()
        for a in anchors[1:]:
            out.add_(a)

    def copy() -> None:
        anchors[0].clone()

    for name, fn, moved in (("linear K=4 (mul + 3 addcmul_)", linear, 1 + 1 + 3 * 3),
                            ("3 plain add_ after a copy", adds, 2 + 3 * 3), ("one copy", copy, 2)):
        times = []
        for _ in range(max(repeats, 5) * 10):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        t = sorted(times)[len(times) // 2]
        print(f"{name:32s} {t * 1e6:8.1f} us  {moved * mb:5.1f} MB moved  {moved * mb / 1024 / t:5.1f} GB/s  "
              f"(feature {list(anchors[0].shape)}, {mb:.2f} MB)")


if __name__ == "__main__":
    main()
