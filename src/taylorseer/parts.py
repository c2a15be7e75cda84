"""The typed parts of a cache: a policy (when), a forecaster (what), targets (where), a store (how kept).

``CacheConfig`` holds one of each and is the one config type below the API: ``apply(model, CacheConfig(...))``
takes it directly, and every ``TaylorSeerConfig`` (and preset) is a builder of one (``parts_of(config)``, which
``apply`` calls once at entry), with bit-identical results. Each part is a frozen, validated dataclass; the policy
and forecaster types are looked up in their registries, so a new one is usable here without editing this file.
Round-trips through JSON with the part's type name.

Example:
    >>> from taylorseer.forecast import TaylorForecast
    >>> from taylorseer.policy import IntervalSchedule
    >>> cfg = CacheConfig(IntervalSchedule(interval=5), TaylorForecast(max_order=2))
    >>> CacheConfig.from_json(cfg.to_json()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .config import (
    ABSCISSAE,
    FACTOR_DTYPES,
    GRANULARITIES,
    PRESET_NAMES,
    TaylorSeerConfig,
    config_from_dict,
    config_to_dict,
    preset,
)
from .forecast import AnchoredLinearForecast, LinearForecast, TaylorForecast, registered_forecasters
from .forecast.linear_file import CalibrationError, CalibrationFile
from .policy import AnchorSchedule, IntervalSchedule, build_policy, registered_policies


@dataclass(frozen=True)
class Targets:
    """Where to intercept: ``granularity`` (``module`` outputs as in the paper, ``block`` residuals, or the model
    ``output``), optional path ``modules`` patterns (``blocks.*.attn``; empty: the registered adapter) and
    ``block_shortcuts`` (blocks with a registered shortcut skip, on forecast steps, the work that only feeds
    forecast modules; bit-identical)."""

    granularity: str = "module"
    modules: tuple[str, ...] = ()
    block_shortcuts: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Targets.granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if isinstance(self.modules, str) or not all(isinstance(p, str) and p for p in self.modules):
            raise TypeError(f"Targets.modules must be a tuple of non-empty path patterns, got {self.modules!r}")
        object.__setattr__(self, "modules", tuple(self.modules))
        if not isinstance(self.block_shortcuts, bool):
            raise TypeError(f"Targets.block_shortcuts must be a bool, got {self.block_shortcuts!r}")


@dataclass(frozen=True)
class Store:
    """How factors are kept: ``factor_dtype`` (None: the feature's own dtype; ``float16``/``bfloat16`` halve the
    memory). Room for offloading later."""

    factor_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"Store.factor_dtype must be one of {list(FACTOR_DTYPES)}, got {self.factor_dtype!r}")


def _registered(kind: str) -> dict[str, type]:
    return registered_policies() if kind == "policy" else registered_forecasters()


@dataclass(frozen=True)
class CacheConfig:
    """One policy, one forecaster, the targets, the store, and the ``abscissa`` (``step``, ``timestep`` or
    ``sigma``) the forecaster works in. ``name`` labels records and reports (not compared)."""

    policy: Any
    forecaster: Any
    targets: Targets = field(default_factory=Targets)
    store: Store = field(default_factory=Store)
    abscissa: str = "step"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for kind in ("policy", "forecaster"):
            registered = _registered(kind)
            if type(getattr(self, kind)) not in registered.values():
                raise TypeError(f"CacheConfig.{kind} must be one of {sorted(registered)}, "
                                f"got {type(getattr(self, kind)).__name__}")
        if not isinstance(self.targets, Targets):
            raise TypeError(f"CacheConfig.targets must be a Targets, got {type(self.targets).__name__}")
        if not isinstance(self.store, Store):
            raise TypeError(f"CacheConfig.store must be a Store, got {type(self.store).__name__}")
        if self.abscissa not in ABSCISSAE:
            raise ValueError(f"CacheConfig.abscissa must be one of {list(ABSCISSAE)}, got {self.abscissa!r}")

    def full_steps(self, num_steps: int) -> int | None:
        """Fully computed steps of a generation, for static policies (None for adaptive ones)."""
        plan = build_policy(self.policy).plan(num_steps)
        return None if plan is None else sum(plan)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict; the policy and forecaster carry their type name under ``"type"``. The one serialiser
        of a cache: every part goes through ``config_to_dict`` (as every policy config's own ``to_dict``)."""
        return {"policy": part_to_dict(self.policy), "forecaster": part_to_dict(self.forecaster),
                "targets": config_to_dict(self.targets), "store": config_to_dict(self.store),
                "abscissa": self.abscissa, "name": self.name}

    def to_json(self) -> str:
        """JSON text of ``to_dict()`` (keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheConfig:
        """Inverse of ``to_dict``; unknown part types or fields raise ``ValueError`` naming them.

        Example:
            >>> CacheConfig.from_dict({"policy": {"type": "IntervalSchedule", "interval": 5},
            ...                        "forecaster": {"type": "TaylorForecast"}}).policy.interval
            5
        """
        if not isinstance(data, dict):
            raise TypeError(f"CacheConfig.from_dict needs a dict (a JSON object), got {type(data).__name__}")
        allowed = {"policy", "forecaster", "targets", "store", "abscissa", "name"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown CacheConfig field(s) {unknown}; allowed: {sorted(allowed)}")
        missing = [kind for kind in ("policy", "forecaster") if kind not in data]
        if missing:
            raise ValueError(f"CacheConfig.from_dict: missing {missing}; a policy and a forecaster are required, "
                             f"each an object with its \"type\" (one of {sorted(registered_policies())} and "
                             f"{sorted(registered_forecasters())})")
        return cls(part_from_dict("policy", data["policy"]), part_from_dict("forecaster", data["forecaster"]),
                   config_from_dict(Targets, _tuples(Targets, data.get("targets", {}))),
                   config_from_dict(Store, data.get("store", {})),
                   data.get("abscissa", "step"), data.get("name", "custom"))

    @classmethod
    def from_json(cls, text: str) -> CacheConfig:
        """Inverse of ``to_json``: ``ValueError`` naming the text if it is not valid JSON; then as ``from_dict``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"CacheConfig.from_json: not valid JSON ({err}) in {text!r:.80}") from None
        return cls.from_dict(data)


def part_to_dict(part: Any) -> dict[str, Any]:
    """A policy or forecaster config as a plain-JSON dict with its registered type name under ``"type"``.

    Example:
        >>> part_to_dict(IntervalSchedule(interval=5))
        {'type': 'IntervalSchedule', 'interval': 5, 'warmup_steps': 2, 'tail_steps': 0}
    """
    return {"type": type(part).__name__, **config_to_dict(part)}


def part_from_dict(kind: str, data: Any) -> Any:
    """Inverse of ``part_to_dict`` for ``kind`` ``"policy"`` or ``"forecaster"``: the registered config type named
    by ``data["type"]``, built from the other keys (``ValueError`` naming an unknown type or key).

    Example:
        >>> part_from_dict("forecaster", {"type": "TaylorForecast", "max_order": 1}).max_order
        1
    """
    if not isinstance(data, dict):
        raise TypeError(f"CacheConfig.{kind} must be a JSON object with a \"type\", got {type(data).__name__}")
    spec = dict(data)
    registered = _registered(kind)
    name = spec.pop("type", None)
    if name not in registered:
        raise ValueError(f"CacheConfig.{kind}.type must be one of {sorted(registered)}, got {name!r}")
    return config_from_dict(registered[name], _tuples(registered[name], spec))


def _tuples(config_type: type, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with JSON lists turned into tuples for the fields the config type declares as tuples."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(config_type)}
    return {k: tuple(v) if isinstance(v, list) and "tuple" in hints.get(k, "") else v for k, v in spec.items()}


def parts_of(config: TaylorSeerConfig | CacheConfig) -> CacheConfig:
    """The parts a ``TaylorSeerConfig`` stands for (a ``CacheConfig`` is returned as it is).

    Example:
        >>> parts_of(TaylorSeerConfig(interval=5, max_order=1)).forecaster
        TaylorForecast(max_order=1, scheme='divided', history_from_step=0)
    """
    if isinstance(config, CacheConfig):
        return config
    if not isinstance(config, TaylorSeerConfig):
        raise TypeError(f"config must be a TaylorSeerConfig or a CacheConfig (see taylorseer.preset), "
                        f"got {type(config).__name__}")
    # The reference code takes no differences on full steps with index <= W - 2 (FLUX drops step 1's history).
    history = max(config.warmup_steps - 1, 0) if config.scheme == "reference" else 0
    return CacheConfig(
        policy=IntervalSchedule(config.interval, config.warmup_steps, config.tail_steps),
        forecaster=TaylorForecast(config.max_order, config.scheme, history),
        targets=Targets(config.granularity, config.modules, config.block_shortcuts),
        store=Store(config.factor_dtype),
        abscissa=config.abscissa,
        name=config.name,
    )


def searched_forecaster(calibration: CalibrationFile) -> Any:
    """For a calibration file whose schedule was searched for a formula forecaster (``calibrate(...,
    forecaster=...)``), that forecaster's config (from its header); else None. ``CalibrationError`` if the header
    names a forecaster that is not registered.

    Example:
        >>> searched_forecaster(read_calibration("ts2-output-b8-s50.safetensors"))   # doctest: +SKIP
        TaylorForecast(max_order=2, scheme='divided', history_from_step=0)
    """
    spec = (calibration.header.get("forecaster") or {}).get("searched_with")
    if spec is None:
        return None
    try:
        return part_from_dict("forecaster", spec)
    except (TypeError, ValueError) as err:
        raise CalibrationError(f"{calibration.path or 'the calibration'}: its header names an unknown forecaster "
                               f"{spec!r}: {err}") from err


def calibrated_config(calibration: CalibrationFile, forecaster: Any = None, name: str | None = None) -> CacheConfig:
    """The ``CacheConfig`` a calibration file stands for (``Calibration.cache_config``): its ``FixedSchedule`` with
    its ``LinearForecast`` (the file must have been saved or loaded, so that the config can name it; a file of
    anchored weights gives the hybrid ``AnchorSchedule`` with its ``AnchoredLinearForecast``), or with
    ``forecaster`` (any forecaster config; for a schedule searched for a formula forecaster, that one by default),
    at the file's granularity, in step units.

    Example:
        >>> calibrated_config(read_calibration("ts2-output-b8-s50.safetensors")).policy.num_steps   # doctest: +SKIP
        50
    """
    searched = searched_forecaster(calibration) if forecaster is None and calibration.table is None else None
    forecaster = forecaster if forecaster is not None else searched
    label = name or calibration.header.get("name") or "calibrated"
    if forecaster is None and (calibration.header.get("forecaster") or {}).get("anchor"):
        # Anchored weights (calibration.anchor_fit) read the anchor's fresh output: they run only under the hybrid
        # policy whose probe computes it (the first block on every forecast step), never as a plain LinearForecast.
        if calibration.path is None:
            raise CalibrationError("save the calibration first (save_calibration): its forecaster names a file")
        return CacheConfig(AnchorSchedule(calibration.schedule.full_steps, calibration.schedule.num_steps, 1),
                           AnchoredLinearForecast(str(calibration.path), calibration.sha256 or ""),
                           Targets(granularity=calibration.granularity), abscissa="step", name=label)
    if forecaster is None:
        calibration.table_required()
        if calibration.path is None:
            raise CalibrationError("save the calibration first (save_calibration): LinearForecast names a file")
        forecaster = LinearForecast(calibration.path, calibration.sha256 or "")
    return CacheConfig(calibration.schedule, forecaster, Targets(granularity=calibration.granularity),
                       abscissa="step", name=label)


def load_config(spec: str | os.PathLike | dict | TaylorSeerConfig | CacheConfig) -> CacheConfig:
    """The one reader behind every command's ``--config JSON|FILE|NAME``: a ``CacheConfig`` from a preset name
    (``PRESET_NAMES``), a path to a ``.json`` file, JSON text, or a dict. A JSON object with a ``"policy"`` key is
    a ``CacheConfig`` (any registered policy and forecaster, by type name); any other object is read as
    ``TaylorSeerConfig`` fields. Errors name the spec and the allowed forms.

    Example:
        >>> load_config("paper_flux").policy.interval
        6
        >>> load_config('{"interval": 5, "max_order": 1}').forecaster.max_order
        1
    """
    if isinstance(spec, (CacheConfig, TaylorSeerConfig)):
        return parts_of(spec)
    if isinstance(spec, dict):
        return CacheConfig.from_dict(spec) if "policy" in spec else parts_of(TaylorSeerConfig.from_dict(spec))
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"config must be a preset name, a JSON file path or JSON text, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text in PRESET_NAMES:
        return parts_of(preset(text))
    if text.lstrip().startswith("{"):
        source = "JSON text"
    elif os.path.isfile(text):
        source = f"file {text}"
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    else:
        raise ValueError(f"config must be a preset name {list(PRESET_NAMES)}, a path to a JSON file or JSON text "
                         f"(an object), got {text!r:.120}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config: {source} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {source} must hold a JSON object, got {type(data).__name__}")
    return load_config(data)
