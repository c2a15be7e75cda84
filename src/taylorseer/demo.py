"""`taylorseer demo`: the embedded DiT at full compute and with TaylorSeer, side by side, measured.

Everything runs on the CPU from files shipped in the package: the trained reference DiT, the evaluation
classifier and the Fashion-MNIST test statistics. Caching reaches the model through ``taylorseer.apply``, the
same path users take.

Timing: each method first runs once untimed (warm-up of the allocator and code paths; these are the images the
quality metrics and the picture use), then ``rounds`` timed rounds run every method once each, interleaved, in an
order rotated by one method per round (round 1: A B C, round 2: B C A, ...), so a burst of background load falls
on all methods alike. Each timed generation runs with Python's garbage collector paused (collected before it, as
``timeit`` does), so a collection triggered by one method's allocations is not charged to another. A method's wall
time is its median over the rounds, its *spread* the relative range ``(max - min) / median`` of those times; a
speedup is the ratio of the reference's median to the method's, and its spread the relative range of the per-round
ratios (each round's reference time over the method's time in that round). The CPU-time speedup (process CPU time,
``time.process_time``, of the same rounds; much steadier than wall time when other jobs share the machine) is the
median of the per-round CPU ratios, each from two runs measured back to back under the same load, with their
spread. ``taylorseer demo`` times with one torch thread by default: with two threads on a shared
machine the process CPU time also counts one thread spin-waiting for the other while it is descheduled, which
grows with the load. Every timed generation must reproduce the warm-up's images bit for bit (``torch.equal``).

A run is flagged *busy* (a warning line under the table; its speedups mean little) when either bound is exceeded:

- load: the 1-minute load average (``os.getloadavg``), the larger of the values read before the warm-up and after
  the last round, exceeds ``threads + LOAD_MARGIN`` (``LOAD_MARGIN = 0.5``; ``threads`` = ``torch.get_num_threads()``),
  i.e. other work took more than half a core on average beside ours. The load average is system-wide (in a container
  it may count the host's work) and lags by about a minute.
- spread: the largest wall-time spread of any method exceeds ``SPREAD_BOUND = 0.15`` (15%).

Example:
    >>> rows = run_demo(out_dir="out/demo", per_class=4)   # doctest: +SKIP
    >>> print(format_table(rows))                           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ._extras import require
from .api import apply
from .config import TaylorSeerConfig, preset
from .eval.grid import side_by_side
from .eval.timing import interleaved, timed
from .models.sampler import StepListener, sample
from .parts import CacheConfig
from .runtime.measure import count_flops

require("torchmetrics")  # the bench extra (eval.metrics): fail before sampling, with the pip command

LOAD_MARGIN = 0.5  # busy: 1-minute load average > threads + LOAD_MARGIN
SPREAD_BOUND = 0.15  # busy: some method's wall-time spread (max - min) / median > SPREAD_BOUND


@dataclass(frozen=True)
class DemoMethod:
    """One row of the demo: a cache config (None: no cache), the sampler's number of steps, and a short title for
    the picture (``"\\n"`` breaks the line; empty: the label)."""

    label: str
    config: TaylorSeerConfig | CacheConfig | None
    num_steps: int
    title: str = ""


HEADLINE_CALIBRATION = "ts2-output-b8-s50"  # shipped: the schedule searched for TaylorSeer O=2 on the output


def shipped_calibration(name: str) -> Path:
    """The path of a calibration file shipped in the package (``assets/calibrations/NAME.safetensors``)."""
    from .models.checkpoint import ASSETS_DIR

    path = ASSETS_DIR / "calibrations" / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped calibration {name!r} ({path})")
    return path


def demo_methods(num_steps: int = 50, model: torch.nn.Module | None = None) -> list[DemoMethod]:
    """Full compute; our best method on this model (the shipped calibration: a schedule searched for TaylorSeer
    O=2 on the model output, 8 of 50 full steps; it needs ``num_steps`` = 50 and CFG 1.5, else the N=5 schedule
    heads the list); TaylorSeer O=2 at N=5 on the modules (the paper's kind of schedule); reuse (FORA) and plain
    DDIM at the headline's number of model evaluations."""
    fast = TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, name="taylorseer-n5-o2")
    methods = [DemoMethod(f"full ({num_steps} steps)", None, num_steps, f"full\n{num_steps} steps")]
    headline: TaylorSeerConfig | Any = None
    if num_steps == 50:
        from .calibration import load_calibration

        cal = load_calibration(shipped_calibration(HEADLINE_CALIBRATION), model=model, num_steps=num_steps)
        headline = cal.cache_config()
        evals = len(cal.schedule.full_steps)
        methods.append(DemoMethod(f"TaylorSeer O=2, searched schedule, output ({evals} full)", headline, num_steps,
                                  f"TaylorSeer searched\n{evals} of {num_steps}"))
        fora: Any = cal.cache_config(forecaster=_reuse(), name="fora-searched")
        fora_label = f"FORA reuse, same schedule ({evals} full)"
    else:
        evals = fast.full_steps(num_steps)
        fora = fast.replace(max_order=0, name="fora-n5")
        fora_label = f"FORA reuse N=5 ({evals} full)"
    methods += [
        DemoMethod(f"TaylorSeer N=5, O=2 ({fast.full_steps(num_steps)} full)", fast, num_steps,
                   "TaylorSeer\nN=5, O=2"),
        DemoMethod(fora_label, fora, num_steps, "FORA reuse\n" + ("same schedule" if headline else "N=5")),
        DemoMethod(f"DDIM {evals} steps (same model calls)", None, evals, f"DDIM\n{evals} steps"),
    ]
    return methods


FLUX_HEADLINES = {28: "flux-ts2-output-b6-s28", 50: "flux-ts2-output-b8-s50"}  # shipped searched schedules


def flux_demo_methods(num_steps: int = 28, model: torch.nn.Module | None = None) -> list[DemoMethod]:
    """The flow-matching reference: full compute; our best method on it (the shipped schedule searched for
    TaylorSeer O=2 on the model output: 6 of 28 or 8 of 50 full steps; at another step count TaylorSeer O=2 on the
    output at a fixed interval with 6 full steps); the FLUX preset (``paper_flux``) and its reuse (FORA); plain Euler
    with the headline's number of model evaluations."""
    from .eval.flux import interval_for

    flux = preset("paper_flux")
    methods = [DemoMethod(f"full ({num_steps} steps)", None, num_steps, f"full\n{num_steps} steps")]
    if num_steps in FLUX_HEADLINES:
        from .calibration import load_calibration

        cal = load_calibration(shipped_calibration(FLUX_HEADLINES[num_steps]), model=model, num_steps=num_steps)
        evals = len(cal.schedule.full_steps)
        methods.append(DemoMethod(f"TaylorSeer O=2, searched schedule, output ({evals} full)", cal.cache_config(),
                                  num_steps, f"TaylorSeer searched\n{evals} of {num_steps}"))
    else:
        base = interval_for(6, num_steps) or TaylorSeerConfig(interval=max(2, num_steps // 6), warmup_steps=2)
        evals = base.full_steps(num_steps)
        out = base.replace(max_order=2, granularity="output", name="ts-o2-output")
        methods.append(DemoMethod(f"TaylorSeer O=2, output, N={base.interval} ({evals} full)", out, num_steps,
                                  f"TaylorSeer output\n{evals} of {num_steps}"))
    return methods + [
        DemoMethod(f"paper_flux (N=6, O=1; {flux.full_steps(num_steps)} full)", flux, num_steps,
                   "TaylorSeer\npaper_flux"),
        DemoMethod("FORA reuse, paper_flux schedule", flux.replace(max_order=0, name="fora-paper_flux"), num_steps,
                   "FORA reuse\npaper_flux"),
        DemoMethod(f"Euler {evals} steps (same model calls)", None, evals, f"Euler\n{evals} steps"),
    ]


def _reuse() -> Any:
    from .forecast import TaylorForecast

    return TaylorForecast(max_order=0)


class _ProgressListener:
    """A step listener that advances a named tqdm bar and passes the steps on to ``inner`` (a handle or None)."""

    def __init__(self, inner: StepListener | None, desc: str) -> None:
        self.inner, self.desc = inner, desc
        self.bar: tqdm | None = None

    def begin(self, num_steps: int | None = None) -> None:
        if self.inner is not None:
            self.inner.begin(num_steps)
        self.close()
        self.bar = tqdm(total=num_steps, desc=self.desc, leave=False)

    @contextlib.contextmanager
    def step(self, index: int, timestep: Any = None, sigma: Any = None) -> Iterator[Any]:
        inner = self.inner.step(index, timestep, sigma) if self.inner is not None else contextlib.nullcontext()
        with inner as value:
            yield value
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


Sampler = Any  # sampler(model, labels, *, num_steps, guidance_scale, seed, cfg_mode, listener) -> images


def _generate(model: torch.nn.Module, method: DemoMethod, labels: torch.Tensor, seed: int, guidance_scale: float,
              desc: str | None, sampler: Sampler = sample, cfg_mode: str = "batch") -> tuple[torch.Tensor, Any]:
    """One generation of ``method``: images [N, 1, S, S] and the handle's stats (None without a cache).
    ``desc``: the progress bar's text (None: no bar)."""
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(apply(model, method.config)) if method.config is not None else None
        listener: StepListener | None = handle
        if desc is not None:
            listener = _ProgressListener(handle, desc)
            stack.callback(listener.close)
        images = sampler(model, labels, num_steps=method.num_steps, guidance_scale=guidance_scale, seed=seed,
                         cfg_mode=cfg_mode, listener=listener)
        return images, handle.stats if handle is not None else None


def _flops(model: torch.nn.Module, method: DemoMethod, guidance_scale: float, sampler: Sampler, cfg_mode: str) -> int:
    labels = torch.tensor([0])  # FLOPs scale linearly with the batch: one image gives the exact ratio
    return count_flops(lambda: _generate(model, method, labels, 0, guidance_scale, None, sampler, cfg_mode))[1]


def _load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _spread(values: list[float]) -> float:
    """Relative range ``(max - min) / median`` of positive values (0.0 for a single value)."""
    return (max(values) - min(values)) / statistics.median(values)


def _time_rounds(model: torch.nn.Module, methods: list[DemoMethod], labels: torch.Tensor, seed: int,
                 guidance_scale: float, rounds: int, kept: dict[str, torch.Tensor],
                 progress: bool, sampler: Sampler = sample,
                 cfg_mode: str = "batch") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of every method in every round (``eval.timing.interleaved``: interleaved,
    each round starting one method later, garbage collection paused in each timed run); each run must reproduce
    ``kept``."""
    def candidate(method: DemoMethod) -> Callable[[], tuple[float, float]]:
        done = [0]

        def run() -> tuple[float, float]:
            done[0] += 1
            desc = f"sampling {method.label} (round {done[0]}/{rounds})" if progress else None
            (images, _), wall, cpu = timed(
                lambda: _generate(model, method, labels, seed, guidance_scale, desc, sampler, cfg_mode), pause_gc=True)
            if not torch.equal(images, kept[method.label]):
                raise RuntimeError(f"{method.label}: a timed run's images differ from the warm-up's (same seed); "
                                   "the timings would compare different work")
            return wall, cpu
        return run

    timings = interleaved({m.label: candidate(m) for m in methods}, rounds=rounds, rotate=True, self_timed=True)
    return ({k: list(t.wall_samples_s) for k, t in timings.items()},
            {k: list(t.cpu_samples_s) for k, t in timings.items()})


def _busy_reasons(load_before: float | None, load_after: float | None, threads: int,
                  spreads: dict[str, float]) -> list[str]:
    """Why this run's timings mean little (empty: they are fine), against ``LOAD_MARGIN`` and ``SPREAD_BOUND``."""
    reasons = []
    loads = [v for v in (load_before, load_after) if v is not None]
    if loads and max(loads) > threads + LOAD_MARGIN:
        reasons.append(f"1-min load average {max(loads):.2f} > {threads + LOAD_MARGIN:.1f} "
                       f"({threads} thread(s) + {LOAD_MARGIN})")
    worst = max(spreads, key=spreads.__getitem__)
    if spreads[worst] > SPREAD_BOUND:
        reasons.append(f"wall-time spread {spreads[worst]:.0%} ({worst}) > {SPREAD_BOUND:.0%}")
    return reasons


def run_demo(
    out_dir: str | Path = "out/demo",
    per_class: int = 8,
    num_steps: int = 50,
    guidance_scale: float = 1.5,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    methods: list[DemoMethod] | None = None,
    progress: bool = True,
    rounds: int = 3,
    reference: str = "dit",
    config: TaylorSeerConfig | CacheConfig | None = None,
) -> list[dict]:
    """Generate ``per_class`` images of each class per method; return one row of measurements per method.

    The first method is the reference. Timing as in the module docstring: one untimed warm-up per method, then
    ``rounds`` interleaved, rotated timed rounds. Each row has ``seconds`` (median wall s, ``time.perf_counter``),
    ``wall_samples_s``, ``spread`` (relative range of the wall times), ``speedup`` (reference median / median),
    ``speedup_spread`` (relative range of the per-round ratios), ``cpu_seconds``, ``cpu_samples_s``,
    ``cpu_speedup`` (median of the per-round CPU-time ratios reference / method) and ``cpu_speedup_spread``
    (their relative range), steadier than wall time on a shared machine, ``flops_speedup``,
    ``full_steps``, ``cache_mb``,
    the quality of the warm-up's images (``psnr`` dB and ``ssim`` versus the reference's images of the same seeds,
    ``class_acc``, ``fid_fmnist``, ``fid_to_full``), and the run's ``threads``, ``rounds``, ``load_before``,
    ``load_after`` (1-minute load averages, None where unavailable), ``busy`` and ``busy_reasons``.
    ``demo.png`` in ``out_dir`` shows the images side by side, each column captioned with speedup and PSNR.
    ``reference``: ``"dit"`` (the shipped DiT, DDIM, CFG as one doubled batch) or ``"flux"`` (the shipped
    flow-matching reference through diffusers' ``FluxPipeline``, Euler, true CFG as two calls per step).
    ``config``: one more row, that cache config at ``num_steps`` (``taylorseer demo --config``).
    """
    if reference not in ("dit", "flux"):
        raise ValueError(f"reference must be one of ['dit', 'flux'], got {reference!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    sampler: Sampler = sample
    cfg_mode = "batch"
    if reference == "flux":
        from .eval.flux import FluxSampler
        from .models.flux_pipeline import load_flux_reference

        ref = load_flux_reference()
        model, sampler, cfg_mode = ref.transformer, FluxSampler(ref), "split"
        methods = flux_demo_methods(num_steps, ref.transformer) if methods is None else methods
    elif model is None:
        from .models.pretrained import load_reference

        model = load_reference()
    methods = demo_methods(num_steps, model) if methods is None else methods
    if config is not None:  # taylorseer demo --config: one more row
        methods = [*methods, DemoMethod(f"--config {config.name}", config, num_steps, f"--config\n{config.name}")]
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"method labels must be unique, got {[m.label for m in methods]}")
    labels = torch.arange(10).repeat_interleave(per_class)
    load_before = _load()
    rows, kept = _warm_up(model, methods, labels, seed, guidance_scale, progress, sampler, cfg_mode)
    times, cpu = _time_rounds(model, methods, labels, seed, guidance_scale, rounds, kept, progress, sampler,
                              cfg_mode)
    load_after = _load()
    _add_timing(rows, times, cpu, methods[0].label)
    threads = torch.get_num_threads()
    reasons = _busy_reasons(load_before, load_after, threads, {r["method"]: r["spread"] for r in rows})
    _add_quality(rows, kept, labels, progress)
    for row in rows:
        row.update(threads=threads, rounds=rounds, load_before=load_before, load_after=load_after,
                   busy=bool(reasons), busy_reasons=reasons)
    titles = [m.title or m.label for m in methods]
    titles = titles if len(set(titles)) == len(titles) else [m.label for m in methods]  # one panel per method
    side_by_side({t: kept[m.label] for t, m in zip(titles, methods, strict=True)}, Path(out_dir) / "demo.png",
                 ncol=per_class, captions=[_caption(row) for row in rows])
    return rows


def _warm_up(model: torch.nn.Module, methods: list[DemoMethod], labels: torch.Tensor, seed: int,
             guidance_scale: float, progress: bool, sampler: Sampler = sample,
             cfg_mode: str = "batch") -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The untimed first generation of each method (its images are the ones measured and shown) and its FLOPs."""
    rows: list[dict] = []
    kept: dict[str, torch.Tensor] = {}
    for method in methods:
        desc = f"sampling {method.label} (warm-up)" if progress else None
        kept[method.label], stats = _generate(model, method, labels, seed, guidance_scale, desc, sampler, cfg_mode)
        rows.append({"method": method.label, "stats": stats,
                     "flops": _flops(model, method, guidance_scale, sampler, cfg_mode),
                     "full_steps": stats.steps_full if stats else method.num_steps})
    return rows, kept


def _add_quality(rows: list[dict], kept: dict[str, torch.Tensor], labels: torch.Tensor, progress: bool) -> None:
    """FLOPs speedup, cache size and the quality metrics of each method's kept images, versus the first row's."""
    from .eval import metrics  # needs the shipped classifier assets

    full_images = kept[rows[0]["method"]]
    bar = tqdm(rows, desc="metrics", leave=False, disable=not progress)
    for row in bar:
        bar.set_postfix_str(row["method"])
        images = kept[row["method"]]
        row["flops_speedup"] = rows[0]["flops"] / row["flops"]
        row["psnr"] = metrics.psnr(images, full_images)
        row["ssim"] = metrics.ssim(images, full_images)
        row["class_acc"] = metrics.class_accuracy(images, labels)
        row["fid_fmnist"] = metrics.fid_fmnist(images)
        row["fid_to_full"] = metrics.fid_between(images, full_images)
        stats = row.pop("stats")
        row["cache_mb"] = stats.peak_cache_bytes / 2**20 if stats is not None else 0.0


def _add_timing(rows: list[dict], times: dict[str, list[float]], cpu: dict[str, list[float]],
                reference: str) -> None:
    """Median, spread and speedup into each row: from wall time the ratio of medians and the spread of the
    per-round ratios, from process CPU time of the same rounds the median of the per-round ratios and their
    spread."""
    ref, ref_cpu = times[reference], cpu[reference]
    for row in rows:
        samples, cpu_samples = times[row["method"]], cpu[row["method"]]
        ratios = paired_ratios(ref, samples)  # same round: measured back to back
        cpu_ratios = paired_ratios(ref_cpu, cpu_samples)
        row.update(seconds=statistics.median(samples), wall_samples_s=samples, spread=_spread(samples),
                   speedup=statistics.median(ref) / statistics.median(samples), speedup_spread=_spread(ratios),
                   cpu_seconds=statistics.median(cpu_samples), cpu_samples_s=cpu_samples,
                   cpu_speedup=statistics.median(cpu_ratios), cpu_speedup_spread=_spread(cpu_ratios))


def paired_ratios(reference: list[float], method: list[float]) -> list[float]:
    """Each round's reference seconds over the method's seconds in the same round (> 1: the method is faster).

    Example:
        >>> paired_ratios([10.0, 20.0, 12.0], [2.0, 5.0, 2.0])
        [5.0, 4.0, 6.0]
    """
    return [a / b for a, b in zip(reference, method, strict=True)]


def _caption(row: dict) -> str:
    """The picture's caption of one row: measured speedup and PSNR versus the reference."""
    psnr = "reference" if row["psnr"] == float("inf") else f"{row['psnr']:.1f} dB"
    return f"{row['speedup']:.1f}x, {psnr}"


def format_table(rows: list[dict]) -> str:
    """The demo rows as a Markdown table, then a line on how they were timed and, for a busy run, a warning."""
    columns = ("method", "full steps", "wall s", "wall spread", "speedup", "speedup spread", "CPU-time speedup",
               "CPU speedup spread", "FLOPs speedup", "PSNR dB", "SSIM", "class acc", "FID-FMNIST", "FID to full",
               "cache MB")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for i, r in enumerate(rows):
        psnr = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
        speedup_spread = "-" if i == 0 else f"{r['speedup_spread']:.0%}"
        cpu_spread = "-" if i == 0 else f"{r['cpu_speedup_spread']:.0%}"
        lines.append(f"| {r['method']} | {r['full_steps']} | {r['seconds']:.1f} | {r['spread']:.0%} | "
                     f"{r['speedup']:.2f}x | {speedup_spread} | {r['cpu_speedup']:.2f}x | {cpu_spread} | "
                     f"{r['flops_speedup']:.2f}x | {psnr} | "
                     f"{r['ssim']:.4f} | {r['class_acc']:.1%} | {r['fid_fmnist']:.2f} | {r['fid_to_full']:.3f} | "
                     f"{r['cache_mb']:.1f} |")
    run = rows[0]
    loads = ("unavailable" if run["load_before"] is None
             else f"{run['load_before']:.2f} before, {run['load_after']:.2f} after")
    lines.append(f"\ntiming: median of {run['rounds']} interleaved rounds (order rotated each round, garbage "
                 f"collector paused) after one untimed warm-up per method; speedup: ratio of the medians; "
                 f"spread = (max - min) / median over the rounds; {run['threads']} thread(s); 1-min load "
                 f"average {loads}; CPU-time speedup: the median of the same rounds' ratios of process CPU time "
                 f"(steadier than wall time when other jobs share the machine)")
    if run["busy"]:
        lines.append(f"WARNING: machine busy, these speedups mean little: {'; '.join(run['busy_reasons'])}. "
                     "Rerun on an idle machine (or with more --rounds).")
    return "\n".join(lines)
