"""The fixed-interval schedule of the reference code, as a host-side list computed before sampling.

A call is computed in full if it is one of the first ``warmup_steps`` steps, one of the last ``tail_steps``
steps, or if the forecast counter reaches ``interval - 1``; a full call resets the counter to 0, a forecast call
adds one. With ``interval = N`` this gives ``N - 1`` forecast steps between computed ones.

Example:
    >>> IntervalPolicy(interval=4, warmup_steps=2).pattern(10)
    'FFfffFfffF'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import config_from_dict as config_from_dict  # the one serialiser of part configs, re-exported
from ..config import config_to_dict as config_to_dict
from .base import Decision, Policy, StepInfo, register_policy


@dataclass(frozen=True)
class IntervalPolicy:
    """Compute every ``interval``-th step after ``warmup_steps`` full steps; the last ``tail_steps`` in full."""

    interval: int
    warmup_steps: int = 0
    tail_steps: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("interval", 1), ("warmup_steps", 0), ("tail_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    @classmethod
    def from_config(cls, config) -> IntervalPolicy:
        """The policy of a ``TaylorSeerConfig``."""
        return cls(config.interval, config.warmup_steps, config.tail_steps)

    def plan(self, num_steps: int) -> list[bool]:
        """For each step ``0 .. num_steps - 1``: True to compute in full, False to forecast."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        plan, counter = [], 0
        for step in range(num_steps):
            forced = step < self.warmup_steps or step >= num_steps - self.tail_steps
            if forced or counter == self.interval - 1:
                plan.append(True)
                counter = 0
            else:
                plan.append(False)
                counter += 1
        return plan

    def pattern(self, num_steps: int) -> str:
        """The plan as a string: ``F`` for a full step, ``f`` for a forecast one."""
        return "".join("F" if full else "f" for full in self.plan(num_steps))


#################################################################################
#                        As a registered runtime policy                          #
#################################################################################

@dataclass(frozen=True)
class IntervalSchedule:
    """Policy config: the fixed-interval schedule (``IntervalPolicy``) asked step by step by the runtime.

    Without ``num_steps`` the plan is extended as steps arrive (``tail_steps`` then needs ``num_steps``).

    Example:
        >>> IntervalSchedule(interval=4, warmup_steps=2).interval
        4
    """

    interval: int = 4
    warmup_steps: int = 2
    tail_steps: int = 0

    def __post_init__(self) -> None:
        IntervalPolicy(self.interval, self.warmup_steps, self.tail_steps)  # same validation

    def to_dict(self) -> dict[str, Any]:
        """This config as a plain dict (``config_to_dict``)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IntervalSchedule:
        """The config from ``to_dict``'s output (``config_from_dict``)."""
        return config_from_dict(cls, data)


_FORECAST, _FULL, _WARMUP = Decision(False, reason="interval"), Decision(True, reason="interval"), \
    Decision(True, reason="warmup")  # frozen: one object each, shared by every step that takes it


@register_policy(IntervalSchedule)
class IntervalSchedulePolicy(Policy):
    """Decisions read off ``IntervalPolicy.plan``, made once per generation (a list lookup per step). Without
    ``num_steps`` the list grows by doubling (a plan without a tail is a prefix of every longer one)."""

    def __init__(self, config: IntervalSchedule):
        self.schedule = IntervalPolicy(config.interval, config.warmup_steps, config.tail_steps)
        self._decisions: list[Decision] = []
        self._num_steps: int | None = None

    def begin(self, num_steps: int | None) -> None:
        if num_steps is None and self.schedule.tail_steps:
            raise ValueError("tail_steps > 0 needs num_steps: call handle.begin(num_steps) first")
        self._num_steps = num_steps
        self._decisions = self._decide_all(num_steps) if num_steps is not None else []

    def _decide_all(self, num_steps: int) -> list[Decision]:
        warmup = self.schedule.warmup_steps
        return [_FORECAST if not full else _WARMUP if i < warmup else _FULL
                for i, full in enumerate(self.schedule.plan(num_steps))]

    def decide(self, info: StepInfo) -> Decision:
        index = info.index
        if index >= len(self._decisions) and self._num_steps is None:
            self._decisions = self._decide_all(max(index + 1, 2 * len(self._decisions)))
        return self._decisions[index]

    def plan(self, num_steps: int) -> list[bool]:
        return self.schedule.plan(num_steps)


# The former name (issue 21: the runtime object of a policy config <C> is <C>Policy).
IntervalRuntimePolicy = IntervalSchedulePolicy
