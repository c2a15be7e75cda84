"""Policies: when to compute a step in full and when to forecast it; a registry keyed by config type."""

from .base import (
    Decision,
    Observation,
    Policy,
    StepInfo,
    build_policy,
    register_policy,
    registered_policies,
)
from .interval import IntervalPolicy, IntervalSchedule

__all__ = ["Decision", "Observation", "Policy", "StepInfo", "build_policy", "register_policy",
           "registered_policies", "IntervalPolicy", "IntervalSchedule"]
