"""The report: Markdown + HTML tables and matplotlib PNG plots, drawn from bench records (JSONL) only.

Nothing here runs a model. ``write_report`` reads the records of one bench run (the last one in the file by
default), checks the issue's targets P1-P3 and states each as PASS / MISS / NOT MEASURED with its numbers.

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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402  (after choosing the backend)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Record = dict[str, Any]
FAMILY_ORDER = ("full", "fewer-steps", "fora", "taylorseer", "preset", "diffusers-peer")
P1_INTERVAL, P1_EFFICIENCY = 5, 0.90
P3_EVALS = (10, 11, 12)
PSNR_TIE_DB = 0.01  # P2: PSNRs this close are equal (identical math differs only by float rounding, ~1e-6 dB)
NA = "n/a"


#################################################################################
#                                    Records                                    #
#################################################################################

def read_records(path: str | os.PathLike, run_id: str | None = None) -> list[Record]:
    """The records of one bench run from a JSONL file: ``run_id``'s, or the last run's in the file.

    Example:
        >>> records = read_records("runs/bench/records.jsonl")   # doctest: +SKIP
    """
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"no records in {path}")
    run_id = run_id if run_id is not None else rows[-1].get("run_id")
    return [r for r in rows if r.get("run_id") == run_id]


def _ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if not r.get("error")]


def _cfg(record: Record, key: str, default: Any = None) -> Any:
    return (record.get("config") or {}).get(key, default)


def _sort_key(record: Record) -> tuple:
    family = record.get("family")
    rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    return rank, -(record.get("steps_full") or 0), _cfg(record, "max_order", 0), record.get("name", "")


def _series(record: Record) -> str:
    """The plot series of a record: one line per method family (TaylorSeer: per order, scheme, abscissa and
    granularity)."""
    family = record.get("family")
    if family == "taylorseer":
        scheme, abscissa, granularity = _cfg(record, "scheme"), _cfg(record, "abscissa"), _cfg(record, "granularity")
        return (f"TaylorSeer O={_cfg(record, 'max_order')}" + ("" if scheme == "divided" else f" {scheme}")
                + ("" if abscissa == "step" else f" {abscissa}")
                + ("" if granularity in (None, "module") else f" {granularity}"))
    return {"full": "full (reference)", "fewer-steps": "DDIM, fewer steps", "fora": "FORA (O=0)",
            "preset": "paper presets", "diffusers-peer": "diffusers TaylorSeer"}.get(family, str(family))


#################################################################################
#                                     Plots                                     #
#################################################################################

_METRICS = {"psnr": "PSNR vs full (dB)", "fid_fmnist": "FID-FMNIST (lower is better)"}
_SPEEDS = {"flops_speedup": "FLOPs speedup (x)", "wall_speedup": "wall speedup (x)"}


def _style(label: str) -> dict[str, Any]:
    if label in ("full (reference)", "paper presets", "diffusers TaylorSeer"):
        return {"linestyle": "none", "marker": {"full (reference)": "*"}.get(label, "D"), "markersize": 7}
    if label.endswith(" block") or label.endswith(" output"):
        return {"linestyle": "none", "marker": "s" if label.endswith(" block") else "^", "markersize": 6}
    dashed = "reference" in label or "timestep" in label
    return {"linestyle": ":" if "timestep" in label else "--" if dashed else "-", "marker": "o", "markersize": 4}


def plot_pareto(records: list[Record], metric: str = "psnr") -> Figure:
    """Speed-quality plot: FLOPs speedup (left) and wall speedup (right) vs ``metric`` ("psnr" or "fid_fmnist").

    One line per method family, its points joined in order of growing skip (interval N up, or fewer DDIM
    steps), so noisy wall times do not scramble the curve. Records lacking the metric are left out.

    Example:
        >>> fig = plot_pareto(read_records("records.jsonl"), "psnr")   # doctest: +SKIP
        >>> fig.axes[0].get_xlabel()                                     # doctest: +SKIP
        'FLOPs speedup (x)'
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {list(_METRICS)}, got {metric!r}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    groups: dict[str, list[Record]] = {}
    for rec in sorted(_ok(records), key=_sort_key):
        groups.setdefault(_series(rec), []).append(rec)
    for ax, speed in zip(axes, _SPEEDS):
        for label, recs in groups.items():
            pts = [(r[speed], r[metric]) for r in sorted(recs, key=_along)
                   if r.get(speed) and r.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, **_style(label))
        ax.set_xlabel(_SPEEDS[speed])
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(_METRICS[metric])
    _legend_or_note(fig, axes, f"no record has {metric}")
    fig.suptitle(f"Speed vs quality ({_METRICS[metric]})")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return fig


def _along(record: Record) -> tuple:
    """Order of a record along its family's curve: interval N, or fewer sampler steps."""
    return (_cfg(record, "interval", 0), -record.get("num_steps", 0), record.get("name", ""))


def _legend_or_note(fig: Figure, axes: Any, note: str) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    else:
        axes[0].text(0.5, 0.5, note, ha="center", va="center", transform=axes[0].transAxes)


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
                  and _cfg(r, "abscissa") == "step"]
    candidates.sort(key=lambda r: (_cfg(r, "scheme") != "divided", r.get("family") != "fora"))
    return candidates[0] if candidates else None


def plot_probe_errors(records: list[Record]) -> Figure:
    """Per-step relative L2 forecast error of the probed module, one curve per order 0..3 at one interval N.

    Example:
        >>> plot_probe_errors(records).axes[0].get_ylabel()   # doctest: +SKIP
        'relative L2 forecast error'
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    interval = _chosen_interval(records, "probe_errors")
    curves = [(o, _probe_curve(records, interval, o)) for o in range(4)] if interval else []
    curves = [(o, r) for o, r in curves if r is not None]
    for order, rec in curves:
        pts = sorted((e["step"], e["rel_l2"]) for e in rec["probe_errors"])
        ax.plot(*zip(*pts), marker="o", markersize=3, label=f"O={order} ({rec['name']})")
    if curves and all(e["rel_l2"] > 0 for _, r in curves for e in r["probe_errors"]):
        ax.set_yscale("log")
    title = f"Forecast error of {curves[0][1]['probe_path']} at N={interval}" if curves else None
    return _finish(fig, ax, "sampling step", "relative L2 forecast error", title, "no probe records")


def plot_memory(records: list[Record]) -> Figure:
    """Peak bytes of cached factors (MB = 1e6 bytes, whole CFG batch) vs Taylor order, per scheme, at one N.

    Example:
        >>> plot_memory(records).axes[0].get_xlabel()   # doctest: +SKIP
        'Taylor order O (0 = FORA)'
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    interval = _chosen_interval(records, "peak_cache_bytes")
    recs = [r for r in _ok(records) if r.get("family") in ("fora", "taylorseer") and _cfg(r, "interval") == interval
            and _cfg(r, "abscissa") == "step" and r.get("peak_cache_bytes") is not None]
    for scheme in sorted({_cfg(r, "scheme") for r in recs if _cfg(r, "max_order")}):
        # Order 0 (FORA) stores the same single factor under either scheme: it starts every line.
        pts = sorted({(_cfg(r, "max_order"), r["peak_cache_bytes"] / 1e6) for r in recs
                      if _cfg(r, "scheme") == scheme or not _cfg(r, "max_order")})
        dashed = scheme != "divided"
        ax.plot(*zip(*pts), marker="s" if dashed else "o", linestyle="--" if dashed else "-",
                markersize=5 if dashed else 8, label=f"{scheme} scheme")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"Cache memory at N={interval}, {recs[0].get('num_images')} images (CFG batch)" if recs else None
    return _finish(fig, ax, "Taylor order O (0 = FORA)", "peak cache (MB)", title, "no cache records")


def _finish(fig: Figure, ax: Any, xlabel: str, ylabel: str, title: str | None, empty: str) -> Figure:
    """Label and grid one-axis plots; with data (``title`` set) add the legend, else say there is none."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title is not None:
        ax.legend(fontsize=8)
        ax.set_title(title)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_samples(
    records: list[Record], records_dir: str | os.PathLike, names: list[str] | None = None
) -> Figure | None:
    """The saved sample grids of ``names`` (default: full, and the methods at the model-evaluation count of N=5),
    one per row. Returns None if no chosen record points to an existing sample file."""
    names = names if names is not None else _sample_selection(records)
    chosen = [r for r in _ok(records) if r["name"] in names and r.get("samples_png")
              and (Path(records_dir) / r["samples_png"]).is_file()]
    if not chosen:
        return None
    chosen.sort(key=_sort_key)
    grids = [mpimg.imread(Path(records_dir) / r["samples_png"]) for r in chosen]
    aspect = grids[0].shape[1] / grids[0].shape[0]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(1.8 + 1.1 * aspect, 1.15 * len(chosen) + 0.3), squeeze=False)
    for ax, rec, grid in zip(axes[:, 0], chosen, grids):
        ax.imshow(grid, cmap="gray")
        ax.set_ylabel(rec["name"], rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
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
            _num(r.get("fid_to_full"), ".3f"), _num(r.get("class_accuracy"), ".3f"), _num(cache, ".1f")]


MAIN_HEADERS = ["method", "family", "full steps / model calls", "FLOPs speedup", "wall speedup", "wall/FLOPs",
                "PSNR (dB)", "SSIM", "FID-FMNIST", "FID to full", "class acc", "cache MB"]
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
            f"Model: {model.get('name')} ({model.get('params', 0) / 1e6:.2f}M parameters); "
            f"DDIM {full.get('num_steps')} steps, CFG scale {first.get('guidance_scale')} "
            f"({first.get('cfg_mode')}{where})",
            f"Images: {first.get('num_images')} per method (classes 0-9 in turn, seed {first.get('seed')}); wall "
            f"times are medians of {first.get('repeats')} interleaved rounds; speedups are against the full run "
            f"timed in the same rounds"]


def _document(records: list[Record], images: dict[str, str], notes: str | None) -> list[tuple]:
    recs = sorted(records, key=_sort_key)
    doc: list[tuple] = [("h1", "TaylorSeer benchmark"), ("list", _header_lines(records)), ("h2", "Targets")]
    for check in check_targets(records):
        doc += [("p", check.line()), ("list", check.details)] if check.details else [("p", check.line())]
    doc += [("h2", "Results"), ("table", MAIN_HEADERS, [_main_row(r) for r in recs if not r.get("error")]),
            ("p", "PSNR and SSIM compare with the full-compute images of the same seeds. FID-FMNIST is biased "
                  "upward at small image counts: compare rows of this run only. Cache MB is the peak size of the "
                  "cached factors for the whole CFG batch. wall/FLOPs = wall speedup / FLOPs speedup (1 = ideal).")]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(records_path: str | os.PathLike, out_dir: str | os.PathLike, notes: str | None = None,
                 run_id: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and PNG plots into ``out_dir`` from the records of one bench run.

    Reads records only (the last run in the file unless ``run_id`` is given). ``notes`` is appended as a closing
    section (e.g. why a target was missed). Returns the Markdown path.

    Example:
        >>> write_report("runs/bench/records.jsonl", "docs/results")   # doctest: +SKIP
        PosixPath('docs/results/report.md')
    """
    records_path, out_dir = Path(records_path), Path(out_dir)
    records = read_records(records_path, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"speed vs PSNR": ("pareto_psnr.png", plot_pareto(records, "psnr")),
             "speed vs FID-FMNIST": ("pareto_fid.png", plot_pareto(records, "fid_fmnist")),
             "forecast error per step": ("forecast_error.png", plot_probe_errors(records)),
             "cache memory vs order": ("memory.png", plot_memory(records)),
             "sample grids": ("samples.png", plot_samples(records, records_path.parent))}
    images = {alt: name for alt, (name, fig) in plots.items() if _save(fig, out_dir / name)}
    doc = _document(records, images, notes)
    (out_dir / "report.md").write_text(_markdown(doc), encoding="utf-8")
    (out_dir / "report.html").write_text(_html(doc), encoding="utf-8")
    return out_dir / "report.md"
