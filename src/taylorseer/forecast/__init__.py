"""Pure forecast math: what a skipped step returns, one file per forecaster, a registry keyed by config type."""

from .base import FactorState, Forecaster, build_forecaster, register_forecaster, registered_forecasters
from .taylor import TaylorForecast, TaylorState, derivatives, forecast, update

__all__ = ["FactorState", "Forecaster", "build_forecaster", "register_forecaster", "registered_forecasters",
           "TaylorForecast", "TaylorState", "update", "forecast", "derivatives"]
