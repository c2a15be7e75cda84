"""An explicit compute/forecast schedule: the steps to compute in full, listed (a searched or loaded pattern).

The schedule belongs to one number of steps: a generation of any other length is refused (``begin`` raises,
naming both numbers) rather than stretched, cut or reused. Step 0 is always full (nothing can be forecast before
anything was computed). The policy is static: ``plan`` gives the whole list up front, and ``notify`` changes
nothing (a step the runtime forced to full does not move later full steps).

Example:
    >>> schedule = FixedSchedule.from_pattern("FFfffFfffF", name="dit-n4")
    >>> schedule.full_steps
    (0, 1, 5, 9)
    >>> schedule.pattern()
    'FFfffFfffF'
    >>> FixedSchedule.from_dict(schedule.to_dict()) == schedule
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import Decision, Policy, StepInfo, check_int, check_steps, register_policy
from .interval import config_from_dict, config_to_dict


@dataclass(frozen=True)
class FixedSchedule:
    """Policy config: compute exactly the steps in ``full_steps`` (0-based, sorted, unique, in
    ``[0, num_steps)``, containing 0) of a generation of ``num_steps`` steps; forecast the others.

    ``full_steps`` may be given as a list; it is stored as a tuple. ``name``: a free label for records.

    Example:
        >>> FixedSchedule((0, 1, 4), num_steps=6).pattern()
        'FFffFf'
    """

    full_steps: tuple[int, ...]
    num_steps: int
    name: str = ""

    def __post_init__(self) -> None:
        check_int("FixedSchedule", "num_steps", self.num_steps, 1)
        if not isinstance(self.name, str):
            raise ValueError(f"FixedSchedule.name must be a str, got {self.name!r}")
        steps = check_steps("FixedSchedule", "full_steps", self.full_steps, "the first step is always full")
        if steps[-1] >= self.num_steps:
            raise ValueError(f"FixedSchedule.full_steps must lie in [0, num_steps - 1] = [0, {self.num_steps - 1}], "
                             f"got step {steps[-1]}")
        object.__setattr__(self, "full_steps", steps)

    @classmethod
    def from_pattern(cls, pattern: str, name: str = "") -> FixedSchedule:
        """The schedule of a string of ``F`` (full) and ``f`` (forecast), one character per step.

        Example:
            >>> FixedSchedule.from_pattern("FfF").full_steps
            (0, 2)
        """
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"FixedSchedule.from_pattern needs a non-empty str of 'F' and 'f', got {pattern!r}")
        for index, char in enumerate(pattern):
            if char not in "Ff":
                raise ValueError(f"FixedSchedule.from_pattern: character {char!r} at step {index} is neither "
                                 "'F' (full) nor 'f' (forecast)")
        return cls(tuple(i for i, char in enumerate(pattern) if char == "F"), len(pattern), name)

    def pattern(self) -> str:
        """The schedule as a string: ``F`` for a full step, ``f`` for a forecast one."""
        return "".join("F" if full else "f" for full in self.plan(self.num_steps))

    def plan(self, num_steps: int) -> list[bool]:
        """For each step ``0 .. num_steps - 1``: True to compute in full; ``num_steps`` must be the schedule's."""
        check_matching(self, num_steps)
        full = set(self.full_steps)
        return [step in full for step in range(self.num_steps)]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON types; ``full_steps`` as a list)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FixedSchedule:
        """The config from ``to_dict``'s output; unknown or missing keys are an error."""
        return config_from_dict(cls, data)


def check_matching(schedule: FixedSchedule, num_steps: Any) -> None:
    """``ValueError`` naming both numbers unless ``num_steps`` is the schedule's own."""
    label = f" {schedule.name!r}" if schedule.name else ""
    if num_steps is None:
        raise ValueError(f"FixedSchedule{label} is a schedule for {schedule.num_steps} steps and needs the "
                         "generation's num_steps to check it, got None")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps != schedule.num_steps:
        raise ValueError(f"FixedSchedule{label} is a schedule for {schedule.num_steps} steps, but the generation "
                         f"has num_steps={num_steps!r}; load or search a schedule for {num_steps!r} steps")


@register_policy(FixedSchedule)
class FixedSchedulePolicy(Policy):
    """``FixedSchedule``'s decisions, read off its plan (reason ``"schedule"``)."""

    def __init__(self, config: FixedSchedule):
        self.schedule = config
        self._plan: list[bool] | None = None

    def begin(self, num_steps: int | None) -> None:
        check_matching(self.schedule, num_steps)
        self._plan = self.schedule.plan(self.schedule.num_steps)

    def decide(self, info: StepInfo) -> Decision:
        if self._plan is None:
            raise RuntimeError("FixedSchedulePolicy: call begin(num_steps) before the first decide()")
        if info.num_steps is not None:
            check_matching(self.schedule, info.num_steps)
        if isinstance(info.index, bool) or not isinstance(info.index, int) or not 0 <= info.index < len(self._plan):
            raise ValueError(f"FixedSchedulePolicy: step {info.index!r} is outside the schedule's "
                             f"{len(self._plan)} steps")
        return Decision(self._plan[info.index], reason="schedule")

    def plan(self, num_steps: int) -> list[bool]:
        return self.schedule.plan(num_steps)
