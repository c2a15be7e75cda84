"""The forecaster contract and its registry: a frozen config type selects the pure-math implementation.

A forecaster turns the features of the computed (full) steps of one cached target into a prediction at a skipped
step. It is pure tensor math over an immutable ``FactorState`` (factors + the abscissae they came from, newest
first): no modules, hooks or globals. The runtime owns one state per (branch, target) and calls only ``update``
(after a full step) and ``predict`` (on a forecast step).

Adding a forecaster is one file: a frozen config dataclass, a class implementing ``Forecaster``, and one
``register_forecaster`` line. The runtime never changes.

Example:
    >>> from taylorseer.forecast import TaylorForecast, build_forecaster
    >>> f = build_forecaster(TaylorForecast(max_order=1))
    >>> s = f.update(f.empty(), torch.tensor([1.0]), 0.0)
    >>> s = f.update(s, torch.tensor([3.0]), 1.0)
    >>> f.predict(s, 2.0)
    tensor([5.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import torch


class FactorState(NamedTuple):
    """What a forecaster keeps for one cached feature: tensors and the abscissae they came from (newest first).

    The meaning of ``factors`` is the forecaster's own (Taylor derivative estimates, Newton divided differences,
    raw past features, ...); the runtime only stores, frees and measures them.
    """

    factors: tuple[torch.Tensor, ...]
    points: tuple[float, ...]

    @staticmethod
    def empty() -> FactorState:
        """The state before any computed step."""
        return FactorState((), ())

    @property
    def order(self) -> int:
        """Number of factors minus one (-1 when empty)."""
        return len(self.factors) - 1

    def nbytes(self) -> int:
        """Bytes held by the factor tensors."""
        return sum(f.numel() * f.element_size() for f in self.factors)


@runtime_checkable
class Forecaster(Protocol):
    """Pure forecast math over ``FactorState``; built from a frozen config by ``build_forecaster``.

    ``update(state, feature, point)``: the new state after computing ``feature`` at abscissa ``point`` (a float:
    step index, timestep or sigma). ``keep_history=False`` starts again from ``feature`` alone. ``factor_dtype``
    stores the factors in another dtype (differences are taken in the feature's own dtype). Raises ``ValueError``
    if ``point`` repeats the newest stored abscissa.
    ``predict(state, point)``: a new tensor, the forecast at ``point`` (``dtype``: the result's dtype, default the
    factors'). Raises ``ValueError`` on an empty state. Never modifies ``state``.
    ``history_from_step``: full steps with a step index below this keep no history (the reference code's quirk);
    0 for every principled forecaster.
    """

    history_from_step: int

    def empty(self) -> FactorState: ...

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState: ...

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor: ...


class ForecasterBase:
    """Optional base for forecaster classes: keeps the config, no history quirk, the empty state.

    Example:
        >>> class Reuse(ForecasterBase):   # doctest: +SKIP
        ...     def update(self, state, feature, point, **kw): return FactorState((feature,), (point,))
        ...     def predict(self, state, point, **kw): return state.factors[0].clone()
    """

    history_from_step = 0

    def __init__(self, config: Any):
        self.config = config

    def empty(self) -> FactorState:
        """The state before any computed step."""
        return FactorState.empty()


C = TypeVar("C")
_FORECASTERS: dict[type, Callable[[Any], Forecaster]] = {}


def register_forecaster(config_type: type[C]) -> Callable[[Callable[[C], Forecaster]], Callable[[C], Forecaster]]:
    """Decorator: ``builder(config) -> Forecaster`` handles configs of exactly ``config_type``.

    Example:
        >>> @register_forecaster(MyForecast)          # doctest: +SKIP
        ... class MyForecaster: ...
    """

    def decorate(builder: Callable[[C], Forecaster]) -> Callable[[C], Forecaster]:
        _FORECASTERS[config_type] = builder
        return builder

    return decorate


def build_forecaster(config: Any) -> Forecaster:
    """The forecaster for a forecaster config (``TypeError`` naming the registered types otherwise)."""
    builder = _FORECASTERS.get(type(config))
    if builder is None:
        names = sorted(t.__name__ for t in _FORECASTERS)
        raise TypeError(f"forecaster must be one of the registered forecaster configs {names}, "
                        f"got {type(config).__name__}")
    return builder(config)


def registered_forecasters() -> dict[str, type]:
    """Name -> config type of every registered forecaster."""
    return {t.__name__: t for t in _FORECASTERS}


def check_point(state: FactorState, point: float) -> None:
    """``ValueError`` if ``point`` is not finite or repeats the newest stored abscissa (zero spacing)."""
    if point != point or point in (float("inf"), float("-inf")):
        raise ValueError(f"abscissa must be finite, got {point}")
    if state.points and point == state.points[0]:
        raise ValueError(f"point {point} repeats the latest computed abscissa: spacing would be zero")
