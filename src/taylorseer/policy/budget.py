"""An error budget in the spirit of TeaCache and FirstBlockCache: forecast while the first blocks' accumulated
change since the last full step stays within a budget.

Outside the forced steps every step is *probed*: the runtime computes the first ``probe_blocks`` blocks for real
and measures ``Observation.change``, the relative L1 change ||out_s - out_prev|| / ||out_prev|| of their output
against the previous step of this branch on which they ran (dimensionless; ``inf`` when there is none).
TeaCache accumulates such a per-step relative L1 change (of the modulated input, rescaled by a fitted polynomial)
and computes a step once the sum reaches its threshold; FirstBlockCache compares the first block's residual to the
one at the last computed step. Summing per-step changes since the last full step bounds that distance from above
(triangle inequality) and needs no stored reference beyond the previous step.

The accumulator ``A`` (dimensionless):

- holds the sum of ``change`` over the probed steps that were *forecast* since the last full step;
- on a probed step, ``resolve`` compares ``A + change`` (the triggering step's change counts) with ``budget``:
  full iff ``A + change > budget`` (strictly greater; a NaN or infinite change counts as exceeding);
- when the step is forecast (``notify(info, False)``), ``A`` becomes ``A + change``;
- when the step is computed in full for any reason (budget, warm-up, tail, cap, or forced by the runtime),
  ``A`` is reset to 0: the triggering step's change is *not* carried over, since the full step's outputs are
  the new reference;
- a forecast step that was not probed (a runtime that forecast without probing) adds nothing: the next probe's
  ``change`` is measured against the last step on which the probe blocks ran, so it covers both steps.

Per step, in this order (``n`` = consecutive forecast steps since the last full step):
``index < warmup_steps`` -> full ``"warmup"``; ``index >= num_steps - tail_steps`` -> full ``"tail"``;
``n >= max_forecast`` -> full without probing ``"cap"``; otherwise probe, reason ``"budget"``.

Example:
    >>> from taylorseer.policy import ErrorBudget, Observation, StepInfo, build_policy
    >>> policy = build_policy(ErrorBudget(budget=0.5, warmup_steps=0))
    >>> policy.begin(None)
    >>> for index, change in enumerate([0.25, 0.25, 0.25]):
    ...     info = StepInfo(index, None, float(index))
    ...     _ = policy.decide(info)
    ...     full = policy.resolve(info, Observation(forecast_error=0.0, change=change))
    ...     policy.notify(info, full)
    ...     print(full, policy.accumulated)
    False 0.25
    False 0.5
    True 0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Observation, register_policy
from .gate import ProbingPolicy, check_observed, check_positive_float, check_probe_fields
from .interval import config_from_dict, config_to_dict


@dataclass(frozen=True)
class ErrorBudget:
    """Policy config: probe every non-forced step; compute in full once the accumulated first-block change since
    the last full step exceeds ``budget``.

    ``budget``: the largest accumulated relative L1 change (dimensionless, a sum of per-step ratios) at which a
    step is still forecast. ``warmup_steps`` / ``tail_steps``: the first / last steps, computed in full without
    probing (``tail_steps > 0`` needs the generation's ``num_steps``). ``max_forecast``: at most this many
    consecutive forecast steps; the next is computed in full without probing. ``probe_blocks``: how many leading
    blocks a probe computes.

    Example:
        >>> ErrorBudget(budget=0.2).to_dict()
        {'budget': 0.2, 'warmup_steps': 2, 'tail_steps': 0, 'max_forecast': 6, 'probe_blocks': 1}
    """

    family: ClassVar[str] = "budget"  # the eval layer's method family (eval.methods.family_of)
    budget: float = 0.1
    warmup_steps: int = 2
    tail_steps: int = 0
    max_forecast: int = 6
    probe_blocks: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", check_positive_float("ErrorBudget", "budget", self.budget))
        check_probe_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON types)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorBudget:
        """The config from ``to_dict``'s output; unknown keys are an error."""
        return config_from_dict(cls, data)


@register_policy(ErrorBudget)
class ErrorBudgetPolicy(ProbingPolicy):
    """``ErrorBudget``'s decisions; ``accumulated`` is the accumulator ``A`` of the module docstring."""

    probe_reason = "budget"

    def __init__(self, config: ErrorBudget):
        super().__init__(config.warmup_steps, config.tail_steps, config.max_forecast, config.probe_blocks)
        self.budget = config.budget
        self.accumulated = 0.0
        self._candidate = 0.0  # A + change of the step being resolved

    def reset(self) -> None:
        super().reset()
        self.accumulated = 0.0
        self._candidate = 0.0

    def judge(self, observation: Observation) -> bool:
        change = check_observed(self._name, "change", observation.change)
        self._candidate = self.accumulated + change
        return not math.isfinite(self._candidate) or self._candidate > self.budget

    def after_full(self) -> None:
        self.accumulated = 0.0

    def after_forecast(self, resolved: bool) -> None:
        if resolved:
            self.accumulated = self._candidate
