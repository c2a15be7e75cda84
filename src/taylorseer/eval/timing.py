"""One timing helper for every command that compares wall times: warm-up, interleaved rotated rounds, medians.

On a shared, noisy machine a method timed alone after another measures the machine's load as much as the method.
``interleaved`` runs every candidate once per round (A, B, C, A, B, C, ...) so that a slow spell slows them
alike; ``rotate=True`` also starts each round one candidate later (A B C, B C A, C A B) so that no candidate is
always first after a pause. Each run is timed in wall seconds (``time.perf_counter``) and in this process's CPU
seconds (``time.process_time``: all threads of the process). ``Timing`` gives the median, minimum, maximum and
spread of each. The bench, the demo and generate read their speedups from these medians.

Example:
    >>> import time
    >>> times = interleaved({"a": lambda: time.sleep(0.001), "b": lambda: None}, rounds=3, warmup=1)
    >>> times["a"].runs, times["a"].wall_s > times["b"].wall_s
    (3, True)
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """The timed runs of one candidate: wall and process-CPU seconds per run, in run order.

    Example:
        >>> t = Timing((1.0, 3.0, 2.0), (0.5, 0.7, 0.6))
        >>> t.wall_s, t.spread, t.cpu_s
        (2.0, 1.0, 0.6)
    """

    wall_samples_s: tuple[float, ...]
    cpu_samples_s: tuple[float, ...]

    @property
    def runs(self) -> int:
        return len(self.wall_samples_s)

    @property
    def wall_s(self) -> float:
        """Median wall time (s)."""
        return statistics.median(self.wall_samples_s)

    @property
    def cpu_s(self) -> float:
        """Median process CPU time (s)."""
        return statistics.median(self.cpu_samples_s)

    @property
    def wall_min_s(self) -> float:
        return min(self.wall_samples_s)

    @property
    def wall_max_s(self) -> float:
        return max(self.wall_samples_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of the wall times: 0 for identical runs."""
        return (self.wall_max_s - self.wall_min_s) / self.wall_s if self.wall_s > 0 else 0.0

    def speedup_over(self, reference: Timing) -> float:
        """``reference``'s median wall time over this one's (> 1: this candidate is faster)."""
        return reference.wall_s / self.wall_s


def timed(run: Callable[[], Any], *, pause_gc: bool = False) -> tuple[Any, float, float]:
    """``run()``'s result, its wall seconds and this process's CPU seconds. ``pause_gc``: one collection first, then
    garbage collection paused while ``run`` runs, so that a collection set off by an earlier run's allocations is
    not charged to this one (the demo's few long runs; a collection costs about 0.2 s in a process holding torch
    and diffusers, too much for the bench's many short runs).

    Example:
        >>> timed(lambda: 7)[0]
        7
    """
    if pause_gc:
        gc.collect()
        gc.disable()
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = run()
        return result, time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        if pause_gc:
            gc.enable()


def interleaved(candidates: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 0, rotate: bool = False,
                on_run: Callable[[str], None] | None = None, self_timed: bool = False) -> dict[str, Timing]:
    """Time each of ``candidates`` (name -> a no-argument call) in ``rounds`` interleaved rounds, after ``warmup``
    untimed rounds; ``rotate``: round ``k`` starts at candidate ``k mod n``. ``on_run(name)`` is called before each
    timed run (a progress bar). ``self_timed``: each call times its own core and returns ``(wall_s, cpu_s)`` (the
    bench times the sampling, not the installation around it). Raises ``ValueError`` for ``rounds < 1`` or
    ``warmup < 0``.

    Example:
        >>> sorted(interleaved({"x": lambda: None, "y": lambda: None}, rounds=2))
        ['x', 'y']
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for k in range(rounds):
        shift = k % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            if on_run is not None:
                on_run(name)
            result, w, c = timed(candidates[name])
            if self_timed:
                w, c = result
            wall[name].append(w)
            cpu[name].append(c)
    return {n: Timing(tuple(wall[n]), tuple(cpu[n])) for n in names}
