"""Adams-Bashforth forecast: integrate the polynomial through the latest feature slopes (in the spirit of AB-Cache).

AB-Cache (Yu et al., arXiv 2504.10540) reads the denoising trajectory through the Adams-Bashforth method and
replaces plain reuse of a cached output by a k-th order Adams-Bashforth combination of several cached outputs.
This file is our own training-free formulation of that idea over ``FactorState``, on the true abscissae (step index,
timestep or sigma; any spacing, either direction). We could read only the paper's abstract, so the formulas below
are ours, not a transcription of the paper's.

Formulation (order ``k``; computed features ``F_0`` (newest), ``F_1``, ... at abscissae ``a_0, a_1, ...``):

* Derivative samples are the secant slopes between consecutive computed features,
  ``s_j = (F_j - F_{j+1}) / (a_j - a_{j+1})`` for ``j = 0 .. k-1`` (the last ``k + 1`` computed features).
* Slope ``s_j`` is placed at the node ``n_j``: ``slope_at="midpoint"`` uses the secant midpoint
  ``n_j = (a_j + a_{j+1}) / 2``; ``slope_at="newer"`` uses its newer end ``n_j = a_j`` (the classical
  Adams-Bashforth convention, where the derivative at a computed step is its backward difference).
* ``q`` is the polynomial of degree ``k - 1`` through ``(n_j, s_j)``, and the forecast at ``x`` is
  ``F(x) = F_0 + integral_{a_0}^{x} q(t) dt`` (integrated exactly, also for ``x`` inside an interval or behind
  ``a_0``).

Stored factors (at most ``k + 1`` tensors of the feature's shape, e.g. ``[B, L, C]``, plus ``k + 1`` floats):
``(F_0, e_0, ..., e_{k-1})`` with ``e_i = s[n_0, ..., n_i]`` the divided differences of the slopes over their
nodes, so ``q(t) = sum_i e_i * prod_{j<i} (t - n_j)`` and
``F(x) = F_0 + sum_i e_i * integral_{a_0}^{x} prod_{j<i} (t - n_j) dt``.
Differences are taken in the feature's dtype before any ``factor_dtype`` cast. Until ``k + 1`` features have been
computed the order is what the history allows (one feature: reuse; two: linear extrapolation).

Exactness (any spacing, distinct nodes):

* both placements are exact for features that are polynomials of degree <= 1 (all slopes equal the derivative);
* ``midpoint`` is exact for polynomials of degree <= ``min(k, 2)``: the secant slope of a quadratic equals its
  derivative at the secant midpoint, and ``q`` (degree ``k - 1 >= 1``) then interpolates the linear ``F'`` exactly.
  It is *not* exact on cubics, for any ``k``: the secant slope of a cubic misses ``F'`` at the midpoint by
  ``F''' (a_j - a_{j+1})**2 / 24`` (on uniform spacing a constant, so the forecast drifts linearly in ``x``).
  For ``k <= 2`` it is the only linear rule on ``k + 1`` points with that exactness, i.e. it coincides with the
  Newton forecast of order ``k`` (``TaylorForecast(max_order=k)``); ``k = 3, 4`` use more history for the same
  (degree 2) exactness and differ from Newton.
* ``newer`` is exact only for degree <= 1 (for ``k >= 2``).

Uniform spacing ``h``, one interval ahead (``x = a_0 + h``): ``newer`` gives the textbook coefficients,
``F_0 + h (3/2 s_0 - 1/2 s_1)`` (k = 2) and ``F_0 + h (23/12 s_0 - 16/12 s_1 + 5/12 s_2)`` (k = 3);
``midpoint`` gives ``F_0 + h (2 s_0 - s_1)`` (k = 2, i.e. ``3 F_0 - 3 F_1 + F_2``) and
``F_0 + h (73/24 s_0 - 37/12 s_1 + 25/24 s_2)`` (k = 3).

Example:
    >>> from taylorseer.forecast import AdamsForecast, build_forecaster
    >>> f = build_forecaster(AdamsForecast(order=2))
    >>> s = f.empty()
    >>> for x in (0.0, 1.0, 3.0):
    ...     s = f.update(s, torch.tensor([x * x]), x)
    >>> f.predict(s, 4.0)
    tensor([16.])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FactorState, ForecasterBase, check_point, register_forecaster, weighted_sum

SLOPE_PLACEMENTS = ("midpoint", "newer")
MAX_ORDER = 4


@dataclass(frozen=True)
class AdamsForecast:
    """Adams-Bashforth forecast of order ``order`` over the last ``order + 1`` computed features.

    ``slope_at="midpoint"`` (default): slopes sit at their secant midpoints; exact for polynomial features of
    degree <= ``min(order, 2)`` on any spacing. ``slope_at="newer"``: the classical Adams-Bashforth placement
    (slope at the newer end); exact for degree <= 1. Keeps ``order + 1`` tensors per cached feature.

    Example:
        >>> AdamsForecast(order=3).slope_at
        'midpoint'
    """

    order: int = 2
    slope_at: str = "midpoint"

    def __post_init__(self) -> None:
        order = self.order
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"AdamsForecast.order must be an int in [1, {MAX_ORDER}], got {order!r}")
        if self.slope_at not in SLOPE_PLACEMENTS:
            raise ValueError(f"AdamsForecast.slope_at must be one of {list(SLOPE_PLACEMENTS)}, got {self.slope_at!r}")


def _node(newer: float, older: float, slope_at: str) -> float:
    """Abscissa at which the secant slope between ``newer`` and ``older`` is taken to be the derivative."""
    return 0.5 * (newer + older) if slope_at == "midpoint" else newer


def _integrals(nodes: list[float], start: float, stop: float) -> list[float]:
    """``integral_{start}^{stop} prod_{j<i} (t - nodes[j]) dt`` for ``i = 0 .. len(nodes) - 1`` (exact, floats)."""
    distance = stop - start
    poly = [1.0]  # coefficients of prod_{j<i} (u - (nodes[j] - start)) in powers of u = t - start
    out = []
    for node in nodes:
        out.append(sum(c * distance ** (p + 1) / (p + 1) for p, c in enumerate(poly)))
        shift = node - start
        poly = [(poly[p - 1] if p > 0 else 0.0) - shift * (poly[p] if p < len(poly) else 0.0)
                for p in range(len(poly) + 1)]
    return out


@register_forecaster(AdamsForecast)
class AdamsForecaster(ForecasterBase):
    """Adams-Bashforth update/forecast bound to one ``AdamsForecast`` (see the module docstring for the math)."""

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        """New state after computing ``feature`` at abscissa ``point``: ``(F_0, e_0, ..., e_{m-1})``, ``m <= order``.

        ``ValueError`` if ``point`` repeats the newest abscissa, is not finite, or makes two slope nodes coincide
        (only possible when the abscissae are not monotone).
        """
        old = state.factors if keep_history else ()
        old_points = state.points if keep_history else ()
        check_point(FactorState(old, old_points), point)
        slope_at = self.config.slope_at
        new = [feature]
        if old:
            newest = old[0] if old[0].dtype == feature.dtype else old[0].to(feature.dtype)
            new.append((feature - newest) / (point - old_points[0]))  # e_0 = s_0, the newest slope
            first_node = _node(point, old_points[0], slope_at)
            for i in range(min(self.config.order - 1, len(old) - 1)):
                # old[1 + i] = s[n_1, ..., n_{i+1}] in the new numbering: the old nodes are the new ones shifted by 1.
                spacing = first_node - _node(old_points[i], old_points[i + 1], slope_at)
                if spacing == 0:
                    raise ValueError(f"point {point} puts two slope nodes at the same abscissa {first_node}: "
                                     f"abscissae must be monotone, got {(point,) + tuple(old_points)}")
                previous = old[1 + i] if old[1 + i].dtype == feature.dtype else old[1 + i].to(feature.dtype)
                new.append((new[1 + i] - previous) / spacing)
        if factor_dtype is not None:
            new = [f.to(factor_dtype) for f in new]
        return FactorState(tuple(new), ((point,) + tuple(old_points))[: len(new)])

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``F_0 + integral_{a_0}^{point} q(t) dt`` (a new tensor; ``dtype``: the result's, default the factors')."""
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        factors = state.factors if dtype is None else [f.to(dtype) for f in state.factors]
        return weighted_sum(factors, self.weights(state, point))

    def weights(self, state: FactorState, point: float) -> list[float]:
        """The scalar multiplying each factor in the forecast at ``point`` (1 for ``F_0``)."""
        points = state.points
        nodes = [_node(points[j], points[j + 1], self.config.slope_at) for j in range(len(state.factors) - 1)]
        return [1.0] + (_integrals(nodes, points[0], point) if nodes else [])
