"""Pipeline integration: forecasting on a diffusers pipeline, with the step told by the pipeline's own scheduler.

``taylorseer.apply(pipe, config)`` installs a ``CacheHandle`` on ``pipe.transformer`` and swaps, on the scheduler
*instance*, ``set_timesteps`` (a new generation: the handle is reset and its plan is made for the steps about to
run) and ``step`` (one sampler step completed). A forward pre-hook on the transformer opens
``handle.step(index, timestep, sigma, branch)`` around every transformer call, where ``index`` is the number of
``scheduler.step`` calls completed in this generation and ``timestep`` / ``sigma`` are read from the scheduler's
``timesteps`` / ``sigmas`` at that position; a forward hook (``always_call``) closes it. The k-th transformer call
of one step is CFG branch k, so CFG as a doubled batch (one call) and as two calls per step both work. Nothing
counts transformer calls to find the step, and users pass no callbacks.

Every transformer call is checked against the scheduler: its own ``timestep`` argument must be the scheduler's
timestep at the expected position, up to the constant factor the pipeline applies (diffusers passes ``t`` or
``t / 1000``; learned from the generation's first call) and the rounding of the call's dtype. A call that does not
match (a pipeline call that failed partway and left its generation open, then a direct transformer call or another
pipeline sharing the transformer) ends the generation: its factors are dropped, it runs at full compute, and a
``UserWarning`` says so once. Forecasts therefore only ever come from the generation the call belongs to.

Example:
    >>> pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256")                  # doctest: +SKIP
    >>> with taylorseer.apply(pipe, taylorseer.preset("paper_dit")) as handle:       # doctest: +SKIP
    ...     image = pipe(class_labels=[207], num_inference_steps=50).images[0]
    ...     print(handle.stats.to_dict())
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

from ..adapters.registry import Target
from ..config import TaylorSeerConfig
from ..parts import CacheConfig
from ..runtime.handle import CacheHandle, CacheStats

_ATTACHED: dict[int, PipelineHandle] = {}  # id(scheduler) -> handle, to refuse wrapping a scheduler twice


def _then(original: Any, after: Any) -> Any:
    """``original`` followed by ``after()``; ``functools.wraps`` keeps its signature visible to ``inspect``
    (pipelines inspect ``set_timesteps`` for ``sigmas`` / ``timesteps`` support)."""

    @functools.wraps(original)
    def swapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        after()
        return result

    return swapped


def _timestep_position(transformer: nn.Module) -> int | None:
    """The position of the ``timestep`` argument of the transformer's forward (None if it has none)."""
    try:
        names = list(inspect.signature(transformer.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("timestep") if "timestep" in names else None


def _timestep_value(value: Any) -> tuple[float, float] | None:
    """A transformer call's timestep as a number (the largest entry of a tensor: per-token timesteps hold zeros
    for conditioning tokens) and the relative tolerance its dtype's rounding needs; None if it is not one."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        rtol = max(2 * torch.finfo(value.dtype).eps, 1e-5) if value.is_floating_point() else 1e-5
        return float(value.detach().max()), rtol
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), 1e-5
    return None


def scheduler_point(scheduler: Any, position: int, with_sigma: bool) -> tuple[Any, Any]:
    """The scheduler's timestep at ``position`` of its ``timesteps`` and, when ``with_sigma``, its sigma (from
    ``sigmas``, else from ``alphas_cumprod``; None when it has neither)."""
    timestep = scheduler.timesteps[position]
    sigma = None
    if with_sigma:
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is not None and len(sigmas) > position:
            sigma = sigmas[position]
        elif getattr(scheduler, "alphas_cumprod", None) is not None:
            alpha = scheduler.alphas_cumprod[int(timestep)]
            sigma = ((1 - alpha) / alpha).sqrt()
    return timestep, sigma


class TimestepCheck:
    """Whether a transformer call's own ``timestep`` argument is the scheduler's at the expected step, up to the
    constant factor the pipeline applies (diffusers passes ``t`` or ``t / 1000``: learned at the generation's
    first call with a non-zero timestep; ``reset`` at each generation) and the rounding of the call's dtype."""

    def __init__(self, transformer: nn.Module):
        self.position = _timestep_position(transformer)
        self.ratio: float | None = None

    def reset(self) -> None:
        self.ratio = None

    def mismatch(self, expected: Any, args: tuple, kwargs: dict) -> tuple[float, float] | None:
        """None if the call follows the scheduler (or has no readable timestep); else (its timestep, the one
        expected of it)."""
        at = self.position
        called = _timestep_value(kwargs["timestep"] if "timestep" in kwargs else
                                 args[at] if at is not None and len(args) > at else None)
        if called is None:
            return None
        value, rtol = called
        expected = float(expected)
        if self.ratio is None:
            if expected != 0.0 and value != 0.0 and math.isfinite(value / expected):
                self.ratio = value / expected
            return None
        want = self.ratio * expected
        return None if abs(value - want) <= rtol * max(abs(value), abs(want)) else (value, want)


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers-style pipeline: a ``transformer`` module and a ``scheduler`` with ``set_timesteps``."""
    return (isinstance(getattr(obj, "transformer", None), nn.Module)
            and callable(getattr(getattr(obj, "scheduler", None), "set_timesteps", None)))


def check_pipeline(pipeline: Any) -> None:
    """Raise ``ValueError`` naming what is missing if ``pipeline`` cannot be accelerated."""
    name = type(pipeline).__name__
    if getattr(pipeline, "transformer", None) is None:
        has_unet = isinstance(getattr(pipeline, "unet", None), nn.Module)
        raise ValueError(f"{name} has no transformer to accelerate"
                         + (" (UNet pipelines are not supported: taylorseer targets diffusion transformers)"
                            if has_unet else ""))
    if not isinstance(pipeline.transformer, nn.Module):
        raise ValueError(f"{name}.transformer must be a torch.nn.Module, got {type(pipeline.transformer).__name__}")
    scheduler = getattr(pipeline, "scheduler", None)
    for method in ("set_timesteps", "step"):
        if not callable(getattr(scheduler, method, None)):
            raise ValueError(f"{name}.scheduler must have a {method}() method (a diffusers scheduler), "
                             f"got {type(scheduler).__name__}")


class PipelineHandle:
    """Forecasting installed on a pipeline; created by ``taylorseer.apply(pipe, config)``. A context manager.

    ``stats``, ``plan``, ``probe`` and ``cache_bytes`` are those of the ``CacheHandle`` on ``pipe.transformer``
    (``self.cache``), reset at the start of every pipeline call. ``remove()`` restores the pipeline exactly.
    """

    def __init__(self, pipeline: Any, cache: CacheHandle):
        self.pipeline = pipeline
        self.cache = cache
        self.transformer: nn.Module = pipeline.transformer
        self._scheduler: Any = None
        self._saved: list[tuple[Any, str, bool, Any]] = []  # (scheduler, method, had own attribute, its value)
        self._hooks: list[Any] = []
        self._pending = False  # set_timesteps was called; the generation begins at the next transformer call
        self._active = False  # a generation is running: transformer calls are given steps
        self._completed = 0  # scheduler.step() calls since set_timesteps: the index of the current step
        self._offset = 0  # scheduler.begin_index (img2img pipelines start inside the schedule)
        self._num_steps = 0
        self._last_index: int | None = None
        self._branch = 0
        self._open: contextlib.ExitStack | None = None
        self._warned = False
        self._removed = False
        self._timesteps = TimestepCheck(pipeline.transformer)

    # ---------------------------------------------------------------------------------------------------
    # install / remove
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, pipeline: Any, config: TaylorSeerConfig | CacheConfig, targets: list[Target]) -> PipelineHandle:
        """Install the cache on ``pipeline.transformer`` and attach to its scheduler; see the module docstring."""
        check_pipeline(pipeline)
        if id(pipeline.scheduler) in _ATTACHED:
            raise ValueError("taylorseer is already applied to this pipeline's scheduler: remove() that handle first")
        cache = CacheHandle.install(pipeline.transformer, config, targets)
        cache.auto_steps = False  # the scheduler tells the steps
        handle = cls(pipeline, cache)
        try:
            handle._attach(pipeline.scheduler)
            handle._hooks.append(handle.transformer.register_forward_pre_hook(handle._enter, with_kwargs=True))
            handle._hooks.append(handle.transformer.register_forward_hook(handle._exit, always_call=True))
        except BaseException:
            handle.remove()
            raise
        return handle

    def remove(self) -> None:
        """Restore the scheduler's methods and the transformer exactly, and drop all cached tensors. Idempotent."""
        self._close()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._detach()
        self.cache.remove()
        self._removed = True

    def __enter__(self) -> PipelineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------------------------
    # the CacheHandle's facts
    # ---------------------------------------------------------------------------------------------------
    @property
    def config(self) -> TaylorSeerConfig | CacheConfig:
        """The config in force."""
        return self.cache.config

    @property
    def targets(self) -> list[Target]:
        """The intercepted modules of ``pipe.transformer``."""
        return self.cache.targets

    @property
    def stats(self) -> CacheStats:
        """What happened in the latest pipeline call (full/forecast steps, module calls, cache bytes)."""
        return self.cache.stats

    def plan(self, num_steps: int) -> list[bool]:
        """The compute (True) / forecast (False) list for a call with ``num_steps`` denoising steps."""
        return self.cache.plan(num_steps)

    def probe(self, *paths: str) -> None:
        """Record the forecast error of these target paths on forecast steps (see ``CacheHandle.probe``)."""
        self.cache.probe(*paths)

    def count_flops(self) -> contextlib.AbstractContextManager[CacheStats]:
        """Count executed and skipped FLOPs of the pipeline calls inside (see ``CacheHandle.count_flops``)."""
        return self.cache.count_flops()

    def cache_bytes(self) -> int:
        """Bytes currently held by the cached factors."""
        return self.cache.cache_bytes()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.targets)} targets"
        return (f"PipelineHandle({type(self.pipeline).__name__}, {type(self.transformer).__name__}, {state}, "
                f"{self.config.to_json()})")

    # ---------------------------------------------------------------------------------------------------
    # scheduler: the source of the step
    # ---------------------------------------------------------------------------------------------------
    def _attach(self, scheduler: Any) -> None:
        if id(scheduler) in _ATTACHED and _ATTACHED[id(scheduler)] is not self:
            raise ValueError("this scheduler is attached to another taylorseer handle: remove() that handle first")
        self._detach()
        self._scheduler = scheduler
        _ATTACHED[id(scheduler)] = self
        for method, after in (("set_timesteps", self._on_set_timesteps), ("step", self._on_step)):
            had_own = method in scheduler.__dict__
            self._saved.append((scheduler, method, had_own, scheduler.__dict__.get(method)))
            setattr(scheduler, method, _then(getattr(scheduler, method), after))

    def _detach(self) -> None:
        for scheduler, method, had_own, value in reversed(self._saved):
            if had_own:
                setattr(scheduler, method, value)
            else:
                scheduler.__dict__.pop(method, None)
        self._saved.clear()
        if self._scheduler is not None and _ATTACHED.get(id(self._scheduler)) is self:
            del _ATTACHED[id(self._scheduler)]
        self._scheduler = None

    def _on_set_timesteps(self) -> None:
        self._close()  # a call interrupted by a KeyboardInterrupt (torch then runs no forward hook) left one open
        self._pending, self._active, self._completed = True, False, 0

    def _on_step(self) -> None:
        self._completed += 1

    def _begin(self) -> None:
        scheduler = self._scheduler
        self._offset = int(getattr(scheduler, "begin_index", None) or 0)
        self._num_steps = len(scheduler.timesteps) - self._offset
        self.cache.begin(self._num_steps)
        self._pending, self._active, self._last_index, self._warned = False, True, None, False
        self._timesteps.reset()

    def _where(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scheduler's timestep and sigma of step ``index`` (sigma only when the abscissa needs it)."""
        return scheduler_point(self._scheduler, self._offset + index, self.config.abscissa == "sigma")

    # ---------------------------------------------------------------------------------------------------
    # transformer hooks
    # ---------------------------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._close()  # a call interrupted by a non-Exception (KeyboardInterrupt) may have left one open
        if self.pipeline.scheduler is not self._scheduler:  # the user swapped the scheduler after apply()
            self._attach(self.pipeline.scheduler)
            timesteps = getattr(self._scheduler, "timesteps", None)
            self._pending = timesteps is not None and len(timesteps) > 0
            self._completed = 0
        if self._pending:
            self._begin()
        if not self._active:
            return  # not inside a denoising loop: run the original model
        index = self._completed
        if index >= self._num_steps:
            if not self._warned:
                warnings.warn(f"transformer called after the last of {self._num_steps} scheduler steps; "
                              f"running it without forecasting", stacklevel=2)
                self._warned = True
            return
        timestep, sigma = self._where(index)
        if not self._follows(index, timestep, args, kwargs):
            return
        self._branch = self._branch + 1 if index == self._last_index else 0
        self._last_index = index
        stack = contextlib.ExitStack()
        stack.enter_context(self.cache.step(index, timestep, sigma, branch=self._branch))
        self._open = stack

    def _follows(self, index: int, expected: Any, args: tuple, kwargs: dict) -> bool:
        """Whether this call's timestep is the scheduler's at step ``index``; if not, end the generation."""
        mismatch = self._timesteps.mismatch(expected, args, kwargs)
        if mismatch is None:
            return True
        value, want = mismatch
        self._active = False
        self.cache.engine.clear()  # nothing from that generation may be read again
        warnings.warn(f"transformer called with timestep {value:g} where step {index} of the running generation has "
                      f"{want:g} (scheduler timestep {float(expected):g}): taylorseer ended that "
                      f"generation (a pipeline call that failed partway, or another pipeline sharing this "
                      f"transformer); calls run at full compute until the pipeline sets its timesteps again",
                      stacklevel=3)
        return False

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()
