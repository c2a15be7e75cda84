"""The library's version, on the ground floor so that any layer may record it (calibration headers, records)."""

__version__ = "0.1.0"
