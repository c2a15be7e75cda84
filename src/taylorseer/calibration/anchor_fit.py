"""The anchored forecaster's closed-form fit: the linear forecaster's ridge solve on Grams recorded with an anchor.

``TrajectoryStats`` recorded with ``anchor=PATH`` (``calibration.record.record_trajectories``) hold, per group,
the Gram over ``[own features at every step | the anchor's features at every step | 1]``. For a schedule and a
forecast step ``s`` the regressors are the target's own features at its last ``history`` full steps, the anchor's
fresh feature at ``s`` and the anchor's features at its last ``anchor_history`` full steps; the weights solve the
same per-channel ridge system as ``calibration.fit`` (``solve_step``: ``FitOptions`` history, bias, ridge, variance
matching), so with the anchor's weights forced to zero it is the linear forecaster's fit, and on the calibration
trajectories it is never worse than it.

Example:
    >>> table, error = fit_anchored(stats, (0, 1, 9, 24, 40), anchor_history=1)   # doctest: +SKIP
    >>> table.steps["single_transformer_blocks.3"][5].anchors                       # doctest: +SKIP
    (1, 0, 55, 51)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..forecast.linear import LinearTable, StepWeights
from ..forecast.linear_file import CalibrationError, read_calibration
from ..parts import calibrated_config
from ..policy.schedule import FixedSchedule
from .fit import FitOptions, forecast_steps, solve_step
from .io import new_header, save_calibration


def anchored_indices(full_steps: Sequence[int], step: int, num_steps: int, history: int,
                     anchor_history: int) -> tuple[int, ...]:
    """The Gram indices a forecast of ``step`` combines: the last ``history`` full steps (newest first), then
    ``num_steps + step`` (the anchor's fresh feature), then ``num_steps + a`` for the anchor's last
    ``anchor_history`` full steps.

    Example:
        >>> anchored_indices((0, 1, 5), 7, 10, history=2, anchor_history=1)
        (5, 1, 17, 15)
    """
    before = [s for s in full_steps if s < step]
    own = tuple(reversed(before[-history:]))
    return own + (num_steps + step,) + tuple(num_steps + a for a in own[:anchor_history])


def fit_anchored(stats: Any, full_steps: Sequence[int], options: Any = None, anchor_history: int = 1
                 ) -> tuple[LinearTable, dict[str, float]]:
    """Fit every forecast step of the schedule ``full_steps`` for every group of anchored ``stats``
    (``stats.anchor`` set); returns the table (anchors encoded as in ``forecast/anchored.py``) and the relative L2
    fit error of the teacher-forced forecasts (``rel_error``, ``rel_error_max``) as ``calibration.fit``'s.

    ``options``: ``calibration.fit.FitOptions`` (None: its defaults); ``anchor_history``: 0..history cached anchor
    features beside the fresh one.
    """
    options = options or FitOptions()
    if getattr(stats, "anchor", None) is None:
        raise ValueError("fit_anchored needs TrajectoryStats recorded with an anchor (record_trajectories(..., "
                         "anchor=PATH)); stats.anchor is None")
    if isinstance(anchor_history, bool) or not isinstance(anchor_history, int) \
            or not 0 <= anchor_history <= options.history:
        raise ValueError(f"anchor_history must be an int in [0, history={options.history}], got {anchor_history!r}")
    full = tuple(int(s) for s in full_steps)
    n = stats.num_steps
    if not full or full[0] != 0:
        raise ValueError(f"full_steps must start with step 0, got {list(full)}")
    steps: dict[str, dict[int, StepWeights]] = {}
    residual_total = energy_total = worst = 0.0
    width = 0
    for group, gram in stats.gram.items():
        if gram.shape[-1] != 2 * n + 1:
            raise ValueError(f"group {group!r}: Gram of size {gram.shape[-1]}, an anchored one has 2 x {n} + 1")
        steps[group] = {}
        for s in forecast_steps(full, n):
            index = anchored_indices(full, s, n, options.history, anchor_history)
            w, b, residual, energy = solve_step(gram, s, index, options)
            steps[group][s] = StepWeights(index, w.float(), None if b is None else b.float())
            width = max(width, len(index))
            residual_total += residual
            energy_total += energy
            worst = max(worst, (residual / max(energy, 1e-300)) ** 0.5)
    table = LinearTable(steps=steps, num_steps=n, full_steps=full, grouping=stats.grouping, history=width)
    return table, {"rel_error": (residual_total / max(energy_total, 1e-300)) ** 0.5, "rel_error_max": worst}


def save_anchored(path: str, stats: Any, table: LinearTable, error: dict[str, float], model: Any, *,
                  name: str, options: Any = None, anchor_history: int = 1, search: Any = None) -> Any:
    """Write an anchored calibration file (the ``LinearForecast`` file format; the header's ``forecaster`` names
    the ``anchor`` target and the fit options) and return it as loaded."""
    options = options or FitOptions()
    schedule = FixedSchedule(table.full_steps, table.num_steps)
    fit = {"history": options.history, "bias": options.bias, "channelwise": options.channelwise,
           "ridge": options.ridge, "match_variance": options.match_variance, "anchor": stats.anchor,
           "anchor_history": anchor_history}
    data = {**stats.sampling, "images": stats.images, "model_calls": stats.model_calls,
            "seconds": round(stats.seconds, 1)}
    header = new_header("linear", name, model, schedule, granularity=stats.granularity, forecaster=fit,
                        targets=dict(stats.targets), fit=error, calibration_data=data, search=search)
    return save_calibration(path, header, table)


def anchored_config(path: str, *, probe_blocks: int = 1, name: str | None = None) -> Any:
    """The ``CacheConfig`` of an anchored calibration file: its schedule as an ``AnchorSchedule`` (``probe_blocks``
    blocks computed on every other step), ``AnchoredLinearForecast`` pinned to the file's SHA-256, the file's
    granularity, ``abscissa="step"``.

    Example:
        >>> cfg = anchored_config("flux-anchor-b5-s50.safetensors")   # doctest: +SKIP
    """
    cal = read_calibration(path)
    if not (cal.header.get("forecaster") or {}).get("anchor"):
        raise CalibrationError(f"calibration file {path}: its header names no anchor target; anchored_config reads "
                               f"files made by save_anchored (cache_config() gives a plain file's config)")
    config = calibrated_config(cal, name=name or str(cal.header.get("name") or "anchored"))
    return dataclasses.replace(config, policy=dataclasses.replace(config.policy, probe_blocks=probe_blocks))
