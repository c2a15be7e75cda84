"""The demo's CPU-time speedup: the median of per-round paired ratios, timed with the garbage collector paused, one
torch thread by default (issue 27: two runs' CPU-time speedups within 10%)."""

from __future__ import annotations

import gc

import pytest

import taylorseer.demo as demo
from taylorseer import TaylorSeerConfig
from taylorseer.demo import DemoMethod, format_table, paired_ratios, run_demo
from taylorseer.eval import timing


def _methods():
    return [DemoMethod("full", None, 6),
            DemoMethod("ts", TaylorSeerConfig(interval=2, warmup_steps=1, max_order=1), 6)]


class _Clocks:
    """Stand-in for ``time`` in ``taylorseer.eval.timing`` (which times the demo): wall and CPU clocks advanced
    only by the recorded generations, each by its own list of durations per label (one value per call: warm-up,
    FLOPs pass, then the rounds)."""

    def __init__(self, wall, cpu):
        self.wall = self.cpu = 0.0
        self.durations = {"wall": wall, "cpu": cpu}
        self.calls: dict[str, int] = {}

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu

    def advance(self, label):
        k = self.calls.get(label, 0)
        self.calls[label] = k + 1
        self.wall += self.durations["wall"][label][k]
        self.cpu += self.durations["cpu"][label][k]


@pytest.fixture
def clocked(monkeypatch):
    gc_during: list[bool] = []

    def install(wall, cpu):
        clocks = _Clocks(wall, cpu)
        real = demo._generate

        def generate(model, method, labels, seed, guidance_scale, desc, *sampling):
            out = real(model, method, labels, seed, guidance_scale, desc, *sampling)
            gc_during.append(gc.isenabled())
            clocks.advance(method.label)
            return out

        monkeypatch.setattr(demo, "_generate", generate)
        monkeypatch.setattr(timing, "time", clocks)  # the one timing helper (eval.timing) times the demo
        monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        return gc_during

    return install


@pytest.mark.slow
def test_cpu_speedup_is_the_median_of_the_per_round_ratios(tmp_path, tiny_dit, clocked):
    # per label: warm-up, FLOPs pass, rounds 1-3 (the wall clock is steady, the CPU clock is not)
    wall = {"full": [1.0] * 5, "ts": [1.0] * 5}
    cpu = {"full": [1.0, 1.0, 10.0, 30.0, 12.0], "ts": [1.0, 1.0, 2.0, 5.0, 4.0]}
    clocked(wall, cpu)
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=3)
    full, ts = rows
    assert ts["cpu_samples_s"] == [2.0, 5.0, 4.0] and full["cpu_samples_s"] == [10.0, 30.0, 12.0]
    assert ts["cpu_speedup"] == pytest.approx(5.0)  # ratios 10/2, 30/5, 12/4 = 5, 6, 3: median 5
    assert ts["cpu_speedup_spread"] == pytest.approx((6 - 3) / 5)
    assert full["cpu_speedup"] == 1.0 and full["cpu_speedup_spread"] == 0.0
    assert ts["cpu_seconds"] == 4.0  # the median CPU seconds themselves are unchanged
    line = next(x for x in format_table(rows).splitlines() if x.startswith("| ts |"))
    assert "| 5.00x | 60% |" in line


@pytest.mark.slow
def test_timed_runs_have_the_garbage_collector_paused_and_it_is_restored(tmp_path, tiny_dit, clocked):
    gc_during = clocked({"full": [1.0] * 4, "ts": [1.0] * 4}, {"full": [1.0] * 4, "ts": [1.0] * 4})
    assert gc.isenabled()
    run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=2)
    # warm-up and FLOPs pass of each method (collector on), then 2 rounds x 2 methods timed (paused)
    assert gc_during == [True, True, True, True, False, False, False, False]
    assert gc.isenabled()


def test_paired_ratios_are_per_round():
    assert paired_ratios([10.0, 20.0], [5.0, 4.0]) == [2.0, 5.0]
    with pytest.raises(ValueError):
        paired_ratios([1.0, 2.0], [1.0])


def test_timed_pauses_garbage_collection_only_when_asked():
    """The demo's runs pause the collector (pause_gc=True); the bench's many short runs leave it alone (a collection
    costs about 0.2 s in a process holding torch and diffusers); it is on again afterwards, even after an error."""
    seen = []
    assert timing.timed(lambda: seen.append(gc.isenabled()) or 7, pause_gc=True)[0] == 7
    timing.timed(lambda: seen.append(gc.isenabled()))
    with pytest.raises(ZeroDivisionError):
        timing.timed(lambda: 1 / 0, pause_gc=True)
    assert seen == [False, True] and gc.isenabled()
