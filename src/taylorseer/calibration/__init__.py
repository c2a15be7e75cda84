"""Calibrated forecasting: record full-compute trajectories, fit linear forecasters, search schedules, save files.

Example:
    >>> stats = record_trajectories(model, torch.arange(16) % 10, seed=1000)             # doctest: +SKIP
    >>> result = search_schedule(stats, 8, refine=SampledObjective(model, stats))        # doctest: +SKIP
    >>> table, error = fit_linear(stats, result.full_steps)                              # doctest: +SKIP
"""

from .calibrate import DEFAULT_SEED, calibrate, calibration_labels
from .fit import FitOptions, anchors_for, fit_linear, fit_on_policy, forecast_steps
from .io import (
    Calibration,
    CalibrationError,
    load_calibration,
    model_identity,
    new_header,
    save_calibration,
)
from .pipeline import PipelineSampler, calibrate_pipeline
from .record import (
    OnPolicyStats,
    TrajectoryRecorder,
    TrajectoryStats,
    calibration_targets,
    record_on_policy,
    record_trajectories,
    target_paths,
)
from .search import (
    Objective,
    ProxyObjective,
    SampledObjective,
    SearchResult,
    greedy_schedule,
    refine_schedule,
    search_schedule,
)

__all__ = ["DEFAULT_SEED", "calibrate", "calibration_labels", "FitOptions", "anchors_for", "fit_linear",
           "fit_on_policy", "forecast_steps", "Calibration", "CalibrationError", "load_calibration", "model_identity",
           "new_header",
           "save_calibration", "OnPolicyStats", "TrajectoryRecorder", "TrajectoryStats", "record_on_policy",
           "record_trajectories", "target_paths", "calibration_targets",
           "Objective", "ProxyObjective", "SampledObjective", "SearchResult", "greedy_schedule", "refine_schedule",
           "search_schedule", "PipelineSampler", "calibrate_pipeline"]
