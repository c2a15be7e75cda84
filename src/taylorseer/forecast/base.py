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
    factors'), referenced nowhere else: the runtime may write into it (``writable``), so never return a factor itself.
    Raises ``ValueError`` on an empty state. Never modifies ``state``.
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


def writable(fresh: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether an elementwise op of ``fresh`` with ``others`` may write its result into ``fresh`` with the same bits
    as the out-of-place op: ``fresh`` is a forecast just made (``predict`` returns a new tensor that nothing else
    references), already of the result's shape, dtype and device, dense, and no autograd graph is being built.

    ``fresh.mul_(g).add_(h)`` then equals ``g * fresh + h`` to the bit (IEEE multiplication and addition are
    commutative) and skips two allocations; on the CPU, writing to memory just read is also faster than writing a new
    tensor (in cache, 25 vs 41 us for one [32, 64, 128] float32 add, 1 thread, AMD EPYC:
    scripts/experiments/elementwise_micro.py; in a generation of the embedded DiT, a block-granularity forecast step
    4.38 -> 3.63 ms on an Intel Xeon: docs/results/hot_path).

    Example:
        >>> writable(torch.zeros(2, 3), torch.ones(1, 3))
        True
        >>> writable(torch.zeros(1, 3), torch.ones(2, 3))   # the result is larger than the forecast
        False
    """
    if fresh.requires_grad or not fresh.is_contiguous():
        return False
    grad = torch.is_grad_enabled()
    for other in others:
        if other.dtype != fresh.dtype or other.device != fresh.device or (grad and other.requires_grad):
            return False
        if other.shape != fresh.shape:
            try:
                if torch.broadcast_shapes(other.shape, fresh.shape) != fresh.shape:
                    return False
            except RuntimeError:  # not broadcastable: the out-of-place op raises its own error
                return False
    return True


def _cast(factors: Sequence[torch.Tensor], dtype: torch.dtype | None) -> Sequence[torch.Tensor]:
    return factors if dtype is None else [f if f.dtype == dtype else f.to(dtype) for f in factors]


def predict_batch(forecaster: Any, states: Sequence[FactorState], point: float, *,
                  dtypes: Sequence[torch.dtype | None] | None = None,
                  targets: Sequence[str] | None = None) -> list[torch.Tensor]:
    """The forecasts of many states at one abscissa ``point`` (one per state, in order): what the runtime calls once
    per forecast step for all its targets. Results equal ``forecaster.predict`` state by state, to the bit.

    A forecaster with ``plan_batch`` or ``weights(state, point) -> list[float]`` (its forecast is
    ``weighted_sum(factors, weights)``) is evaluated with one ``torch._foreach_*`` call per term for every group of
    states sharing abscissae and dtype, so the tensor ops of a step grow with the order, not with the number of
    states; any other forecaster is asked state by state (``targets`` passed to those with ``per_target = True``).
    See ``BatchPlan``. ``dtypes``: each result's dtype (None: the factors').

    Example:
        >>> from taylorseer.forecast import TaylorForecast, build_forecaster
        >>> f = build_forecaster(TaylorForecast(max_order=1))
        >>> s = f.update(f.update(f.empty(), torch.tensor([1.0]), 0.0), torch.tensor([3.0]), 1.0)
        >>> predict_batch(f, [s, s], 2.0)
        [tensor([5.]), tensor([5.])]
    """
    return BatchPlan(forecaster, states, dtypes=dtypes, targets=targets).run(point)


class BatchPlan:
    """``predict_batch`` split in two: the grouping of fixed states into ``torch._foreach_*`` columns, prepared
    once (the runtime keeps it while no factor changes, i.e. across the forecast steps between two full steps), and
    ``run(point)``, the evaluation at an abscissa: the weights of each group, then one foreach call per term.

    A forecaster may provide ``plan_batch(states, dtypes) -> [(members, evaluate)]`` (``evaluate(point)`` returns
    the forecasts of ``states[i] for i in members``); with ``weights(state, point)`` the groups are built here; any
    other forecaster is evaluated state by state.

    Example:
        >>> from taylorseer.forecast import TaylorForecast, build_forecaster
        >>> f = build_forecaster(TaylorForecast(max_order=0))
        >>> BatchPlan(f, [f.update(f.empty(), torch.tensor([2.0]), 0.0)]).run(5.0)
        [tensor([2.])]
    """

    def __init__(self, forecaster: Any, states: Sequence[FactorState], *,
                 dtypes: Sequence[torch.dtype | None] | None = None, targets: Sequence[str] | None = None):
        self.size = len(states)
        dtypes = list(dtypes) if dtypes is not None else [None] * len(states)
        own = getattr(forecaster, "plan_batch", None)
        weights_of = getattr(forecaster, "weights", None)
        if own is not None:
            self.groups = list(own(states, dtypes))
        elif weights_of is not None:
            self.groups = weighted_groups(weights_of, states, dtypes)
        else:
            extra = getattr(forecaster, "per_target", False)

            def one(i: int) -> Callable[[float], list[torch.Tensor]]:
                kw: dict[str, Any] = {"target": targets[i]} if extra and targets else {}
                return lambda point: [forecaster.predict(states[i], point, dtype=dtypes[i], **kw)]

            self.groups = [([i], one(i)) for i in range(len(states))]
        self.whole = len(self.groups) == 1 and list(self.groups[0][0]) == list(range(self.size))

    def run(self, point: float) -> list[torch.Tensor]:
        """The forecasts of the states at ``point``, in order."""
        if self.whole:
            return list(self.groups[0][1](point))
        results: list[Any] = [None] * self.size
        for members, evaluate in self.groups:
            for i, output in zip(members, evaluate(point)):
                results[i] = output
        return results


def weighted_groups(weights_of: Callable[[FactorState, float], list[float]], states: Sequence[FactorState],
                    dtypes: Sequence[torch.dtype | None]) -> list[tuple[list[int], Callable]]:
    """The states grouped by abscissae, order and result dtype (one group on a plain schedule), each with its
    evaluation: ``weighted_sum_batch`` of the group's factor columns with ``weights_of`` its first state."""
    groups: dict[tuple, list[int]] = {}
    for i, state in enumerate(states):
        key = (state.points, len(state.factors), dtypes[i])  # foreach takes mixed devices and dtypes
        members = groups.get(key)
        if members is None:
            if not state.factors:
                raise ValueError("cannot forecast from an empty state: no step has been computed yet")
            members = groups[key] = []
        members.append(i)
    out = []
    for (_, _, dtype), members in groups.items():
        first = states[members[0]]
        columns = [list(column) for column in zip(*[states[i].factors for i in members])]

        def evaluate(point: float, first: FactorState = first, columns: list = columns,
                     dtype: torch.dtype | None = dtype) -> list[torch.Tensor]:
            cols = columns if dtype is None else [list(_cast(c, dtype)) for c in columns]
            return list(weighted_columns(cols, weights_of(first, point)))

        out.append((members, evaluate))
    return out


def weighted_columns(columns: Sequence[list[torch.Tensor]], weights: Sequence[float]) -> Sequence[torch.Tensor]:
    """``weighted_sum_batch`` on factor columns (``columns[i]``: the i-th factor of every state)."""
    if len(columns) == 1:
        return torch._foreach_mul(columns[0], 1.0)  # a copy: x * 1.0 is x exactly
    outputs = torch._foreach_add(columns[0], columns[1], alpha=weights[1])
    for i in range(2, len(columns)):
        torch._foreach_add_(outputs, columns[i], alpha=weights[i])
    return outputs


def weighted_batch(weights_of: Callable[[FactorState, float], list[float]], states: Sequence[FactorState],
                   point: float, dtypes: Sequence[torch.dtype | None]) -> list[torch.Tensor]:
    """``weighted_sum`` of every state at ``point`` with ``weights_of(state, point)``, one ``weighted_sum_batch``
    per group of states that share abscissae, order and dtypes (one group on a plain schedule)."""
    results: list[Any] = [None] * len(states)
    for members, evaluate in weighted_groups(weights_of, states, dtypes):
        for i, output in zip(members, evaluate(point)):
            results[i] = output
    return results


def check_point(state: FactorState, point: float) -> None:
    """``ValueError`` if ``point`` is not finite or repeats the newest stored abscissa (zero spacing)."""
    if point != point or point in (float("inf"), float("-inf")):
        raise ValueError(f"abscissa must be finite, got {point}")
    if state.points and point == state.points[0]:
        raise ValueError(f"point {point} repeats the latest computed abscissa: spacing would be zero")
