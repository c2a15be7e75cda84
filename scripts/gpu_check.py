"""GPU check of the hot path: a FLUX-dev-sized transformer, full compute vs our methods vs diffusers' hooks.

    python scripts/gpu_check.py            # a CUDA device: FLUX.1-dev widths, bf16, 28 steps at 1024x1024
    python scripts/gpu_check.py --tiny     # anywhere (CPU): small widths, the same code path (tests run this)

The model is diffusers' ``FluxTransformer2DModel`` at FLUX.1-dev's widths (hidden 3072 = 24 heads x 128, text
4096, pooled 768, 64 latent channels, guidance embedding) with few blocks (``--double`` 2, ``--single`` 4) and random
weights: the per-block work of the real model at 1024x1024 (4096 image + 512 text tokens), not its quality. A
28-step Euler flow-matching loop tells each step to the method (``handle.step``). Methods: full compute; our
TaylorSeer (FLUX preset: warm-up 3, interval 6, order 1) at module, block and output granularity; diffusers'
TaylorSeer hooks on the same modules and schedule (``integrations.peers``). Modes: eager; regional
``torch.compile`` (each block); ``mode="reduce-overhead"`` (CUDA graphs) where the device has them. Under compile on
CUDA the runtime binds the factors and forecast weights in buffers at fixed addresses (``state.StaticFactors``), so
CUDA graphs replay without copying them in.

Printed per (mode, method): wall time of a generation (median of ``--repeats`` after a warm-up generation),
speedup over full compute in the same mode, FLOPs speedup (``torch.utils.flop_counter``, one eager generation),
efficiency (wall speedup / FLOPs speedup), peak memory, and host syncs in one generation: on CUDA the
synchronizing calls that ``torch.cuda.set_sync_debug_mode("warn")`` reports, on the CPU the
``aten._local_scalar_dense`` / ``aten.is_nonzero`` ops a ``TorchDispatchMode`` sees (eager only); plus the
library's deliberate reads (``engine.host_reads``: batched finiteness flags, at most one per full step). Runs stop
being started once ``--budget`` seconds have passed (default 420: the whole check stays under 8 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import taylorseer  # noqa: E402
from taylorseer import TaylorSeerConfig  # noqa: E402

SIZES = {  # FluxTransformer2DModel arguments, image and text tokens
    "dev": {"model": {"patch_size": 1, "in_channels": 64, "num_attention_heads": 24, "attention_head_dim": 128,
                      "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                      "axes_dims_rope": (16, 56, 56)}, "image": 4096, "text": 512},
    "tiny": {"model": {"patch_size": 1, "in_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16,
                       "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
                       "axes_dims_rope": (4, 6, 6)}, "image": 64, "text": 8},
}
PRESET = {"interval": 6, "warmup_steps": 3, "max_order": 1}  # the paper's FLUX.1-dev preset


def build(size: str, double: int, single: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, Callable]:
    """The model and ``velocity(x, sigma)`` with fixed random text conditioning."""
    from diffusers import FluxTransformer2DModel

    spec = SIZES[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **spec["model"])
    model = model.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device="cpu").manual_seed(1)
    text = torch.randn(1, spec["text"], spec["model"]["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, spec["model"]["pooled_projection_dim"], generator=g).to(device, dtype)
    side = int(spec["image"] ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    img_ids, txt_ids = img_ids.reshape(-1, 3).to(device), torch.zeros(spec["text"], 3, device=device)
    guidance = torch.full((1,), 3.5, device=device)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((1,), sigma, device=device, dtype=dtype)
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

    return model, velocity


def generate(velocity: Callable, listener: Any, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler flow matching from sigma 1 to 0, each step told to ``listener`` (None: nothing told)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = x0.clone()
    if listener is not None:
        listener.begin(steps)
    for i in range(steps):
        context = listener.step(i, sigmas[i] * 1000, sigmas[i]) if listener is not None else contextlib.nullcontext()
        with context:
            v = velocity(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def methods(model: Any) -> list[tuple[str, Callable[[], Any]]]:
    """(name, install) pairs: install returns the listener (with ``remove``) or None for full compute."""
    from taylorseer.integrations.peers import adapter_regexes, apply_diffusers_taylorseer

    out: list[tuple[str, Callable[[], Any]]] = [("full", lambda: None)]
    for granularity in ("module", "block", "output"):
        config = TaylorSeerConfig(granularity=granularity, **PRESET)
        out.append((f"ours {granularity}", lambda c=config: taylorseer.apply(model, c)))
    out.append(("diffusers hooks", lambda: apply_diffusers_taylorseer(
        model, PRESET["interval"], PRESET["warmup_steps"], PRESET["max_order"], adapter_regexes(model))))
    return out


def blocks(model: Any) -> list[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


@contextlib.contextmanager
def compiled(model: Any, mode: str) -> Iterator[None]:
    """Regional ``torch.compile`` of every block (``mode``: None or ``"reduce-overhead"``), undone afterwards."""
    for block in blocks(model):
        block.compile(mode=mode)
    try:
        yield
    finally:
        for block in blocks(model):
            block._compiled_call_impl = None
        torch._dynamo.reset()


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """``aten._local_scalar_dense`` / ``aten.is_nonzero`` ops (``.item()``, ``bool()`` of a tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if str(func) in ("aten._local_scalar_dense.default", "aten.is_nonzero.default"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_syncs(run: Callable[[], Any], device: torch.device, eager: bool) -> int | None:
    """Host syncs in one generation (see the module docstring); None where not counted."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    if not eager:
        run()
        return None
    with SyncCounter() as counter:
        run()
    return counter.count


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median wall seconds of ``repeats`` generations, peak memory GiB) after one untimed generation."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small widths on the CPU (or --device)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no new run starts")
    parser.add_argument("--modes", default="eager,compiled,reduce-overhead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(1)
    size = "tiny" if args.tiny else "dev"
    model, velocity = build(size, args.double, args.single, device, dtype)
    spec = SIZES[size]
    x0 = torch.randn(1, spec["image"], spec["model"]["in_channels"], generator=torch.Generator().manual_seed(2))
    x0 = x0.to(device, dtype)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_check {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {card}, torch "
          f"{torch.__version__}, {size} widths, {args.double} double + {args.single} single blocks, {dtype}, "
          f"{args.steps} steps, {spec['image']} + {spec['text']} tokens")
    runs = methods(model)
    flops: dict[str, float] = {}
    from torch.utils.flop_counter import FlopCounterMode

    for name, install in runs:  # FLOPs of one eager generation per method
        listener = install()
        try:
            with FlopCounterMode(display=False) as counter:
                generate(velocity, listener, x0, args.steps)
        finally:
            if listener is not None:
                listener.remove()
        flops[name] = counter.get_total_flops()
    rows: list[dict] = []
    header = (f"{'mode':16s} {'method':16s} {'wall s':>8s} {'speedup':>8s} {'FLOPs x':>8s} {'effic.':>7s} "
              f"{'peak GiB':>8s} {'syncs':>6s} {'reads':>6s}")
    print(header)
    for mode in args.modes.split(","):
        if mode == "reduce-overhead" and device.type != "cuda":
            print(f"{mode:16s} skipped: CUDA graphs need a CUDA device")
            continue
        full_wall = None
        for name, install in runs:
            if time.perf_counter() - started > args.budget:
                print(f"{mode:16s} {name:16s} not run: --budget {args.budget:.0f} s reached")
                continue
            row: dict[str, Any] = {"mode": mode, "method": name}
            listener = install()
            try:
                context = contextlib.nullcontext() if mode == "eager" else compiled(
                    model, None if mode == "compiled" else mode)
                with context:
                    run = lambda listener=listener: generate(velocity, listener, x0, args.steps)  # noqa: E731
                    wall, peak = timed(run, device, args.repeats)
                    engine = getattr(listener, "engine", None)
                    if engine is not None:
                        engine.host_reads = 0
                    syncs = count_syncs(run, device, eager=mode == "eager")
                reads = engine.host_reads if engine is not None else None  # one generation's deliberate reads
            except Exception as error:  # report and go on: one mode failing must not hide the others
                print(f"{mode:16s} {name:16s} failed: {type(error).__name__}: {str(error)[:200]}")
                continue
            finally:
                if listener is not None:
                    listener.remove()
            full_wall = wall if name == "full" else full_wall
            speedup = (full_wall / wall) if full_wall else float("nan")
            flops_x = flops["full"] / flops[name]
            row.update(wall_s=wall, speedup=speedup, flops_speedup=flops_x, efficiency=speedup / flops_x,
                       peak_gib=peak, syncs=syncs, host_reads=reads)
            rows.append(row)
            print(f"{mode:16s} {name:16s} {wall:8.3f} {speedup:8.2f} {flops_x:8.2f} {speedup / flops_x:7.3f} "
                  f"{peak:8.2f} {'-' if syncs is None else syncs:>6} {'-' if reads is None else reads:>6}")
    print(f"# {time.perf_counter() - started:.0f} s in all")
    return rows


if __name__ == "__main__":
    main()
