"""The report's figures (matplotlib PNGs), drawn from bench records only: speed-quality fronts, compute
fractions, forecast error per step, cache memory per order, sample grids.

Every figure draws a method family in one colour and a variant with one marker (``eval.labels``).

Example:
    >>> fig = plot_pareto(read_records("runs/bench/records.jsonl"))   # doctest: +SKIP
"""

from __future__ import annotations

import os
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._extras import require

require("matplotlib").use("Agg")  # the bench extra; without it, one line that names the pip command
import matplotlib.image as mpimg  # noqa: E402  (after choosing the backend)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from .labels import (  # noqa: E402
    Record,
    _cfg,
    _family,
    _family_rank,
    _ok,
    _option_text,
    _options,
    _sort_key,
    family_colour,
    family_label,
    method_label,
    unique_labels,
    variant_label,
    variant_marker,
)

P1_INTERVAL = 5  # the interval of the targets; per-N plots show it when present


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


def _front_panels(records: list[Record], metric: str, xs: dict[str, str], higher_x_is_better: bool
                  ) -> tuple[Figure, Any, _Legend]:
    """Two panels sharing the y axis (``metric``), one per record field of ``xs`` (field -> axis label): each
    family's markers by variant and its Pareto front as a line (on x, larger is better when ``higher_x_is_better``,
    else smaller), the legend drawn when it has entries."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True, layout="constrained")
    legend = _Legend()
    sign = 1 if higher_x_is_better else -1  # pareto_front keeps larger x: a smaller-is-better x enters negated
    recs = sorted((r for r in _ok(records) if r.get(metric) is not None), key=_sort_key)
    for ax, key in zip(axes, xs):
        for family, members in _groups((r for r in recs if r.get(key)), lambda r: r.get("family")).items():
            front = pareto_front(((sign * r[key], r[metric]) for r in members), _HIGHER_IS_BETTER[metric])
            if len(front) > 1:
                ax.plot([sign * x for x, _ in front], [y for _, y in front], color=family_colour(family), zorder=2,
                        **_front_style())
                legend.line(family, f"{family_label(family)}: Pareto front", **_front_style())
            for variant in _groups(members, variant_label).values():
                ax.plot([r[key] for r in variant], [r[metric] for r in variant], linestyle="none", zorder=3,
                        **variant_marker(variant[0]))
                legend.marker(variant[0])
        ax.set_xlabel(xs[key])
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_METRICS[metric])
    if legend.entries:
        legend.draw(fig)
    return fig, axes, legend


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
    fig, axes, legend = _front_panels(records, metric, _SPEEDS, higher_x_is_better=True)
    if not legend.entries:
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
    fig, _, _ = _front_panels(records, metric, _FRACTIONS, higher_x_is_better=False)
    fig.suptitle(_title(f"Compute spent vs quality: {_METRICS[metric]} (lines: each family's Pareto front)", 130),
                 fontsize=11)
    return fig


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


def plot_probe_errors(records: list[Record]) -> Figure | None:
    """Per-step relative L2 forecast error of the probed module at one interval N: one panel per Taylor order
    O >= 1, each against FORA (O=0) on the same schedule; log scale when every error is positive. None when no
    record holds probe errors (the report then has no such picture).

    Example:
        >>> [ax.get_title() for ax in plot_probe_errors(records).axes]   # doctest: +SKIP
        ['TaylorSeer O=1, N=5', 'TaylorSeer O=2, N=5', 'TaylorSeer O=3, N=5']
    """
    interval = _chosen_interval(records, "probe_errors")
    probed = {o: _probe_curve(records, interval, o) for o in range(5)} if interval else {}
    curves = {o: r for o, r in probed.items() if r is not None}
    fora = curves.pop(0, None)
    panels = list(curves.values()) or ([fora] if fora is not None else [])
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.4), sharey=True,
                             squeeze=False, layout="constrained")
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


def plot_memory(records: list[Record]) -> Figure | None:
    """Peak bytes of cached factors (MB = 1e6 bytes, whole CFG batch) vs Taylor order at one interval N: one
    line per granularity and scheme (TaylorSeer), FORA at O=0, each point labelled with its MB; log scale when
    the values span more than 20x. Step abscissa, no last-step variants (they cache the same), no presets. None
    when no record qualifies (the report then has no such picture).

    Example:
        >>> plot_memory(records).axes[0].get_xlabel()   # doctest: +SKIP
        'Taylor order O (0 = FORA)'
    """
    interval = _chosen_interval(records, "peak_cache_bytes")
    recs = [r for r in _ok(records) if r.get("family") not in ("full", "fewer-steps", "preset")
            and _cfg(r, "interval") == interval and _cfg(r, "max_order") is not None
            and _cfg(r, "abscissa", "step") == "step" and not _cfg(r, "tail_steps", 0)
            and r.get("peak_cache_bytes")]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
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


def _save(fig: Figure | None, path: Path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
