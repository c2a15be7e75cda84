"""The measuring instrument: run a grid of methods on one model, write one JSON record per method (JSONL).

Every record is measured, never estimated: FLOPs are counted (``torch.utils.flop_counter``), wall times are
medians of runs of different methods *interleaved* (full, A, B, ..., full, A, B, ...) so that a noisy shared
machine slows every method alike, quality is compared with the full-compute images of the same seeds. A value
that could not be measured is ``null`` and ``reasons[field]`` says why. Reports read these records only.

Methods are benchmarked in groups of about eight. For each method of a group: a probe run on a few images
(per-step forecast error of one module; it costs extra compute, so it is never timed), then a counted run on
all images (FLOPs, step counts, cache bytes, the images for the quality metrics; it is also the method's
warm-up). Then ``repeats`` timed rounds, each running the full-compute reference and the group's methods once,
in order; speedups divide by the reference's median from the same rounds. Records are appended to the JSONL
file group by group, so an interrupted run keeps what it finished.

Every run is identifiable and says whether it finished. A run writes, in order, one line per record:
``{"kind": "run_start", ...header, "methods_planned": [names]}`` before any work; one ``"kind": "method"`` record
per method as its group finishes; and ``{"kind": "run_end", "run_id": ..., "complete": true, "methods": n}`` when,
and only when, every group has finished. A run killed or failed part way has no ``run_end``: ``report`` refuses it
unless asked to show it marked incomplete (``report.read_run``). Each line is written with one write, then flushed
and ``fsync``-ed, so a killed process leaves at most one partial last line (no closing newline, invalid JSON); the
next run first ends such a line with a newline so that its own lines stay whole, and the reader skips the partial
line with a warning.

Method record schema (``SCHEMA`` = "taylorseer.bench/2"; "/1" records, written before the run markers existed,
are the same without ``kind``; times in seconds, sizes in bytes unless named ``_mb``): ``kind`` = "method"; the run
header (``schema``, ``run_id``, ``model``, ``num_images``, ``seed``, ``repeats``, ``guidance_scale``, ``cfg_mode``,
``probe_images_requested``, ``machine``, ``guidance_interval``); the method (``name``, ``family``, ``num_steps``,
``config``, ``counterpart``, ``group``); counts (``steps_full``, ``steps_forecast``, ``flops``, ``flops_speedup``,
``peak_cache_bytes``, ``process_max_rss_mb``: the process's peak so far); timing (``wall_s`` median,
``wall_min_s``, ``wall_max_s``, ``wall_samples_s``, ``cpu_s``, ``wall_full_s``, ``wall_speedup``, ``efficiency`` =
wall / FLOPs speedup); quality (``psnr`` dB and ``ssim`` vs the reference images, ``class_accuracy``,
``fid_fmnist`` vs the real test set, ``fid_to_full``: the same Fréchet distance but to the full-compute images of
the same seeds); the probe (``probe_path``, ``probe_images``, ``probe_errors`` = [{step, rel_l2}]);
``samples_png``, ``error`` (None or "Type: message"), ``reasons`` ({field: why it is null}) and ``bench_elapsed_s``.

Example:
Modules: ``methods`` (the typed ``Method``), ``grids`` (the grids), ``install`` and ``peer_grid`` (installers),
``runs`` (one run of one method: ``run_method``), ``timing`` (interleaved rounds), ``records`` (JSONL in and out).

    >>> model = build_reference("DiT-FM-T/4")                                           # doctest: +SKIP
    >>> records = run_bench(model, default_grid(quick=True, num_steps=10), num_images=8, repeats=1,
    ...                     out_path="runs/bench/records.jsonl")                       # doctest: +SKIP
    >>> [(r["name"], r["flops_speedup"]) for r in records][:2]                          # doctest: +SKIP
    [('full', 1.0), ('ddim-4', 2.5)]
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .._extras import require
from ..integrations.cache_dit import cache_dit_version
from ..models.reference import GUIDANCE_INTERVAL, NUM_CLASSES
from ..models.sampler import sample
from .grids import (
    GRID_INTERVALS,
    GRID_WARMUP,
    PART_INTERVALS,
    SPECTRUM_BUDGETS,
    calibrated_methods,
    default_grid,
    part_methods,
    schedule_companions,
    select_methods,
    spectrum_and_anchor_methods,
)
from .install import INSTALLERS, Installed, Installer, installer_for, register_installer
from .labels import describe
from .methods import Method, PeerSettings, method_from_config
from .records import append_record, end_partial_line
from .runs import (
    SAMPLE_GRID_IMAGES,
    MethodRun,
    RunContext,
    Sampler,
    block_watchers,
    machine_facts,
    max_rss_mb,
    probe_path,
    quality,
    run_method,
    save_grid,
)
from .timing import Timing, interleaved

require("torchmetrics")  # the quality metrics (eval.metrics): fail now, not after the first group has run

__all__ = ["GRID_INTERVALS", "GRID_WARMUP", "INSTALLERS", "PART_INTERVALS", "SAMPLE_GRID_IMAGES", "SCHEMA",
           "SPECTRUM_BUDGETS", "Installed", "Installer", "Method", "MethodRun", "PeerSettings", "RunContext",
           "Sampler", "append_record", "block_watchers", "calibrated_methods", "default_grid", "installer_for",
           "machine_facts", "method_from_config", "part_methods", "quality", "register_installer", "run_bench",
           "run_method", "schedule_companions", "select_methods", "spectrum_and_anchor_methods"]

SCHEMA = "taylorseer.bench/2"


#################################################################################
#                                 Measurements                                  #
#################################################################################

def _probe(ctx: RunContext, method: Method, probe_images: int) -> dict[str, Any]:
    """Per-step relative L2 error of the forecast of one module, from a separate run on a few images."""
    path = probe_path(ctx.model, method)
    keys = ("probe_path", "probe_images", "probe_errors")
    if path is None:
        why = "no forecast steps" if method.config is None else "the peer integration exposes no probe"
        return {**dict.fromkeys(keys), "reasons": dict.fromkeys(keys, why)}
    labels = ctx.labels[:probe_images]
    run = run_method(ctx, method, labels, probe=path)
    errors = [{"step": e["step"], "rel_l2": e["rel_l2"]} for e in run.stats["probe_errors"]]
    return {"probe_path": path, "probe_images": len(labels), "probe_errors": errors, "reasons": {}}


def _measure(ctx: RunContext, method: Method, reference: torch.Tensor | None, out_dir: Path | None,
             probe_images: int) -> dict[str, Any]:
    """Everything but timing: probe run, counted run, quality metrics, sample grid. Fills a partial record."""
    rec = _probe(ctx, method, probe_images)
    run = run_method(ctx, method, count=True)
    rec["flops"] = run.flops
    rec["block_calls"] = run.block_calls
    if run.block_calls is None:
        rec["reasons"]["block_calls"] = "the model has no block list to watch"
    rec["peer_version"] = run.stats.get("cache_dit")
    if rec["peer_version"] is None:
        rec["reasons"]["peer_version"] = "not a cache-dit method (diffusers' version: machine.diffusers)"
    rec["process_max_rss_mb"] = max_rss_mb()
    for key in ("steps_full", "steps_forecast", "peak_cache_bytes"):
        rec[key] = run.stats.get(key)
        if rec[key] is None:
            rec["reasons"][key] = "not reported by this method's integration"
    values, reasons = quality(run.images, run.images if reference is None else reference, ctx.labels,
                               is_reference=reference is None)
    rec.update(values)
    rec["reasons"].update(reasons)
    rec["samples_png"] = None
    if out_dir is None:
        rec["reasons"]["samples_png"] = "sample grids were not requested"
    else:
        png = Path("samples") / f"{method.name}.png"
        save_grid(run.images, out_dir / png)
        rec["samples_png"] = png.as_posix()
    rec["_images"] = run.images
    return rec


#################################################################################
#                                Timing + records                               #
#################################################################################

def _groups(methods: list[Method], full: Method, size: int) -> list[list[Method]]:
    """Chunk the non-reference methods into timing groups of about ``size``; a peer joins its counterpart."""
    others = [m for m in methods if m is not full]
    units: list[list[Method]] = [[m] for m in others if m.counterpart is None or m.counterpart not in
                                 {o.name for o in others}]
    for peer in (m for m in others if m not in [u[0] for u in units]):
        next(u for u in units if u[0].name == peer.counterpart).append(peer)
    groups: list[list[Method]] = [[]]
    for unit in units:
        if groups[-1] and len(groups[-1]) + len(unit) > size:
            groups.append([])
        groups[-1].extend(unit)
    return [[full] + g for g in groups] if groups[0] else [[full]]


def _wall_fields(timing: Timing, full: Timing) -> dict[str, Any]:
    return {"wall_s": timing.wall_s, "wall_min_s": timing.wall_min_s, "wall_max_s": timing.wall_max_s,
            "wall_samples_s": list(timing.wall_samples_s), "cpu_s": timing.cpu_s, "wall_full_s": full.wall_s,
            "wall_speedup": timing.speedup_over(full)}


def _error_record(message: str) -> dict[str, Any]:
    keys = ("flops", "block_calls", "steps_full", "steps_forecast", "peak_cache_bytes", "psnr", "ssim",
            "class_accuracy", "fid_fmnist", "fid_to_full", "probe_path", "probe_images", "probe_errors", "samples_png",
            "process_max_rss_mb")
    return {**dict.fromkeys(keys), "reasons": {k: "the method failed (see error)" for k in keys}, "error": message}


def _finish(rec: dict[str, Any], timing: dict[str, Any] | None, full_flops: int | None,
            full_blocks: int | None = None) -> dict[str, Any]:
    """Add timing and the ratios; nulls (with reasons) for what is missing."""
    rec.pop("_images", None)
    timed = ("wall_s", "wall_min_s", "wall_max_s", "wall_samples_s", "cpu_s", "wall_full_s", "wall_speedup")
    rec.update(timing if timing is not None else dict.fromkeys(timed))
    if timing is None:
        rec["reasons"].update({k: "not timed: the method failed" for k in timed})
    flops = rec.get("flops")
    rec["flops_speedup"] = full_flops / flops if flops and full_flops else None
    rec["flops_fraction"] = flops / full_flops if flops and full_flops else None
    blocks = rec.get("block_calls")
    rec["block_call_fraction"] = blocks / full_blocks if blocks is not None and full_blocks else None
    rec["efficiency"] = (rec["wall_speedup"] / rec["flops_speedup"]
                         if rec["wall_speedup"] and rec["flops_speedup"] else None)
    for key in ("flops_speedup", "efficiency", "flops_fraction", "block_call_fraction"):
        if rec[key] is None:
            rec["reasons"].setdefault(key, "an input of the ratio is missing")
    return rec


class _Bench:
    """State of one ``run_bench`` call: context, reference images and FLOPs, progress bar, output file."""

    def __init__(self, ctx: RunContext, out_path: Path, header: dict[str, Any], probe_images: int,
                 save_samples: bool, bar: tqdm) -> None:
        self.ctx, self.out_path, self.header, self.bar = ctx, out_path, header, bar
        self.probe_images, self.save_samples = probe_images, save_samples
        self.reference: torch.Tensor | None = None
        self.full_flops: int | None = None
        self.full_blocks: int | None = None
        self.started = time.perf_counter()

    def measure(self, method: Method) -> dict[str, Any]:
        self.bar.set_description(f"measure {method.name}")
        try:
            rec = _measure(self.ctx, method, self.reference, self.out_path.parent if self.save_samples else None,
                           self.probe_images)
            rec["error"] = None
        except Exception as err:  # noqa: BLE001 - a failing method is recorded, the bench goes on
            rec = _error_record(f"{type(err).__name__}: {err}")
        self.bar.update(2)
        if method.family == "full" and self.reference is None:
            self.reference, self.full_flops = rec.get("_images"), rec["flops"]
            self.full_blocks = rec.get("block_calls")
        return rec

    def time_group(self, group: list[Method], repeats: int) -> dict[str, Timing]:
        """Interleaved rounds: every round runs each method once, in order (the sampling timed, not the install)."""

        def timed_run(method: Method) -> Callable[[], tuple[float, float]]:
            def run() -> tuple[float, float]:
                done = run_method(self.ctx, method)
                self.bar.update(1)
                return done.wall_s, done.cpu_s

            return run

        def describe_run(name: str) -> None:
            self.bar.set_description(f"time {name}")

        return interleaved({m.name: timed_run(m) for m in group}, rounds=repeats, on_run=describe_run,
                           self_timed=True)

    def record(self, method: Method, rec: dict[str, Any], group: int, timing: dict[str, Any] | None) -> dict:
        out = {"kind": "method", **self.header, **method.to_dict(), "group": group,
               **_finish(rec, timing, self.full_flops, self.full_blocks)}
        out["knobs"] = method.knobs()
        out.update(describe(out))
        out["bench_elapsed_s"] = time.perf_counter() - self.started
        append_record(self.out_path, out)
        return out


def run_bench(
    model: nn.Module | Callable[[], nn.Module],
    methods: list[Method],
    num_images: int = 100,
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 3,
    out_path: str | os.PathLike = "bench.jsonl",
    progress: bool = True,
    *,
    sampler: Sampler = sample,
    guidance_scale: float = 1.5,
    cfg_mode: str = "batch",
    group_size: int = 8,
    probe_images: int = 16,
    model_name: str | None = None,
    save_samples: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark ``methods`` on ``model`` and append one JSON record per method to ``out_path``; return them.

    ``model`` is a module or a factory returning one; ``sampler(model, labels, num_steps=, guidance_scale=,
    seed=, cfg_mode=, listener=)`` generates images in [-1, 1]. Exactly one method must have family ``full``:
    its images (``num_images`` images of classes 0..9 in turn, noise from ``seed``) are the reference of PSNR
    and SSIM and its FLOPs and wall time the denominators of the speedups. ``threads`` sets torch's thread
    count for the whole process (None: leave it). Wall times are in seconds: median, min, max and all samples
    of ``repeats`` interleaved rounds of groups of ``group_size`` methods plus the reference. Sample grids go
    to ``samples/`` beside ``out_path`` (paths in the records are relative to that directory). Records are
    appended, never truncated, framed by a ``run_start`` record (the header, a fresh ``run_id``, the planned
    method names) and, only once every method is recorded, a ``run_end`` record; ``report.read_run`` picks the
    last run of a file and refuses it if that ``run_end`` is missing.

    Example:
        >>> recs = run_bench(build_reference("DiT-FM-T/4"), default_grid(True, 10), num_images=8,
        ...                  repeats=1, out_path="bench.jsonl", progress=False)         # doctest: +SKIP
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    fulls = [m for m in methods if m.family == "full"]
    if len(fulls) != 1:
        raise ValueError(f"methods must hold exactly one 'full' method (the reference), got {len(fulls)}")
    if progress and cache_dit_version() is None:
        print("bench: cache-dit is not installed (pip install \"taylorseer[peers]\"): its methods are skipped",
              file=sys.stderr)
    if threads is not None:
        torch.set_num_threads(threads)
    model = model if isinstance(model, nn.Module) else model()
    labels = torch.arange(num_images) % NUM_CLASSES
    ctx = RunContext(model, sampler, labels, seed, guidance_scale, cfg_mode)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    groups = _groups(methods, fulls[0], group_size)
    header = _header(model, model_name, num_images, seed, repeats, guidance_scale, cfg_mode, probe_images)
    # our sampler's default ("all": every step); unknown (None) for a custom sampler
    if sampler is sample:
        header["guidance_interval"] = list(GUIDANCE_INTERVAL) if GUIDANCE_INTERVAL else "all"
    else:
        header["guidance_interval"] = None
    total = 2 * len(methods) + repeats * sum(len(g) for g in groups)
    end_partial_line(out_path)
    append_record(out_path, {"kind": "run_start", **header, "methods_planned": [m.name for m in methods]})
    with tqdm(total=total, disable=not progress, desc="bench") as bar:
        bench = _Bench(ctx, out_path, header, probe_images, save_samples, bar)
        records = [r for index, group in enumerate(groups) for r in _bench_group(bench, group, index, repeats)]
    append_record(out_path, {"kind": "run_end", "run_id": header["run_id"], "complete": True,
                             "methods": len(records)})
    return records


def _bench_group(bench: _Bench, group: list[Method], index: int, repeats: int) -> list[dict[str, Any]]:
    """Measure the group's methods (the reference only in group 0), time them interleaved, append the records."""
    full, members = group[0], group[1:]
    todo = group if index == 0 else members
    partial = {m.name: bench.measure(m) for m in todo}
    if bench.reference is None:
        raise RuntimeError(f"the reference method {full.name!r} failed: {partial[full.name]['error']}")
    ok = [full] + [m for m in members if partial[m.name]["error"] is None]
    bench.bar.update(repeats * (len(group) - len(ok)))
    samples = bench.time_group(ok, repeats)
    records = []
    for method in todo:
        timing = _wall_fields(samples[method.name], samples[full.name]) if method.name in samples else None
        records.append(bench.record(method, partial[method.name], index, timing))
    return records


def _header(model: nn.Module, model_name: str | None, num_images: int, seed: int, repeats: int,
            guidance_scale: float, cfg_mode: str, probe_images: int) -> dict[str, Any]:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return {"schema": SCHEMA, "run_id": f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            "model": {"name": model_name or type(model).__name__, "class": type(model).__name__,
                      "params": sum(p.numel() for p in model.parameters())},
            "num_images": num_images, "seed": seed, "repeats": repeats, "guidance_scale": guidance_scale,
            "cfg_mode": cfg_mode, "probe_images_requested": probe_images, "machine": machine_facts()}
