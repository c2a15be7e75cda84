"""Cost of one forecast step relative to one full step of the embedded DiT (batch 100, 1 thread by default).

    python scripts/profile_forecast_step.py

Prints the median wall time of a full model call and of a forecast call, and their ratio, for module granularity
with and without block shortcuts and for block-residual granularity (O = 2, divided). Ratios from one process.

``--python``: the library's own time per target on a forecast step of a tiny DiT (``DiT-FM-T/4`` with 6 blocks,
12 module targets, batch 1, 1 thread), where the tensor work is small: every target's installed forward called once
with the arguments it gets in the model (captured from a plain call), as on a forecast step, minus the same calls of
stubs that return a precomputed tensor, divided by the number of targets (CPU time of the thread,
``time.thread_time``: robust to other jobs on the machine); the host time of the step context itself
(``handle.step`` open and close), per step; and the batched pass's tensor ops alone (the same foreach calls on the
same factors, timed after each step). Each is the median (``--quantile``) over the forecast steps. ``--src DIR`` imports
taylorseer from another checkout's ``src/`` (before/after comparisons).

``--ops``: also the cost of the forecast arithmetic alone, for one module target's feature ([batch, tokens,
channels] float32): the learned linear forecast of K = 4 anchors as ``LinearForecaster`` computes it (one multiply,
three fused multiply-adds with per-channel weights), three plain in-place adds of the same tensors (no weights),
and one copy of a feature; each with the bytes it moves and the rate. When the weighted forecast runs at the rate
of the plain adds, the forecast is bound by memory bandwidth, not by its arithmetic.
"""

import argparse
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", action="store_true", help="the library's time per target (tiny model)")
    parser.add_argument("--src", help="import taylorseer from this checkout's src/")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quantile", type=float, default=0.5,
                        help="--python: which quantile of the per-step times (0.5: the median; a low one, e.g. 0.1, "
                             "is steadier on a loaded machine, where other jobs only add time)")
    parser.add_argument("--ops", action="store_true", help="also time the forecast arithmetic alone")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    torch.set_num_threads(args.threads)
    if args.python:
        _python(max(args.repeats, 200), args.quantile)
        return
    import taylorseer
    from taylorseer.models.pretrained import load_reference

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


def _median(times: list[float], quantile: float = 0.5) -> float:
    return sorted(times)[min(int(len(times) * quantile), len(times) - 1)]


def _python(repeats: int, quantile: float = 0.5) -> None:
    """The library's time per target on a forecast step of a tiny DiT (see the module docstring)."""
    from diffusers import DiTTransformer2DModel

    import taylorseer
    from taylorseer.models.reference import DIT_MODELS

    print(f"taylorseer from {taylorseer.__file__}")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_MODELS["DiT-FM-T/4"](), "num_layers": 6}).eval().requires_grad_(False)
    x, y = torch.randn(1, 1, 16, 16), torch.tensor([3])

    def call(t: float) -> torch.Tensor:
        return model(x, timestep=torch.full((1,), t), class_labels=y).sample

    # interval 47: steps 3-48 forecast, step 49 computed (a longer interval is switched off at 50 steps)
    config = taylorseer.TaylorSeerConfig(interval=47, warmup_steps=3, max_order=2)
    with torch.no_grad():
        handle = taylorseer.apply(model, config)
        paths = [t.path for t in handle.targets]
        handle.remove()
        captured: dict[str, tuple] = {}  # each target's (args, kwargs, output) in a plain call
        hooks = [model.get_submodule(p).register_forward_hook(
            lambda m, a, k, o, p=p: captured.__setitem__(p, (a, k, o)), with_kwargs=True) for p in paths]
        call(500.0)
        for hook in hooks:
            hook.remove()
        handle = taylorseer.apply(model, config)
        wrappers = [(model.get_submodule(p).forward, *captured[p][:2]) for p in paths]
        stubs = [((lambda *a, o=captured[p][2], **k: o), *captured[p][:2]) for p in paths]
        hooked, stub, context, ops = [], [], [], []
        clock = time.thread_time
        while len(hooked) < repeats:  # generations of 50 steps: 3 full, then 46 forecast steps (the last is full)
            handle.begin(50)
            for i in range(3):
                with handle.step(i):
                    call(999.0 - 20 * i)
            for step in range(3, 49):  # one forecast step = every target called once, in model order
                t0 = clock()
                with handle.step(step):
                    if step == 3:
                        entries = handle.engine.store.entries.values()
                        columns = [list(c) for c in zip(*[e.states[0].factors for e in entries])]
                    t1 = clock()
                    for forward, args, kwargs in wrappers:
                        forward(*args, **kwargs)
                    t2 = clock()
                t3 = clock()
                hooked.append(t2 - t1)
                context.append(t1 - t0 + t3 - t2)
                start = clock()
                for forward, args, kwargs in stubs:
                    forward(*args, **kwargs)
                stub.append(clock() - start)
                start = clock()  # the batched pass's tensor work alone: one foreach call per term, same factors
                out = torch._foreach_add(columns[0], columns[1], alpha=0.5)
                for column in columns[2:]:
                    torch._foreach_add_(out, column, alpha=0.25)
                ops.append(clock() - start)
        forecasts = handle.stats.steps_forecast
        handle.remove()
    t = _median(ops, quantile)
    h, s, c = _median(hooked, quantile), _median(stub, quantile), _median(context, quantile)
    n = len(paths)
    print(f"{n} targets, {forecasts} forecast steps per generation: the targets' calls on a forecast step take "
          f"{h * 1e6:.1f} us with the handle (stubs returning a ready tensor: {s * 1e6:.1f} us) -> "
          f"{(h - s) / n * 1e6:.2f} us per target, batched forecast included; the step context (handle.step open "
          f"and close, the policy's decision) {c * 1e6:.1f} us per step -> {(h - s + c) / n * 1e6:.2f} us per "
          f"target in all, of which the forecast's tensor ops {t / n * 1e6:.2f} us and Python "
          f"{(h - s + c - t) / n * 1e6:.2f} us")


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
