"""How methods are named, coloured and marked in every table and figure, from their records only.

A record written by this bench carries ``knobs`` (``eval.methods.knobs_of`` its config: the order, interval and
options of Taylor-on-an-interval methods, the abscissa and name of any) and its ``label``, ``variant`` and
``colour``; records of older runs (whose ``config`` held these fields flat) are read the same way from their
``config``. A family this module has no style for still gets a readable label (its name) and a stable colour.

Example:
    >>> method_label({"family": "taylorseer", "knobs": {"max_order": 2, "interval": 5, "scheme": "divided"}})
    'TaylorSeer O=2, N=5'
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from typing import Any

Record = dict[str, Any]
FAMILY_ORDER = ("full", "fewer-steps", "fora", "taylorseer", "preset", "diffusers-peer")


def _ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if not r.get("error")]


def _cfg(record: Record, key: str, default: Any = None) -> Any:
    """A knob of the record's method: from its ``knobs`` (records of this bench), else its flat ``config`` (older
    records, whose configs were flat ``TaylorSeerConfig`` dicts)."""
    knobs = record.get("knobs")
    value = (knobs if isinstance(knobs, dict) else record.get("config") or {}).get(key)
    return default if value is None else value


def _family(record: Record) -> str:
    """A record's family name as figures show it ("None" for a record without one)."""
    return str(record.get("family"))


def _family_rank(family: Any) -> tuple:
    return (FAMILY_ORDER.index(family), "") if family in FAMILY_ORDER else (len(FAMILY_ORDER), str(family))


def _sort_key(record: Record) -> tuple:
    return (_family_rank(record.get("family")), -(record.get("steps_full") or 0), _cfg(record, "max_order", 0),
            record.get("name", ""))


#################################################################################
#                     Names, colours and markers of methods                     #
#################################################################################

# family -> (label, colour). A new family gets one line here; one missing still gets a readable label (its name)
# and a stable colour (``family_colour``).
FAMILY_STYLES: dict[str, tuple[str, str]] = {
    "full": ("full compute", "#000000"),
    "fewer-steps": ("DDIM", "#7f7f7f"),
    "fora": ("FORA", "#ff7f0e"),
    "taylorseer": ("TaylorSeer", "#1f77b4"),
    "preset": ("paper preset", "#9467bd"),
    "diffusers-peer": ("diffusers TaylorSeer", "#bcbd22"),
    "gate": ("TaylorSeer gate", "#2ca02c"),
    "budget": ("TaylorSeer budget", "#17becf"),
    "adams": ("Adams", "#8c564b"),
    "hermite": ("Hermite", "#e377c2"),
    "corrector": ("corrector", "#d62728"),
    "firstblockcache": ("FirstBlockCache", "#393b79"),
    "magcache": ("MagCache", "#637939"),
    "calibrated": ("calibrated", "#843c39"),
    "diffusers-hook": ("diffusers hook (enable_cache)", "#31a354"),
}
_SPARE_COLOURS = ("#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#969696", "#ad494a", "#8c6d31",
                  "#de9ed6", "#6baed6")
# variant options (see ``_options``) -> marker shape; presets by name; anything else: a stable pick of the spares
_OPTION_MARKERS = {"": "o", "reference": "s", "timestep": "<", "sigma": ">", "block": "v", "output": "^",
                   "tail1": "D"}
_PRESET_MARKERS = {"paper_dit": "P", "paper_flux": "X", "paper_hunyuan_video": "h", "paper_wan": "H"}
_SPARE_MARKERS = ("p", "8", "d", "H", "P", "X", "h")
_ORDER_FILLS = {1: "none", 2: "bottom"}  # Taylor order -> marker fill: O=1 hollow, O=2 half, O=0 and O>=3 full


def _stable_pick(key: str, choices: tuple[str, ...]) -> str:
    return choices[zlib.crc32(key.encode("utf-8")) % len(choices)]


def family_label(family: str) -> str:
    """A family's name in figures: ``FAMILY_STYLES``' label, else the family itself ("-" read as a space).

    Example:
        >>> family_label("fora"), family_label("foo-cache")
        ('FORA', 'foo cache')
    """
    return FAMILY_STYLES[family][0] if family in FAMILY_STYLES else str(family).replace("-", " ")


def family_colour(family: str) -> str:
    """The fixed colour of a family in every figure: ``FAMILY_STYLES``' colour, else one picked by a CRC-32 of
    the name (stable across runs and plots, unlike ``hash``).

    Example:
        >>> family_colour("taylorseer"), family_colour("foo") == family_colour("foo")
        ('#1f77b4', True)
    """
    return FAMILY_STYLES[family][1] if family in FAMILY_STYLES else _stable_pick(str(family), _SPARE_COLOURS)


_OPTION_TEXT = {"reference": "reference scheme", "timestep": "timestep abscissa", "sigma": "sigma abscissa",
                "block": "block granularity", "output": "output granularity (lite)", "tail1": "last step full"}


def _options(record: Record) -> tuple[str, ...]:
    """The non-default options of a record's config, as short tokens: scheme "reference" (at O >= 2, where it
    differs from "divided"), abscissa "timestep"/"sigma", granularity "block"/"output", "tail<k>"."""
    family, order = record.get("family"), _cfg(record, "max_order")
    tokens = []
    if _cfg(record, "scheme") == "reference" and (order or 0) >= 2 and family not in ("preset", "diffusers-peer"):
        tokens.append("reference")
    if _cfg(record, "abscissa", "step") != "step":
        tokens.append(str(_cfg(record, "abscissa")))
    if _cfg(record, "granularity", "module") != "module":
        tokens.append(str(_cfg(record, "granularity")))
    if _cfg(record, "tail_steps", 0):
        tokens.append(f"tail{_cfg(record, 'tail_steps')}")
    return tuple(tokens)


def _option_text(token: str) -> str:
    if token in _OPTION_TEXT:
        return _OPTION_TEXT[token]
    return f"last {token[4:]} steps full" if token.startswith("tail") else token


def _knobs(record: Record, with_interval: bool) -> list[str]:
    """["O=2", "N=5"]: the order (not for FORA, whose O=0 is its definition) and, if asked, the interval."""
    knobs = []
    if _cfg(record, "max_order") is not None and record.get("family") != "fora":
        knobs.append(f"O={_cfg(record, 'max_order')}")
    if with_interval and _cfg(record, "interval") is not None:
        knobs.append(f"N={_cfg(record, 'interval')}")
    return knobs


def _label(record: Record, with_interval: bool) -> str:
    family, steps = _family(record), record.get("num_steps")
    if family == "full":
        return f"full compute ({steps} steps)" if with_interval else "full compute"
    if family == "fewer-steps":
        sampler = "Euler" if (record.get("model") or {}).get("name") == "flux" else "DDIM"  # FluxPipeline's scheduler
        return f"{sampler} {steps} steps" if with_interval else f"{sampler}, fewer steps"
    if family == "preset":
        return f"{_cfg(record, 'name', record.get('name'))} preset ({', '.join(_knobs(record, True))})"
    knobs = _knobs(record, with_interval)
    if not knobs and not _options(record) and with_interval:  # no order or interval: its parts' label or its name
        return f"{family_label(family)} ({_cfg(record, 'label', record.get('name'))})"
    head = " ".join([family_label(family), ", ".join(knobs)]).strip()
    return ", ".join([head, *(_option_text(t) for t in _options(record))])


def method_label(record: Record) -> str:
    """A human name for a record's method, from its fields: "TaylorSeer O=2, N=5", "FORA N=5", "DDIM 11 steps",
    "diffusers TaylorSeer O=1, N=5", "TaylorSeer O=1, N=5, sigma abscissa". A family not known here reads as
    its ``family_label`` with the order and interval of its config, or with its record name if it has neither.

    Example:
        >>> method_label({"family": "taylorseer", "config": {"max_order": 2, "interval": 5, "scheme": "divided"}})
        'TaylorSeer O=2, N=5'
        >>> method_label({"family": "magcache", "name": "magcache-t0.1", "config": {"threshold": 0.1}})
        'MagCache (magcache-t0.1)'
    """
    stored = record.get("label")
    return stored if isinstance(stored, str) else _label(record, with_interval=True)


def variant_label(record: Record) -> str:
    """The legend name of a record's variant: its ``method_label`` without the interval N, which varies along
    the family's points ("TaylorSeer O=2, reference scheme", "FORA", "DDIM, fewer steps").

    Example:
        >>> variant_label({"family": "fora", "config": {"max_order": 0, "interval": 5, "tail_steps": 1}})
        'FORA, last step full'
    """
    stored = record.get("variant")
    return stored if isinstance(stored, str) else _label(record, with_interval=False)


def variant_marker(record: Record) -> dict[str, Any]:
    """Matplotlib marker keywords of a record's variant, the same in every figure: colour from the family,
    shape from the variant's options (``_OPTION_MARKERS``; presets by name), fill from the Taylor order (O=1
    hollow, O=2 half, otherwise full).

    Example:
        >>> variant_marker({"family": "taylorseer", "config": {"max_order": 2, "scheme": "reference"}})["marker"]
        's'
    """
    family = _family(record)
    if family == "full":
        shape = "*"
    elif family == "preset":
        name = str(_cfg(record, "name", record.get("name")))
        shape = _PRESET_MARKERS.get(name) or _stable_pick(name, _SPARE_MARKERS)
    else:
        key = "+".join(_options(record))
        shape = _OPTION_MARKERS.get(key) or _stable_pick(key, _SPARE_MARKERS)
    colour = family_colour(family)
    return {"marker": shape, "color": colour, "markeredgecolor": colour, "markersize": 11 if shape == "*" else 7,
            "fillstyle": _ORDER_FILLS.get(_cfg(record, "max_order"), "full"), "markeredgewidth": 1.3}


def unique_labels(records: list[Record]) -> dict[str, str]:
    """``method_label`` of each record by name; a label two records share gets their names appended."""
    labels = {r["name"]: method_label(r) for r in records}
    counts = Counter(labels.values())
    return {name: label if counts[label] == 1 else f"{label} [{name}]" for name, label in labels.items()}


#################################################################################
#                                     Plots                                     #
#################################################################################


def describe(record: Record) -> dict[str, str]:
    """What the bench stores in a record for the report to read: ``label`` (``method_label``), ``variant``
    (``variant_label``) and ``colour`` (``family_colour``), computed from the record's family, name, steps, model
    and ``knobs``.

    Example:
        >>> describe({"family": "fora", "knobs": {"max_order": 0, "interval": 5}})["label"]
        'FORA N=5'
    """
    return {"label": _label(record, with_interval=True), "variant": _label(record, with_interval=False),
            "colour": family_colour(_family(record))}
