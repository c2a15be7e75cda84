"""Pure forecast math: Taylor factors from computed features, evaluated at skipped steps."""

from .taylor import TaylorState, derivatives, forecast, update

__all__ = ["TaylorState", "update", "forecast", "derivatives"]
