"""HiCache forecast: the Taylor series with its monomials replaced by dual-scaled Hermite polynomials.

HiCache (Feng et al., arXiv 2508.16984) keeps TaylorSeer's derivative estimates ``d_k`` at the newest computed step
and replaces the basis ``x**k`` of the Taylor sum by the *dual-scaled physicists' Hermite polynomial*
``Ht_k(x) = sigma**k * H_k(sigma * x)``, with ``H_0 = 1``, ``H_1 = 2y``, ``H_{k+1}(y) = 2y H_k(y) - 2k H_{k-1}(y)``
and a contraction ``sigma`` in (0, 1) (0.5 in the authors' released code, which is our default):

    F(x) = F_0 + sum_{k=1..K} d_k / k! * sigma**k * H_k(sigma * (x - a_0)).

What it claims: feature-derivative estimates in diffusion transformers look Gaussian, for which Hermite polynomials
are the natural basis, and the two scalings (the argument by ``sigma``, the k-th term by ``sigma**k``) keep the
high-order terms bounded, so long forecasts are more stable than TaylorSeer's. What the formula does (derived here,
tested in tests/math_policy/test_forecasters.py):

* Its k-th term grows like ``(2 sigma**2)**k * x**k / k!``: for ``sigma < 1/sqrt(2)`` every order >= 1 is damped by
  ``(2 sigma**2)**k`` against Taylor's ``x**k / k!`` at large offsets (``1/2**k`` at the default 0.5).
* ``sigma**k H_k(sigma x) = s**k He_k(s x)`` with ``s = sqrt(2) sigma`` and ``He_k`` the probabilists' Hermite
  polynomials; at ``sigma = 1/sqrt(2)`` the forecast is ``F_0 + sum_k d_k He_k(x) / k!``.
* Order 1 is Taylor order 1 with the slope scaled by ``2 sigma**2``: exact on linear features only at
  ``sigma = 1/sqrt(2)`` (then at every order, on any spacing with ``scheme="divided"``), biased otherwise.
* Even orders add a constant at ``x = a_0`` (``H_2(0) = -2``): for ``K >= 2`` the forecast at the newest computed
  abscissa is not ``F_0`` but ``F_0 - sigma**2 d_2 + ...``. It is not exact on quadratics for any ``sigma``.
* Exact on constant features for every ``sigma``; as ``sigma -> 0`` it tends to plain reuse ``F_0`` (FORA), not to
  Taylor.
* ``H_k(sigma x)`` mixes powers of ``x``, so the result depends on the abscissa's unit: forecasting in timesteps
  (spacing ~20) is a different forecaster from forecasting in step indices (spacing 1), not a reparametrisation.
  HiCache was designed and tuned for step-index abscissae (offsets 1 .. N-1).

Derivative estimates: ``scheme="reference"`` uses TaylorSeer's reference factors (latest spacing only, as HiCache's
code does); ``scheme="divided"`` (default) uses ``d_k = k! c_k`` with ``c_k`` the Newton divided differences over the
true abscissae (see ``taylor.py``). The two coincide on uniform spacing, where both reproduce the paper's formula.

Memory: ``max_order + 1`` tensors of the feature's shape (e.g. ``[B, L, C]``) per cached feature, as TaylorSeer.

Example:
    >>> from taylorseer.forecast import HermiteForecast, build_forecaster
    >>> f = build_forecaster(HermiteForecast(max_order=2, scale=0.5))
    >>> s = f.empty()
    >>> for x in (0.0, 1.0, 2.0):
    ...     s = f.update(s, torch.tensor([x * x]), x)
    >>> f.predict(s, 4.0)  # 4 + 3 * 0.5 * H_1(1) + 1 * 0.25 * H_2(1) = 4 + 3 + 0.5 (Taylor: 14, true: 16)
    tensor([7.5000])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import taylor
from .base import FactorState, ForecasterBase, check_point, register_forecaster, weighted_sum


def physicists_hermite(order: int, y: float) -> float:
    """``H_order(y)`` (physicists' convention: ``H_1(y) = 2y``) by the three-term recurrence."""
    previous, current = 1.0, 2.0 * y
    if order == 0:
        return previous
    for k in range(1, order):
        previous, current = current, 2.0 * y * current - 2.0 * k * previous
    return current


@dataclass(frozen=True)
class HermiteForecast:
    """HiCache: Taylor forecast of order ``max_order`` in the dual-scaled Hermite basis ``scale**k H_k(scale x)``.

    ``scale`` is HiCache's contraction ``sigma`` in (0, 1); ``scheme`` picks the derivative estimates
    (``"divided"``: true abscissae; ``"reference"``: TaylorSeer's latest-spacing factors). Order 0 is reuse.
    Keeps ``max_order + 1`` tensors per cached feature.

    Example:
        >>> HermiteForecast().scale
        0.5
    """

    max_order: int = 2
    scale: float = 0.5
    scheme: str = "divided"

    def __post_init__(self) -> None:
        order = self.max_order
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"HermiteForecast.max_order must be an int >= 0, got {order!r}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < 1.0:
            raise ValueError(f"HermiteForecast.scale must be a float in (0, 1), got {scale!r}")
        if self.scheme not in taylor.SCHEMES:
            raise ValueError(f"HermiteForecast.scheme must be one of {list(taylor.SCHEMES)}, got {self.scheme!r}")


@register_forecaster(HermiteForecast)
class HermiteForecaster(ForecasterBase):
    """TaylorSeer factors (``taylor.update``) evaluated in HiCache's scaled Hermite basis."""

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        """TaylorSeer factors after computing ``feature`` at ``point`` (``ValueError`` on a repeated abscissa)."""
        check_point(state if keep_history else FactorState.empty(), point)
        return taylor.update(state, feature, point, self.config.max_order, self.config.scheme,
                             keep_history=keep_history, factor_dtype=factor_dtype)

    def weights(self, state: FactorState, point: float) -> list[float]:
        """The scalar multiplying each factor in the forecast at ``point`` (1 for ``F_0``)."""
        sigma, divided = self.config.scale, self.config.scheme == "divided"
        y = sigma * (point - state.points[0])
        # divided factors are c_k = d_k / k!, so the 1/k! of the series is already in them.
        return [1.0] + [sigma**k * physicists_hermite(k, y) / (1 if divided else math.factorial(k))
                        for k in range(1, len(state.factors))]

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``F_0 + sum_k d_k / k! * scale**k H_k(scale (point - a_0))`` (a new tensor; never modifies ``state``)."""
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        factors = state.factors if dtype is None else [f.to(dtype) for f in state.factors]
        return weighted_sum(factors, self.weights(state, point))
