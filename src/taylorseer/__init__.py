"""taylorseer: training-free acceleration of diffusion transformers by forecasting skipped steps' features.

The common path needs nothing below this package's top level:

    >>> import taylorseer
    >>> cfg = taylorseer.preset("paper_dit")
    >>> cfg.interval, cfg.max_order
    (4, 4)
    >>> model = taylorseer.load_reference()                                    # doctest: +SKIP
    >>> with taylorseer.apply(model, cfg) as handle:                           # doctest: +SKIP
    ...     images = taylorseer.sample(model, torch.arange(10), listener=handle)

Everything but the configs is imported on first use, so ``taylorseer --version`` and ``import taylorseer`` stay
fast (torch is imported when a model-facing name is first touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import PRESET_NAMES, TaylorSeerConfig, preset

_LAZY = {
    "apply": ".api", "default_config": ".api",
    "CacheConfig": ".parts", "Targets": ".parts", "Store": ".parts",
    "CacheHandle": ".runtime", "CacheStats": ".runtime", "count_flops": ".runtime",
    "tune_cpu_allocator": ".runtime.allocator",
    "load_reference": ".models.pretrained", "sample": ".models.sampler",
}

if TYPE_CHECKING:
    from .api import apply, default_config
    from .models.pretrained import load_reference
    from .models.sampler import sample
    from .parts import CacheConfig, Store, Targets
    from .runtime import CacheHandle, CacheStats, count_flops
    from .runtime.allocator import tune_cpu_allocator


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'taylorseer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["apply", "default_config", "TaylorSeerConfig", "CacheConfig", "Targets", "Store", "preset",
           "PRESET_NAMES", "CacheHandle", "CacheStats", "count_flops", "tune_cpu_allocator", "load_reference",
           "sample", "__version__"]
