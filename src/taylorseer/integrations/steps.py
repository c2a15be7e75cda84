"""The one scheduler step-teller: the step of a diffusers pipeline's generation, read from its scheduler instance.

``SchedulerSteps`` swaps, on the scheduler *instance* (never its class), ``set_timesteps`` (a generation is set
up: the count restarts) and ``step`` (one step completed: the count goes up), and calls back after each. The
index of the running step is the number of ``scheduler.step`` calls completed since ``set_timesteps``; its
timestep and sigma are read from the scheduler's ``timesteps`` / ``sigmas`` at that position (offset by
``begin_index``, where img2img pipelines start inside the schedule); a transformer call's own ``timestep``
argument is checked against it (``TimestepCheck``). Nothing counts transformer calls. ``detach()`` restores the
scheduler exactly.

Two users tell the steps with it: ``PipelineHandle`` (``taylorseer.apply(pipe, config)``: a cache step around
each transformer call) and ``taylorseer.calibration.pipeline.StepTeller`` (one pipeline call of a calibration:
a listener step around each step's calls).

Example:
    >>> steps = SchedulerSteps(pipe.transformer, on_set_timesteps=print_new, on_step=lambda: None)  # doctest: +SKIP
    >>> steps.attach(pipe.scheduler)                                                               # doctest: +SKIP
    >>> num_steps = steps.start()            # at the generation's first transformer call          # doctest: +SKIP
    >>> timestep, sigma = steps.where(steps.completed, with_sigma=True)                            # doctest: +SKIP
    >>> steps.detach()                                                                             # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


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


class SchedulerSteps:
    """Tells the steps of a pipeline's generations from its scheduler (see the module docstring).

    ``on_set_timesteps()`` is called after the scheduler's ``set_timesteps`` (``completed`` is then 0),
    ``on_step()`` after its ``step`` and before ``completed`` counts it. ``start()`` reads the generation's
    ``offset`` and ``num_steps`` from the scheduler and restarts the timestep check; ``where(index)`` is the
    timestep (and sigma) of step ``index``; ``mismatch(index, args, kwargs)`` checks a transformer call.
    """

    def __init__(self, transformer: nn.Module, on_set_timesteps: Callable[[], None], on_step: Callable[[], None]):
        self.scheduler: Any = None
        self.completed = 0  # scheduler.step() calls since set_timesteps: the index of the running step
        self.offset = 0  # scheduler.begin_index (img2img pipelines start inside the schedule)
        self.num_steps = 0
        self.check = TimestepCheck(transformer)
        self._on_set_timesteps, self._on_step = on_set_timesteps, on_step
        self._saved: list[tuple[Any, str, bool, Any]] = []  # (scheduler, method, had own attribute, its value)

    def attach(self, scheduler: Any) -> None:
        """Swap ``set_timesteps`` and ``step`` on ``scheduler`` (after restoring any scheduler attached before)."""
        self.detach()
        self.scheduler = scheduler
        for method, after in (("set_timesteps", self._set_timesteps), ("step", self._stepped)):
            had_own = method in scheduler.__dict__
            self._saved.append((scheduler, method, had_own, scheduler.__dict__.get(method)))
            setattr(scheduler, method, _then(getattr(scheduler, method), after))

    def detach(self) -> None:
        """Restore the scheduler's methods exactly (idempotent)."""
        for scheduler, method, had_own, value in reversed(self._saved):
            if had_own:
                setattr(scheduler, method, value)
            else:
                scheduler.__dict__.pop(method, None)
        self._saved.clear()
        self.scheduler = None

    def _set_timesteps(self) -> None:
        self.completed = 0
        self._on_set_timesteps()

    def _stepped(self) -> None:
        self._on_step()
        self.completed += 1

    def start(self) -> int:
        """A generation begins: read its offset and number of steps from the scheduler, restart the timestep
        check; returns the number of steps."""
        self.offset = int(getattr(self.scheduler, "begin_index", None) or 0)
        self.num_steps = len(self.scheduler.timesteps) - self.offset
        self.check.reset()
        return self.num_steps

    def where(self, index: int, with_sigma: bool) -> tuple[Any, Any]:
        """The scheduler's timestep of step ``index`` of the generation and, when ``with_sigma``, its sigma."""
        return scheduler_point(self.scheduler, self.offset + index, with_sigma)

    def mismatch(self, expected: Any, args: tuple, kwargs: dict) -> tuple[float, float] | None:
        """``TimestepCheck.mismatch`` of a transformer call against the timestep ``expected`` of its step."""
        return self.check.mismatch(expected, args, kwargs)
