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
import warnings
from typing import Any

import torch
from torch import nn

from ..adapters.registry import Target
from ..config import TaylorSeerConfig
from ..parts import CacheConfig
from ..runtime.handle import CacheHandle, CacheStats
from .steps import SchedulerSteps

_ATTACHED: dict[int, PipelineHandle] = {}  # id(scheduler) -> handle, to refuse wrapping a scheduler twice


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
        self._steps = SchedulerSteps(pipeline.transformer, self._on_set_timesteps, self._on_step)
        self._hooks: list[Any] = []
        self._pending = False  # set_timesteps was called; the generation begins at the next transformer call
        self._active = False  # a generation is running: transformer calls are given steps
        self._last_index: int | None = None
        self._branch = 0
        self._open: contextlib.ExitStack | None = None
        self._warned = False
        self._removed = False

    # ---------------------------------------------------------------------------------------------------
    # install / remove
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, pipeline: Any, parts: CacheConfig, targets: list[Target], given: Any = None) -> PipelineHandle:
        """Install the cache on ``pipeline.transformer`` and attach to its scheduler; see the module docstring
        (``parts``: what runs; ``given``: the config as the user wrote it, shown by ``repr`` and ``config``)."""
        check_pipeline(pipeline)
        if id(pipeline.scheduler) in _ATTACHED:
            raise ValueError("taylorseer is already applied to this pipeline's scheduler: remove() that handle first")
        cache = CacheHandle.install(pipeline.transformer, parts, targets, given)
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
        _ATTACHED[id(scheduler)] = self
        self._steps.attach(scheduler)

    def _detach(self) -> None:
        scheduler = self._steps.scheduler
        self._steps.detach()
        if scheduler is not None and _ATTACHED.get(id(scheduler)) is self:
            del _ATTACHED[id(scheduler)]

    def _on_set_timesteps(self) -> None:
        self._close()  # a call interrupted by a KeyboardInterrupt (torch then runs no forward hook) left one open
        self._pending, self._active = True, False

    def _on_step(self) -> None:
        pass  # SchedulerSteps counts the step

    def _begin(self) -> None:
        self.cache.begin(self._steps.start())
        self._pending, self._active, self._last_index, self._warned = False, True, None, False

    def _where(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scheduler's timestep and sigma of step ``index`` (sigma only when the abscissa needs it)."""
        return self._steps.where(index, self.cache.parts.abscissa == "sigma")

    # ---------------------------------------------------------------------------------------------------
    # transformer hooks
    # ---------------------------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._close()  # a call interrupted by a non-Exception (KeyboardInterrupt) may have left one open
        if self.pipeline.scheduler is not self._steps.scheduler:  # the user swapped the scheduler after apply()
            self._attach(self.pipeline.scheduler)
            timesteps = getattr(self._steps.scheduler, "timesteps", None)
            self._pending = timesteps is not None and len(timesteps) > 0
            self._steps.completed = 0
        if self._pending:
            self._begin()
        if not self._active:
            return  # not inside a denoising loop: run the original model
        index = self._steps.completed
        if index >= self._steps.num_steps:
            if not self._warned:
                warnings.warn(f"transformer called after the last of {self._steps.num_steps} scheduler steps; "
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
        mismatch = self._steps.mismatch(expected, args, kwargs)
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
