"""Spectral forecast in the spirit of Spectrum (Han et al., "Adaptive Spectral Feature Forecasting for Diffusion
Sampling Acceleration", CVPR 2026, arXiv 2603.01623): a ridge fit of Chebyshev polynomials over the abscissa.

Written from the paper's description (a feature is a function of time, expanded in Chebyshev polynomials
``T_0 .. T_P``, coefficients fitted by ridge regression on the recent computed features, evaluated at the skipped
step); the formulas and defaults below are ours where the description leaves a choice.

Formulation (computed features ``F_1 .. F_K`` at abscissae ``a_1 .. a_K``, the ``history`` newest ones):

* the abscissa is mapped onto the Chebyshev interval by ``tau(a) = 2 a / span - 1`` (``span``: the abscissa's
  range, e.g. the number of steps for ``abscissa="step"``; points outside ``[0, span]`` extrapolate the polynomials);
* ``Phi[k, j] = T_j(tau(a_k))``, ``j = 0 .. degree``; coefficients ``C = argmin ||Phi C - F||^2 + ridge ||C||^2``
  (``F`` the features stacked, one row per computed step; ``C`` has the feature's shape per ``j``);
* the forecast at ``x`` is ``phi(x)^T C = w^T F`` with ``w = (Phi Phi^T + ridge I)^{-1} Phi phi(x)`` (the dual form:
  a ``K x K`` solve on the host in float64, then a weighted sum of the stored features; nothing of the feature's
  size is ever inverted).

Exactness: with ``ridge = 0`` and ``K >= degree + 1`` distinct abscissae the fit interpolates (least squares), so
polynomial features of degree <= ``degree`` are forecast exactly. With ``ridge > 0`` (the paper's 0.1) the fit is
shrunk toward zero: a constant feature is forecast at ``K / (K + ridge)`` of its value for K = 1 .. (degree+1) points
(``phi(x)`` has ``T_0 = 1``), so ``ridge`` should be read relative to the feature scale.

Stored factors: the ``history`` newest computed features, newest first (``history`` tensors of the feature's shape).

Example:
    >>> from taylorseer.forecast import build_forecaster
    >>> f = build_forecaster(SpectrumForecast(degree=2, ridge=0.0, history=3, span=10.0))
    >>> s = f.empty()
    >>> for x in (0.0, 1.0, 3.0):
    ...     s = f.update(s, torch.tensor([x * x], dtype=torch.float64), x)
    >>> round(float(f.predict(s, 5.0)), 6)
    25.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import FactorState, ForecasterBase, check_point, register_forecaster

MAX_DEGREE = 8


@dataclass(frozen=True)
class SpectrumForecast:
    """Chebyshev ridge forecast: ``degree`` (polynomials ``T_0 .. T_degree``; the paper's 4), ``ridge`` (the
    penalty on the coefficients, >= 0; the paper's 0.1), ``history`` (how many of the newest computed features the
    fit uses, >= 1; keeps that many tensors per cached feature), ``span`` (the abscissa range mapped onto
    ``[-1, 1]``, > 0: the number of steps for ``abscissa="step"``).

    Example:
        >>> SpectrumForecast().degree, SpectrumForecast().ridge
        (4, 0.1)
    """

    degree: int = 4
    ridge: float = 0.1
    history: int = 6
    span: float = 50.0

    def __post_init__(self) -> None:
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or not 0 <= self.degree <= MAX_DEGREE:
            raise ValueError(f"SpectrumForecast.degree must be an int in [0, {MAX_DEGREE}], got {self.degree!r}")
        for name, low in (("ridge", 0.0), ("span", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (name == "span" and value == 0):
                rule = ">= 0" if name == "ridge" else "> 0"
                raise ValueError(f"SpectrumForecast.{name} must be a finite number {rule}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"SpectrumForecast.history must be an int >= 1, got {self.history!r}")


def chebyshev(tau: torch.Tensor, degree: int) -> torch.Tensor:
    """``[len(tau), degree + 1]``: ``T_0(tau) .. T_degree(tau)`` by the recurrence ``T_{j+1} = 2 tau T_j - T_{j-1}``.

    Example:
        >>> chebyshev(torch.tensor([0.5], dtype=torch.float64), 3).tolist()
        [[1.0, 0.5, -0.5, -1.0]]
    """
    columns = [torch.ones_like(tau)]
    if degree >= 1:
        columns.append(tau)
    for _ in range(2, degree + 1):
        columns.append(2 * tau * columns[-1] - columns[-2])
    return torch.stack(columns, dim=1)


def spectrum_weights(points: tuple[float, ...], point: float, config: SpectrumForecast) -> list[float]:
    """The weights ``w`` (one per stored feature, same order) with ``forecast(point) = sum_k w_k F_k``.

    Example:
        >>> [round(w, 6) for w in spectrum_weights((1.0, 0.0), 2.0, SpectrumForecast(degree=1, ridge=0.0))]
        [2.0, -1.0]
    """
    scale = 2.0 / config.span
    tau = torch.tensor([p * scale - 1.0 for p in points], dtype=torch.float64)
    phi = chebyshev(tau, config.degree)  # [K, P+1]
    target = chebyshev(torch.tensor([point * scale - 1.0], dtype=torch.float64), config.degree)[0]  # [P+1]
    gram = phi @ phi.T + config.ridge * torch.eye(len(points), dtype=torch.float64)
    # lstsq handles ridge = 0 with fewer distinct constraints than points (minimum-norm solution)
    weights = torch.linalg.lstsq(gram, (phi @ target).unsqueeze(1), driver="gelsd").solution[:, 0]
    return weights.tolist()


@register_forecaster(SpectrumForecast)
class SpectrumForecaster(ForecasterBase):
    """Chebyshev ridge update/forecast bound to one ``SpectrumForecast`` (see the module docstring for the math)."""

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        """New state: ``feature`` first, then the previous features, at most ``history`` of them."""
        old = state if keep_history else FactorState.empty()
        check_point(old, point)
        stored = feature if factor_dtype is None else feature.to(factor_dtype)
        keep = self.config.history
        return FactorState(((stored,) + old.factors)[:keep], ((float(point),) + old.points)[:keep])

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``sum_k w_k F_k`` (a new tensor; ``dtype``: the result's, default the factors')."""
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        weights = spectrum_weights(state.points, float(point), self.config)
        factors = state.factors if dtype is None else tuple(f.to(dtype) for f in state.factors)
        output = factors[0] * weights[0]
        for weight, factor in zip(weights[1:], factors[1:]):
            output.add_(factor, alpha=weight)
        return output
