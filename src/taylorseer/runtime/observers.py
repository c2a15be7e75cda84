"""Observers: statistics, FLOP counts and forecast-error probes. They watch the runtime; they never steer it.

The runtime tells its observers what happened (a target computed or forecast, a decision taken, a fallback);
observers keep counts. Everything here runs on the host, outside any compiled graph.

Example:
    >>> stats = CacheStats()
    >>> stats.to_dict()["steps_full"]
    0
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch


@dataclass
class CacheStats:
    """What happened in the current generation (reset by ``begin``). Counts are per model call and module.

    ``steps_full`` / ``steps_forecast``: steps (of the first CFG branch) computed in full / forecast.
    ``decisions``: one record per (step, branch): step, branch, compute, reason and any probe observation.
    ``fallbacks``: target calls the runtime computed in full although the step was forecast, by reason
    (``"no-factors"``, ``"shape"``, ``"non-finite"``).
    ``switched_off``: why the whole generation ran at full compute (too few steps to forecast; runtime/switch.py).
    """

    steps_full: int = 0
    steps_forecast: int = 0
    module_full: Counter = field(default_factory=Counter)
    module_forecast: Counter = field(default_factory=Counter)
    cache_bytes: int = 0
    peak_cache_bytes: int = 0
    probe_errors: list[dict] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    fallbacks: Counter = field(default_factory=Counter)
    flops_executed: int | None = None  # counted under handle.count_flops(); None when not measured
    flops_skipped: int | None = None  # FLOPs the forecast calls did not execute (each module's counted full cost)
    switched_off: str | None = None  # why this generation ran at full compute (runtime/switch.py), None if not

    @property
    def flops_speedup(self) -> float | None:
        """Full-compute FLOPs / executed FLOPs of the measured run (None when not measured)."""
        if not self.flops_executed:
            return None
        return (self.flops_executed + (self.flops_skipped or 0)) / self.flops_executed

    def pattern(self, branch: Any = 0) -> str:
        """The decisions of one branch as a string: ``F`` computed in full, ``f`` forecast."""
        return "".join("F" if d["compute"] else "f" for d in self.decisions if d["branch"] == branch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (module counters summed over modules)."""
        return {
            "steps_full": self.steps_full,
            "steps_forecast": self.steps_forecast,
            "module_calls_full": sum(self.module_full.values()),
            "module_calls_forecast": sum(self.module_forecast.values()),
            "cache_bytes": self.cache_bytes,
            "peak_cache_bytes": self.peak_cache_bytes,
            "fallbacks": dict(self.fallbacks),
            "flops_executed": self.flops_executed,
            "flops_skipped": self.flops_skipped,
            "flops_speedup": self.flops_speedup,
            "switched_off": self.switched_off,
        }


class StatsObserver:
    """Keeps ``CacheStats`` from the runtime's events. The per-branch lists of target calls are kept as they come
    (one list append per branch) and counted into ``module_full`` / ``module_forecast`` when ``stats`` is read."""

    def __init__(self) -> None:
        self._stats = CacheStats()
        self._calls: list[list[str]] = []  # computed and forecast paths of each branch, alternately, not yet counted
        self._last_step: Any = None  # the step of the latest decision record

    @property
    def stats(self) -> CacheStats:
        """The statistics of the current generation (the target calls so far counted in)."""
        if self._calls:
            self._count()
        return self._stats

    def _count(self) -> None:
        calls, self._calls = self._calls, []
        self._stats.module_full.update(chain.from_iterable(calls[0::2]))
        self._stats.module_forecast.update(chain.from_iterable(calls[1::2]))

    def reset(self) -> None:
        self._stats = CacheStats()
        self._calls = []
        self._last_step = None

    def on_branch(self, computed: list[str], forecast: list[str], record: dict[str, Any] | None) -> None:
        """A (step, branch) closed: its target calls (paths computed, paths forecast; lists the caller no longer
        changes), counted once, when ``stats`` is next read; and its decision ``record`` (None: none), appended to
        ``decisions``, the first record of its step counted in ``steps_full`` / ``steps_forecast``."""
        self._calls += (computed, forecast)
        if len(self._calls) > 4096:  # a long generation whose stats nobody reads: count now, keep memory flat
            self._count()
        if record is not None:
            stats = self._stats
            stats.decisions.append(record)
            step = record["step"]
            if step != self._last_step:  # the first record of its step counts the step (steps are told in order)
                self._last_step = step
                if record["compute"]:
                    stats.steps_full += 1
                else:
                    stats.steps_forecast += 1

    def on_fallback(self, reason: str) -> None:
        self._stats.fallbacks[reason] += 1

    def on_probe(self, path: str, step: int | None, sums: tuple[float, float]) -> None:
        """A measured forecast (``handle.probe``): relative L2 error from (squared error, squared norm)."""
        self._stats.probe_errors.append({"path": path, "step": step, "rel_l2": (sums[0] / max(sums[1], 1e-30)) ** 0.5})

    def on_bytes(self, nbytes: int, peak: int) -> None:
        stats = self._stats
        stats.cache_bytes = nbytes
        if peak > stats.peak_cache_bytes:
            stats.peak_cache_bytes = peak


class FlopObserver:
    """Under ``torch.utils.flop_counter``: each target's cost at its latest full call, summed over the forecast
    calls that skipped it (``stats.flops_skipped``)."""

    def __init__(self, counter: Any, observer: StatsObserver):
        self.counter = counter
        self.observer = observer  # its stats are replaced at every begin(): read them when needed
        self.module_flops: dict[str, int] = {}
        self._before: dict[str, int] = {}

    def total(self) -> int:
        return int(self.counter.get_total_flops())

    def start(self, path: str) -> None:
        self._before[path] = self.total()

    def computed(self, path: str) -> None:
        if path in self._before:
            self.module_flops[path] = self.total() - self._before.pop(path)

    def skipped(self, path: str) -> None:
        stats = self.observer.stats
        stats.flops_skipped = (stats.flops_skipped or 0) + self.module_flops.get(path, 0)


def relative_l2(predicted: list[torch.Tensor], true: list[torch.Tensor]) -> tuple[float, float]:
    """(sum of squared differences, sum of squares of ``true``) over tensor pairs, in float64 on the host."""
    num = sum(float((p - t).double().pow(2).sum()) for p, t in zip(predicted, true))
    den = sum(float(t.double().pow(2).sum()) for t in true)
    return num, den


def relative_l1_change(current: list[torch.Tensor], previous: list[torch.Tensor] | None) -> tuple[float, float]:
    """(sum |current - previous|, sum |previous|) over tensor pairs; (inf, 1) without a previous output."""
    if previous is None or any(c.shape != p.shape for c, p in zip(current, previous)):
        return float("inf"), 1.0
    num = sum(float((c - p).double().abs().sum()) for c, p in zip(current, previous))
    den = sum(float(p.double().abs().sum()) for p in previous)
    return num, den


def squared_error_sums(predicted: list[torch.Tensor], true: list[torch.Tensor]) -> tuple[Any, Any]:
    """``relative_l2``'s two sums as float64 tensors on the device (no host read; 0.0 for no tensors)."""
    num: Any = 0.0
    den: Any = 0.0
    for p, t in zip(predicted, true):
        num = num + (p - t).double().pow(2).sum()
        den = den + t.double().pow(2).sum()
    return num, den


def l1_change_sums(current: list[torch.Tensor], previous: list[torch.Tensor] | None) -> tuple[Any, Any]:
    """``relative_l1_change``'s two sums as float64 tensors on the device ((inf, 1) without a previous output)."""
    if previous is None or any(c.shape != p.shape for c, p in zip(current, previous)):
        return float("inf"), 1.0
    num: Any = 0.0
    den: Any = 0.0
    for c, p in zip(current, previous):
        num = num + (c - p).double().abs().sum()
        den = den + p.double().abs().sum()
    return num, den
