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

from collections.abc import Callable, Sequence
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


#################################################################################
#                 One pass per forecast step: the batched evaluation             #
#################################################################################

def weighted_sum(factors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``factors[0] + sum_i weights[i] * factors[i]`` as a new tensor (``weights[0]`` is 1 and unused), in the
    order every weighted-sum forecaster evaluates: one fused ``add`` for the first two terms, then ``add_``.

    Example:
        >>> weighted_sum([torch.tensor([1.0]), torch.tensor([2.0])], [1.0, 0.5])
        tensor([2.])
    """
    if len(factors) == 1:
        return factors[0].clone()
    output = torch.add(factors[0], factors[1], alpha=weights[1])
    for factor, weight in zip(factors[2:], weights[2:]):
        output.add_(factor, alpha=weight)
    return output


def weighted_sum_batch(factor_lists: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    """``weighted_sum`` of many factor lists of one length with one set of weights, as ``torch._foreach_*`` calls:
    the same operations per tensor (bit-identical results), one call per term instead of one per term and list.

    Example:
        >>> weighted_sum_batch([[torch.tensor([1.0]), torch.tensor([2.0])]] * 2, [1.0, 0.5])
        [tensor([2.]), tensor([2.])]
    """
    columns = list(zip(*factor_lists))
    if len(columns) == 1:
        return list(torch._foreach_mul(list(columns[0]), 1.0))  # a copy: x * 1.0 is x exactly
    outputs = list(torch._foreach_add(list(columns[0]), list(columns[1]), alpha=weights[1]))
    for column, weight in zip(columns[2:], weights[2:]):
        torch._foreach_add_(outputs, list(column), alpha=weight)
    return outputs


def _cast(factors: Sequence[torch.Tensor], dtype: torch.dtype | None) -> Sequence[torch.Tensor]:
    return factors if dtype is None else [f if f.dtype == dtype else f.to(dtype) for f in factors]


def predict_batch(forecaster: Any, states: Sequence[FactorState], point: float, *,
                  dtypes: Sequence[torch.dtype | None] | None = None,
                  targets: Sequence[str] | None = None) -> list[torch.Tensor]:
    """The forecasts of many states at one abscissa ``point`` (one per state, in order): what the runtime calls once
    per forecast step for all its targets. Results equal ``forecaster.predict`` state by state, to the bit.

    A forecaster with its own ``predict_batch(states, point, dtypes=..., targets=...)`` is asked directly; one with
    ``weights(state, point) -> list[float]`` (its forecast is ``weighted_sum(factors, weights)``) is evaluated with
    one ``torch._foreach_*`` call per term for every group of states sharing weights and dtype, so the tensor ops
    of a step grow with the order, not with the number of states; any other forecaster is asked state by state
    (``targets`` passed to those with ``per_target = True``). ``dtypes``: each result's dtype (None: the factors').

    Example:
        >>> from taylorseer.forecast import TaylorForecast, build_forecaster
        >>> f = build_forecaster(TaylorForecast(max_order=1))
        >>> s = f.update(f.update(f.empty(), torch.tensor([1.0]), 0.0), torch.tensor([3.0]), 1.0)
        >>> predict_batch(f, [s, s], 2.0)
        [tensor([5.]), tensor([5.])]
    """
    dtypes = list(dtypes) if dtypes is not None else [None] * len(states)
    own = getattr(forecaster, "predict_batch", None)
    if own is not None:
        return list(own(states, point, dtypes=dtypes, targets=targets))
    weights_of = getattr(forecaster, "weights", None)
    if weights_of is None:
        extra = getattr(forecaster, "per_target", False)
        return [forecaster.predict(s, point, dtype=d, **({"target": targets[i]} if extra and targets else {}))
                for i, (s, d) in enumerate(zip(states, dtypes))]
    return weighted_batch(weights_of, states, point, dtypes)


def weighted_batch(weights_of: Callable[[FactorState, float], list[float]], states: Sequence[FactorState],
                   point: float, dtypes: Sequence[torch.dtype | None]) -> list[torch.Tensor]:
    """``weighted_sum`` of every state at ``point`` with ``weights_of(state, point)``, one ``weighted_sum_batch``
    per group of states that share abscissae, order and dtypes (one group on a plain schedule)."""
    groups: dict[tuple, list[int]] = {}
    weights: dict[tuple, list[float]] = {}
    for i, state in enumerate(states):
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        first = state.factors[0]
        key = (state.points, len(state.factors), dtypes[i], first.dtype, first.device)
        if key not in groups:
            groups[key] = []
            weights[key] = weights_of(state, point)
        groups[key].append(i)
    results: list[Any] = [None] * len(states)
    for key, members in groups.items():
        outputs = weighted_sum_batch([_cast(states[i].factors, dtypes[i]) for i in members], weights[key])
        for i, output in zip(members, outputs):
            results[i] = output
    return results


def check_point(state: FactorState, point: float) -> None:
    """``ValueError`` if ``point`` is not finite or repeats the newest stored abscissa (zero spacing)."""
    if point != point or point in (float("inf"), float("-inf")):
        raise ValueError(f"abscissa must be finite, got {point}")
    if state.points and point == state.points[0]:
        raise ValueError(f"point {point} repeats the latest computed abscissa: spacing would be zero")
