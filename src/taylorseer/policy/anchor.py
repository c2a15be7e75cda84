"""The hybrid: compute the first ``probe_blocks`` blocks on every step, forecast the rest ("a probe without a gate").

DBCache (cache-dit) computes the first Fn blocks of every step and forecasts what the remaining blocks add. Here the
same structure is a policy on our runtime, so it works with every forecaster (Taylor, Hermite, fitted weights, ...)
and at ``module`` or ``block`` granularity: on the steps of ``full_steps`` every target is computed; on every other
step the policy asks for a *probe* (``Decision(compute=False, probe=True)``), the runtime computes the targets of the
first ``probe_blocks`` blocks for real (as it does for ``ConfidenceGate``), and ``resolve`` always answers
"forecast the rest". The later blocks then add their forecast to hidden states that went through freshly computed
first blocks: the anchor. What the probe computed is not recorded as factors (the forecasters still see only the
full steps, so fitted weights keep their meaning). At ``output`` granularity there are no blocks to compute first;
the runtime refuses the policy there, naming the probe depth.

Cost per forecast step: ``probe_blocks`` of the model's blocks (with 6 blocks, 1/6 of a full step; with 57, under
2%), on top of what the plain schedule costs.

Example:
    >>> from taylorseer.policy import Observation, StepInfo, build_policy
    >>> policy = build_policy(AnchorSchedule((0, 2), num_steps=4))
    >>> policy.begin(4)
    >>> [policy.decide(StepInfo(i, 4, float(i))).probe for i in range(4)]
    [False, True, False, True]
    >>> policy.resolve(StepInfo(1, 4, 1.0), Observation(forecast_error=1.0, change=1.0))
    False
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Decision, Observation, Policy, StepInfo, check_int, check_steps, register_policy
from .interval import IntervalPolicy, config_from_dict, config_to_dict


@dataclass(frozen=True)
class AnchorSchedule:
    """Policy config: compute ``full_steps`` (0-based, sorted, unique, containing 0, below ``num_steps``) in full;
    on every other step compute the first ``probe_blocks`` blocks and forecast the rest. ``name``: a free label.

    Example:
        >>> AnchorSchedule.from_interval(5, warmup_steps=2, num_steps=12).full_steps
        (0, 1, 6, 11)
    """

    family: ClassVar[str] = "anchor"  # the eval layer's method family (eval.methods.family_of)
    full_steps: tuple[int, ...]
    num_steps: int
    probe_blocks: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        check_int("AnchorSchedule", "num_steps", self.num_steps, 1)
        check_int("AnchorSchedule", "probe_blocks", self.probe_blocks, 1)
        if not isinstance(self.name, str):
            raise ValueError(f"AnchorSchedule.name must be a str, got {self.name!r}")
        steps = check_steps("AnchorSchedule", "full_steps", self.full_steps, "the first step is always full")
        if steps[-1] >= self.num_steps:
            raise ValueError(f"AnchorSchedule.full_steps must lie in [0, num_steps - 1] = [0, {self.num_steps - 1}], "
                             f"got step {steps[-1]}")
        object.__setattr__(self, "full_steps", steps)

    @classmethod
    def from_interval(cls, interval: int, warmup_steps: int, num_steps: int, probe_blocks: int = 1) -> AnchorSchedule:
        """The full steps of ``IntervalSchedule(interval, warmup_steps)`` at ``num_steps`` steps, anchored."""
        plan = IntervalPolicy(interval, warmup_steps).plan(num_steps)
        return cls(tuple(i for i, full in enumerate(plan) if full), num_steps, probe_blocks)

    def plan(self, num_steps: int) -> list[bool]:
        """True for the full steps (the anchored steps are forecast steps with a probe); ``num_steps`` must be the
        schedule's own."""
        if num_steps != self.num_steps:
            raise ValueError(f"AnchorSchedule is a schedule for {self.num_steps} steps, but the generation has "
                             f"num_steps={num_steps!r}")
        full = set(self.full_steps)
        return [step in full for step in range(self.num_steps)]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON types; ``full_steps`` as a list)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnchorSchedule:
        """The config from ``to_dict``'s output; unknown keys are an error."""
        return config_from_dict(cls, data)


@register_policy(AnchorSchedule)
class AnchorSchedulePolicy(Policy):
    """``AnchorSchedule``'s decisions: full on the schedule's steps (reason ``"schedule"``), a probe that is always
    resolved to "forecast" elsewhere (reason ``"anchor"``)."""

    def __init__(self, config: AnchorSchedule):
        self.config = config
        self.probe_blocks = config.probe_blocks
        self._plan: list[bool] | None = None

    def begin(self, num_steps: int | None) -> None:
        if num_steps is None:
            raise ValueError(f"AnchorSchedule is a schedule for {self.config.num_steps} steps and needs the "
                             "generation's num_steps to check it, got None")
        self._plan = self.config.plan(num_steps)

    def decide(self, info: StepInfo) -> Decision:
        if self._plan is None:
            raise RuntimeError("AnchorSchedulePolicy: call begin(num_steps) before the first decide()")
        if not 0 <= info.index < len(self._plan):
            raise ValueError(f"AnchorSchedulePolicy: step {info.index} is outside the schedule's "
                             f"{len(self._plan)} steps")
        if self._plan[info.index]:
            return Decision(True, reason="schedule")
        return Decision(False, probe=True, reason="anchor")

    def resolve(self, info: StepInfo, observation: Observation) -> bool:
        """Always False: the first blocks were computed, the rest is forecast whatever the probe saw."""
        return False

    def plan(self, num_steps: int) -> list[bool]:
        return self.config.plan(num_steps)


# The former name (issue 21: the runtime object of a policy config <C> is <C>Policy).
AnchorPolicy = AnchorSchedulePolicy
