"""`taylorseer demo`: the embedded DiT at full compute and with TaylorSeer, side by side, measured.

Everything runs on the CPU from files shipped in the package: the trained reference DiT, the evaluation
classifier and the Fashion-MNIST test statistics. Caching reaches the model through ``taylorseer.apply``, the
same path users take.

Timing: each method first runs once untimed (warm-up of the allocator and code paths; these are the images the
quality metrics and the picture use), then ``rounds`` timed rounds run every method once each, interleaved, in an
order rotated by one method per round (round 1: A B C, round 2: B C A, ...), so a burst of background load falls
on all methods alike. A method's wall time is its median over the rounds, its *spread* the relative range
``(max - min) / median`` of those times; a speedup is the ratio of the reference's median to the method's, and its
spread the relative range of the per-round ratios (each round's reference time over the method's time in that
round). Every timed generation must reproduce the warm-up's images bit for bit (checked with ``torch.equal``).

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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ._extras import require
from .api import apply
from .config import TaylorSeerConfig, preset
from .eval.grid import side_by_side
from .models.sampler import StepListener, sample
from .runtime.measure import count_flops

require("torchmetrics")  # the bench extra (eval.metrics): fail before sampling, with the pip command

LOAD_MARGIN = 0.5  # busy: 1-minute load average > threads + LOAD_MARGIN
SPREAD_BOUND = 0.15  # busy: some method's wall-time spread (max - min) / median > SPREAD_BOUND


@dataclass(frozen=True)
class DemoMethod:
    """One row of the demo: a cache config (None: no cache), the sampler's number of steps, and a short title for
    the picture (``"\\n"`` breaks the line; empty: the label)."""

    label: str
    config: TaylorSeerConfig | None
    num_steps: int
    title: str = ""


def demo_methods(num_steps: int = 50) -> list[DemoMethod]:
    """Full compute, the paper's DiT schedule, a faster schedule, and the baselines at the same model-call count."""
    # The fast schedule: N = 5 with DiT's warm-up of 2 (11 full steps of 50), in the library's default step units;
    # on the shipped model both orders beat reuse there (docs/design.md, "Abscissa on the embedded model").
    fast = TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, name="taylorseer-n5-o2")
    fast_o1 = fast.replace(max_order=1, name="taylorseer-n5-o1")
    fora = fast.replace(max_order=0, name="fora-n5")
    evals = fast.full_steps(num_steps)
    return [
        DemoMethod(f"full ({num_steps} steps)", None, num_steps, f"full\n{num_steps} steps"),
        DemoMethod("TaylorSeer paper_dit (N=4, O=4)", preset("paper_dit"), num_steps, "TaylorSeer (paper)\nN=4, O=4"),
        DemoMethod("TaylorSeer N=5, O=2", fast, num_steps, "TaylorSeer\nN=5, O=2"),
        DemoMethod("TaylorSeer N=5, O=1", fast_o1, num_steps, "TaylorSeer\nN=5, O=1"),
        DemoMethod("FORA reuse N=5 (O=0)", fora, num_steps, "FORA reuse\nN=5"),
        DemoMethod(f"DDIM {evals} steps (same model calls)", None, evals, f"DDIM\n{evals} steps"),
    ]


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


def _generate(model: torch.nn.Module, method: DemoMethod, labels: torch.Tensor, seed: int, guidance_scale: float,
              desc: str | None) -> tuple[torch.Tensor, Any]:
    """One generation of ``method``: images [N, 1, S, S] and the handle's stats (None without a cache).
    ``desc``: the progress bar's text (None: no bar)."""
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(apply(model, method.config)) if method.config is not None else None
        listener: StepListener | None = handle
        if desc is not None:
            listener = _ProgressListener(handle, desc)
            stack.callback(listener.close)
        images = sample(model, labels, num_steps=method.num_steps, guidance_scale=guidance_scale, seed=seed,
                        listener=listener)
        return images, handle.stats if handle is not None else None


def _flops(model: torch.nn.Module, method: DemoMethod, guidance_scale: float) -> int:
    labels = torch.tensor([0])  # FLOPs scale linearly with the batch: one image gives the exact ratio
    return count_flops(lambda: _generate(model, method, labels, 0, guidance_scale, None))[1]


def _load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _spread(values: list[float]) -> float:
    """Relative range ``(max - min) / median`` of positive values (0.0 for a single value)."""
    return (max(values) - min(values)) / statistics.median(values)


def rotated_order(methods: list[DemoMethod], rounds: int) -> list[list[DemoMethod]]:
    """The timing order: round r (from 0) runs every method once, starting at method ``r mod len(methods)``.

    Example:
        >>> [[m.label for m in r] for r in rotated_order([DemoMethod(s, None, 1) for s in "abc"], 2)]
        [['a', 'b', 'c'], ['b', 'c', 'a']]
    """
    n = len(methods)
    return [methods[r % n:] + methods[: r % n] for r in range(rounds)]


def _time_rounds(model: torch.nn.Module, methods: list[DemoMethod], labels: torch.Tensor, seed: int,
                 guidance_scale: float, rounds: int, kept: dict[str, torch.Tensor],
                 progress: bool) -> dict[str, list[float]]:
    """Wall seconds of every method in every round (interleaved, rotated); each run must reproduce ``kept``."""
    times: dict[str, list[float]] = {m.label: [] for m in methods}
    for r, order in enumerate(rotated_order(methods, rounds)):
        for method in order:
            desc = f"sampling {method.label} (round {r + 1}/{rounds})" if progress else None
            start = time.perf_counter()
            images, _ = _generate(model, method, labels, seed, guidance_scale, desc)
            times[method.label].append(time.perf_counter() - start)
            if not torch.equal(images, kept[method.label]):
                raise RuntimeError(f"{method.label}: a timed run's images differ from the warm-up's (same seed); "
                                   "the timings would compare different work")
    return times


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
) -> list[dict]:
    """Generate ``per_class`` images of each class per method; return one row of measurements per method.

    The first method is the reference. Timing as in the module docstring: one untimed warm-up per method, then
    ``rounds`` interleaved, rotated timed rounds. Each row has ``seconds`` (median wall s, ``time.perf_counter``),
    ``wall_samples_s``, ``spread`` (relative range of the wall times), ``speedup`` (reference median / median),
    ``speedup_spread`` (relative range of the per-round ratios), ``flops_speedup``, ``full_steps``, ``cache_mb``,
    the quality of the warm-up's images (``psnr`` dB and ``ssim`` versus the reference's images of the same seeds,
    ``class_acc``, ``fid_fmnist``, ``fid_to_full``), and the run's ``threads``, ``rounds``, ``load_before``,
    ``load_after`` (1-minute load averages, None where unavailable), ``busy`` and ``busy_reasons``.
    ``demo.png`` in ``out_dir`` shows the images side by side, each column captioned with speedup and PSNR.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if model is None:
        from .models.pretrained import load_reference

        model = load_reference()
    methods = demo_methods(num_steps) if methods is None else methods
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"method labels must be unique, got {[m.label for m in methods]}")
    labels = torch.arange(10).repeat_interleave(per_class)
    load_before = _load()
    rows, kept = _warm_up(model, methods, labels, seed, guidance_scale, progress)
    times = _time_rounds(model, methods, labels, seed, guidance_scale, rounds, kept, progress)
    load_after = _load()
    _add_timing(rows, times, methods[0].label)
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
             guidance_scale: float, progress: bool) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The untimed first generation of each method (its images are the ones measured and shown) and its FLOPs."""
    rows: list[dict] = []
    kept: dict[str, torch.Tensor] = {}
    for method in methods:
        desc = f"sampling {method.label} (warm-up)" if progress else None
        kept[method.label], stats = _generate(model, method, labels, seed, guidance_scale, desc)
        rows.append({"method": method.label, "stats": stats, "flops": _flops(model, method, guidance_scale),
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


def _add_timing(rows: list[dict], times: dict[str, list[float]], reference: str) -> None:
    """Median, spread and speedup (ratio of medians, and the spread of the per-round ratios) into each row."""
    ref = times[reference]
    for row in rows:
        samples = times[row["method"]]
        ratios = [a / b for a, b in zip(ref, samples, strict=True)]  # same round: measured back to back
        row.update(seconds=statistics.median(samples), wall_samples_s=samples, spread=_spread(samples),
                   speedup=statistics.median(ref) / statistics.median(samples), speedup_spread=_spread(ratios))


def _caption(row: dict) -> str:
    """The picture's caption of one row: measured speedup and PSNR versus the reference."""
    psnr = "reference" if row["psnr"] == float("inf") else f"{row['psnr']:.1f} dB"
    return f"{row['speedup']:.1f}x, {psnr}"


def format_table(rows: list[dict]) -> str:
    """The demo rows as a Markdown table, then a line on how they were timed and, for a busy run, a warning."""
    columns = ("method", "full steps", "wall s", "wall spread", "speedup", "speedup spread", "FLOPs speedup", "PSNR dB",
               "SSIM", "class acc", "FID-FMNIST", "FID to full", "cache MB")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for i, r in enumerate(rows):
        psnr = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
        speedup_spread = "-" if i == 0 else f"{r['speedup_spread']:.0%}"
        lines.append(f"| {r['method']} | {r['full_steps']} | {r['seconds']:.1f} | {r['spread']:.0%} | "
                     f"{r['speedup']:.2f}x | {speedup_spread} | {r['flops_speedup']:.2f}x | {psnr} | "
                     f"{r['ssim']:.4f} | {r['class_acc']:.1%} | {r['fid_fmnist']:.2f} | {r['fid_to_full']:.3f} | "
                     f"{r['cache_mb']:.1f} |")
    run = rows[0]
    loads = ("unavailable" if run["load_before"] is None
             else f"{run['load_before']:.2f} before, {run['load_after']:.2f} after")
    lines.append(f"\ntiming: median of {run['rounds']} interleaved rounds (order rotated each round) after one "
                 f"untimed warm-up per method; spread = (max - min) / median over the rounds; {run['threads']} "
                 f"thread(s); 1-min load average {loads}")
    if run["busy"]:
        lines.append(f"WARNING: machine busy, these speedups mean little: {'; '.join(run['busy_reasons'])}. "
                     "Rerun on an idle machine (or with more --rounds).")
    return "\n".join(lines)
