"""Forecast then calibrate: a BDF2 predictor and a Heun (trapezoidal) corrector on cached features only (FoCa-like).

FoCa (Zheng et al., arXiv 2508.16211) treats the sequence of a layer's features along the sampling trajectory as the
solution of a feature-ODE ``dF/dt = g(t)`` and forecasts a skipped step with a BDF2 predictor followed by a
Heun-type calibration, with no extra model call. We could read only the paper's abstract, so the scheme below is our
own training-free adaptation on the true abscissae (step index, timestep or sigma; any spacing, either direction),
derived from those two ingredients.

Notation: the last three computed features ``F_0`` (newest), ``F_1``, ``F_2`` at ``a_0, a_1, a_2``; their Newton
divided differences ``c_1 = F[a_0, a_1]``, ``c_2 = F[a_0, a_1, a_2]``; ``h_0 = a_0 - a_1``; target ``x``,
``X = x - a_0``.

* Forecast (BDF2 predictor): ``P`` is the quadratic through the three features, the backward-difference polynomial
  BDF2 is built on, and ``F_p = P(x) = F_0 + X c_1 + X (X + h_0) c_2``. Equivalently, ``F_p`` is the value that
  satisfies the variable-step BDF2 relation at ``x``,
  ``F_p = ((1 + w)**2 F_0 - w**2 F_1 + (1 + w) X g_p) / (1 + 2 w)`` with ``w = X / h_0``, for the derivative
  ``g_p = P'(x)`` extrapolated from the cached history.
* Calibrate (Heun): one trapezoidal step from the newest computed feature, ``F_c = F_0 + X/2 (g_0 + g_x)``, with
  ``g_0 = P'(a_0) = c_1 + h_0 c_2`` (the BDF2 derivative at ``a_0``) and ``g_x = (F_p - F_0) / X`` (the derivative at
  the target re-estimated through the forecast, by the one-step backward difference: without a model call this is
  the only new slope). Hence ``F_c = (F_p + F_0 + X g_0) / 2``: the mean of the BDF2 forecast and the tangent line
  with the second-order slope, i.e.

      F_c = F_0 + X c_1 + X (h_0 + X/2) c_2.

  (Re-estimating ``g_x`` with the BDF2 formula instead gives ``P'(x)``, and the trapezoidal rule, exact on ``P``,
  would return ``F_p`` unchanged: the calibration acts only through the lower-order slope at the target.)

Exactness, on any spacing: the calibrated forecast is exact on features of degree <= 1, and on a quadratic feature
with leading coefficient ``c`` it returns exactly ``F(x) - c X**2 / 2``: the calibration halves the curvature term
(the damping FoCa motivates as stability under large skipping intervals); it is exact on quadratics on no spacing,
uniform included. ``calibrate=False`` returns the predictor ``F_p``, exact on degree <= 2 (it is then
``TaylorForecast(max_order=2)``). With two computed features both are linear extrapolation; with one, reuse.

Memory: 3 tensors of the feature's shape (e.g. ``[B, L, C]``) per cached feature (``F_0, c_1, c_2``), as
TaylorSeer order 2.

Example:
    >>> from taylorseer.forecast import CorrectorForecast, build_forecaster
    >>> f = build_forecaster(CorrectorForecast())
    >>> s = f.empty()
    >>> for x in (0.0, 1.0, 2.0):
    ...     s = f.update(s, torch.tensor([x * x]), x)
    >>> f.predict(s, 3.0)  # F_p = 9, g_0 = 4: (9 + 4 + 1 * 4) / 2 = 8.5 (true 9)
    tensor([8.5000])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import taylor
from .base import FactorState, ForecasterBase, check_point, register_forecaster, weighted_sum


@dataclass(frozen=True)
class CorrectorForecast:
    """BDF2 forecast of the last three computed features, then a Heun calibration (``calibrate=False``: skip it).

    Exact on linear features on any spacing; on quadratics the calibrated forecast misses by exactly half the
    curvature term, ``-c (x - a_0)**2 / 2``. Keeps 3 tensors per cached feature.

    Example:
        >>> CorrectorForecast().calibrate
        True
    """

    calibrate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"CorrectorForecast.calibrate must be a bool (True or False), got {self.calibrate!r}")


@register_forecaster(CorrectorForecast)
class CorrectorForecaster(ForecasterBase):
    """Newton factors of order 2 (``taylor.update``) with the predictor/corrector evaluation of the module docstring."""

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        """``(F_0, c_1, c_2)`` after computing ``feature`` at ``point`` (``ValueError`` on a repeated abscissa)."""
        check_point(state if keep_history else FactorState.empty(), point)
        return taylor.update(state, feature, point, 2, "divided", keep_history=keep_history,
                             factor_dtype=factor_dtype)

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``F_c`` (or ``F_p`` without calibration) at ``point``: a new tensor; never modifies ``state``."""
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        factors = state.factors if dtype is None else [f.to(dtype) for f in state.factors]
        return weighted_sum(factors, self.weights(state, point))

    def weights(self, state: FactorState, point: float) -> list[float]:
        """The scalar multiplying each factor in the forecast at ``point``: 1, ``X`` and, with three factors,
        ``X (h_0 + X/2)`` (calibrated) or ``X (h_0 + X)``."""
        if len(state.factors) == 1:
            return [1.0]
        distance = point - state.points[0]
        if len(state.factors) == 2:
            return [1.0, distance]
        spacing = state.points[0] - state.points[1]
        return [1.0, distance, distance * (spacing + (distance / 2 if self.config.calibrate else distance))]
