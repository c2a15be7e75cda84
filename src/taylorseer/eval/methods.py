"""A benchmarked method, typed: a name, a ``CacheConfig`` (or a peer's settings, or None) and a number of steps.

Everything the eval layer says about a method comes from its config's part *types*, never from a hand list: its
family is the policy's ``family`` hook if the policy type offers one (``ConfidenceGate.family == "gate"``), else
the forecaster's (``TaylorForecast.family()`` is "fora" at order 0, else "taylorseer"), else the forecaster
type's name without its suffix (``AdamsForecast`` -> "adams"). A part defined anywhere (a test, a plugin) thus
gets a family, a label, a colour and a marker in the bench records and the report with no edit here. A part type
may offer hooks: ``family`` (a class attribute, or a method of the instance), ``label()`` (a short text the report
names the method by, e.g. "decay 0.9"), ``knobs()`` (a dict of the fields the report groups points by, e.g.
``{"interval": 5}``) and ``grid(num_steps)`` (a class method: a few ``(name, CacheConfig)`` grid points that join
the bench's default grid, and so ``bench --methods`` and ``sample --method`` by name).

Peers of other libraries (diffusers' hooks, cache-dit) run from their own settings types (``PeerSettings``: a
``family`` class attribute and ``to_dict()``); plain sampling (``full``, ``fewer-steps``) has no config.

Example:
    >>> from taylorseer.parts import load_config
    >>> m = Method("ts", load_config('{"interval": 5, "max_order": 2}'), 50)
    >>> m.family, m.full_steps()
    ('taylorseer', 11)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..forecast.taylor import TaylorForecast
from ..parts import CacheConfig
from ..policy.interval import IntervalSchedule

PLAIN_FAMILIES = ("full", "fewer-steps")  # plain sampling: no config
_SUFFIXES = ("Forecaster", "Forecast", "Config", "Settings", "Schedule", "Policy")


@runtime_checkable
class PeerSettings(Protocol):
    """The settings of a peer cache of another library (``FirstBlockCacheSettings``, ``CacheDitSettings``, ...):
    its bench ``family`` and a JSON-ready ``to_dict()``. Installed by the installer registered for that family
    (``eval.install.register_installer``)."""

    family: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...


def _hook(part: Any, name: str) -> Any:
    """The value of the optional hook ``name`` of ``part``'s type: a class attribute, or a method called on it."""
    hook = getattr(type(part), name, None)
    return hook(part) if callable(hook) else hook


def type_family(part_type: type) -> str:
    """A family name from a part type's name: ``AdamsForecast`` -> "adams", ``AlternatePolicy`` -> "alternate".

    Example:
        >>> type_family(IntervalSchedule)
        'interval'
    """
    name = part_type.__name__
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name != suffix:
            name = name[: -len(suffix)]
            break
    return name.lower()


def family_of(config: CacheConfig) -> str:
    """The method family of a config, from its part types (see the module doc).

    Example:
        >>> from taylorseer.policy import ConfidenceGate
        >>> family_of(CacheConfig(ConfidenceGate(), TaylorForecast()))
        'gate'
    """
    for part in (config.policy, config.forecaster):
        value = _hook(part, "family")
        if value:
            return str(value)
    return type_family(type(config.forecaster))


def knobs_of(config: CacheConfig) -> dict[str, Any]:
    """The short fields the report labels and groups a method by (``knobs`` of its records).

    For Taylor (or FORA) on a fixed interval: ``interval``, ``warmup_steps``, ``tail_steps``, ``max_order``,
    ``scheme``, ``granularity``, ``modules``, ``factor_dtype``, ``block_shortcuts`` (the report's "O=2, N=5");
    for any config: ``abscissa`` and ``name``, plus what each part's optional ``knobs()`` hook returns.

    Example:
        >>> knobs_of(CacheConfig(IntervalSchedule(5), TaylorForecast(1)))["max_order"]
        1
    """
    knobs: dict[str, Any] = {}
    policy, forecaster = config.policy, config.forecaster
    if isinstance(policy, IntervalSchedule) and isinstance(forecaster, TaylorForecast):
        knobs.update(interval=policy.interval, warmup_steps=policy.warmup_steps, max_order=forecaster.max_order,
                     tail_steps=policy.tail_steps, scheme=forecaster.scheme, modules=list(config.targets.modules),
                     granularity=config.targets.granularity, factor_dtype=config.store.factor_dtype,
                     block_shortcuts=config.targets.block_shortcuts)
    for part in (policy, forecaster):
        extra = _hook(part, "knobs")
        if isinstance(extra, dict):
            knobs.update(extra)
    labels = [str(text) for text in (_hook(part, "label") for part in (policy, forecaster)) if text]
    if labels:
        knobs["label"] = ", ".join(labels)
    knobs.update(abscissa=config.abscissa, name=config.name)
    return knobs


def grid_methods(part_types: list[type], num_steps: int = 50) -> list[Method]:
    """The grid points that part types offer through their ``grid(num_steps)`` hook (none of the built-in parts
    does: their grid is ``eval.grids``'), as methods at ``num_steps`` steps.

    Example:
        >>> grid_methods([IntervalSchedule, TaylorForecast])
        []
    """
    out = []
    for part_type in part_types:
        grid = getattr(part_type, "grid", None)
        if not callable(grid):
            continue
        for name, config in grid(num_steps):
            out.append(Method(name, config, num_steps))
    return out


@dataclass(frozen=True)
class Method:
    """One benchmarked method: ``num_steps`` sampler steps under ``config``.

    ``config``: a ``CacheConfig`` (applied with ``taylorseer.apply``), a peer's ``PeerSettings``, or None (plain
    sampling). ``family`` is derived (``family_of`` the config, the settings' ``family``, "full" without a config)
    unless given: "fewer-steps" for plain sampling that is not the reference, and for a ``CacheConfig`` a name that
    says where it came from ("preset", "calibrated", "diffusers-peer": diffusers' own TaylorSeer reproducing the
    config). ``counterpart`` names our method that a peer is compared with; the bench times them in one group.

    Example:
        >>> Method("ts-O2-N5", CacheConfig(IntervalSchedule(5, 2), TaylorForecast(2))).full_steps()
        11
        >>> Method("ddim-11", None, 11, family="fewer-steps").to_dict()["config"] is None
        True
    """

    name: str
    config: CacheConfig | PeerSettings | None = None
    num_steps: int = 50
    family: str = ""
    counterpart: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Method.name must be a non-empty str, got {self.name!r}")
        config = self.config
        if config is not None and not isinstance(config, (CacheConfig, PeerSettings)):
            raise TypeError(f"method {self.name!r}: config must be a CacheConfig, a peer's settings or None "
                            f"(Method(name, config, num_steps, family=...)), got {type(config).__name__}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if not isinstance(self.family, str):
            raise TypeError(f"method {self.name!r}: family must be a str, got {self.family!r}")
        if config is None:
            family = self.family or "full"
            if family not in PLAIN_FAMILIES:
                raise ValueError(f"method {self.name!r}: a method without a config has family one of "
                                 f"{list(PLAIN_FAMILIES)}, got {family!r}")
        elif isinstance(config, CacheConfig):
            family = self.family or family_of(config)
            if family in PLAIN_FAMILIES:
                raise ValueError(f"method {self.name!r}: families {list(PLAIN_FAMILIES)} take no config")
        else:
            family = self.family or config.family
            if family != config.family:
                raise ValueError(f"method {self.name!r}: family {family!r} needs its settings, got "
                                 f"{type(config).__name__} (family {config.family!r})")
        object.__setattr__(self, "family", family)

    def full_steps(self) -> int | None:
        """Sampler steps computed in full; None for adaptive policies and peers that decide during sampling (the
        record then has the measured ``steps_full``)."""
        if self.config is None:
            return self.num_steps
        if not isinstance(self.config, CacheConfig):
            return None
        return self.config.full_steps(self.num_steps)

    def cache_config(self) -> CacheConfig:
        """The config that ``taylorseer.apply`` installs (``TypeError`` for plain sampling or a peer's settings)."""
        if not isinstance(self.config, CacheConfig):
            raise TypeError(f"method {self.name!r} (family {self.family}) has no taylorseer config: {self.config!r}")
        return self.config

    def knobs(self) -> dict[str, Any]:
        """``knobs_of`` the config (empty for plain sampling and peers)."""
        return knobs_of(self.config) if isinstance(self.config, CacheConfig) else {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the config as its ``to_dict()``)."""
        return {"name": self.name, "family": self.family, "num_steps": self.num_steps,
                "config": self.config.to_dict() if self.config is not None else None,
                "counterpart": self.counterpart}


def method_from_config(config: CacheConfig, num_steps: int = 50, name: str | None = None) -> Method:
    """The method that applies ``config`` (any registered parts) at ``num_steps`` steps, named after the config.

    Example:
        >>> method_from_config(CacheConfig(IntervalSchedule(5), TaylorForecast(2), name="mine")).name
        'mine'
    """
    if not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a CacheConfig (taylorseer.parts.load_config reads one), "
                        f"got {type(config).__name__}")
    return Method(name or config.name, config, num_steps)
