"""Runtime: install (swap/restore forwards), state (factors), step (the decision point), observers, the handle."""

from .handle import CacheHandle
from .measure import count_flops
from .observers import CacheStats

__all__ = ["CacheHandle", "CacheStats", "count_flops"]
