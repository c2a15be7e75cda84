"""A toy forecaster written as a new contributor would (issue 21): reuse the last computed feature, scaled by
``decay ** (steps since it was computed)``. One file; registered by the one ``register_forecaster`` line below."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorseer.forecast import register_forecaster
from taylorseer.forecast.base import FactorState, ForecasterBase


@dataclass(frozen=True)
class DecayForecast:
    """Reuse with decay: ``feature * decay ** (point - computed point)``."""

    decay: float = 0.98


@register_forecaster(DecayForecast)
class DecayForecaster(ForecasterBase):
    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        return FactorState((feature.to(factor_dtype or feature.dtype),), (float(point),))

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not state.factors:
            raise ValueError("DecayForecaster.predict: no computed step yet")
        scale = self.config.decay ** abs(point - state.points[0])
        return (state.factors[0] * scale).to(dtype or state.factors[0].dtype)
