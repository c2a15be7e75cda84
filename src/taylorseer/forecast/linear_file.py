"""The calibration file of the learned linear forecaster: its format, the validated read, and the builder.

Format ``taylorseer.calibration/1`` (one safetensors file):

* metadata key ``"taylorseer.calibration"``: a JSON object, the header. ``format``; ``kind`` (``"linear"``: weights
  for a schedule, usable as ``LinearForecast`` + ``FixedSchedule``; ``"schedule"``: a schedule only, usable with any
  forecaster); ``name``; ``library_version``; ``created`` (UTC); ``model`` (``class``, ``config_sha256`` of its public
  config, ``params``: parameter count and the float64 sum of absolute values, a fingerprint of the weights);
  ``granularity`` (what the weights forecast: ``module`` outputs, ``block`` residuals or the model ``output``; files
  without it are ``module``); ``num_steps``; ``schedule`` (``FixedSchedule.to_dict()``); ``forecaster`` (the fit
  options and grouping, or null); ``groups`` (weight groups, in tensor order) and ``targets`` (path -> group); ``fit``
  (relative L2 fit error of the teacher-forced forecasts, overall and worst step; seconds); ``search`` (budget,
  method, cost in model calls and seconds, proxy and measured errors, or null); ``calibration_data`` (images, class
  labels, noise seed, guidance scale, CFG mode, model calls and seconds of the recording); ``tensor_sha256``: SHA-256
  over the tensors (name, dtype, shape and bytes, sorted by name).
* tensors: ``schedule.full_steps`` (int64 ``[F]``) and, per group ``g`` (its index in ``groups``),
  ``g{g}.steps`` (int64 ``[n]``, the forecast steps), ``g{g}.anchors`` (int64 ``[n, K]``, newest first, -1
  padded), ``g{g}.weights`` (float32 ``[n, K, R, C']``, zero padded; ``R`` row groups, ``C'`` channels or 1)
  and, with a bias, ``g{g}.bias`` (float32 ``[n, R, C']``).

Loading validates everything and never falls back: an unreadable, truncated or corrupted file (tensor digest),
an unknown format, a header that disagrees with the tensors, another model (class, config hash or weights), other
``num_steps`` or another schedule raise ``CalibrationError`` naming the mismatch.

``LinearForecast(path, sha256)`` is built here (``read_calibration``: one forecaster per file content); the
calibration package (``taylorseer.calibration``: ``load_calibration``, ``save_calibration``, ``Calibration`` with
``cache_config``) builds on this module, which stands below it with the forecasters (docs/design.md, "Layers").

Example:
    >>> cal = read_calibration("dit-b8.safetensors", num_steps=50)   # doctest: +SKIP
    >>> cal.schedule.pattern()                                         # doctest: +SKIP
    'FFffffFffff...'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import GRANULARITIES
from ..models.checkpoint import CheckpointError, check_sha256, file_sha256
from ..policy.schedule import FixedSchedule
from .base import build_forecaster, register_forecaster
from .linear import GROUPINGS, LinearForecast, LinearForecaster, LinearTable, StepWeights

FORMAT = "taylorseer.calibration/1"
HEADER_KEY = "taylorseer.calibration"
KINDS = ("linear", "schedule")


class CalibrationError(ValueError):
    """A calibration file is unreadable, corrupted, truncated, or does not match the model, steps or schedule."""


#################################################################################
#                                 Model identity                                #
#################################################################################

_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module) -> tuple:
    """What ``model_identity`` depends on, cheaply: each parameter's storage, version counter (bumped by every
    in-place write, ``load_state_dict`` and optimizer steps included), shape, dtype and device."""
    return tuple((n, p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device)
                 for n, p in model.named_parameters())


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a calibration is bound to: the model's class, the SHA-256 of its public config (diffusers' ``config``
    without ``_``-keys; without a config, the parameter names, shapes and dtypes) and a weights fingerprint
    (parameter count and float64 sum of absolute values). The fingerprint is remembered per model until a parameter
    is replaced or written in place (``_weights_key``), so checking it at every ``apply`` costs one pass over the
    weights per change of weights, not per call.

    Example:
        >>> model_identity(torch.nn.Linear(2, 1))["class"]
        'Linear'
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "items"):
        public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        text = json.dumps(public, sort_keys=True, default=str)
    else:
        text = json.dumps([(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()])
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "params": dict(_weights_fingerprint(model))}


def _weights_fingerprint(model: nn.Module) -> dict[str, Any]:
    key = _weights_key(model)
    try:
        known = _FINGERPRINTS.get(model)
    except TypeError:  # not weak-referenceable
        known = None
    if known is not None and known[0] == key:
        return known[1]
    with torch.no_grad():
        parameters = list(_materialised(model))
        count = sum(p.numel() for p in parameters)
        abs_sum = float(sum(p.detach().double().abs().sum().cpu() for p in parameters)) if count else 0.0
    fingerprint = {"count": int(count), "abs_sum": abs_sum}
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[model] = (key, fingerprint)
    return fingerprint


def _materialised(model: nn.Module) -> Any:
    """Each parameter of ``model`` once, with its values: a parameter offloaded by accelerate (the ``meta`` device,
    its values in the module hook's ``weights_map``, as ``enable_sequential_cpu_offload`` leaves them) is read
    from there; one with no values anywhere raises ``CalibrationError`` naming it."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        maps = [getattr(h, "weights_map", None) for h in (hook, *getattr(hook, "hooks", ()))]
        for local, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if parameter.device.type == "meta":
                found = next((m[local] for m in maps if m is not None and local in m), None)
                if found is None:
                    raise CalibrationError(f"parameter {module_name}.{local} has no values (meta device): the model's "
                                           f"weights cannot be compared with the calibration's; load them first")
                parameter = found
            yield parameter


def _check_model(header: dict[str, Any], model: nn.Module, where: str) -> None:
    want, have = header["model"], model_identity(model)
    if want["class"] != have["class"]:
        raise CalibrationError(f"{where} was calibrated for model class {want['class']}, not {have['class']}")
    if want["config_sha256"] != have["config_sha256"]:
        raise CalibrationError(f"{where} was calibrated for a {want['class']} with another config (config SHA-256 "
                               f"{want['config_sha256'][:12]}..., this model's {have['config_sha256'][:12]}...)")
    a, b = want["params"], have["params"]
    if a["count"] != b["count"] or abs(a["abs_sum"] - b["abs_sum"]) > 1e-6 * max(abs(a["abs_sum"]), 1.0):
        raise CalibrationError(f"{where} was calibrated for other weights of this {want['class']} (parameters: "
                               f"{a['count']}, sum |w| {a['abs_sum']:.6g}; this model: {b['count']}, "
                               f"{b['abs_sum']:.6g}); calibrate again for these weights")


#################################################################################
#                                  The record                                   #
#################################################################################

@dataclass(frozen=True)
class CalibrationFile:
    """A calibration file as read (or freshly written): the ``header`` (see the module docstring), the weights
    ``table`` (None for a schedule-only file), and the ``path``/``sha256`` of the file. What the linear forecaster
    and the handle check against; ``taylorseer.calibration.Calibration`` adds the configs built from it."""

    header: dict[str, Any]
    table: LinearTable | None = None
    path: str | None = None
    sha256: str | None = None

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def num_steps(self) -> int:
        return int(self.header["num_steps"])

    @property
    def granularity(self) -> str:
        """What the weights forecast (``Targets.granularity``): ``module``, ``block`` or ``output``."""
        return str(self.header.get("granularity", "module"))

    @property
    def schedule(self) -> FixedSchedule:
        """The calibration's schedule, as a ``FixedSchedule`` policy config."""
        return FixedSchedule.from_dict(self.header["schedule"])

    def table_required(self) -> LinearTable:
        """The weights table; ``CalibrationError`` for a schedule-only file."""
        if self.table is None:
            raise CalibrationError(f"{self.path or 'this calibration'} holds a schedule only (kind "
                                   f"{self.kind!r}), no fitted weights: use it with another forecaster, "
                                   f"cache_config(forecaster=...)")
        return self.table

    def check(self, *, model: nn.Module | None = None, num_steps: int | None = None,
              schedule: FixedSchedule | tuple[int, ...] | None = None) -> None:
        """``CalibrationError`` naming the mismatch unless the calibration fits ``model``, ``num_steps`` and
        ``schedule`` (each checked when given)."""
        where = self.path or "the calibration"
        if model is not None:
            _check_model(self.header, model, where)
        if num_steps is not None and num_steps != self.num_steps:
            raise CalibrationError(f"{where} is for {self.num_steps}-step generations, not {num_steps}: its schedule "
                                   f"and weights are per step index and are not interpolated; calibrate for "
                                   f"{num_steps} steps (taylorseer calibrate --steps {num_steps})")
        if schedule is not None:
            steps = schedule.full_steps if isinstance(schedule, FixedSchedule) else tuple(schedule)
            if tuple(steps) != self.schedule.full_steps:
                raise CalibrationError(f"{where} was fitted for the full steps {list(self.schedule.full_steps)}, "
                                       f"not {list(steps)}")

    @property
    def row_groups(self) -> int:
        """``R``: 2 for weights fitted on a guided CFG batch ``[cond; uncond]`` (each half its own weights), else
        1 (one branch per call, or a schedule-only file)."""
        if self.table is None:
            return 1
        return int((self.header.get("forecaster") or {}).get("row_groups", 1))

    def check_sampling(self, guidance_scale: float | None = None, cfg_mode: str | None = None) -> None:
        """``CalibrationError`` naming the mismatch unless sampling at ``guidance_scale`` with ``cfg_mode``
        (``"batch"``: one doubled CFG batch per step; ``"split"``: a call per branch; None: not known) fits the
        calibration: the same guidance scale as its trajectories (files that record one), and for weights fitted on
        a guided CFG batch (``row_groups`` 2) a guided batch layout. Unknown values are not checked.

        Example:
            >>> load_calibration("dit-b8.safetensors").check_sampling(4.0)   # doctest: +SKIP
            Traceback (most recent call last):
            CalibrationError: ... calibrated at guidance_scale 1.5, not 4 ...
        """
        where = self.path or "the calibration"
        made = (self.header.get("calibration_data") or {}).get("guidance_scale")
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                    or not math.isfinite(guidance_scale):
                raise ValueError(f"guidance_scale must be a finite float or None, got {guidance_scale!r}")
            if made is not None and float(made) != float(guidance_scale):
                raise CalibrationError(f"{where} was calibrated at guidance_scale {float(made):g}, not "
                                       f"{float(guidance_scale):g}: its schedule and weights are fitted to the "
                                       f"trajectories of that scale; sample at guidance_scale {float(made):g} or "
                                       f"calibrate again at {float(guidance_scale):g}")
        if cfg_mode is not None and cfg_mode not in ("batch", "split"):
            raise ValueError(f"cfg_mode must be one of ['batch', 'split'] or None, got {cfg_mode!r}")
        if self.row_groups == 2:
            unguided = guidance_scale is not None and float(guidance_scale) == 1.0
            if unguided or cfg_mode == "split":
                raise CalibrationError(f"{where}: its weights were fitted on a guided CFG batch [cond; uncond] (2 row "
                                       f"groups), but this run samples with "
                                       f"{'guidance_scale=1 (no CFG batch)' if unguided else 'cfg_mode=split'}: "
                                       f"the rows would get the other half's weights; sample with guidance as one "
                                       f"doubled batch, or calibrate with the same guidance layout")

    def check_call(self, rows: int | None, halves_equal: bool | None, call: int) -> None:
        """At the first step of a generation, before any forecast: ``CalibrationError`` unless model call number
        ``call`` (0-based) of that step, whose first tensor argument has ``rows`` rows (None: no tensor), fits the
        weights' row layout. Weights fitted on a guided CFG batch (``row_groups`` 2) need one call per step on a
        batch ``[x; x]``: an even row count whose two halves are equal (``halves_equal``: the same latents, the
        conditioning differs). Anything else (an unguided batch, two calls per step) would give each half of the
        batch the other branch's weights, or fail only at the first forecast step."""
        if self.row_groups != 2:
            return
        where = self.path or "the calibration"
        fitted = f"{where}: its weights were fitted on a guided CFG batch [cond; uncond] (2 row groups)"
        if call > 0:
            raise CalibrationError(f"{fitted}, but step 0 calls the model more than once (cfg_mode='split', or "
                                   f"several branches): sample with guidance as one doubled batch, or calibrate "
                                   f"with the same guidance layout")
        if rows is None or rows % 2:
            raise CalibrationError(f"{fitted}, but the model's first tensor argument has "
                                   f"{'no rows' if rows is None else f'{rows} rows, an odd count'}: not a CFG batch "
                                   f"[x; x] (unguided sampling?)")
        if not halves_equal:
            raise CalibrationError(f"{fitted}, but the two halves of the model's first tensor argument ({rows} rows) "
                                   f"differ, so it is not a CFG batch [x; x] (an unguided batch, or one call per "
                                   f"CFG branch, cfg_mode='split'): the second half would get the unconditional "
                                   f"weights; sample with the same guidance layout or calibrate again with yours")


#################################################################################
#                                      Read                                     #
#################################################################################

def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors (name, dtype, shape and bytes, sorted by name): the header's ``tensor_sha256``."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _fail(path: Path, message: str) -> CalibrationError:
    return CalibrationError(f"calibration file {path}: {message}")


def _read(path: Path, sha256: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    sha256 = check_sha256(sha256)
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise _fail(path, f"SHA-256 {actual} differs from the expected {sha256}: the file was changed, "
                        f"corrupted or truncated since the config naming it was made")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _fail(path, f"not a readable safetensors file (truncated or corrupted?): {err}") from err
    if HEADER_KEY not in metadata:
        raise _fail(path, f"no {HEADER_KEY!r} header: not a taylorseer calibration file")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise _fail(path, f"the header is not valid JSON (corrupted?): {err}") from err
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object (corrupted?)")
    return tensors, header


_REQUIRED = ("format", "kind", "name", "library_version", "model", "num_steps", "schedule", "forecaster", "groups",
             "targets", "fit", "search", "calibration_data", "tensor_sha256")


def _unpack(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor], schedule: FixedSchedule
            ) -> LinearTable:
    options = header.get("forecaster") or {}
    grouping, history = options.get("grouping"), options.get("history")
    if grouping not in GROUPINGS or not isinstance(history, int):
        raise _fail(path, f"header forecaster needs grouping in {list(GROUPINGS)} and an int history, got "
                    f"{options!r}")
    forecast = [s for s in range(schedule.num_steps) if s not in set(schedule.full_steps)]
    steps: dict[str, dict[int, StepWeights]] = {}
    for g, group in enumerate(header["groups"]):
        names = [f"g{g}.steps", f"g{g}.anchors", f"g{g}.weights"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise _fail(path, f"group {group!r} lacks tensors {missing}")
        s, a, w = (tensors[n] for n in names)
        b = tensors.get(f"g{g}.bias")
        if s.tolist() != forecast:
            raise _fail(path, f"group {group!r} has weights for steps {s.tolist()}, but the schedule forecasts "
                        f"{forecast}")
        if a.shape != (len(forecast), history) or w.shape[:2] != (len(forecast), history):
            raise _fail(path, f"group {group!r}: anchors {tuple(a.shape)} / weights {tuple(w.shape)} do not match "
                        f"{len(forecast)} steps x history {history}")
        steps[group] = {}
        for i, step in enumerate(forecast):
            anchors = tuple(int(x) for x in a[i] if x >= 0)
            steps[group][step] = StepWeights(anchors, w[i, : len(anchors)].clone(),
                                             None if b is None else b[i].clone())
    return LinearTable(steps, schedule.num_steps, schedule.full_steps, grouping, history)


def read_calibration(path: str | os.PathLike, *, sha256: str | None = None, model: nn.Module | None = None,
                     num_steps: int | None = None, schedule: FixedSchedule | tuple[int, ...] | None = None,
                     kind: str | None = None) -> CalibrationFile:
    """Read and validate a calibration file (see the module docstring); check it against ``model``,
    ``num_steps``, ``schedule`` and ``kind`` when given. ``sha256``: the expected digest of the whole file.

    Raises ``CalibrationError`` (a ``ValueError``) naming what is wrong or does not match.

    Example:
        >>> cal = read_calibration("b8.safetensors", model=load_reference(), num_steps=50)   # doctest: +SKIP
    """
    path = Path(path)
    try:
        tensors, header = _read(path, sha256)
    except CheckpointError as err:
        raise CalibrationError(str(err)) from err
    if header.get("format") != FORMAT:
        raise _fail(path, f"format {header.get('format')!r} is not {FORMAT!r} (another library version?)")
    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise _fail(path, f"the header lacks {missing} (corrupted or written by another tool)")
    if header["tensor_sha256"] != tensor_digest(tensors):
        raise _fail(path, "its tensors do not match the digest recorded in its header: the file is corrupted")
    if header["kind"] not in KINDS:
        raise _fail(path, f"kind {header['kind']!r} is not one of {list(KINDS)}")
    if header.get("granularity", "module") not in GRANULARITIES:
        raise _fail(path, f"granularity {header['granularity']!r} is not one of {list(GRANULARITIES)}")
    try:
        schedule_cfg = FixedSchedule.from_dict(header["schedule"])
    except (TypeError, ValueError) as err:
        raise _fail(path, f"invalid schedule in the header: {err}") from err
    if "schedule.full_steps" not in tensors or tuple(tensors["schedule.full_steps"].tolist()) != \
            schedule_cfg.full_steps or schedule_cfg.num_steps != header["num_steps"]:
        raise _fail(path, "the schedule in the header disagrees with the file's schedule tensor")
    table = _unpack(path, header, tensors, schedule_cfg) if header["kind"] == "linear" else None
    cal = CalibrationFile(header, table, str(path), file_sha256(path))
    if kind is not None and kind != cal.kind:
        raise _fail(path, f"holds a {cal.kind!r} calibration, a {kind!r} one was asked for")
    cal.check(model=model, num_steps=num_steps, schedule=schedule)
    return cal


#################################################################################
#                 The forecaster, and the configs that name a file              #
#################################################################################

_BUILT: dict[str, LinearForecaster] = {}  # content SHA-256 of a calibration file -> its forecaster
_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (its inode and change time, its content SHA-256)


def _content_digest(path: str) -> str | None:
    """The SHA-256 of the file's content (None if it cannot be read), hashed again whenever the file's device,
    inode, size, modification or *change* time differ from the last hash. The change time (``st_ctime``) is set by
    the system on every write, rename onto the path or ``utime``, and cannot be set back by a copy or a restore
    (``cp -p``, ``rsync -t`` keep the modification time only), so a replaced file is always hashed again; an
    unchanged one is not read at every ``apply``."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # read_calibration names the problem
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _DIGESTS.get(path)
    if known is not None and known[0] == key:
        return known[1]
    try:
        digest = str(file_sha256(path))
    except OSError:
        return None
    if len(_DIGESTS) >= 64:
        _DIGESTS.pop(next(iter(_DIGESTS)))
    _DIGESTS[path] = (key, digest)
    return digest


@register_forecaster(LinearForecast)
def _build_linear(config: LinearForecast) -> LinearForecaster:
    # The forecaster holds no generation state (that is in FactorState), only its weights placed on a device: one
    # per file *content* (its SHA-256, whatever its path, size or modification time), so that an apply per
    # generation does not validate and place the weights again, and a file replaced in place (``cp -p``,
    # ``rsync -t``, a restore) is never served from the old content.
    digest = _content_digest(config.calibration)
    if digest is not None and digest in _BUILT and (not config.sha256 or config.sha256.lower() == digest):
        return _BUILT[digest]
    calibration = read_calibration(config.calibration, sha256=config.sha256 or None)
    if digest is not None and calibration.sha256 != digest:  # replaced between the two reads: read it again
        raise CalibrationError(f"calibration file {config.calibration}: changed while it was being read; "
                               f"try again once it is no longer being written")
    anchor = (calibration.header.get("forecaster") or {}).get("anchor")
    if anchor:  # its weights read the anchor's fresh output: as a plain LinearForecast they would be misread
        raise CalibrationError(f"calibration file {config.calibration}: holds anchored weights (anchor target "
                               f"{anchor!r}); run it as AnchoredLinearForecast under an AnchorSchedule, i.e. the "
                               f"config its cache_config() gives, not as a LinearForecast")
    forecaster = LinearForecaster(calibration.table_required(), calibration)
    while len(_BUILT) >= 8:  # a few recent files (a calibration holds a few MB of weights)
        _BUILT.pop(next(iter(_BUILT)))
    if calibration.sha256 is not None:
        _BUILT[calibration.sha256] = forecaster
    return forecaster


def calibration_of(config: Any) -> CalibrationFile | None:
    """The calibration a config's forecaster was built from (a ``CacheConfig`` with a ``LinearForecast``; read
    and validated, content-checked against its ``sha256`` when the config names one), else None.

    Example:
        >>> calibration_of(load_calibration("b8.safetensors").cache_config()).num_steps   # doctest: +SKIP
        50
    """
    forecaster = getattr(config, "forecaster", None)
    if not isinstance(forecaster, LinearForecast):
        return None
    return getattr(build_forecaster(forecaster), "calibration", None)


def pin_config(config: Any) -> Any:
    """``config`` with its ``LinearForecast`` bound to the content of the file it names (``sha256`` set to the
    file's SHA-256): a run identity that holds the config then changes with the file's content, and a file changed
    later is refused by its digest instead of mixing two calibrations in one run. Other configs are returned as
    they are; a config whose ``sha256`` disagrees with the file raises ``CalibrationError``.

    Example:
        >>> pin_config(CacheConfig(schedule, LinearForecast("b8.safetensors"))).forecaster.sha256   # doctest: +SKIP
        '3f2a...'
    """
    forecaster = getattr(config, "forecaster", None)
    if not isinstance(forecaster, LinearForecast):
        return config
    calibration = calibration_of(config)
    assert calibration is not None and calibration.sha256 is not None, "built from a file"
    return dataclasses.replace(config, forecaster=LinearForecast(forecaster.calibration, calibration.sha256))
