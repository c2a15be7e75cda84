"""Policies: when to compute a step in full and when to forecast it; a registry keyed by config type."""

from .anchor import AnchorSchedule
from .base import (
    Decision,
    Observation,
    Policy,
    StepInfo,
    build_policy,
    register_policy,
    registered_policies,
)
from .budget import ErrorBudget
from .gate import ConfidenceGate
from .guidance import GuidanceCache
from .interval import IntervalPolicy, IntervalSchedule
from .schedule import FixedSchedule
from .spectrum import SpectrumSchedule

__all__ = ["Decision", "Observation", "Policy", "StepInfo", "build_policy", "register_policy",
           "registered_policies", "IntervalPolicy", "IntervalSchedule"]
__all__ += ["ConfidenceGate", "ErrorBudget", "FixedSchedule", "GuidanceCache"]
__all__ += ["AnchorSchedule", "SpectrumSchedule"]
