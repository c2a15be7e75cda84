"""Spectrum's schedule (Han et al., CVPR 2026, arXiv 2603.01623): full steps whose spacing grows by a factor.

Written from the paper's description: after a warm-up, the model is computed in full, then forecast for a window
of steps that widens by ``growth`` after every full step (the spectral forecast's error does not compound with the
window the way a local Taylor forecast's does, so later windows can be longer). The plan is static:

* steps ``0 .. warmup_steps - 1`` and the last ``tail_steps`` steps are full;
* after the warm-up the first window is ``interval`` (the next full step is ``interval`` steps after the last one);
  each full step after the warm-up multiplies the window by ``growth``; the gap used is the window rounded to the
  nearest int (at least 1).

``spectrum_for_budget`` picks the ``interval`` that gives a wanted number of full steps at a given growth.

Example:
    >>> SpectrumSchedule(interval=2, growth=1.5, warmup_steps=2).pattern(20)
    'FFfFffFffffFffffffFf'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Decision, Policy, StepInfo, check_int, register_policy
from .interval import config_from_dict, config_to_dict


@dataclass(frozen=True)
class SpectrumSchedule:
    """Policy config: ``warmup_steps`` full steps, then full steps ``interval``, ``interval * growth``,
    ``interval * growth**2``, ... steps apart (rounded; at least 1); the last ``tail_steps`` steps full.

    Example:
        >>> sum(SpectrumSchedule(interval=3, growth=1.25).plan(50))
        9
    """

    family: ClassVar[str] = "spectrum"  # the eval layer's method family (eval.methods.family_of)
    interval: float = 3.0
    growth: float = 1.25
    warmup_steps: int = 2
    tail_steps: int = 0

    def __post_init__(self) -> None:
        for name, low in (("interval", 1.0), ("growth", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low:
                raise ValueError(f"SpectrumSchedule.{name} must be a finite number >= {low:g}, got {value!r}")
            object.__setattr__(self, name, float(value))
        check_int("SpectrumSchedule", "warmup_steps", self.warmup_steps, 1)
        check_int("SpectrumSchedule", "tail_steps", self.tail_steps, 0)

    def plan(self, num_steps: int) -> list[bool]:
        """For each step ``0 .. num_steps - 1``: True to compute in full."""
        check_int("SpectrumSchedule", "plan(num_steps)", num_steps, 1)
        plan = [False] * num_steps
        for step in range(min(self.warmup_steps, num_steps)):
            plan[step] = True
        for step in range(max(num_steps - self.tail_steps, 0), num_steps):
            plan[step] = True
        last, window = min(self.warmup_steps, num_steps) - 1, self.interval
        while True:
            step = last + max(1, int(math.floor(window + 0.5)))
            if step >= num_steps:
                break
            plan[step] = True
            last, window = step, window * self.growth
        return plan

    def pattern(self, num_steps: int) -> str:
        """The plan as a string: ``F`` full, ``f`` forecast."""
        return "".join("F" if full else "f" for full in self.plan(num_steps))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON types)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpectrumSchedule:
        """The config from ``to_dict``'s output; unknown keys are an error."""
        return config_from_dict(cls, data)


def spectrum_for_budget(full_steps: int, num_steps: int = 50, growth: float = 1.25, warmup_steps: int = 2
                        ) -> SpectrumSchedule:
    """The ``SpectrumSchedule`` with ``growth`` and ``warmup_steps`` whose plan has exactly ``full_steps`` full
    steps of ``num_steps``, with the smallest first window (a multiple of 0.05) that gives it; ``ValueError`` if no
    window does.

    Example:
        >>> sum(spectrum_for_budget(8).plan(50))
        8
    """
    check_int("spectrum_for_budget", "full_steps", full_steps, 1)
    for hundredths in range(100, 100 * num_steps + 1, 5):
        schedule = SpectrumSchedule(hundredths / 100, growth, warmup_steps)
        if sum(schedule.plan(num_steps)) == full_steps:
            return schedule
    raise ValueError(f"spectrum_for_budget: no first window gives {full_steps} full steps of {num_steps} with "
                     f"growth {growth} and warmup_steps {warmup_steps}")


@register_policy(SpectrumSchedule)
class SpectrumSchedulePolicy(Policy):
    """``SpectrumSchedule``'s decisions, read off its plan (reason ``"spectrum"``; ``"warmup"`` first)."""

    def __init__(self, config: SpectrumSchedule):
        self.config = config
        self._plan: list[bool] | None = None

    def begin(self, num_steps: int | None) -> None:
        if num_steps is None:
            raise ValueError("SpectrumSchedule needs the generation's num_steps (its windows are planned up front)")
        self._plan = self.config.plan(num_steps)

    def decide(self, info: StepInfo) -> Decision:
        if self._plan is None:
            raise RuntimeError("SpectrumSchedulePolicy: call begin(num_steps) before the first decide()")
        if not 0 <= info.index < len(self._plan):
            raise ValueError(f"SpectrumSchedulePolicy: step {info.index} is outside the generation's "
                             f"{len(self._plan)} steps")
        reason = "warmup" if info.index < self.config.warmup_steps else "spectrum"
        return Decision(self._plan[info.index], reason=reason)

    def plan(self, num_steps: int) -> list[bool]:
        return self.config.plan(num_steps)


# The former name (issue 21: the runtime object of a policy config <C> is <C>Policy).
SpectrumPolicy = SpectrumSchedulePolicy
