"""Pure forecast math: what a skipped step returns, one file per forecaster, a registry keyed by config type."""

from .adams import AdamsForecast
from .anchored import AnchoredLinearForecast, AnchoredMapForecast
from .base import FactorState, Forecaster, build_forecaster, register_forecaster, registered_forecasters
from .corrector import CorrectorForecast
from .hermite import HermiteForecast
from .linear import LinearForecast
from .linear_file import CalibrationError  # registers LinearForecast's builder (it reads the file)
from .spectrum import SpectrumForecast
from .taylor import TaylorForecast, TaylorState, derivatives, forecast, update

__all__ = ["FactorState", "Forecaster", "build_forecaster", "register_forecaster", "registered_forecasters",
           "TaylorForecast", "TaylorState", "update", "forecast", "derivatives"]
__all__ += ["AdamsForecast", "HermiteForecast", "CorrectorForecast"]
__all__ += ["LinearForecast", "CalibrationError"]
__all__ += ["SpectrumForecast", "AnchoredLinearForecast", "AnchoredMapForecast"]
