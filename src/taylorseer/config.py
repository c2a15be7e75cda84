"""Typed, frozen, validated configs and the paper presets, and the one serialiser of part configs
(``config_to_dict`` / ``config_from_dict``). The ground floor: imports nothing of ours.

One config object drives the API, the CLI and the report headers, and round-trips through JSON.

Example:
    >>> cfg = TaylorSeerConfig(interval=5, max_order=2)
    >>> TaylorSeerConfig.from_json(cfg.to_json()) == cfg
    True
    >>> preset("paper_dit").full_steps(50)
    14
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

SCHEMES = ("reference", "divided")
ABSCISSAE = ("step", "timestep", "sigma")
GRANULARITIES = ("module", "block", "output")
FACTOR_DTYPES = (None, "float32", "float16", "bfloat16", "float64")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class TaylorSeerConfig:
    """How to forecast skipped steps: schedule (policy), forecaster and where to intercept.

    Schedule: a model call is computed in full for the first ``warmup_steps`` steps, then once every
    ``interval`` steps (the ``interval - 1`` steps between are forecast), and for the last ``tail_steps`` steps.
    ``interval=1`` computes every step (no acceleration).

    Forecaster: Taylor factors up to ``max_order`` (0 = plain reuse, i.e. FORA) kept per cached module output.
    ``scheme="reference"`` reproduces the official code (step-index units, higher orders divided by the latest
    spacing only, history dropped on full steps with index <= warmup_steps - 2); ``scheme="divided"`` uses
    Newton divided differences over the actual abscissae (exact for polynomials of degree <= max_order).
    ``abscissa`` is what the series is expanded in: the step index, the scheduler's timestep, or sigma.

    Where: ``modules`` are path patterns (``"blocks.*.attn"``; ``*`` matches one path component, ``**`` any
    number) naming the sub-modules whose outputs are forecast; empty means the adapter registered for the model
    class. ``granularity`` picks module outputs (paper), block residuals, or the model output ("lite").
    ``factor_dtype`` stores the factors in another dtype (None: the feature's own) to save memory.
    ``block_shortcuts`` lets blocks with a registered shortcut skip, on forecast steps, the work that only feeds
    forecast modules (bit-identical output, less wall time; see ``adapters/shortcuts.py``).
    """

    interval: int = 4
    warmup_steps: int = 2
    max_order: int = 2
    tail_steps: int = 0
    scheme: str = "divided"
    abscissa: str = "step"
    modules: tuple[str, ...] = ()
    granularity: str = "module"
    factor_dtype: str | None = None
    block_shortcuts: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("max_order", self.max_order, 0)
        _check_int("tail_steps", self.tail_steps, 0)
        _check_choice("scheme", self.scheme, SCHEMES)
        _check_choice("abscissa", self.abscissa, ABSCISSAE)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        if isinstance(self.modules, str):  # one pattern is not iterated into characters: it is refused
            raise TypeError(f"modules must be a tuple of non-empty path patterns, got the string {self.modules!r}; "
                            f"wrap a single pattern in a list or tuple: [{self.modules!r}]")
        if not isinstance(self.modules, (tuple, list)) or not all(isinstance(p, str) and p for p in self.modules):
            raise TypeError(f"modules must be a tuple of non-empty path patterns (str), got "
                            f"{type(self.modules).__name__} {self.modules!r}")
        object.__setattr__(self, "modules", tuple(self.modules))
        if not isinstance(self.block_shortcuts, bool):
            raise TypeError(f"block_shortcuts must be a bool, got {self.block_shortcuts!r}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")

    # -- schedule facts --------------------------------------------------------------------------------
    def full_steps(self, num_steps: int) -> int:
        """Number of fully computed steps in a generation of ``num_steps`` steps (the count of ``F`` in
        ``IntervalPolicy(interval, warmup_steps, tail_steps).pattern(num_steps)``, in closed form: the first
        ``warmup_steps`` and last ``tail_steps`` steps, and every ``interval``-th step between them).

        Example:
            >>> TaylorSeerConfig(interval=4, warmup_steps=2).full_steps(10)
            4
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        forced = min(num_steps, self.warmup_steps + self.tail_steps)
        return forced + (num_steps - forced) // self.interval

    # -- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (``modules`` as a list)."""
        out = dataclasses.asdict(self)
        out["modules"] = list(self.modules)
        return out

    def to_json(self) -> str:
        """JSON text of ``to_dict()``."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaylorSeerConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them and the allowed keys.

        ``data`` must be a dict (a JSON object), else ``TypeError``. ``modules`` is a list of patterns; a single
        string is refused (``TypeError``), never split into characters: write ``["blocks.*.attn"]``.

        Example:
            >>> TaylorSeerConfig.from_dict({"interval": 5, "modules": ["blocks.*.attn"]}).modules
            ('blocks.*.attn',)
        """
        if not isinstance(data, dict):
            raise TypeError(f"TaylorSeerConfig.from_dict needs a dict (a JSON object) of fields, got "
                            f"{type(data).__name__} {data!r:.80}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed), key=str)
        if unknown:
            raise ValueError(f"unknown TaylorSeerConfig field(s) {unknown}; allowed: {allowed}")
        data = dict(data)
        if isinstance(data.get("modules"), list):  # JSON arrays; anything else is judged by __post_init__
            data["modules"] = tuple(data["modules"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TaylorSeerConfig:
        """Inverse of ``to_json``: ``text`` must hold one JSON object (``ValueError`` naming the text if it is
        not valid JSON, ``TypeError`` if it is not a str or not an object); then as ``from_dict``."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"TaylorSeerConfig.from_json needs JSON text (str), got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"TaylorSeerConfig.from_json: not valid JSON ({err}) in {text!r:.80}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TaylorSeerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#################################################################################
#                                    Presets                                    #
#################################################################################

_PRESETS: dict[str, dict[str, Any]] = {
    # The official code's settings (../shared/ALGORITHM.md), step-index units, reference differences.
    "paper_dit": dict(warmup_steps=2, interval=4, max_order=4, scheme="reference", abscissa="step"),
    "paper_flux": dict(warmup_steps=3, interval=6, max_order=1, scheme="reference", abscissa="step"),
    "paper_hunyuan_video": dict(warmup_steps=1, interval=5, max_order=1, scheme="reference", abscissa="step"),
    "paper_wan": dict(warmup_steps=1, interval=5, max_order=1, scheme="reference", abscissa="step"),
    # Plain reuse of the last computed features (FORA) on DiT's schedule.
    "fora": dict(warmup_steps=2, interval=4, max_order=0, scheme="reference", abscissa="step"),
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> TaylorSeerConfig:
    """A named preset (see ``PRESET_NAMES``), optionally with fields overridden.

    Example:
        >>> preset("paper_flux", interval=4).interval
        4
    """
    if not isinstance(name, str) or name not in _PRESETS:
        raise ValueError(f"preset must be one of {list(PRESET_NAMES)}, got {name!r}")
    allowed = [f.name for f in dataclasses.fields(TaylorSeerConfig)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:  # TypeError, as for any unexpected keyword argument
        raise TypeError(f"preset({name!r}): unknown TaylorSeerConfig field(s) {unknown}; allowed: {allowed}")
    return TaylorSeerConfig(**{**_PRESETS[name], "name": name, **overrides})


#################################################################################
#                 Serialisation of part configs (JSON), the one way              #
#################################################################################

def config_to_dict(config: Any) -> dict[str, Any]:
    """A part config's fields (a policy or forecaster config, ``Targets``, ``Store``) as a plain dict of JSON types
    (tuples become lists): the one serialiser every part and ``CacheConfig.to_dict`` use.

    Example:
        >>> from taylorseer.policy import IntervalSchedule
        >>> config_to_dict(IntervalSchedule(interval=5, warmup_steps=1))
        {'interval': 5, 'warmup_steps': 1, 'tail_steps': 0}
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a part config dataclass instance, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        out[item.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(config_type: type[C], data: Mapping[str, Any]) -> C:
    """The config of type ``config_type`` from ``config_to_dict``'s output; unknown or missing keys are errors.

    Example:
        >>> from taylorseer.policy import IntervalSchedule
        >>> config_from_dict(IntervalSchedule, {"interval": 5, "warmup_steps": 1, "tail_steps": 0})
        IntervalSchedule(interval=5, warmup_steps=1, tail_steps=0)
    """
    name = config_type.__name__
    if not isinstance(data, Mapping):
        raise TypeError(f"{name}.from_dict needs a dict, got {type(data).__name__}")
    fields = dataclasses.fields(config_type)
    known = [f.name for f in fields]
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ValueError(f"{name}.from_dict: unknown keys {unknown}; allowed keys are {known}")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{name}.from_dict: missing keys {missing}; required keys are {required}")
    return config_type(**dict(data))
