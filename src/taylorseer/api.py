"""One verb: ``apply(model, config) -> handle``; ``handle.remove()`` (or leaving ``with``) undoes it exactly.

Example:
    >>> import taylorseer
    >>> handle = taylorseer.apply(model, taylorseer.preset("paper_dit"))         # doctest: +SKIP
    >>> with handle.step(0, timestep=999):                                         # doctest: +SKIP
    ...     eps = model(x, 999, labels)
    >>> handle.remove()                                                            # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from .adapters import resolve_targets
from .config import TaylorSeerConfig
from .runtime.handle import CacheHandle


def apply(model: nn.Module, config: TaylorSeerConfig | None = None) -> CacheHandle:
    """Install forecasting on ``model`` (in place, reversibly) and return the handle that owns its state.

    The targets come from ``config.modules`` path patterns or the adapter registered for the model's class.
    Everything is validated before the model is touched: on any error the model is left unmodified.
    """
    config = TaylorSeerConfig() if config is None else config
    if not isinstance(config, TaylorSeerConfig):
        raise TypeError(f"config must be a TaylorSeerConfig (see taylorseer.preset), got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = resolve_targets(model, config)
    return CacheHandle.install(model, config, targets)
