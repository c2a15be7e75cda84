"""Runtime: the handle that owns cache state and the step context, plus measurement helpers."""

from .handle import CacheHandle, CacheStats
from .measure import count_flops

__all__ = ["CacheHandle", "CacheStats", "count_flops"]
