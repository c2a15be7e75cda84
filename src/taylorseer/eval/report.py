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
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .labels import (
    FAMILY_ORDER,
    FAMILY_STYLES,
    Record,
    _cfg,
    _ok,
    _sort_key,
    family_colour,
    family_label,
    method_label,
    unique_labels,
    variant_label,
    variant_marker,
)
from .records import LEGACY_SCHEMAS, BenchRun, IncompleteRunError, PartialRecordWarning, read_records, read_run
from .report_plots import (
    _FRACTIONS,
    P1_INTERVAL,
    _save,
    pareto_front,
    plot_compute_fronts,
    plot_memory,
    plot_pareto,
    plot_probe_errors,
    plot_samples,
)

__all__ = ["FAMILY_ORDER", "FAMILY_STYLES", "LEGACY_SCHEMAS", "BenchRun", "IncompleteRunError",
           "PartialRecordWarning", "family_colour", "family_label", "method_label", "pareto_front", "plot_pareto",
           "read_records", "read_run", "unique_labels", "variant_label", "variant_marker", "write_report"]

P1_EFFICIENCY = 0.90
P3_EVALS = (10, 11, 12)
PSNR_TIE_DB = 0.01  # P2: PSNRs this close are equal (identical math differs only by float rounding, ~1e-6 dB)
NA = "n/a"


#################################################################################
#                                 Equal compute                                 #
#################################################################################

# Who is who at a budget: each peer group by its families; "ours" is every other family but full compute, so a new
# part's family counts as ours without an edit here.
BUDGET_GROUPS: dict[str, tuple[str, ...]] = {
    "ours": (), "cache-dit": ("cache-dit",), "Spectrum": ("spectrum",),
    "diffusers' hooks": ("firstblockcache", "magcache", "seacache", "diffusers-peer", "diffusers-hook"),
    "FORA": ("fora",), "DDIM (fewer steps)": ("fewer-steps",)}
BUDGETS = (0.12, 0.16, 0.22)
BUDGET_SLACK = 0.01  # a method is "at" budget b when its fraction is <= b + this


def _budget_group(family: Any) -> str | None:
    """The ``BUDGET_GROUPS`` group of a family: the peer group that lists it, else "ours" (None: full compute)."""
    if family == "full":
        return None
    return next((group for group, families in BUDGET_GROUPS.items() if family in families), "ours")


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
        for group in BUDGET_GROUPS:
            fit = [r for r in _ok(records) if _budget_group(r.get("family")) == group and r.get(metric) is not None
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
