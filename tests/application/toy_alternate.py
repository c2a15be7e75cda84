"""A toy policy written as a new contributor would (issue 21): after ``warmup_steps`` full steps, compute every
other step. One file; registered by the one ``register_policy`` line below."""

from __future__ import annotations

from dataclasses import dataclass

from taylorseer.policy import register_policy
from taylorseer.policy.base import Decision, Policy, StepInfo


@dataclass(frozen=True)
class AlternatePolicy:
    """Full, forecast, full, ... after the warm-up."""

    warmup_steps: int = 2


@register_policy(AlternatePolicy)
class AlternateRuntimePolicy(Policy):
    def __init__(self, config: AlternatePolicy):
        self.config = config

    def decide(self, info: StepInfo) -> Decision:
        full = info.index < self.config.warmup_steps or (info.index - self.config.warmup_steps) % 2 == 1
        return Decision(full, reason="alternate")

    def plan(self, num_steps: int) -> list[bool]:
        return [self.decide(StepInfo(i, num_steps, float(i))).compute for i in range(num_steps)]
