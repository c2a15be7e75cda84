"""The fixed-interval schedule of the reference code, as a host-side list computed before sampling.

A call is computed in full if it is one of the first ``warmup_steps`` steps, one of the last ``tail_steps``
steps, or if the forecast counter reaches ``interval - 1``; a full call resets the counter to 0, a forecast call
adds one. With ``interval = N`` this gives ``N - 1`` forecast steps between computed ones.

Example:
    >>> IntervalPolicy(interval=4, warmup_steps=2).pattern(10)
    'FFfffFfffF'
"""

from __future__ import annotations

from dataclasses import dataclass


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
