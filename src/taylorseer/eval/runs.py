"""Run one method once: install it, sample, uninstall; images, counted FLOPs and block calls, stats, times. Also
the quality metrics of a run against reference images, and the facts of the machine a record was measured on.

``run_method`` is the public "run one method -> images + stats" that the bench and scripts share.

Example:
    >>> ctx = RunContext(load_reference(), sample, torch.arange(8) % 10, seed=0)          # doctest: +SKIP
    >>> fora = Method("fora-N5", load_config('{"interval": 5, "max_order": 0}'))         # doctest: +SKIP
    >>> run = run_method(ctx, fora, count=True)                                         # doctest: +SKIP
    >>> run.images.shape, run.stats["steps_full"]                                       # doctest: +SKIP
    (torch.Size([8, 1, 28, 28]), 11)
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from ..adapters import resolve_targets
from ..integrations.cache_dit import cache_dit_version
from ..runtime.allocator import allocator_setting
from ..runtime.install import unwrap
from ..runtime.measure import count_flops
from .grid import image_grid
from .install import applies_config, installer_for
from .methods import Method
from .timing import timed

SAMPLE_GRID_IMAGES = 16
Sampler = Callable[..., torch.Tensor]


@dataclass
class RunContext:
    """What every run of a bench shares: the model, the sampler (``sampler(model, labels, num_steps=,
    guidance_scale=, seed=, cfg_mode=, listener=)`` -> images in [-1, 1]), the class labels, the noise seed, the
    guidance scale and CFG layout."""

    model: nn.Module
    sampler: Sampler
    labels: torch.Tensor
    seed: int
    guidance_scale: float = 1.5
    cfg_mode: str = "batch"


@dataclass
class MethodRun:
    """One run of a method: its images, FLOPs (None unless counted), stats, wall and process-CPU seconds of the
    sampling, and block calls (None unless counted or without blocks)."""

    images: torch.Tensor
    flops: int | None
    stats: dict[str, Any]
    wall_s: float
    cpu_s: float
    block_calls: int | None = None


_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


def block_watchers(model: nn.Module) -> list[nn.Module]:
    """One module per transformer block that runs exactly when the block's own work runs: the first ``nn.Linear``
    of its attention (``attn*``) child, else its first ``nn.Linear`` outside norms. Counting their calls counts
    block calls whatever skips the block (a cache that never calls it, a forecast module or block, a shortcut).

    Example:
        >>> len(block_watchers(load_reference()))    # doctest: +SKIP
        6
    """
    watched: list[nn.Module] = []
    for name, child in unwrap(model).named_children():
        if name not in _BLOCK_LISTS or not isinstance(child, nn.ModuleList):
            continue
        for block in child:
            linears = [(path, m) for path, m in block.named_modules() if isinstance(m, nn.Linear)]
            attention = [m for path, m in linears if path.split(".")[0].startswith("attn")]
            plain = [m for path, m in linears if "norm" not in path]
            pick = attention or plain
            if pick:
                watched.append(pick[0])
    return watched


def _count_block_calls(model: nn.Module, call: Callable[[], Any]) -> tuple[Any, int | None]:
    """``call()`` with a counter on ``block_watchers(model)``: (its result, block calls; None without blocks)."""
    watched = block_watchers(model)
    count = [0]

    def bump(module: nn.Module, args: tuple) -> None:
        count[0] += 1

    handles = [m.register_forward_pre_hook(bump) for m in watched]
    try:
        result = call()
    finally:
        for h in handles:
            h.remove()
    return result, (count[0] if watched else None)


def run_method(ctx: RunContext, method: Method, labels: torch.Tensor | None = None, count: bool = False,
               probe: str | None = None) -> MethodRun:
    """Install ``method`` on ``ctx.model``, sample ``labels`` (None: ``ctx.labels``) once, uninstall; optionally
    counting FLOPs and block calls (``count``) or probing the forecast error of one module (``probe``: its path).

    Example:
        >>> run_method(ctx, Method("full", None, 10)).wall_s > 0          # doctest: +SKIP
        True
    """
    labels = ctx.labels if labels is None else labels
    installed = installer_for(method)(ctx.model, method)
    try:
        if probe is not None:
            if installed.probe is None:
                raise TypeError(f"method {method.name!r} (family {method.family}) cannot probe a module")
            installed.probe(probe)

        def call() -> torch.Tensor:
            return ctx.sampler(installed.model, labels, num_steps=method.num_steps, guidance_scale=ctx.guidance_scale,
                               seed=ctx.seed, cfg_mode=ctx.cfg_mode, listener=installed.listener)

        blocks = None
        if count:
            ((images, flops), blocks), wall, cpu = timed(lambda: _count_block_calls(installed.model,
                                                                                   lambda: count_flops(call)))
        else:
            images, wall, cpu = timed(call)
            flops = None
        stats = installed.stats()
    finally:
        installed.remove()
    return MethodRun(images, flops, stats, wall, cpu, blocks)


def probe_path(model: nn.Module, method: Method) -> str | None:
    """The middle attention target of ``method`` (e.g. ``transformer_blocks.3.attn1``), None if not probeable."""
    if not applies_config(method):
        return None
    targets = [t.path for t in resolve_targets(model, method.cache_config())]
    paths = [p for p in targets if "attn" in p] or targets
    return paths[len(paths) // 2] if paths else None


def machine_facts() -> dict[str, Any]:
    """CPU model, core count, library versions, torch threads, UTC date, load average right now and the C
    allocator thresholds set by ``tune_cpu_allocator`` (``None``: the C library's defaults)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "cache_dit": cache_dit_version(),
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "allocator": allocator_setting()}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def quality(images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor,
            is_reference: bool = False) -> tuple[dict[str, float | None], dict[str, str]]:
    """PSNR/SSIM vs the reference images, class accuracy, FID-FMNIST and the Fréchet distance to the reference
    images' features (``fid_to_full``); (values, reasons for the nulls)."""
    values: dict[str, Any] = {"psnr": None, "ssim": None, "class_accuracy": None, "fid_fmnist": None,
                              "fid_to_full": None}
    reasons: dict[str, str] = {}
    try:
        from . import metrics  # optional at run time: a missing or broken metrics module nulls the fields, with why
    except Exception as err:  # noqa: BLE001 - the metrics module may be missing or broken: record why
        return values, {k: f"eval.metrics unavailable: {type(err).__name__}: {err}" for k in values}
    jobs = {"psnr": lambda: metrics.psnr(images, reference), "ssim": lambda: metrics.ssim(images, reference),
            "class_accuracy": lambda: metrics.class_accuracy(images, labels),
            "fid_fmnist": lambda: metrics.fid_fmnist(images),
            "fid_to_full": lambda: metrics.fid_between(images, reference)}
    for key, job in jobs.items():
        if key == "psnr" and is_reference:
            reasons[key] = "this is the reference: PSNR against itself is infinite by definition"
            continue
        try:
            values[key] = float(job())
        except Exception as err:  # noqa: BLE001 - e.g. classifier assets missing: null with the reason
            reasons[key] = f"{type(err).__name__}: {err}"
            continue
        if values[key] != values[key] or abs(values[key]) == float("inf"):  # JSON has no inf: null + reason
            reasons[key] = f"{key} is {values[key]} (e.g. images identical to the reference)"
            values[key] = None
    return values, reasons


def save_grid(images: torch.Tensor, path: Path) -> None:
    """Save the first images ([N, 1, S, S] in [-1, 1]) as one PNG, 2 rows, each pixel drawn 2x2."""
    x = images[:SAMPLE_GRID_IMAGES]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(x, ncol=-(-len(x) // (2 if len(x) > 1 else 1)), pad=0, scale=2).save(path)
