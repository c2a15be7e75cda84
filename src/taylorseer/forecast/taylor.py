"""Forecast math as pure tensor functions: update Taylor factors at a computed step, evaluate at another.

No modules, hooks or globals: a ``TaylorState`` goes in, a new one comes out. Order 0 is plain reuse (FORA).

Two schemes (see docs/design.md):

* ``reference`` -- the official TaylorSeer code, to the last bit in float32. Factors are derivative estimates
  ``d[0] = F(s)``, ``d[i+1] = (d[i] - d_old[i]) / h`` with ``h`` the latest spacing only, and the forecast is the
  Taylor sum ``sum_i (1/i!) * d[i] * x**i`` evaluated term by term from ``i = 0`` with ``x = s - s_last``.
* ``divided`` -- Newton divided differences over the actual abscissae ``a_0 (newest), a_1, ...``: factors
  ``c[i] = f[a_0, ..., a_i]`` and the forecast ``sum_i c[i] * prod_{j<i} (x - a_j)``, i.e. the polynomial through
  the last ``k + 1`` computed points. Exact for polynomials of degree <= k on any spacing. On uniform spacing its
  derivative estimates ``i! * c[i]`` equal the reference factors; forecasts coincide for orders 0 and 1.

Example:
    >>> s = TaylorState.empty()
    >>> for x in (0.0, 1.0, 2.0):
    ...     s = update(s, torch.tensor([x * x]), x, max_order=2, scheme="divided")
    >>> forecast(s, 3.0, scheme="divided")
    tensor([9.])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import FactorState, register_forecaster, weighted_groups, weighted_sum

SCHEMES = ("reference", "divided")
TaylorState = FactorState  # the Taylor factors of one cached feature (newest abscissa first)


def update(
    state: TaylorState,
    feature: torch.Tensor,
    point: float,
    max_order: int,
    scheme: str = "divided",
    keep_history: bool = True,
    factor_dtype: torch.dtype | None = None,
) -> TaylorState:
    """New factors after computing ``feature`` at abscissa ``point``.

    ``keep_history=False`` drops the old factors (only ``feature`` is kept), as the reference code does on its
    first steps. ``factor_dtype`` stores the factors in another dtype; differences are taken in the feature's.
    Raises ``ValueError`` if ``point`` repeats the latest computed abscissa (zero spacing).
    """
    old = state.factors if keep_history else ()
    old_points = state.points if keep_history else ()
    if old_points and point == old_points[0]:
        raise ValueError(f"point {point} repeats the latest computed abscissa: spacing would be zero")
    new = [feature]
    for i in range(min(max_order, len(old))):
        if scheme == "reference":
            spacing = point - old_points[0]
        elif scheme == "divided":
            spacing = point - old_points[i]
        else:
            raise ValueError(f"scheme must be one of ['reference', 'divided'], got {scheme!r}")
        previous = old[i] if old[i].dtype == feature.dtype else old[i].to(feature.dtype)
        new.append(torch.sub(new[i], previous).div_(spacing))  # (new - previous) / spacing, bit for bit, in place
    if factor_dtype is not None:
        new = [f.to(factor_dtype) for f in new]
    return TaylorState(tuple(new), ((point,) + tuple(old_points))[: max_order + 1])


def forecast(
    state: TaylorState, point: float, scheme: str = "divided", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The feature forecast at abscissa ``point`` (a new tensor; the state is not modified).

    ``dtype`` is the result's dtype (default: the factors'). Raises ``ValueError`` on an empty state.
    """
    if not state.factors:
        raise ValueError("cannot forecast from an empty state: no step has been computed yet")
    if scheme == "reference":
        return _forecast_reference(state, point, dtype)
    if scheme == "divided":
        return _forecast_newton(state, point, dtype)
    raise ValueError(f"scheme must be one of ['reference', 'divided'], got {scheme!r}")


def _forecast_reference(state: TaylorState, point: float, dtype: torch.dtype | None) -> torch.Tensor:
    # Keep the reference's exact evaluation order: ((1/i!) * d_i) * x**i, summed from i = 0 upward.
    distance = point - state.points[0]
    factors = state.factors if dtype is None else [f.to(dtype) for f in state.factors]
    output = factors[0].clone()
    for i in range(1, len(factors)):
        output += (1 / math.factorial(i)) * factors[i] * (distance**i)
    return output


def _forecast_newton(state: TaylorState, point: float, dtype: torch.dtype | None) -> torch.Tensor:
    factors = state.factors if dtype is None else [f.to(dtype) for f in state.factors]
    return weighted_sum(factors, newton_weights(state, point))


def newton_weights(state: TaylorState, point: float) -> list[float]:
    """The scalar multiplying each divided-difference factor in the forecast at ``point``:
    ``prod_{j<i} (point - a_j)`` (1 for ``c[0]``), in the order the forecast multiplies them out."""
    weights = [1.0]
    if len(state.factors) > 1:
        weight = point - state.points[0]
        weights.append(weight)
        for i in range(2, len(state.factors)):
            weight *= point - state.points[i - 1]
            weights.append(weight)
    return weights


def forecast_batch(states: list[TaylorState], point: float, scheme: str = "divided",
                   dtypes: list[torch.dtype | None] | None = None) -> list[torch.Tensor]:
    """``forecast`` of many states at one ``point``, as ``torch._foreach_*`` calls over the states that share
    their abscissae and order: the same operations per tensor as ``forecast`` (bit-identical results), a number of
    calls that grows with the order, not with the number of states.

    Example:
        >>> s = update(update(TaylorState.empty(), torch.tensor([1.0]), 0.0, 1), torch.tensor([2.0]), 1.0, 1)
        >>> forecast_batch([s, s], 3.0)
        [tensor([4.]), tensor([4.])]
    """
    dtypes = dtypes if dtypes is not None else [None] * len(states)
    results: list = [None] * len(states)
    for members, evaluate in forecast_groups(states, scheme, dtypes):
        for i, output in zip(members, evaluate(point)):
            results[i] = output
    return results


def forecast_groups(states: list[TaylorState], scheme: str, dtypes: list[torch.dtype | None]) -> list[tuple]:
    """``forecast_batch``'s grouping, prepared once: ``[(members, evaluate(point))]`` (see ``base.BatchPlan``)."""
    if scheme == "divided":
        return weighted_groups(newton_weights, states, dtypes)
    if scheme != "reference":
        raise ValueError(f"scheme must be one of ['reference', 'divided'], got {scheme!r}")
    groups: dict[tuple, list[int]] = {}
    for i, state in enumerate(states):
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        groups.setdefault((state.points[0], len(state.factors), dtypes[i]), []).append(i)
    out = []
    for (first, order, dtype), members in groups.items():
        columns = [list(c) for c in zip(*[states[i].factors for i in members])]

        def evaluate(point: float, first: float = first, order: int = order, dtype: torch.dtype | None = dtype,
                     columns: list = columns) -> list[torch.Tensor]:
            cols = columns if dtype is None else [[f.to(dtype) for f in c] for c in columns]
            distance = point - first
            # The reference's order, term by term: ((1/i!) * d_i) * x**i added to a copy of d_0.
            outputs = list(torch._foreach_mul(cols[0], 1.0))  # a copy: x * 1.0 is x exactly
            for i in range(1, order):
                term = torch._foreach_mul(cols[i], 1 / math.factorial(i))
                torch._foreach_mul_(term, distance**i)
                torch._foreach_add_(outputs, term)
            return outputs

        out.append((members, evaluate))
    return out


def derivatives(state: TaylorState, scheme: str = "divided") -> list[torch.Tensor]:
    """Derivative estimates ``d[i]`` at the newest point: the factors themselves (reference) or ``i! * c[i]``.

    For ``divided`` these are the derivatives of the interpolating polynomial's *leading* terms (exact for
    ``i = k``); they equal the reference factors on uniform spacing.
    """
    if scheme == "reference":
        return list(state.factors)
    return [math.factorial(i) * f for i, f in enumerate(state.factors)]


#################################################################################
#                          Forecaster configs (registered)                      #
#################################################################################

@dataclass(frozen=True)
class TaylorForecast:
    """Truncated Taylor / Newton forecast of order ``max_order`` (0 = reuse, FORA).

    ``scheme="divided"``: Newton divided differences over the actual abscissae, exact for polynomials of degree
    <= ``max_order`` on any spacing. ``scheme="reference"``: the official code's derivative estimates, bit-exact
    with it in float32. ``history_from_step``: full steps with a smaller step index keep no history (the reference
    code's quirk, ``warmup_steps - 1``; 0 otherwise).

    Example:
        >>> TaylorForecast(max_order=2).scheme
        'divided'
    """

    max_order: int = 2
    scheme: str = "divided"
    history_from_step: int = 0

    def __post_init__(self) -> None:
        for name in ("max_order", "history_from_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TaylorForecast.{name} must be an int >= 0, got {value!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"TaylorForecast.scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")

    def family(self) -> str:
        """The eval layer's method family (``eval.methods.family_of``): order 0 is FORA's plain reuse."""
        return "fora" if self.max_order == 0 else "taylorseer"


@register_forecaster(TaylorForecast)
class TaylorForecaster:
    """``update``/``forecast`` above, bound to one ``TaylorForecast``."""

    def __init__(self, config: TaylorForecast):
        self.config = config
        self.history_from_step = config.history_from_step

    def empty(self) -> FactorState:
        return FactorState.empty()

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        return update(state, feature, point, self.config.max_order, self.config.scheme, keep_history=keep_history,
                      factor_dtype=factor_dtype)

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return forecast(state, point, self.config.scheme, dtype=dtype)

    def plan_batch(self, states: list[FactorState], dtypes: list[torch.dtype | None]) -> list[tuple]:
        """``predict`` of many states in one pass, prepared (``forecast_groups``; see ``base.BatchPlan``)."""
        return forecast_groups(states, self.config.scheme, dtypes)

    def traced_weights(self, state: FactorState, point: float) -> list[float]:
        """The forecast as ``sum_i w_i * factor_i`` (``w_0 = 1``): what a compiled graph evaluates."""
        if self.config.scheme == "divided":
            return newton_weights(state, point)
        distance = point - state.points[0]
        return [1.0] + [distance**i / math.factorial(i) for i in range(1, len(state.factors))]
