"""A confidence gate in the spirit of CG-Taylor (arXiv 2508.02240): forecast a step unless the probe shows the
forecast is already wrong in the first blocks.

Outside the forced steps every step is *probed*: the runtime computes the first ``probe_blocks`` blocks for real
and measures ``Observation.forecast_error``, the relative L2 error ||computed - forecast|| / ||computed|| of the
forecast of those blocks (dimensionless). If it exceeds ``threshold`` the rest of the step is computed in full;
otherwise the rest is forecast. The first blocks stand in for the whole network: where their forecast is off, the
deeper blocks' forecast is unlikely to be better.

Per step, in this order (``n`` = consecutive forecast steps since the last full step, as reported by ``notify``):

1. ``index < warmup_steps``                         -> full, reason ``"warmup"``
2. ``index >= num_steps - tail_steps``              -> full, reason ``"tail"``
3. ``n >= max_forecast``                            -> full without probing, reason ``"cap"``
4. otherwise probe (reason ``"gate"``); ``resolve`` -> full iff ``forecast_error > threshold``
   (strictly greater; a NaN error counts as exceeding).

``notify(info, computed)`` is the truth: a full step (whoever decided it, the runtime included) sets ``n = 0``,
a forecast step adds one.

Example:
    >>> from taylorseer.policy import ConfidenceGate, Observation, StepInfo, build_policy
    >>> policy = build_policy(ConfidenceGate(threshold=0.1, warmup_steps=1))
    >>> policy.begin(3)
    >>> policy.decide(StepInfo(0, 3, 0.0)).reason
    'warmup'
    >>> policy.notify(StepInfo(0, 3, 0.0), True)
    >>> info = StepInfo(1, 3, 1.0)
    >>> policy.decide(info).probe
    True
    >>> policy.resolve(info, Observation(forecast_error=0.2, change=0.01))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Decision, Observation, Policy, StepInfo, check_int, register_policy
from .interval import config_from_dict, config_to_dict


def check_positive_float(owner: str, name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` naming ``owner.name`` unless it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a finite float > 0, got {value!r}")
    return float(value)


def check_probe_fields(config: Any) -> None:
    """Validate the fields every probing policy config shares (warm-up, tail, cap, probe depth)."""
    owner = type(config).__name__
    check_int(owner, "warmup_steps", config.warmup_steps, 0)
    check_int(owner, "tail_steps", config.tail_steps, 0)
    check_int(owner, "max_forecast", config.max_forecast, 1)
    check_int(owner, "probe_blocks", config.probe_blocks, 1)


def check_observed(owner: str, name: str, value: Any) -> float:
    """An observation field as a float: ``ValueError`` if it is not a number or is negative (NaN, inf pass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{owner}.resolve: Observation.{name} must be a float >= 0 (nan and inf allowed), "
                         f"got {value!r}")
    return float(value)


#################################################################################
#          Shared bookkeeping of probing policies (warm-up, tail, cap)           #
#################################################################################

class ProbingPolicy(Policy):
    """Base of the probing policies: forced steps, the forecast cap and the call-order contract.

    Subclasses set ``probe_reason`` and implement ``judge(observation) -> bool`` (True: compute in full), and may
    extend ``after_full`` / ``after_forecast`` (called from ``notify``) and ``reset`` (called from ``begin``).

    The call order is checked, since the counters are only right if it holds: ``begin``; then per step, in index
    order, ``decide``, ``resolve`` (exactly when the decision was a probe, at most once) and ``notify``. A
    violation raises instead of silently drifting.
    """

    probe_reason = "probe"

    def __init__(self, warmup_steps: int, tail_steps: int, max_forecast: int, probe_blocks: int):
        self.warmup_steps = warmup_steps
        self.tail_steps = tail_steps
        self.max_forecast = max_forecast
        self.probe_blocks = probe_blocks
        self._begun = False
        self._num_steps: int | None = None
        self._next_index = 0
        self._pending: Decision | None = None
        self._resolved = False
        self.since_full = 0  # consecutive forecast steps since the last full step (as notified)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def reset(self) -> None:
        """Forget the adaptive state (subclasses extend)."""
        self.since_full = 0

    def begin(self, num_steps: int | None) -> None:
        if num_steps is not None:
            check_int(self._name, "begin(num_steps)", num_steps, 1)
        elif self.tail_steps:
            raise ValueError(f"{self._name}: tail_steps={self.tail_steps} needs num_steps, but begin() was told "
                             "None; pass the generation's number of steps or set tail_steps=0")
        self._begun = True
        self._num_steps = num_steps
        self._next_index = 0
        self._pending = None
        self._resolved = False
        self.reset()

    def decide(self, info: StepInfo) -> Decision:
        if not self._begun:
            raise RuntimeError(f"{self._name}: call begin(num_steps) before the first decide()")
        if self._pending is not None:
            raise RuntimeError(f"{self._name}: step {self._next_index} was decided but not notified; "
                               "call notify(info, computed) before deciding the next step")
        if info.index != self._next_index:
            raise ValueError(f"{self._name}: expected step {self._next_index}, got step {info.index} (steps are "
                             "decided once each, in order; call begin() for a new generation)")
        n = self._num_steps
        if n is not None and info.num_steps is not None and info.num_steps != n:
            raise ValueError(f"{self._name}: step {info.index} says num_steps={info.num_steps} but begin() was "
                             f"told {n}")
        if n is not None and info.index >= n:
            raise ValueError(f"{self._name}: step {info.index} is past the generation's {n} steps")
        if info.index < self.warmup_steps:
            decision = Decision(True, reason="warmup")
        elif n is not None and info.index >= n - self.tail_steps:
            decision = Decision(True, reason="tail")
        elif self.since_full >= self.max_forecast:
            decision = Decision(True, reason="cap")
        else:
            decision = Decision(False, probe=True, reason=self.probe_reason)
        self._pending = decision
        self._resolved = False
        return decision

    def _check_pending(self, info: StepInfo, verb: str) -> Decision:
        if self._pending is None or info.index != self._next_index:
            raise RuntimeError(f"{self._name}.{verb}: step {info.index} was not decided (next step to decide: "
                               f"{self._next_index})")
        return self._pending

    def resolve(self, info: StepInfo, observation: Observation) -> bool:
        decision = self._check_pending(info, "resolve")
        if not decision.probe:
            raise RuntimeError(f"{self._name}.resolve: step {info.index} was decided without a probe "
                               f"(reason {decision.reason!r}); only probe decisions are resolved")
        if self._resolved:
            raise RuntimeError(f"{self._name}.resolve: step {info.index} was already resolved")
        self._resolved = True
        return self.judge(observation)

    def judge(self, observation: Observation) -> bool:
        """True to compute the rest of a probed step in full."""
        raise NotImplementedError

    def notify(self, info: StepInfo, computed: bool) -> None:
        self._check_pending(info, "notify")
        self._pending = None
        self._next_index += 1
        if computed:
            self.since_full = 0
            self.after_full()
        else:
            self.since_full += 1
            self.after_forecast(resolved=self._resolved)
        self._resolved = False

    def after_full(self) -> None:
        """A step was computed in full (subclasses extend)."""

    def after_forecast(self, resolved: bool) -> None:
        """A step was forecast; ``resolved``: it was probed and resolved (subclasses extend)."""


#################################################################################
#                               The confidence gate                              #
#################################################################################

@dataclass(frozen=True)
class ConfidenceGate:
    """Policy config: probe every non-forced step; compute it in full when the probe's forecast error is large.

    ``threshold``: the largest relative L2 forecast error of the probe blocks (dimensionless, e.g. 0.05 = 5 %)
    at which the step is still forecast. ``warmup_steps`` / ``tail_steps``: the first / last steps, computed in
    full without probing (``tail_steps > 0`` needs the generation's ``num_steps``). ``max_forecast``: at most this
    many consecutive forecast steps; the next is computed in full without probing. ``probe_blocks``: how many
    leading blocks a probe computes.

    Example:
        >>> ConfidenceGate(threshold=0.1).to_dict()
        {'threshold': 0.1, 'warmup_steps': 2, 'tail_steps': 0, 'max_forecast': 6, 'probe_blocks': 1}
    """

    family: ClassVar[str] = "gate"  # the eval layer's method family (eval.methods.family_of)
    threshold: float = 0.05
    warmup_steps: int = 2
    tail_steps: int = 0
    max_forecast: int = 6
    probe_blocks: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_positive_float("ConfidenceGate", "threshold", self.threshold))
        check_probe_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON types)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceGate:
        """The config from ``to_dict``'s output; unknown keys are an error."""
        return config_from_dict(cls, data)


@register_policy(ConfidenceGate)
class ConfidenceGatePolicy(ProbingPolicy):
    """``ConfidenceGate``'s decisions: full iff ``forecast_error > threshold`` on a probed step."""

    probe_reason = "gate"

    def __init__(self, config: ConfidenceGate):
        super().__init__(config.warmup_steps, config.tail_steps, config.max_forecast, config.probe_blocks)
        self.threshold = config.threshold

    def judge(self, observation: Observation) -> bool:
        error = check_observed(self._name, "forecast_error", observation.forecast_error)
        return math.isnan(error) or error > self.threshold
