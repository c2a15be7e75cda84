"""The anchored linear forecaster: fitted weights over the cached features *and* this step's freshly computed anchor.

The hybrid (``policy.anchor.AnchorSchedule``) computes the first ``probe_blocks`` blocks on every step and
forecasts the rest. Their fresh output at a forecast step ``s`` is information the plain fitted forecaster
(``forecast/linear.py``) never sees. Here the forecast of target ``t`` at ``s`` is

    F_hat_t(s) = sum_j w_j * F_t(a_j) + v_0 * A(s) + sum_m v_m * A(a_m) (+ b)

per channel (and row group): ``F_t(a_j)`` the target's own features at its last ``K`` full steps, ``A(s)`` the
anchor target's output computed at this step (the probe), ``A(a_m)`` the anchor's features at its last ``M`` full
steps (so that ``A(s) - A(a_0)``, how far the step moved the anchor, is in the span), ``b`` the bias. The weights
are a closed-form ridge fit on full-compute trajectories, as for the linear forecaster
(``calibration.anchor_fit.fit_anchored`` on ``TrajectoryStats`` recorded with ``anchor=``).

Table encoding (the calibration file format of ``LinearForecast``, unchanged): ``StepWeights.anchors`` holds
indices into the Gram ``[own steps | anchor steps | 1]``: ``i < num_steps`` is the target's own feature at step
``i``; ``num_steps + i`` is the anchor's feature at step ``i`` (``i = s``: the fresh one). The file's header names
the anchor (``forecaster.anchor``).

At run time the probe tells the forecaster what the anchor target computed (``observe_anchor``, called by
``runtime.probe.Probes.observe`` for every probe target, with the anchor's stored factors of the same branch); a
target that returns several tensors (FLUX's ``(encoder_hidden_states, hidden_states)``) is paired with the anchor's
tensor of the same shape. A forecast step without a probe of the anchor is a ``ValueError`` naming it, never a
silent fallback. Each built forecaster belongs to one handle (it holds the step's anchor); the weights are shared.

Example:
    >>> from taylorseer.forecast.linear import LinearTable, StepWeights
    >>> table = LinearTable({"*": {1: StepWeights((0, 2 + 1), torch.tensor([1.0, 2.0]))}}, num_steps=2,
    ...                     full_steps=(0,), grouping="all", history=2)
    >>> f = AnchoredLinearForecaster(table, anchor="blocks.0")
    >>> s = f.update(f.empty(), torch.tensor([[1.0]]), 0.0)
    >>> f.observe_anchor("blocks.0", 1.0, [torch.tensor([[10.0]])], None)
    >>> f.predict(s, 1.0, target="blocks.1")   # 1 * 1 + 2 * 10
    tensor([[21.]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import FactorState, check_point, register_forecaster
from .linear import LinearTable, StepWeights, check_file_fields, group_of
from .linear_file import CalibrationError, read_calibration


@dataclass(frozen=True)
class AnchoredLinearForecast:
    """Anchored forecaster config: the weights in the calibration file ``calibration`` (a path; its header names
    the anchor target), checked against ``sha256`` (hex digest) when given. Use with an ``AnchorSchedule`` whose
    probe computes the anchor target, ``abscissa="step"`` and the file's schedule and granularity
    (``calibration.anchor_fit.anchored_config(path)`` builds all of them).

    Example:
        >>> AnchoredLinearForecast("flux-anchor-b5.safetensors").calibration
        'flux-anchor-b5.safetensors'
    """

    calibration: str
    sha256: str = ""

    def __post_init__(self) -> None:
        check_file_fields(self)


class AnchoredLinearForecaster:
    """Update/predict bound to an anchored ``LinearTable`` (see the module docstring). ``anchor``: the anchor
    target's path. ``calibration``: the file it was built from (the handle checks the model against it)."""

    history_from_step = 0
    per_target = True

    def __init__(self, table: LinearTable, anchor: str, calibration: Any = None):
        self.table = table
        self.anchor = anchor
        self.calibration = calibration
        n = table.num_steps
        own = [sum(1 for a in sw.anchors if a < n) for t in table.steps.values() for sw in t.values()]
        cached = [sum(1 for a in sw.anchors if a >= n) - 1 for t in table.steps.values() for sw in t.values()]
        self.keep = max(own + cached + [1])  # features kept per target (the anchor's cached ones included)
        self._fresh: tuple[float, list[torch.Tensor], Any] | None = None

    def empty(self) -> FactorState:
        return FactorState.empty()

    def update(self, state: FactorState, feature: torch.Tensor, point: float, *, keep_history: bool = True,
               factor_dtype: torch.dtype | None = None) -> FactorState:
        """Keep ``feature`` as the newest of the last ``keep`` raw features."""
        old = state if keep_history else FactorState.empty()
        check_point(old, point)
        new = feature if factor_dtype is None else feature.to(factor_dtype)
        return FactorState(((new,) + old.factors)[:self.keep], ((float(point),) + old.points)[:self.keep])

    def observe_anchor(self, target: str, point: float, tensors: list[torch.Tensor], states: Any) -> None:
        """A probe target was computed at ``point``: if it is the anchor, keep its tensors (and ``states``, its
        stored factors of the same branch) for this step's forecasts."""
        if target == self.anchor:
            self._fresh = (float(point), list(tensors), states)

    def _leaf(self, like: torch.Tensor, target: str) -> int:
        assert self._fresh is not None
        hits = [i for i, t in enumerate(self._fresh[1]) if t.shape == like.shape]
        if len(hits) != 1:
            shapes = [tuple(t.shape) for t in self._fresh[1]]
            raise ValueError(f"AnchoredLinearForecast: target {target!r} has a tensor of shape {tuple(like.shape)}; "
                             f"the anchor {self.anchor!r} returned {shapes}: exactly one must have that shape")
        return hits[0]

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None,
                target: str | None = None) -> torch.Tensor:
        """The anchored forecast of ``target`` at step ``point`` (a new tensor; ``dtype``: the result's)."""
        if target is None:
            raise ValueError("AnchoredLinearForecast needs the target path at predict time (per_target = True)")
        if not state.factors:
            raise ValueError("cannot forecast from an empty state: no step has been computed yet")
        first = state.factors[0]
        dtype = dtype or first.dtype
        if self._fresh is None or self._fresh[0] != float(point):
            raise ValueError(f"AnchoredLinearForecast: step {point!r} has no computed output of the anchor "
                             f"{self.anchor!r}: run it with an AnchorSchedule whose probe blocks compute the anchor")
        leaf = self._leaf(first, target)
        if target == self.anchor:  # the probe's own forecast error: its output is known exactly
            return self._fresh[1][leaf].to(dtype).clone()
        sw = self._weights(target, point)
        columns = [self._column(a, state, leaf, point, target) for a in sw.anchors]
        rows = sw.row_groups
        shape = first.shape
        if shape[0] % rows or sw.weights.shape[2] not in (1, shape[-1]):
            raise ValueError(f"AnchoredLinearForecast: target {target!r} returned shape {tuple(shape)}, which does "
                             f"not fit weights {tuple(sw.weights.shape)} (row groups, channels): another model or "
                             f"guidance layout")
        view = (rows, -1, shape[-1])
        w = sw.weights.to(first.device, dtype)[:, :, None, :]
        output = torch.mul(columns[0].to(dtype).reshape(view), w[0])
        if sw.bias is not None:
            output += sw.bias.to(first.device, dtype)[:, None, :]
        for column, weight in zip(columns[1:], w[1:]):
            output.addcmul_(column.to(dtype).reshape(view), weight)
        return output.view(shape)

    def _weights(self, target: str, point: float) -> StepWeights:
        group = group_of(target, self.table.grouping)
        table = self.table.steps.get(group)
        step = int(point)
        if table is None or step != point or step not in table:
            raise ValueError(f"AnchoredLinearForecast: no weights for target {target!r} (group {group!r}) at step "
                             f"{point!r}: the calibration forecasts the steps outside {list(self.table.full_steps)} "
                             f"of a {self.table.num_steps}-step generation, at its granularity")
        return table[step]

    def _column(self, index: int, state: FactorState, leaf: int, point: float, target: str) -> torch.Tensor:
        n = self.table.num_steps
        assert self._fresh is not None
        if index >= n and index - n == int(point):
            return self._fresh[1][leaf]
        states, step = (None, index) if index < n else (self._fresh[2], index - n)
        held = state if states is None else (states[leaf] if states is not None and leaf < len(states) else None)
        if held is None or float(step) not in held.points:
            whose = target if index < n else self.anchor
            have = [] if held is None else [int(p) for p in held.points]
            raise ValueError(f"AnchoredLinearForecast: step {int(point)} of {target!r} was fitted on the feature of "
                             f"{whose!r} at step {step}, but the computed steps held are {have}: the run did not "
                             f"follow the calibration's schedule {list(self.table.full_steps)}")
        return held.factors[held.points.index(float(step))]


@register_forecaster(AnchoredLinearForecast)
def _build_anchored(config: AnchoredLinearForecast) -> AnchoredLinearForecaster:
    # One forecaster per handle (it holds the step's anchor); the file is read and validated by linear_file.
    calibration = read_calibration(config.calibration, sha256=config.sha256 or None)
    anchor = (calibration.header.get("forecaster") or {}).get("anchor")
    if not isinstance(anchor, str):
        raise CalibrationError(f"calibration file {config.calibration}: its header names no anchor target "
                               f"(forecaster.anchor): not an anchored calibration; use LinearForecast")
    return AnchoredLinearForecaster(calibration.table_required(), anchor, calibration)


#################################################################################
#            A low-rank cross-channel correction from the anchor's change       #
#################################################################################

CORRECTION_KIND = "anchor-correction"


@dataclass(frozen=True)
class AnchoredMapForecast:
    """The anchored forecaster plus a low-rank cross-channel map per forecast step: on one target (the file's
    ``target``, the carrier of the anchor terms), on its tensors of ``tokens`` rows, the forecast gains
    ``([A(s), A(a_0), ...] @ map_s) @ basis_s^T`` (``A(s)`` the anchor's fresh tensor of the same shape, ``A(a_m)``
    its values at the newest full steps; ``map_s`` ``[(1 + m) C, r]``, ``basis_s`` ``[C, r]``). Per-channel weights
    cannot mix channels; the first block's change moves the later blocks' output across channels, and a rank-``r``
    map of it costs ``2 r C`` multiply-adds per token once per step (counted FLOPs).
    ``calibration``: the anchored weights (``AnchoredLinearForecast``'s file); ``correction``: the safetensors file
    of the maps (``calibration.anchor_joint.save_correction``); ``sha256``/``correction_sha256``: hex digests ('' for
    unchecked).

    Example:
        >>> AnchoredMapForecast("joint.safetensors", "joint-map.safetensors").correction
        'joint-map.safetensors'
    """

    calibration: str
    correction: str
    sha256: str = ""
    correction_sha256: str = ""

    def __post_init__(self) -> None:
        check_file_fields(self)
        if not isinstance(self.correction, str) or not self.correction:
            raise ValueError(f"AnchoredMapForecast.correction must be the path of a correction file, got "
                             f"{self.correction!r}")
        if not isinstance(self.correction_sha256, str):
            raise ValueError(f"AnchoredMapForecast.correction_sha256 must be a hex digest str ('' for unchecked), "
                             f"got {self.correction_sha256!r}")


@dataclass(frozen=True)
class AnchorCorrection:
    """The maps of an ``AnchoredMapForecast``: ``maps[step] = (map [(1 + m) C, r], basis [C, r])`` for ``target``,
    applied to its tensors with ``tokens`` rows (dimension -2), ``anchor_history`` m cached anchor values."""

    target: str
    tokens: int
    anchor_history: int
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]]


class AnchoredMapForecaster(AnchoredLinearForecaster):
    """``AnchoredLinearForecaster`` plus ``AnchorCorrection`` on its target (see ``AnchoredMapForecast``)."""

    def __init__(self, table: LinearTable, anchor: str, correction: AnchorCorrection, calibration: Any = None):
        super().__init__(table, anchor, calibration)
        self.correction = correction

    def predict(self, state: FactorState, point: float, *, dtype: torch.dtype | None = None,
                target: str | None = None) -> torch.Tensor:
        output = super().predict(state, point, dtype=dtype, target=target)
        c = self.correction
        step = int(point)
        if target != c.target or step not in c.maps or output.dim() < 2 or output.shape[-2] != c.tokens:
            return output
        assert self._fresh is not None
        leaf = self._leaf(state.factors[0], target)
        full = [a for a in self.table.full_steps if a < step][::-1][:c.anchor_history]
        columns = [self._fresh[1][leaf]] + [self._column(self.table.num_steps + a, state, leaf, point, target)
                                            for a in full]
        m, basis = c.maps[step]
        x = torch.cat([col.to(output.dtype) for col in columns], dim=-1)
        return output + (x @ m.to(output.device, output.dtype)) @ basis.to(output.device, output.dtype).T


def read_correction(path: str, sha256: str = "") -> AnchorCorrection:
    """Read ``save_correction``'s file (``CalibrationError`` naming the path when it is not one, or its digest
    differs from ``sha256``)."""
    import json

    from safetensors import safe_open

    from ..models.checkpoint import file_sha256

    if sha256 and file_sha256(path) != sha256:
        raise CalibrationError(f"correction file {path}: SHA-256 differs from the config's {sha256[:12]}...")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("correction", "null") or "null")
        if not isinstance(meta, dict) or meta.get("kind") != CORRECTION_KIND:
            raise CalibrationError(f"correction file {path}: no '{CORRECTION_KIND}' header (save_correction writes "
                                   f"one)")
        maps = {int(s): (f.get_tensor(f"s{s}.map"), f.get_tensor(f"s{s}.basis")) for s in meta["steps"]}
    return AnchorCorrection(str(meta["target"]), int(meta["tokens"]), int(meta["anchor_history"]), maps)


@register_forecaster(AnchoredMapForecast)
def _build_anchored_map(config: AnchoredMapForecast) -> AnchoredMapForecaster:
    base = _build_anchored(AnchoredLinearForecast(config.calibration, config.sha256))
    assert isinstance(base, AnchoredLinearForecaster)
    correction = read_correction(config.correction, config.correction_sha256)
    return AnchoredMapForecaster(base.table, base.anchor, correction, base.calibration)
