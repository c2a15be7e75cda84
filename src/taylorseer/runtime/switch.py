"""Per generation, the policy that runs: the configured one, or full compute where forecasting cannot help.

The handle asks its planner once per generation, when the step count is known (``begin(num_steps)``; for a
pipeline the scheduler tells it), which policy to run. The default ``Planner`` runs the configured policy, except
that it **switches forecasting off** (full compute, one warning, ``stats.switched_off`` says why) for a generation
too short for a fixed-interval schedule:

    num_steps < warmup_steps + tail_steps + interval

After the warm-up, a schedule of interval N computes one step in N; a generation shorter than the warm-up plus one
interval ends before its first full step after the warm-up, so every forecast step extrapolates from the warm-up's
few adjacent steps over a gap as long as or longer than their span, and nothing ever corrects it (a 4-step distilled
model under FLUX's W=3, N=6; img2img at low strength, where the scheduler runs only the last steps). Full compute is
then the better use of those few steps. Fixed schedules (``FixedSchedule``, made for one step count) and adaptive
policies (which measure before forecasting) run as configured. A speed target (``taylorseer.auto``) brings its
own planner, which chooses the schedule per step count and applies the same rule to it.

Example:
    >>> from taylorseer.policy import IntervalSchedule
    >>> Planner(IntervalSchedule(interval=4, warmup_steps=2)).choose(5).switched_off.split(":")[0]
    '5 steps are fewer than warm-up 2 + tail 0 + interval 4 = 6'
    >>> Planner(IntervalSchedule(interval=4, warmup_steps=2)).choose(6).switched_off is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy.interval import IntervalSchedule

FULL_COMPUTE = IntervalSchedule(interval=1, warmup_steps=0)  # every step computed: nothing recorded or forecast


@dataclass(frozen=True)
class Choice:
    """The policy of one generation; ``switched_off``: why it runs at full compute instead (None: it does not);
    ``note``: what a speed target chose for this step count (logged once per step count)."""

    policy: Any
    switched_off: str | None = None
    note: str | None = None


def too_few_steps(policy: Any, num_steps: int | None) -> str | None:
    """Why a generation of ``num_steps`` steps is too short for ``policy`` (see the module docstring), else None.

    Example:
        >>> too_few_steps(IntervalSchedule(interval=6, warmup_steps=3), 9) is None
        True
    """
    if num_steps is None or not isinstance(policy, IntervalSchedule) or policy.interval == 1:
        return None
    need = policy.warmup_steps + policy.tail_steps + policy.interval
    if num_steps >= need:
        return None
    return (f"{num_steps} steps are fewer than warm-up {policy.warmup_steps} + tail {policy.tail_steps} + interval "
            f"{policy.interval} = {need}: the generation would end before its first full step after the warm-up, "
            f"every forecast extrapolating from the warm-up alone (a few-step or distilled model, or img2img at low "
            f"strength); it runs at full compute")


class Planner:
    """The configured policy, switched off for generations too short for it (``too_few_steps``)."""

    def __init__(self, policy: Any):
        self.policy = policy

    def choose(self, num_steps: int | None) -> Choice:
        """The policy for a generation of ``num_steps`` steps (None: not known)."""
        reason = too_few_steps(self.policy, num_steps)
        return Choice(FULL_COMPUTE, switched_off=reason) if reason else Choice(self.policy)

    def describe(self) -> str:
        """A short text for ``repr(handle)`` ("" for the configured policy)."""
        return ""
