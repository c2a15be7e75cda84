"""Learned linear forecast: per forecast step and target, fitted weights over the last K computed features.

For a generation of ``num_steps`` steps with a known schedule (its full steps), the forecast of target ``t`` at a
skipped step ``s`` is

    F_hat(s) = sum_{j < k} w[t, s, j] * F(a_j) + b[t, s]

over the features ``F(a_0), F(a_1), ...`` of the last ``k = min(K, full steps so far)`` computed steps (newest
first), ``K <= 4``. The weights are per channel (``[k, C]``, broadcast over the feature's last dimension) or one
number per anchor (``[k]``); the optional bias is ``[C]`` or a number. The weights come from a closed-form ridge
least-squares fit on full-compute trajectories (``taylorseer.calibration``; L2P, arXiv 2604.26365, fits per-step
linear weights the same way): every Taylor, Newton or Adams forecast of order ``< K`` on the same schedule is one
point of the space searched, so on the calibration trajectories the fit is never worse than they are.

The math is pure and bound to a table (``LinearTable``): ``update`` keeps the last ``K`` raw features,
``predict(state, point, target=...)`` looks the weights up by the target's group and the step index ``point``
(abscissa ``"step"``), checks that the state holds exactly the anchors the weights were fitted for, and sums. It
is the same number of tensor passes as a Taylor forecast of order ``K - 1`` (one multiply-add per anchor, one add
for the bias). A step, target or history the table does not hold is a ``ValueError`` naming it, never a silent
fallback.

The config ``LinearForecast(calibration=PATH, sha256=DIGEST)`` names a calibration file (a JSON-safe reference,
so bench records and ``CacheConfig.to_json`` stay small); its registered builder (``forecast/linear_file.py``, the
file's format and validated read) reads the table; this module does no file IO.

Example:
    >>> table = LinearTable({"*": {1: StepWeights((0,), torch.tensor([1.0]), None),
    ...                            3: StepWeights((2, 0), torch.tensor([2.0, -1.0]), None)}},
    ...                     num_steps=4, full_steps=(0, 2), grouping="all", history=2)
    >>> f = LinearForecaster(table)
    >>> s = f.update(f.empty(), torch.tensor([1.0]), 0.0)
    >>> s = f.update(s, torch.tensor([3.0]), 2.0)
    >>> f.predict(s, 3.0, target="blocks.0.attn")
    tensor([5.])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .base import FactorState, check_point

GROUPINGS = ("target", "kind", "all")


def group_of(target: str, grouping: str) -> str:
    """The weight group of a target path: itself (``target``), its path with block indices replaced by ``*``
    (``kind``: ``transformer_blocks.*.attn1``), or ``*`` (``all``).

    Example:
        >>> group_of("transformer_blocks.3.attn1", "kind")
        'transformer_blocks.*.attn1'
    """
    if grouping == "target":
        return target
    if grouping == "kind":
        return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", target)
    if grouping == "all":
        return "*"
    raise ValueError(f"grouping must be one of {list(GROUPINGS)}, got {grouping!r}")


@dataclass(frozen=True)
class StepWeights:
    """The forecast of one step of one group: ``anchors`` (step indices, newest first), ``weights``
    ``[k, R, C']`` and ``bias`` ``[R, C']`` or None (float32).

    ``R`` row groups: the feature's first dimension is split into ``R`` equal contiguous blocks, each with its own
    weights (``R = 2`` for a CFG batch ``[cond; uncond]``, whose two halves move differently; 1 otherwise).
    ``C'``: the feature's channel count (per-channel weights) or 1 (one weight per anchor). ``[k]`` and ``[k, C']``
    weights (and ``[]``/``[C']`` biases) are accepted and stored as ``R = 1``.
    """

    anchors: tuple[int, ...]
    weights: torch.Tensor
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        w = self.weights
        if w.dim() == 1:
            w = w[:, None, None]
        elif w.dim() == 2:
            w = w[:, None, :]
        if not self.anchors or w.dim() != 3 or w.shape[0] != len(self.anchors):
            raise ValueError(f"StepWeights: weights must be [k], [k, C] or [k, R, C] with k = {len(self.anchors)} "
                             f"anchors, got shape {tuple(self.weights.shape)}")
        object.__setattr__(self, "weights", w)
        if self.bias is not None:
            b = self.bias.reshape(1, -1) if self.bias.dim() <= 1 else self.bias
            if b.dim() != 2 or b.shape[0] != w.shape[1] or b.shape[1] not in (1, w.shape[2]):
                raise ValueError(f"StepWeights: bias must be [R, C'] matching weights {tuple(w.shape)}, got shape "
                                 f"{tuple(self.bias.shape)}")
            object.__setattr__(self, "bias", b)

    @property
    def row_groups(self) -> int:
        return int(self.weights.shape[1])


@dataclass(frozen=True)
class LinearTable:
    """Fitted weights of one schedule: ``steps[group][step] -> StepWeights`` for every forecast step of a
    ``num_steps`` generation with ``full_steps`` computed, ``grouping`` mapping targets to groups, ``history`` K."""

    steps: dict[str, dict[int, StepWeights]]
    num_steps: int
    full_steps: tuple[int, ...]
    grouping: str
    history: int

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS:
            raise ValueError(f"LinearTable.grouping must be one of {list(GROUPINGS)}, got {self.grouping!r}")
        for group, table in self.steps.items():
            for step, sw in table.items():
                if len(sw.anchors) > self.history:
                    raise ValueError(f"LinearTable: group {group!r} step {step} combines {len(sw.anchors)} features, "
                                     f"more than history={self.history}")


@dataclass(frozen=True)
class LinearForecast:
    """Learned linear forecaster config: the weights in the calibration file ``calibration`` (a path), checked
    against ``sha256`` (its hex digest) when given. Use with ``abscissa="step"`` and the file's schedule
    (``taylorseer.calibration.load_calibration(path).cache_config()`` builds both).

    Example:
        >>> LinearForecast("dit-b8.safetensors").calibration
        'dit-b8.safetensors'
    """

    calibration: str
    sha256: str = ""

    def __post_init__(self) -> None:
        check_file_fields(self)


def check_file_fields(config: Any) -> None:
    """A file-backed forecaster config's ``calibration`` (a non-empty path str) and ``sha256`` (a hex digest str,
    '' for unchecked); ``ValueError`` naming the config type and the field."""
    name = type(config).__name__
    if not isinstance(config.calibration, str) or not config.calibration:
        raise ValueError(f"{name}.calibration must be the path of a calibration file, got {config.calibration!r}")
    if not isinstance(config.sha256, str):
        raise ValueError(f"{name}.sha256 must be a hex digest str ('' for unchecked), got {config.sha256!r}")


class LinearForecaster:
    """Update/predict bound to one ``LinearTable`` (see the module docstring). ``per_target = True``: the runtime
    passes the target path to ``predict``. ``calibration``: the file it was built from (None for a bare table)."""

    history_from_step = 0
    per_target = True

    def __init__(self, table: LinearTable, calibration: Any = None):
        self.table = table
        # The loaded file (``linear_file.CalibrationFile``) when built from one: its header says which
        # model, guidance scale and row layout the weights are for (checked by the handle before any forecast).
        self.calibration = calibration
        self._placed: dict[tuple[str, float, Any, Any], _Placed] = {}

    def empty(self) -> FactorState:
        """The state before any computed step."""
        return FactorState.empty()

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        """Keep ``feature`` as the newest of the last ``history`` raw features (``factor_dtype``: stored cast)."""
        old = state if keep_history else FactorState.empty()
        check_point(old, point)
        new = feature if factor_dtype is None else feature.to(factor_dtype)
        k = self.table.history
        return FactorState(((new,) + old.factors)[:k], ((float(point),) + old.points)[:k])

    def weights_for(self, target: str, point: float) -> StepWeights:
        """The fitted weights of ``target`` at step ``point``; ``ValueError`` naming what the table lacks."""
        group = group_of(target, self.table.grouping)
        table = self.table.steps.get(group)
        if table is None:
            known = sorted(self.table.steps)[:4]
            raise ValueError(f"LinearForecast: the calibration holds no weights for target {target!r} (group "
                             f"{group!r}); its groups are {known}{' ...' if len(self.table.steps) > 4 else ''}: "
                             f"calibrate for this model")
        step = int(point)
        if step != point or step not in table:
            full = self.table.full_steps
            raise ValueError(f"LinearForecast: no weights for step {point!r} of target {target!r}: the calibration "
                             f"forecasts the steps outside {list(full)} of a {self.table.num_steps}-step generation "
                             f"(abscissa must be 'step' and the schedule the calibration's)")
        return table[step]

    def _placed_weights(self, target: str, point: float, like: torch.Tensor, dtype: torch.dtype) -> _Placed:
        key = (target, point, like.device, dtype)
        placed = self._placed.get(key)
        if placed is None:
            sw = self.weights_for(target, point)
            w = sw.weights.to(like.device, dtype)[:, :, None, :]  # [k, R, 1, C']: broadcast over each row group
            b = None if sw.bias is None else sw.bias.to(like.device, dtype)[:, None, :]
            placed = _Placed(sw.anchors, tuple(float(a) for a in sw.anchors), tuple(w), b, sw.row_groups,
                             int(sw.weights.shape[2]))
            self._placed[key] = placed
        return placed

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None,
                target: str | None = None) -> torch.Tensor:
        """``sum_j w_j * F(a_j) (+ b)`` at step ``point`` for ``target`` (a new tensor; ``dtype``: the result's,
        default the stored features')."""
        if target is None:
            raise ValueError("LinearForecast needs the target path at predict time (the runtime passes it to "
                             "forecasters with per_target = True)")
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        first = state.factors[0]
        dtype = dtype or first.dtype
        placed = self._placed_weights(target, point, first, dtype)
        k = len(placed.anchors)
        if tuple(state.points[:k]) != placed.points:
            held = [int(p) for p in state.points[:k]]
            raise ValueError(f"LinearForecast: step {int(point)} of target {target!r} was fitted on the features of "
                             f"steps {list(placed.anchors)}, but the computed steps held are {held}: the run did "
                             f"not follow the calibration's schedule {list(self.table.full_steps)}")
        shape, rows = first.shape, placed.rows
        if first.dim() == 0 or shape[0] % rows:
            raise ValueError(f"LinearForecast: target {target!r} returned a feature of shape {tuple(shape)}, whose "
                             f"first dimension does not split into the calibration's {rows} row groups (a CFG batch "
                             f"[cond; uncond] was calibrated: sample with the same guidance layout)")
        if placed.channels not in (1, shape[-1]):
            raise ValueError(f"LinearForecast: target {target!r} has {shape[-1]} channels, its weights "
                             f"{placed.channels}: the calibration is for another model")
        # [R, rows/R * ..., C] views: one multiply (with the bias added in the same pass), then one fused
        # multiply-add per further anchor: k passes over the features, bias or not.
        view = (rows, -1, shape[-1])
        factors = [_as(f, dtype).reshape(view) for f in state.factors[:k]]
        if placed.bias is None:
            output = torch.mul(factors[0], placed.weights[0])
        else:
            output = torch.addcmul(placed.bias, factors[0], placed.weights[0])
        for factor, weight in zip(factors[1:], placed.weights[1:]):
            output.addcmul_(factor, weight)
        return output.view(shape)


@dataclass(frozen=True)
class _Placed:
    """One (target, step)'s weights on the features' device and dtype, shaped to broadcast: ``weights[j]``
    ``[R, 1, C']``, ``bias`` ``[R, 1, C']``; ``points``: the anchors as the state's float abscissae."""

    anchors: tuple[int, ...]
    points: tuple[float, ...]
    weights: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None
    rows: int
    channels: int


def _as(feature: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return feature if feature.dtype == dtype else feature.to(dtype)
