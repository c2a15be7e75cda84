"""CLI: one-line errors and exit codes; demo rows, interleaved timing, busy warning and picture on a tiny model."""

import pytest
import torch

import taylorseer.demo as demo
from taylorseer import TaylorSeerConfig
from taylorseer.cli import main
from taylorseer.demo import DemoMethod, format_table, run_demo
from taylorseer.eval import timing


def test_plan_prints_pattern(capsys):
    assert main(["plan", "--preset", "paper_dit", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "FFfffFfffF" in out and "4 full / 10 steps" in out


@pytest.mark.parametrize(
    "argv, field",
    [(["plan", "--interval", "0"], "interval"), (["plan", "--order", "-1"], "max_order"),
     (["plan", "--steps", "0"], "num_steps")],
)
def test_bad_values_exit_2_with_one_line(capsys, argv, field):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err


def test_unknown_choice_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--scheme", "newton"])
    assert info.value.code == 2 and "divided" in capsys.readouterr().err


def _methods():
    return [DemoMethod("full", None, 6),
            DemoMethod("ts", TaylorSeerConfig(interval=2, warmup_steps=1, max_order=1), 6),
            DemoMethod("ddim-4", None, 4)]


@pytest.mark.slow
def test_demo_rows_and_picture(tmp_path, tiny_dit):
    methods = _methods()
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=methods, progress=False, rounds=2)
    assert [r["method"] for r in rows] == ["full", "ts", "ddim-4"]
    full, ts, ddim = rows
    assert full["psnr"] == float("inf") and full["flops_speedup"] == 1.0
    assert ts["full_steps"] == methods[1].config.full_steps(6) == 3 and ts["flops_speedup"] > 1.0 and ts["cache_mb"] > 0
    assert ddim["full_steps"] == 4 and ddim["flops_speedup"] == pytest.approx(1.5)
    assert all(0 <= r["class_acc"] <= 1 and r["fid_fmnist"] >= 0 for r in rows)
    assert full["fid_to_full"] == 0.0 and ts["fid_to_full"] > 0 and ddim["fid_to_full"] > 0
    assert all(len(r["wall_samples_s"]) == 2 and r["seconds"] == pytest.approx(sum(r["wall_samples_s"]) / 2)
               for r in rows)  # the median of two rounds
    assert full["speedup"] == 1.0 and full["speedup_spread"] == 0.0 and all(r["spread"] >= 0 for r in rows)
    assert all(r["rounds"] == 2 and r["busy"] == bool(r["busy_reasons"]) for r in rows)
    assert (tmp_path / "demo.png").stat().st_size > 1000
    table = format_table(rows)
    assert "| wall s | wall spread | speedup | speedup spread |" in table and "| ts | 3 |" in table
    assert table.splitlines()[2].startswith("| full | 6 |") and "| 1.00x | - |" in table.splitlines()[2]
    assert "median of 2 interleaved rounds" in table


class _Clock:
    """A stand-in for the ``time`` module in ``taylorseer.eval.timing`` (which times the demo): ``perf_counter``
    reads a time that only the recorded generations advance, by ``durations[label]`` (a list: one value per call,
    the last one repeated)."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, durations, {}

    def perf_counter(self):
        return self.now

    def process_time(self):  # CPU time advances with the same recorded durations (one busy process)
        return self.now

    def advance(self, label):
        k = self.calls.get(label, 0)
        self.calls[label] = k + 1
        seq = self.durations[label]
        self.now += seq[min(k, len(seq) - 1)]


@pytest.fixture
def recorded(monkeypatch):
    """Record every demo generation as (label, number of images) and drive the demo's clock with ``_Clock``."""
    calls, state = [], {}

    def install(durations, load=0.0):
        clock = _Clock(durations)
        real = demo._generate

        def generate(model, method, labels, seed, guidance_scale, desc, *sampling):
            calls.append((method.label, len(labels)))
            out = real(model, method, labels, seed, guidance_scale, desc, *sampling)
            clock.advance(method.label)
            return state.get("tamper", lambda m, o: o)(method, out)

        monkeypatch.setattr(demo, "_generate", generate)
        monkeypatch.setattr(timing, "time", clock)  # the one timing helper (eval.timing) times the demo
        monkeypatch.setattr(demo.os, "getloadavg", lambda: (load, load, load))
        return calls, state

    return install


@pytest.mark.slow
def test_demo_warms_up_then_times_rounds_interleaved_and_rotated(tmp_path, tiny_dit, recorded):
    calls, _ = recorded({"full": [4.0], "ts": [2.0], "ddim-4": [1.0]})
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=2)
    n = 10
    assert calls == [("full", n), ("full", 1), ("ts", n), ("ts", 1), ("ddim-4", n), ("ddim-4", 1),  # warm-up, FLOPs
                     ("full", n), ("ts", n), ("ddim-4", n),  # round 1
                     ("ts", n), ("ddim-4", n), ("full", n)]  # round 2: rotated by one
    # the warm-up and FLOPs passes advanced the fake clock too, but only the timed rounds are measured
    assert [r["wall_samples_s"] for r in rows] == [[4.0, 4.0], [2.0, 2.0], [1.0, 1.0]]
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 4.0] and [r["spread"] for r in rows] == [0.0, 0.0, 0.0]
    assert [r["cpu_speedup"] for r in rows] == [1.0, 2.0, 4.0]  # from the same rounds' CPU times
    assert not rows[0]["busy"] and "WARNING" not in format_table(rows)


@pytest.mark.slow
def test_demo_spread_and_speedup_spread_are_relative_ranges(tmp_path, tiny_dit, recorded):
    # calls per label: warm-up, FLOPs, round 1, round 2
    recorded({"full": [4.0, 4.0, 4.0, 5.0], "ts": [2.0, 2.0, 2.0, 3.0], "ddim-4": [1.0]})
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=2)
    full, ts, ddim = rows
    assert full["seconds"] == 4.5 and full["spread"] == pytest.approx(1 / 4.5)
    assert ts["seconds"] == 2.5 and ts["speedup"] == pytest.approx(4.5 / 2.5)
    assert ts["speedup_spread"] == pytest.approx((2.0 - 5 / 3) / (11 / 6))  # per-round ratios 4/2 and 5/3
    assert ddim["speedup_spread"] == pytest.approx(1 / 4.5)  # ratios 4 and 5, median 4.5
    table = format_table(rows)
    assert "| ts | 3 | 2.5 | 40% | 1.80x | 18% |" in table
    assert rows[0]["busy"] and "WARNING: machine busy" in table and "wall-time spread 40% (ts) > 15%" in table


@pytest.mark.slow
def test_demo_busy_warning_from_the_load_average(tmp_path, tiny_dit, recorded):
    recorded({"full": [4.0], "ts": [2.0], "ddim-4": [1.0]}, load=9.0)
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=2)
    table = format_table(rows)
    assert rows[1]["busy"] and rows[1]["load_before"] == rows[1]["load_after"] == 9.0
    assert "1-min load average 9.00 > 1.5 (1 thread(s) + 0.5)" in table  # conftest: 1 torch thread
    assert "load average 9.00 before, 9.00 after" in table
    assert "spread" not in table.splitlines()[-1].split("busy")[1]  # the spreads were 0: only the load is named


@pytest.mark.slow
def test_demo_load_just_under_the_bound_is_not_busy(tmp_path, tiny_dit, recorded):
    recorded({"full": [4.0], "ts": [2.0], "ddim-4": [1.0]}, load=1.49)
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=2)
    assert not any(r["busy"] for r in rows) and "WARNING" not in format_table(rows)


@pytest.mark.slow
def test_demo_refuses_timed_runs_that_change_the_images(tmp_path, tiny_dit, recorded):
    _, state = recorded({"full": [4.0], "ts": [2.0], "ddim-4": [1.0]})
    seen = {}

    def tamper(method, out):  # the third generation of "ts" (its first timed run) comes out different
        seen[method.label] = seen.get(method.label, 0) + 1
        return (out[0] + 1e-3, out[1]) if method.label == "ts" and seen["ts"] == 3 else out

    state["tamper"] = tamper
    with pytest.raises(RuntimeError, match="ts: a timed run's images differ"):
        run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=2)


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_demo_rounds_must_be_a_positive_int(tmp_path, tiny_dit, rounds):
    with pytest.raises(ValueError, match="rounds"):
        run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=_methods(), progress=False, rounds=rounds)


def test_demo_cli_takes_rounds():
    from taylorseer.cli import build_parser

    assert build_parser().parse_args(["demo"]).rounds == 3
    assert build_parser().parse_args(["demo", "--rounds", "5"]).rounds == 5


def test_side_by_side_columns_neither_overlap_nor_leave_the_sheet(tmp_path):
    import numpy as np
    from PIL import Image

    from taylorseer.eval.grid import side_by_side

    titles = ["TaylorSeer paper_dit (N=4, O=4)", "FORA reuse N=5 (O=0)", "DDIM\n11 steps (same model calls)"]
    images = torch.zeros(2, 1, 16, 16)  # one image per row: each grid is far narrower than its title
    path = side_by_side({t: images for t in titles}, tmp_path / "g.png", ncol=1,
                        captions=["1.0x, reference", "3.7x, 29.1 dB", "4.6x, 21.7 dB"])
    ink = (np.asarray(Image.open(path).convert("L")) < 250).any(axis=0)  # pixel columns holding anything
    assert not ink[:4].any() and not ink[-4:].any()  # a white margin at both edges: nothing clipped
    edges = np.diff(ink.astype(int))
    blank = np.flatnonzero(edges == 1)[1:] - np.flatnonzero(edges == -1)[:-1]  # widths of the white gaps in between
    assert (blank >= 8).sum() == 2  # three columns 8+ px apart (word spaces are narrower): no text meets a neighbour
    with pytest.raises(ValueError, match="captions"):
        side_by_side({t: images for t in titles}, tmp_path / "h.png", ncol=1, captions=["one"])


def test_train_reference_flags_override_the_shipped_recipe():
    import json
    from dataclasses import asdict

    from taylorseer.cli import build_parser
    from taylorseer.cli.shipped import train_config_from_args
    from taylorseer.models.checkpoint import load_tensors
    from taylorseer.models.pretrained import REFERENCE_PATH
    from taylorseer.models.train import TrainConfig

    default = train_config_from_args(build_parser().parse_args(["train-reference"]))
    assert default == TrainConfig()
    _, header = load_tensors(REFERENCE_PATH)
    shipped = json.loads(header["train_config"])
    ours = asdict(default)
    shipped.pop("out_dir"), ours.pop("out_dir")
    assert ours == shipped  # `taylorseer train-reference` with no flags retrains the shipped model
    given = train_config_from_args(build_parser().parse_args(
        ["train-reference", "--steps", "12", "--lr", "0.002", "--batch-size", "16", "--out-dir", "x"]))
    assert (given.steps, given.lr, given.batch_size, given.out_dir) == (12, 0.002, 16, "x")
    assert given.seed == default.seed


@pytest.mark.slow
def test_train_reference_export_records_the_recipe(tmp_path, monkeypatch):
    import taylorseer.models.pretrained as pretrained

    seen = {}
    monkeypatch.setattr(pretrained, "export_reference",
                        lambda path, notes=None: seen.update(path=path, notes=notes) or path)  # never the package
    assert main(["train-reference", "--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "4", "--export"]) == 0
    assert seen["path"] == tmp_path / "train_state.safetensors"
    assert seen["notes"]["batch_size"] == 4 and seen["notes"]["size"] == "DiT-FM-B/2-16"
    assert "lr" in seen["notes"] and "model_label_dropout" in seen["notes"]
