"""taylorseer: training-free acceleration of diffusion transformers by forecasting skipped steps' features.

Example:
    >>> import taylorseer
    >>> cfg = taylorseer.preset("paper_dit")
    >>> cfg.interval, cfg.max_order
    (4, 4)
"""

from .api import apply
from .config import PRESET_NAMES, TaylorSeerConfig, preset
from .runtime import CacheHandle, CacheStats, count_flops
from .runtime.allocator import tune_cpu_allocator

__version__ = "0.1.0"
__all__ = ["apply", "TaylorSeerConfig", "preset", "PRESET_NAMES", "CacheHandle", "CacheStats", "count_flops",
           "tune_cpu_allocator"]
