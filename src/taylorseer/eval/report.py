"""The report: Markdown + HTML tables and matplotlib PNG plots, drawn from bench records (JSONL) only.

Nothing here runs a model. ``write_report`` reads the records of one bench run (the last one in the file by
default), checks the issue's targets P1-P3 and states each as PASS / MISS / NOT MEASURED with its numbers. A run
that did not finish (no ``run_end`` record, see ``read_run``) is refused unless ``allow_incomplete``; then the
report says INCOMPLETE RUN in its header.

Every plot draws a method family in one colour (``family_colour``: a fixed table, a stable hash for a family the
table lacks) and a variant of it with one marker (``variant_marker``: shape from the variant's options, fill from
its Taylor order), the same in every figure; methods are named by ``method_label`` ("TaylorSeer O=2, N=5").

Example:
    >>> path = write_report("runs/bench/records.jsonl", "runs/bench/report")   # doctest: +SKIP
    >>> path.name                                                                 # doctest: +SKIP
    'report.md'
"""

from __future__ import annotations

import html
import json
import os
import statistics
import textwrap
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._extras import require

require("matplotlib").use("Agg")  # the bench extra; without it, one line that names the pip command
import matplotlib.image as mpimg  # noqa: E402  (after choosing the backend)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

Record = dict[str, Any]
FAMILY_ORDER = ("full", "fewer-steps", "fora", "taylorseer", "preset", "diffusers-peer")
P1_INTERVAL, P1_EFFICIENCY = 5, 0.90
P3_EVALS = (10, 11, 12)
PSNR_TIE_DB = 0.01  # P2: PSNRs this close are equal (identical math differs only by float rounding, ~1e-6 dB)
NA = "n/a"
LEGACY_SCHEMAS = ("taylorseer.bench/1",)  # written before run_start/run_end markers existed


#################################################################################
#                                    Records                                    #
#################################################################################

class PartialRecordWarning(UserWarning):
    """A line of a records file is not a whole JSON record (a bench killed while writing it); it is skipped."""


class IncompleteRunError(ValueError):
    """The chosen run of a records file did not finish (no ``run_end`` record, or fewer records than it says)."""


@dataclass(frozen=True)
class BenchRun:
    """The method records of one bench run and whether the run finished.

    ``status`` is "complete" (a ``run_end`` record whose method count matches), "incomplete" (none, or a count
    that does not match: the bench was killed or failed part way) or "legacy" (written before run markers
    existed; reported as complete, its completeness unknown). ``detail`` says why in one line; ``planned`` is
    the method names the run set out to measure (None: not recorded).
    """

    path: Path
    run_id: str | None
    records: list[Record]
    status: str
    detail: str
    planned: list[str] | None = None

    @property
    def complete(self) -> bool:
        """True unless the run is known not to have finished (legacy runs count as complete)."""
        return self.status != "incomplete"


def _parse_lines(path: Path) -> list[Record]:
    """The JSON objects of a JSONL file, one per line; a line that is not one is skipped with a warning."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    rows: list[Record] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            row, why = None, str(err)
        else:
            why = "not a JSON object"
        if isinstance(row, dict):
            rows.append(row)
            continue
        where = "its last line (no newline after it)" if number == len(lines) else f"line {number}"
        warnings.warn(f"{path}: skipping {where}: not a whole record, probably cut off by a killed bench ({why})",
                      PartialRecordWarning, stacklevel=3)
    return rows


def _classify(rows: list[Record]) -> tuple[str, str, list[str] | None]:
    """(status, detail, planned method names) of one run's rows; see ``BenchRun``."""
    methods = [r for r in rows if r.get("kind", "method") == "method"]
    start = next((r for r in rows if r.get("kind") == "run_start"), None)
    end = next((r for r in rows if r.get("kind") == "run_end"), None)
    planned = start.get("methods_planned") if start is not None else None
    if end is not None:
        if end.get("complete") is True and end.get("methods") == len(methods):
            return "complete", f"complete (run_end record: {len(methods)} methods)", planned
        return "incomplete", (f"its run_end record says {end.get('methods')} methods (complete: "
                              f"{end.get('complete')}) but the file holds {len(methods)}"), planned
    schemas = {r.get("schema") for r in methods}
    if start is None and (rows[0].get("run_id") is None or schemas <= {*LEGACY_SCHEMAS, None}):
        return "legacy", ("not recorded (written before run_end markers existed, schema "
                          f"{', '.join(sorted(str(s) for s in schemas))}); reported as complete"), planned
    of = f" of {len(planned)} planned" if planned is not None else ""
    return "incomplete", (f"no run_end record: {len(methods)}{of} methods recorded, the bench was interrupted or "
                          "failed"), planned


def read_run(path: str | os.PathLike, run_id: str | None = None, allow_incomplete: bool = False) -> BenchRun:
    """One bench run of a JSONL records file: ``run_id``'s, or the latest (the run of the file's last record).

    A run is complete when its ``run_end`` record is present and counts its method records. A run without one
    was killed or failed part way; it raises ``IncompleteRunError`` (naming the file and the run id) unless
    ``allow_incomplete``. Legacy records (schema "taylorseer.bench/1", written before the run markers existed,
    including the committed docs/results files) have no markers at all: such a run, like a file without run ids,
    is treated as complete, with ``status`` "legacy". A line that is not a whole JSON record (a trailing line cut
    off by a killed writer) is skipped with a ``PartialRecordWarning``.

    Example:
        >>> run = read_run("runs/bench/records.jsonl")   # doctest: +SKIP
        >>> run.status, len(run.records)                 # doctest: +SKIP
        ('complete', 68)
    """
    path = Path(path)
    rows = _parse_lines(path)
    if not rows:
        raise ValueError(f"no records in {path}")
    runs: dict[str | None, list[Record]] = {}
    for row in rows:
        runs.setdefault(row.get("run_id"), []).append(row)
    latest = run_id is None
    run_id = rows[-1].get("run_id") if latest else run_id
    if run_id not in runs:
        raise ValueError(f"{path}: no run {run_id!r}; runs in the file: {[k for k in runs if k is not None]}")
    status, detail, planned = _classify(runs[run_id])
    records = [r for r in runs[run_id] if r.get("kind", "method") == "method"]
    which = f"the latest run {run_id}" if latest else f"run {run_id}"
    if status == "incomplete" and not allow_incomplete:
        done = [k for k, v in runs.items() if k != run_id and _classify(v)[0] != "incomplete"]
        earlier = f"; the last complete run in the file is {done[-1]}" if done else ""
        raise IncompleteRunError(f"{path}: {which} is incomplete ({detail}); rerun the bench, or report it "
                                 f"marked INCOMPLETE with --allow-incomplete{earlier}")
    if not records:
        raise ValueError(f"{path}: {which} has no method records ({detail})")
    return BenchRun(path, run_id, records, status, detail, planned)


def read_records(path: str | os.PathLike, run_id: str | None = None, allow_incomplete: bool = False) -> list[Record]:
    """The method records of one bench run (``read_run(...).records``): ``run_id``'s, or the latest run's.

    Example:
        >>> records = read_records("runs/bench/records.jsonl")   # doctest: +SKIP
    """
    return read_run(path, run_id, allow_incomplete).records


def _ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if not r.get("error")]


def _cfg(record: Record, key: str, default: Any = None) -> Any:
    value = (record.get("config") or {}).get(key)
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
    if not knobs and not _options(record) and with_interval:  # nothing in the config names it: use its name
        return f"{family_label(family)} ({record.get('name')})"
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
    return _label(record, with_interval=True)


def variant_label(record: Record) -> str:
    """The legend name of a record's variant: its ``method_label`` without the interval N, which varies along
    the family's points ("TaylorSeer O=2, reference scheme", "FORA", "DDIM, fewer steps").

    Example:
        >>> variant_label({"family": "fora", "config": {"max_order": 0, "interval": 5, "tail_steps": 1}})
        'FORA, last step full'
    """
    return _label(record, with_interval=False)


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

_METRICS = {"psnr": "PSNR vs full (dB)", "fid_fmnist": "FID-FMNIST (lower is better)"}
_HIGHER_IS_BETTER = {"psnr": True, "fid_fmnist": False}
_SPEEDS = {"flops_speedup": "FLOPs speedup (x)", "wall_speedup": "wall speedup (x)"}
TITLE_WIDTH = 90  # characters per title line


def _title(text: str, width: int = TITLE_WIDTH) -> str:
    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))


def pareto_front(points: Iterable[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The non-dominated (speed, quality) points, by growing speed: those that no other point matches or beats
    in both speed and quality while beating it in one.

    Example:
        >>> pareto_front([(1, 30), (2, 35), (3, 20), (2, 33)])
        [(2, 35), (3, 20)]
        >>> pareto_front([(1, 9.0), (2, 8.0), (3, 8.5)], higher_is_better=False)
        [(2, 8.0), (3, 8.5)]
    """
    sign = 1 if higher_is_better else -1
    front: list[tuple[float, float]] = []
    for speed, quality in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if not front or sign * quality > sign * front[-1][1]:
            front.append((speed, quality))
    return front[::-1]


def _groups(records: Iterable[Record], key: Any) -> dict[Any, list[Record]]:
    out: dict[Any, list[Record]] = {}
    for rec in records:
        out.setdefault(key(rec), []).append(rec)
    return out


class _Legend:
    """Legend entries collected while plotting, one per label, shown in (family, variant) order."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[tuple, Line2D]] = {}

    def add(self, label: str, key: tuple, handle: Line2D) -> None:
        self.entries.setdefault(label, (key, handle))

    def marker(self, record: Record) -> None:
        """The record's variant: its marker, named by ``variant_label``."""
        key = (_family_rank(record.get("family")), 1, _cfg(record, "max_order", -1), _options(record))
        self.add(variant_label(record), key, Line2D([], [], linestyle="none", **variant_marker(record)))

    def line(self, family: str, label: str, **style: Any) -> None:
        """A line in the family's colour (a front, a series), listed before the family's markers."""
        self.add(label, (_family_rank(family), 0), Line2D([], [], color=family_colour(family), **style))

    def draw(self, fig: Figure, ncol: int = 4) -> None:
        items = sorted(self.entries.items(), key=lambda item: item[1][0])
        fig.legend([h for _, (_, h) in items], [label for label, _ in items], loc="outside lower center",
                   ncol=min(ncol, max(1, len(items))), fontsize=8, frameon=False)


def _front_style() -> dict[str, Any]:
    return {"linewidth": 1.6, "alpha": 0.75}


def plot_pareto(records: list[Record], metric: str = "psnr") -> Figure:
    """Speed-quality plot: FLOPs speedup (left) and wall speedup (right) vs ``metric`` ("psnr" or "fid_fmnist").

    Every method is one marker (colour = family, marker = variant, as in every figure); each family's Pareto
    front (its methods that no other method of the family beats in both speed and quality) is a line in the
    family's colour. Records lacking the metric are left out (the full reference has no PSNR).

    Example:
        >>> fig = plot_pareto(read_records("records.jsonl"), "psnr")   # doctest: +SKIP
        >>> fig.axes[0].get_xlabel()                                     # doctest: +SKIP
        'FLOPs speedup (x)'
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {list(_METRICS)}, got {metric!r}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True, layout="constrained")
    legend = _Legend()
    recs = sorted((r for r in _ok(records) if r.get(metric) is not None), key=_sort_key)
    for ax, speed in zip(axes, _SPEEDS):
        for family, members in _groups((r for r in recs if r.get(speed)), lambda r: r.get("family")).items():
            front = pareto_front(((r[speed], r[metric]) for r in members), _HIGHER_IS_BETTER[metric])
            if len(front) > 1:
                ax.plot(*zip(*front), color=family_colour(family), zorder=2, **_front_style())
                legend.line(family, f"{family_label(family)}: Pareto front", **_front_style())
            for variant in _groups(members, variant_label).values():
                ax.plot([r[speed] for r in variant], [r[metric] for r in variant], linestyle="none", zorder=3,
                        **variant_marker(variant[0]))
                legend.marker(variant[0])
        ax.set_xlabel(_SPEEDS[speed])
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_METRICS[metric])
    if legend.entries:
        legend.draw(fig)
    else:
        axes[0].text(0.5, 0.5, f"no record has {metric}", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(_title(f"Speed vs quality: {_METRICS[metric]}\nmarker colour = method family, shape and fill = "
                        "variant (fill: O=1 hollow, O=2 half); lines = each family's Pareto front", 130), fontsize=11)
    return fig


_FRACTIONS = {"flops_fraction": "FLOPs / full compute", "block_call_fraction": "block calls / full compute"}


def plot_compute_fronts(records: list[Record], metric: str = "psnr") -> Figure:
    """Quality vs compute spent: FLOPs fraction (left) and block-call fraction (right) of full compute, each
    family's Pareto front a line (fewer is better on x). The fractions differ where a method computes some blocks
    on every step (cache-dit's Fn, FirstBlockCache, our hybrid) or spends FLOPs outside the blocks.

    Example:
        >>> fig = plot_compute_fronts(read_records("records.jsonl"))   # doctest: +SKIP
        >>> fig.axes[1].get_xlabel()                                     # doctest: +SKIP
        'block calls / full compute'
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {list(_METRICS)}, got {metric!r}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True, layout="constrained")
    legend = _Legend()
    recs = sorted((r for r in _ok(records) if r.get(metric) is not None), key=_sort_key)
    for ax, key in zip(axes, _FRACTIONS):
        for family, members in _groups((r for r in recs if r.get(key)), lambda r: r.get("family")).items():
            front = pareto_front(((1 / r[key], r[metric]) for r in members), _HIGHER_IS_BETTER[metric])
            if len(front) > 1:
                ax.plot([1 / x for x, _ in front], [y for _, y in front], color=family_colour(family), zorder=2,
                        **_front_style())
                legend.line(family, f"{family_label(family)}: Pareto front", **_front_style())
            for variant in _groups(members, variant_label).values():
                ax.plot([r[key] for r in variant], [r[metric] for r in variant], linestyle="none", zorder=3,
                        **variant_marker(variant[0]))
                legend.marker(variant[0])
        ax.set_xlabel(_FRACTIONS[key])
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_METRICS[metric])
    if legend.entries:
        legend.draw(fig)
    fig.suptitle(_title(f"Compute spent vs quality: {_METRICS[metric]} (lines: each family's Pareto front)", 130),
                 fontsize=11)
    return fig


# Who is who at a budget: our methods vs each peer group (families by name).
BUDGET_GROUPS = {"ours": ("calibrated", "anchor", "taylorseer", "preset", "adams", "hermite", "corrector", "gate",
                          "budget"),
                 "cache-dit": ("cache-dit",), "Spectrum": ("spectrum",),
                 "diffusers' hooks": ("firstblockcache", "magcache", "seacache", "diffusers-peer", "diffusers-hook"),
                 "FORA": ("fora",), "DDIM (fewer steps)": ("fewer-steps",)}
BUDGETS = (0.12, 0.16, 0.22)
BUDGET_SLACK = 0.01  # a method is "at" budget b when its fraction is <= b + this


def budget_rows(records: list[Record], key: str = "flops_fraction", budgets: tuple[float, ...] = BUDGETS,
                metric: str = "psnr") -> list[list[str]]:
    """One row per budget: the best ``metric`` of each group of ``BUDGET_GROUPS`` among its methods whose ``key``
    is at most the budget (plus ``BUDGET_SLACK``), with the method's name, and ours minus the best peer.

    Example:
        >>> budget_rows([{"name": "a", "family": "calibrated", "flops_fraction": 0.16, "psnr": 40.0,
        ...               "error": None}], budgets=(0.16,))[0][:2]
        ['0.16', '40.00 (a)']
    """
    rows = []
    for budget in budgets:
        best: dict[str, Record | None] = {}
        for group, families in BUDGET_GROUPS.items():
            fit = [r for r in _ok(records) if r.get("family") in families and r.get(metric) is not None
                   and r.get(key) is not None and r[key] <= budget + BUDGET_SLACK]
            best[group] = max(fit, key=lambda r: r[metric]) if fit else None
        cells = [f"{budget:.2f}"] + [NA if r is None else f"{r[metric]:.2f} ({r['name']})" for r in best.values()]
        ours = best["ours"]
        peers = [r for g, r in best.items() if g != "ours" and r is not None]
        top = max(peers, key=lambda r: r[metric]) if peers else None
        cells.append(NA if ours is None or top is None else f"{ours[metric] - top[metric]:+.2f} vs {top['name']}")
        rows.append(cells)
    return rows


BUDGET_HEADERS = ["budget", *BUDGET_GROUPS, "ours - best peer (dB)"]


def _chosen_interval(records: list[Record], key: str) -> int | None:
    """The interval N shown in per-N plots: 5 (the targets' N) if present, else the most common one."""
    found = Counter(_cfg(r, "interval") for r in _ok(records)
                    if r.get("family") in ("fora", "taylorseer") and r.get(key))
    if not found:
        return None
    return P1_INTERVAL if P1_INTERVAL in found else found.most_common(1)[0][0]


def _probe_curve(records: list[Record], interval: int, order: int) -> Record | None:
    candidates = [r for r in _ok(records) if r.get("family") in ("fora", "taylorseer") and r.get("probe_errors")
                  and _cfg(r, "interval") == interval and _cfg(r, "max_order") == order
                  and _cfg(r, "abscissa", "step") == "step" and not _cfg(r, "tail_steps", 0)
                  and _cfg(r, "granularity", "module") == "module"]
    candidates.sort(key=lambda r: (_cfg(r, "scheme") != "divided", r.get("family") != "fora"))
    return candidates[0] if candidates else None


def plot_probe_errors(records: list[Record]) -> Figure:
    """Per-step relative L2 forecast error of the probed module at one interval N: one panel per Taylor order
    O >= 1, each against FORA (O=0) on the same schedule; log scale when every error is positive.

    Example:
        >>> [ax.get_title() for ax in plot_probe_errors(records).axes]   # doctest: +SKIP
        ['TaylorSeer O=1, N=5', 'TaylorSeer O=2, N=5', 'TaylorSeer O=3, N=5']
    """
    interval = _chosen_interval(records, "probe_errors")
    probed = {o: _probe_curve(records, interval, o) for o in range(5)} if interval else {}
    curves = {o: r for o, r in probed.items() if r is not None}
    fora = curves.pop(0, None)
    panels = list(curves.values()) or ([fora] if fora is not None else [])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)) + 1, 4.4), sharey=True,
                             squeeze=False, layout="constrained")
    if not panels:
        return _empty(fig, axes[0, 0], "sampling step", "relative L2 forecast error", "no probe records")
    legend = _Legend()
    for ax, rec in zip(axes[0], panels):
        for curve in ([fora] if fora is not None and rec is not fora else []) + [rec]:
            pts = sorted((e["step"], e["rel_l2"]) for e in curve["probe_errors"])
            style = {**variant_marker(curve), "markersize": 4, "markeredgewidth": 1.0}
            ax.plot(*zip(*pts), linewidth=1.1, label=method_label(curve), **style)
            legend.add(method_label(curve), (_family_rank(curve.get("family")), _cfg(curve, "max_order", 0)),
                       Line2D([], [], linewidth=1.1, **style))
        ax.set_title(_title(method_label(rec), 40), fontsize=10)
        ax.set_xlabel("sampling step")
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("relative L2 forecast error")
    if all(e["rel_l2"] > 0 for r in panels + [fora] if r is not None for e in r["probe_errors"]):
        axes[0, 0].set_yscale("log")
    legend.draw(fig, ncol=5)
    images = panels[0].get("probe_images")
    fig.suptitle(_title(f"Forecast error of {panels[0]['probe_path']} on forecast steps, N={interval}"
                        + (f", {images} images" if images else "")), fontsize=11)
    return fig


def plot_memory(records: list[Record]) -> Figure:
    """Peak bytes of cached factors (MB = 1e6 bytes, whole CFG batch) vs Taylor order at one interval N: one
    line per granularity and scheme (TaylorSeer), FORA at O=0, each point labelled with its MB; log scale when
    the values span more than 20x. Step abscissa, no last-step variants (they cache the same), no presets.

    Example:
        >>> plot_memory(records).axes[0].get_xlabel()   # doctest: +SKIP
        'Taylor order O (0 = FORA)'
    """
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    interval = _chosen_interval(records, "peak_cache_bytes")
    recs = [r for r in _ok(records) if r.get("family") not in ("full", "fewer-steps", "preset")
            and _cfg(r, "interval") == interval and _cfg(r, "max_order") is not None
            and _cfg(r, "abscissa", "step") == "step" and not _cfg(r, "tail_steps", 0)
            and r.get("peak_cache_bytes")]
    if not recs:
        return _empty(fig, ax, "Taylor order O (0 = FORA)", "peak cache (MB)", "no cache records")
    legend, noted = _Legend(), set()
    drawn: list[set[tuple[Any, float]]] = []  # the (order, MB) points of each series drawn so far
    styles = {"": "-", "reference": "--", "block": "-.", "output": ":"}
    for (family, options), series in _groups(sorted(recs, key=_sort_key),
                                             lambda r: (r.get("family"), _options(r))).items():
        series.sort(key=lambda r: _cfg(r, "max_order"))
        orders, mbs = [_cfg(r, "max_order") for r in series], [r["peak_cache_bytes"] / 1e6 for r in series]
        # A series that would hide under an earlier one (same order, same bytes) is drawn a little to the right.
        places = {(o, round(m, 6)) for o, m in zip(orders, mbs)}
        dodge = 0.12 * sum(1 for earlier in drawn if earlier & places)
        drawn.append(places)
        xs = [o + dodge for o in orders]
        linestyle = styles.get("+".join(options), "-")
        if len(series) > 1:
            ax.plot(xs, mbs, color=family_colour(family), linestyle=linestyle, linewidth=1.3, zorder=2)
            what = ", ".join(_option_text(t) for t in options) if options else "module granularity"
            legend.line(family, f"{family_label(family)}, {what}: O={orders[0]} to {orders[-1]}",
                        linestyle=linestyle, linewidth=1.3)
        for rec, x, mb in zip(series, xs, mbs):
            ax.plot([x], [mb], linestyle="none", zorder=3, **variant_marker(rec))
            legend.marker(rec)
            if (round(x), round(mb, 6)) not in noted:  # one value label per place
                noted.add((round(x), round(mb, 6)))
                ax.annotate(f"{mb:.3g}", (x, mb), xytext=(-8, 5), textcoords="offset points", fontsize=7,
                            ha="right", va="bottom", color=family_colour(family))
    mbs = [r["peak_cache_bytes"] / 1e6 for r in recs]
    if max(mbs) / min(mbs) > 20:  # several decades (e.g. "output" granularity caches ~1000x less): log scale
        ax.set_yscale("log")
        ax.margins(y=0.1)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(0, max(mbs) * 1.12)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Taylor order O (0 = FORA)")
    ax.set_ylabel("peak cache (MB)")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(-0.4, max(_cfg(r, "max_order") for r in recs) + 0.6)
    legend.draw(fig, ncol=2)
    fig.suptitle(_title(f"Peak cache memory at N={interval}: {recs[0].get('num_images')} images, whole CFG batch",
                        60), fontsize=11)
    return fig


def _empty(fig: Figure, ax: Any, xlabel: str, ylabel: str, note: str) -> Figure:
    """Label a figure that has no data and say so in the axes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_samples(
    records: list[Record], records_dir: str | os.PathLike, names: list[str] | None = None
) -> Figure | None:
    """The saved sample grids of ``names`` (default: full, and the methods at the model-evaluation count of N=5),
    one per row, each named by its ``method_label``. Returns None if no chosen record points to an existing
    sample file."""
    names = names if names is not None else _sample_selection(records)
    chosen = [r for r in _ok(records) if r["name"] in names and r.get("samples_png")
              and (Path(records_dir) / r["samples_png"]).is_file()]
    if not chosen:
        return None
    chosen.sort(key=_sort_key)
    labels = unique_labels(chosen)
    grids = [mpimg.imread(Path(records_dir) / r["samples_png"]) for r in chosen]
    aspect = grids[0].shape[1] / grids[0].shape[0]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(1.3 * aspect, 1.45 * len(chosen)), squeeze=False,
                             layout="constrained")
    for ax, rec, grid in zip(axes[:, 0], chosen, grids):
        ax.imshow(grid, cmap="gray")
        ax.set_title(labels[rec["name"]], loc="left", fontsize=9, color=family_colour(_family(rec)))
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _sample_selection(records: list[Record]) -> list[str]:
    """Full plus every method (step abscissa) with as many full steps as the N=5 (else most common N) methods."""
    interval = _chosen_interval(records, "steps_full")
    evals = {r.get("steps_full") for r in _ok(records) if _cfg(r, "interval") == interval}
    return [r["name"] for r in _ok(records) if r.get("family") == "full"
            or (r.get("steps_full") in evals and _cfg(r, "abscissa", "step") == "step")]


#################################################################################
#                                    Targets                                    #
#################################################################################

@dataclass
class TargetCheck:
    """One target of the issue, checked on the records: PASS, MISS or NOT MEASURED, with the numbers."""

    name: str
    status: str
    summary: str
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        """``"P1: PASS - ..."``."""
        return f"{self.name}: {self.status} - {self.summary}"


def _x(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}x"


def check_p1(records: list[Record]) -> TargetCheck:
    """P1: at N=5 every TaylorSeer config's wall speedup is >= 0.90 x its FLOPs speedup."""
    recs = [r for r in _ok(records) if r.get("family") == "taylorseer" and _cfg(r, "interval") == P1_INTERVAL
            and r.get("efficiency") is not None]
    if not recs:
        return TargetCheck("P1", "NOT MEASURED", f"no timed TaylorSeer record at N={P1_INTERVAL}")
    details = [f"{r['name']}: wall {_x(r['wall_speedup'])} / FLOPs {_x(r['flops_speedup'])} = {r['efficiency']:.2f}"
               + ("" if r["efficiency"] >= P1_EFFICIENCY else " (below)") for r in sorted(recs, key=_sort_key)]
    effs = [r["efficiency"] for r in recs]
    below = sum(e < P1_EFFICIENCY for e in effs)
    status = "PASS" if below == 0 else "MISS"
    summary = (f"wall/FLOPs speedup at N={P1_INTERVAL} is {min(effs):.2f}-{max(effs):.2f} (median "
               f"{statistics.median(effs):.2f}) over {len(effs)} TaylorSeer configs; target >= {P1_EFFICIENCY:.2f}; "
               f"{below} below")
    return TargetCheck("P1", status, summary, details)


def check_p2(records: list[Record]) -> TargetCheck:
    """P2: against diffusers' hook at the same schedule and modules, our PSNR is >= (to ``PSNR_TIE_DB``) and our
    median wall time <= (both timed in the same interleaved rounds)."""
    by_name = {r["name"]: r for r in records}
    pairs = [(by_name.get(p.get("counterpart")), p) for p in records if p.get("family") == "diffusers-peer"]
    if not pairs:
        return TargetCheck("P2", "NOT MEASURED", "no diffusers-peer record in this run")
    details, passed, measured = [], 0, 0
    for ours, peer in pairs:
        if ours is None or ours.get("error") or peer.get("error") or None in (
                ours.get("psnr"), peer.get("psnr"), ours.get("wall_s"), peer.get("wall_s")):
            why = peer.get("error") or (ours or {}).get("error") or "a PSNR or wall time is missing"
            details.append(f"{peer['name']} vs {peer.get('counterpart')}: not measured ({why})")
            continue
        measured += 1
        ok = ours["psnr"] >= peer["psnr"] - PSNR_TIE_DB and ours["wall_s"] <= peer["wall_s"]
        passed += ok
        same = "same" if ours.get("flops") == peer.get("flops") else "DIFFERENT"
        rounds = "same rounds" if ours.get("group") == peer.get("group") else "DIFFERENT timing rounds"
        details.append(f"{ours['name']} vs {peer['name']}: PSNR {ours['psnr']:.2f} vs {peer['psnr']:.2f} dB, wall "
                       f"{ours['wall_s']:.3f} vs {peer['wall_s']:.3f} s ({rounds}), {same} FLOPs -> "
                       + ("PASS" if ok else "MISS"))
    if not measured:
        return TargetCheck("P2", "NOT MEASURED", f"{len(pairs)} peer comparison(s), none measurable", details)
    status = "PASS" if passed == measured == len(pairs) else "MISS"
    summary = (f"{passed} of {len(pairs)} comparisons met both conditions (PSNR within {PSNR_TIE_DB} dB counts "
               f"as equal)")
    return TargetCheck("P2", status, summary, details)


def _p3_at(records: list[Record], evals: int) -> tuple[str, str] | None:
    """(status, text) at ``evals`` full model evaluations, None if a family is missing there."""
    at = [r for r in _ok(records) if r.get("steps_full") == evals]
    ts = [r for r in at if r.get("family") == "taylorseer" and _cfg(r, "max_order", 0) >= 1]
    rivals = [r for r in at if r.get("family") in ("fora", "fewer-steps")]
    if not ts or not {r["family"] for r in rivals} >= {"fora", "fewer-steps"}:
        return None
    if any(r.get(k) is None for r in ts + rivals for k in ("psnr", "fid_fmnist")):
        return "NOT MEASURED", f"{evals} evals: PSNR or FID-FMNIST missing"
    best_psnr = max(rivals, key=lambda r: r["psnr"])
    best_fid = min(rivals, key=lambda r: r["fid_fmnist"])
    winners = [r for r in ts if r["psnr"] > best_psnr["psnr"] and r["fid_fmnist"] < best_fid["fid_fmnist"]]
    top = max(winners or ts, key=lambda r: r["psnr"])
    text = (f"{evals} evals: best rival PSNR {best_psnr['psnr']:.2f} dB ({best_psnr['name']}), FID "
            f"{best_fid['fid_fmnist']:.2f} ({best_fid['name']}); {len(winners)} of {len(ts)} TaylorSeer configs beat "
            f"both, e.g. {top['name']}: PSNR {top['psnr']:.2f} dB, FID {top['fid_fmnist']:.2f}")
    return ("PASS" if winners else "MISS"), text


def check_p3(records: list[Record]) -> TargetCheck:
    """P3: at 10-12 model evaluations some TaylorSeer O>=1 beats FORA and fewer-step DDIM on PSNR and FID."""
    results = [res for e in P3_EVALS if (res := _p3_at(records, e)) is not None]
    if not results:
        return TargetCheck("P3", "NOT MEASURED", f"no evaluation count in {list(P3_EVALS)} with TaylorSeer, FORA "
                                                 "and fewer-step DDIM records")
    statuses = [s for s, _ in results]
    status = "PASS" if set(statuses) == {"PASS"} else "MISS" if "MISS" in statuses else "NOT MEASURED"
    summary = f"{statuses.count('PASS')} of {len(results)} evaluation counts pass"
    return TargetCheck("P3", status, summary, [t for _, t in results])


def check_targets(records: list[Record]) -> list[TargetCheck]:
    """P1, P2 and P3 of issue 4, checked on the records of one run."""
    return [check_p1(records), check_p2(records), check_p3(records)]


#################################################################################
#                          Document (Markdown and HTML)                         #
#################################################################################

def _num(value: Any, fmt: str) -> str:
    return NA if value is None else format(value, fmt)


def _main_row(r: Record) -> list[str]:
    steps = f"{_num(r.get('steps_full'), 'd')} / {r.get('num_steps')}"
    cache = None if r.get("peak_cache_bytes") is None else r["peak_cache_bytes"] / 1e6
    psnr = "ref" if r.get("family") == "full" else _num(r.get("psnr"), ".2f")
    return [r["name"], r.get("family", ""), steps, _x(r.get("flops_speedup")), _x(r.get("wall_speedup")),
            _num(r.get("efficiency"), ".2f"), psnr, _num(r.get("ssim"), ".4f"), _num(r.get("fid_fmnist"), ".2f"),
            _num(r.get("fid_to_full"), ".3f"), _num(r.get("class_accuracy"), ".3f"), _num(cache, ".1f"),
            _num(r.get("flops_fraction"), ".3f"), _num(r.get("block_call_fraction"), ".3f")]


MAIN_HEADERS = ["method", "family", "full steps / model calls", "FLOPs speedup", "wall speedup", "wall/FLOPs",
                "PSNR (dB)", "SSIM", "FID-FMNIST", "FID to full", "class acc", "cache MB",
                "FLOPs frac", "block-call frac"]
TIMING_HEADERS = ["method", "group", "wall median (s)", "min (s)", "max (s)", "runs", "full in group (s)",
                  "CPU median (s)"]


def _timing_row(r: Record) -> list[str]:
    return [r["name"], str(r.get("group")), _num(r.get("wall_s"), ".3f"), _num(r.get("wall_min_s"), ".3f"),
            _num(r.get("wall_max_s"), ".3f"), str(len(r.get("wall_samples_s") or [])),
            _num(r.get("wall_full_s"), ".3f"), _num(r.get("cpu_s"), ".3f")]


def _allocator(machine: dict) -> str:
    setting = machine.get("allocator")
    if not setting:
        return "defaults" if "allocator" in machine else "not recorded"
    return (f"tuned (mmap threshold {setting['mmap_threshold_bytes'] >> 20} MiB, trim threshold "
            f"{setting['trim_threshold_bytes'] >> 20} MiB)")


def _header_lines(records: list[Record]) -> list[str]:
    first = records[0]
    m, model = first.get("machine", {}), first.get("model", {})
    full = next((r for r in records if r.get("family") == "full"), first)
    elapsed = max((r.get("bench_elapsed_s") or 0) for r in records)
    rss = max((r.get("process_max_rss_mb") or 0) for r in records)
    interval = first.get("guidance_interval")
    if interval == "all":
        where = ", at every step"
    elif interval:
        where = f", applied at timesteps {interval[0]} <= t < {interval[1]}"
    else:
        where = ""
    return [f"Run {first.get('run_id')} on {m.get('date')}, {len(records)} methods, bench time {elapsed / 60:.1f} min",
            f"Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('platform')}; load average at start "
            f"{m.get('loadavg')}",
            f"Software: torch {m.get('torch')}, diffusers {m.get('diffusers')}, Python {m.get('python')}; "
            f"{m.get('threads')} torch thread(s); process peak RSS {rss:.0f} MB; C allocator: {_allocator(m)}",
            f"Model: {model.get('name')}, {model.get('params', 0) / 1e6:.2f}M parameters; "
            f"{'FluxPipeline Euler' if model.get('name') == 'flux' else 'DDIM'} {full.get('num_steps')} steps, "
            f"CFG scale {first.get('guidance_scale')} "
            f"({first.get('cfg_mode')}{where})",
            f"Images: {first.get('num_images')} per method (classes 0-9 in turn, seed {first.get('seed')}); wall "
            f"times are medians of {first.get('repeats')} interleaved rounds; speedups are against the full run "
            f"timed in the same rounds"]


def _run_lines(run: BenchRun) -> list[str]:
    if run.complete:
        return [f"Completeness: {run.detail}"]
    missing = [n for n in run.planned or [] if n not in {r["name"] for r in run.records}]
    return [f"INCOMPLETE RUN: {run.detail}; tables, plots and targets cover the recorded methods only"
            + (f"; not recorded: {', '.join(missing)}" if missing else "")]


def _document(run: BenchRun, images: dict[str, str], notes: str | None) -> list[tuple]:
    records = run.records
    recs = sorted(records, key=_sort_key)
    title = "TaylorSeer benchmark" + ("" if run.complete else ": INCOMPLETE RUN")
    header = _header_lines(records)
    header = _run_lines(run) + header if not run.complete else header[:1] + _run_lines(run) + header[1:]
    doc: list[tuple] = [("h1", title), ("list", header), ("h2", "Targets")]
    for check in check_targets(records):
        doc += [("p", check.line()), ("list", check.details)] if check.details else [("p", check.line())]
    doc += [("h2", "Results"), ("table", MAIN_HEADERS, [_main_row(r) for r in recs if not r.get("error")]),
            ("p", "PSNR and SSIM compare with the full-compute images of the same seeds. FID-FMNIST is biased "
                  "upward at small image counts: compare rows of this run only. Cache MB is the peak size of the "
                  "cached factors for the whole CFG batch. wall/FLOPs = wall speedup / FLOPs speedup (1 = ideal).")]
    if any(r.get("flops_fraction") is not None for r in recs):
        for key in _FRACTIONS:
            lines = ["; ".join(f"{h}: {c}" for h, c in zip(BUDGET_HEADERS, row)) for row in budget_rows(recs, key)]
            doc += [("h2", f"Equal compute: best PSNR at {_FRACTIONS[key]} <= budget + {BUDGET_SLACK}"),
                    ("list", lines)]
    failed = [[r["name"], r.get("family", ""), r["error"]] for r in recs if r.get("error")]
    if failed:
        doc += [("h2", "Failed methods"), ("table", ["method", "family", "error"], failed)]
    doc += [("h2", "Plots")] + [("img", src, alt) for alt, src in images.items()]
    doc += [("h2", "Timing detail"), ("table", TIMING_HEADERS, [_timing_row(r) for r in recs if r.get("wall_s")])]
    if notes:
        doc += [("h2", "Notes"), ("p", notes)]
    return doc


def _markdown(doc: list[tuple]) -> str:
    out: list[str] = []
    for kind, *args in doc:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            headers, rows = args
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            out.append("\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]))
        elif kind == "img":
            out.append(f"![{args[1]}]({args[0]})")
    return "\n\n".join(out) + "\n"


def _html(doc: list[tuple]) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>TaylorSeer benchmark</title><style>"
           "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
           "</style></head><body>"]
    for kind, *args in doc:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{e(args[0])}</{kind}>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in args[0]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in args[0])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in args[1])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            out.append(f"<p><img src='{e(args[0])}' alt='{e(args[1])}' style='max-width:100%'></p>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def _save(fig: Figure | None, path: Path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(records_path: str | os.PathLike, out_dir: str | os.PathLike, notes: str | None = None,
                 run_id: str | None = None, allow_incomplete: bool = False) -> Path:
    """Write ``report.md``, ``report.html`` and PNG plots into ``out_dir`` from the records of one bench run.

    Reads records only (the last run in the file unless ``run_id`` is given, see ``read_run``). A run that did
    not finish raises ``IncompleteRunError`` unless ``allow_incomplete``, which reports it with "INCOMPLETE RUN"
    in the title and header. ``notes`` is appended as a closing section (e.g. why a target was missed). Returns
    the Markdown path.

    Example:
        >>> write_report("runs/bench/records.jsonl", "docs/results")   # doctest: +SKIP
        PosixPath('docs/results/report.md')
    """
    records_path, out_dir = Path(records_path), Path(out_dir)
    run = read_run(records_path, run_id, allow_incomplete)
    records = run.records
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"speed vs PSNR": ("pareto_psnr.png", plot_pareto(records, "psnr")),
             "speed vs FID-FMNIST": ("pareto_fid.png", plot_pareto(records, "fid_fmnist")),
             "compute fractions vs PSNR": ("pareto_compute.png", plot_compute_fronts(records, "psnr")),
             "forecast error per step": ("forecast_error.png", plot_probe_errors(records)),
             "cache memory vs order": ("memory.png", plot_memory(records)),
             "sample grids": ("samples.png", plot_samples(records, records_path.parent))}
    images = {alt: name for alt, (name, fig) in plots.items() if _save(fig, out_dir / name)}
    doc = _document(run, images, notes)
    (out_dir / "report.md").write_text(_markdown(doc), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(doc), encoding="utf-8")
    return out_dir / "report.md"
