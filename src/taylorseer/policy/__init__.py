"""Policies: when to compute a step in full and when to forecast it."""

from .interval import IntervalPolicy

__all__ = ["IntervalPolicy"]
