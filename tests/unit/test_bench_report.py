"""The measuring instrument end to end on the tiny random DiT: quick bench -> JSONL records -> report + plots.

No timing is asserted: only the schema, counted facts (steps, FLOPs, cache bytes) and what the report draws.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from taylorseer.eval import bench
from taylorseer.eval.bench import Method, default_grid, run_bench
from taylorseer.eval.report import (
    check_p1,
    check_p2,
    check_p3,
    plot_memory,
    plot_pareto,
    plot_probe_errors,
    read_records,
    write_report,
)
from taylorseer.models.reference import build_reference

torch.set_num_threads(1)
NUM_STEPS, NUM_IMAGES = 10, 6
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
SCHEMA = {  # key -> allowed JSON types
    "schema": str, "run_id": str, "name": str, "family": str, "num_steps": int, "config": (dict, type(None)),
    "counterpart": (str, type(None)), "model": dict, "machine": dict, "num_images": int, "seed": int,
    "repeats": int, "group": int, "error": (str, type(None)), "reasons": dict, "flops": (int, type(None)),
    "flops_speedup": OPTIONAL_NUMBER, "steps_full": (int, type(None)), "steps_forecast": (int, type(None)),
    "wall_s": OPTIONAL_NUMBER, "wall_min_s": OPTIONAL_NUMBER, "wall_max_s": OPTIONAL_NUMBER,
    "wall_samples_s": (list, type(None)), "wall_full_s": OPTIONAL_NUMBER, "wall_speedup": OPTIONAL_NUMBER,
    "efficiency": OPTIONAL_NUMBER, "cpu_s": OPTIONAL_NUMBER, "peak_cache_bytes": (int, type(None)),
    "process_max_rss_mb": OPTIONAL_NUMBER, "psnr": OPTIONAL_NUMBER, "ssim": OPTIONAL_NUMBER,
    "class_accuracy": OPTIONAL_NUMBER, "fid_fmnist": OPTIONAL_NUMBER, "fid_to_full": OPTIONAL_NUMBER,
    "probe_path": (str, type(None)),
    "probe_images": (int, type(None)), "probe_errors": (list, type(None)), "samples_png": (str, type(None)),
    "bench_elapsed_s": NUMBER,
}
CACHED = ("fora", "taylorseer", "preset")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "records.jsonl"
    torch.manual_seed(0)
    model = build_reference("DiT-FM-T/4")
    records = run_bench(model, default_grid(quick=True, num_steps=NUM_STEPS), num_images=NUM_IMAGES, repeats=1,
                        out_path=out, progress=False, probe_images=4)
    return out, records


def _by_name(records):
    return {r["name"]: r for r in records}


def test_jsonl_holds_every_record_with_the_schema(bench_run):
    out, records = bench_run
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records
    assert sorted(r["name"] for r in records) == sorted(m.name for m in default_grid(quick=True, num_steps=NUM_STEPS))
    for rec in records:
        assert set(SCHEMA) <= set(rec), f"{rec['name']} lacks {set(SCHEMA) - set(rec)}"
        for key, types in SCHEMA.items():
            assert isinstance(rec[key], types), f"{rec['name']}.{key} = {rec[key]!r}"
        if rec["error"] is None:  # every null of a measured record says why
            missing = [k for k in SCHEMA if rec[k] is None and k not in ("error", "config", "counterpart")]
            assert all(k in rec["reasons"] for k in missing), (rec["name"], missing, rec["reasons"])
        assert {"cpu", "torch", "threads", "date", "allocator"} <= set(rec["machine"])
    assert len({frozenset(r) for r in records}) == 1  # one key set for all records


def test_reference_record_is_the_unit(bench_run):
    full = _by_name(bench_run[1])["full"]
    assert full["error"] is None and full["config"] is None
    assert full["psnr"] is None and "reference" in full["reasons"]["psnr"]
    assert full["ssim"] == pytest.approx(1.0) and full["fid_to_full"] == 0.0
    assert full["flops_speedup"] == 1.0 and full["wall_speedup"] == 1.0 and full["efficiency"] == 1.0
    assert (full["steps_full"], full["steps_forecast"], full["peak_cache_bytes"]) == (NUM_STEPS, 0, 0)
    assert full["wall_min_s"] <= full["wall_s"] <= full["wall_max_s"]


def test_cached_methods_skip_steps_and_flops(bench_run):
    records = _by_name(bench_run[1])
    cached = [r for r in records.values() if r["family"] in CACHED]
    assert len(cached) >= 3
    for rec in cached:
        assert rec["error"] is None, rec["error"]
        assert rec["steps_full"] < NUM_STEPS and rec["steps_full"] + rec["steps_forecast"] == NUM_STEPS
        assert rec["flops_speedup"] > 1 and rec["peak_cache_bytes"] > 0
        assert math.isfinite(rec["psnr"]) and 0 < rec["ssim"] < 1 and rec["fid_to_full"] > 0
        forecast_steps = [e["step"] for e in rec["probe_errors"]]
        assert len(forecast_steps) == rec["steps_forecast"] and min(forecast_steps) >= 2  # warm-up 2 is computed
        assert all(e["rel_l2"] >= 0 for e in rec["probe_errors"])
        assert rec["samples_png"] and (bench_run[0].parent / rec["samples_png"]).stat().st_size > 0
    # Fewer sampler steps at the same number of model evaluations: exactly k/num_steps of the full FLOPs.
    ddim = [r for r in records.values() if r["family"] == "fewer-steps"]
    assert [r["steps_full"] for r in ddim] == sorted({r["steps_full"] for r in cached}, reverse=True)
    assert ddim[0]["flops_speedup"] == pytest.approx(NUM_STEPS / ddim[0]["steps_full"])
    # Forecasts are elementwise (uncounted): FORA and TaylorSeer on one schedule execute the same FLOPs,
    # and keep 1, 2, 3 factors per module for orders 0, 1, 2.
    fora, o1, o2 = records["fora-N3"], records["ts-O1-N3-divided"], records["ts-O2-N3-reference"]
    assert fora["flops"] == o1["flops"] == o2["flops"]
    assert (o1["peak_cache_bytes"], o2["peak_cache_bytes"]) == (2 * fora["peak_cache_bytes"],
                                                                 3 * fora["peak_cache_bytes"])


def test_peer_is_measured_or_records_its_error(bench_run):
    peer = next(r for r in bench_run[1] if r["family"] == "diffusers-peer")
    assert peer["counterpart"] == "ts-O1-N3-divided"
    if peer["error"] is None:
        assert peer["flops"] == _by_name(bench_run[1])[peer["counterpart"]]["flops"]  # same schedule and modules
    else:
        assert peer["wall_s"] is None and peer["reasons"]["wall_s"]


def test_a_failing_method_is_recorded_and_the_bench_goes_on(tmp_path, monkeypatch):
    def broken(model, method):
        raise ImportError("No module named 'peers'")

    monkeypatch.setitem(bench.INSTALLERS, "diffusers-peer", broken)
    grid = default_grid(quick=True, num_steps=4)
    methods = [grid[0], next(m for m in grid if m.family == "diffusers-peer"), Method("ddim-2", "fewer-steps",
                                                                                       num_steps=2)]
    records = run_bench(build_reference("DiT-FM-T/4"), methods, num_images=2, repeats=1, out_path=tmp_path / "r.jsonl",
                        progress=False, save_samples=False)
    peer = records[1]
    assert peer["error"] == "ImportError: No module named 'peers'"
    assert peer["flops"] is None and peer["psnr"] is None and peer["reasons"]["psnr"]
    assert records[2]["error"] is None and records[2]["flops_speedup"] == pytest.approx(2.0)


def test_report_writes_tables_targets_and_plots(bench_run, tmp_path):
    out, records = bench_run
    path = write_report(out, tmp_path / "report")
    text = path.read_text()
    assert "| method | family | full steps / model calls | FLOPs speedup | wall speedup |" in text
    assert "## Timing detail" in text and all(f"| {r['name']} |" in text for r in records)
    assert all(f"{p}: " in text for p in ("P1", "P2", "P3"))
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("<table>") == 2 and "<img src='pareto_psnr.png'" in html
    for name in ("pareto_psnr.png", "pareto_fid.png", "forecast_error.png", "memory.png", "samples.png"):
        png = (tmp_path / "report" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 2000, name
        assert f"]({name})" in text


def test_plot_axes(bench_run):
    import matplotlib.pyplot as plt

    records = read_records(bench_run[0])
    fig = plot_pareto(records, "psnr")
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["FLOPs speedup (x)", "wall speedup (x)"]
    assert fig.axes[0].get_ylabel() == "PSNR vs full (dB)" and len(fig.axes[0].lines) >= 4
    assert plot_pareto(records, "fid_fmnist").axes[0].get_ylabel() == "FID-FMNIST (lower is better)"
    fig = plot_probe_errors(records)
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("sampling step", "relative L2 forecast error")
    assert [line.get_label()[:3] for line in fig.axes[0].lines] == ["O=0", "O=1", "O=2"]
    fig = plot_memory(records)
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("Taylor order O (0 = FORA)", "peak cache (MB)")
    plt.close("all")


def _rec(name, family, steps_full, **fields):
    config = {k: fields.pop(k) for k in ("interval", "max_order", "scheme", "abscissa") if k in fields}
    return {"name": name, "family": family, "steps_full": steps_full, "num_steps": 50, "error": None,
            "config": {"scheme": "divided", "abscissa": "step", **config} if config else None, **fields}


def test_targets_state_pass_and_miss_with_numbers():
    fast = _rec("ts-O1-N5", "taylorseer", 11, interval=5, max_order=1, wall_speedup=4.2, flops_speedup=4.5,
                efficiency=4.2 / 4.5)
    slow = _rec("ts-O2-N5", "taylorseer", 11, interval=5, max_order=2, wall_speedup=2.9, flops_speedup=4.5,
                efficiency=2.9 / 4.5)
    assert check_p1([fast]).status == "PASS"
    p1 = check_p1([fast, slow])
    assert p1.status == "MISS" and "0.64-0.93" in p1.summary and "1 below" in p1.summary
    rivals = [_rec("fora-N5", "fora", 11, interval=5, max_order=0, psnr=20.0, fid_fmnist=9.0),
              _rec("ddim-11", "fewer-steps", 11, psnr=22.0, fid_fmnist=8.0)]
    fast.update(psnr=25.0, fid_fmnist=7.5)
    slow.update(psnr=23.0, fid_fmnist=8.5)
    p3 = check_p3(rivals + [fast, slow])
    assert p3.status == "PASS" and "1 of 2 TaylorSeer configs beat both" in p3.details[0]
    fast.update(fid_fmnist=8.2)
    assert check_p3(rivals + [fast, slow]).status == "MISS"
    assert check_p3(rivals).status == "NOT MEASURED"


def test_p2_compares_the_peer_with_its_counterpart():
    ours = _rec("ts-O1-N5", "taylorseer", 11, psnr=30.0, wall_s=1.0, flops=10, group=2)
    peer = _rec("diffusers-O1-N5", "diffusers-peer", None, psnr=30.000001, wall_s=1.2, flops=10, group=2,
                counterpart="ts-O1-N5")
    p2 = check_p2([ours, peer])
    assert p2.status == "PASS" and "same rounds" in p2.details[0] and "same FLOPs" in p2.details[0]
    peer.update(wall_s=0.9)
    assert check_p2([ours, peer]).status == "MISS"
    peer.update(error="ImportError: no peers", wall_s=None, psnr=None)
    assert check_p2([ours, peer]).status == "NOT MEASURED"


def test_select_methods_keeps_full_and_names_unknown_methods():
    from taylorseer.eval.bench import default_grid, select_methods

    grid = default_grid(quick=True, num_steps=10)
    picked = select_methods(grid, ["fora-N3", "ddim-4"])
    assert [m.name for m in picked] == ["full", "ddim-4", "fora-N3"]
    with pytest.raises(ValueError, match=r"methods: unknown name\(s\) \['fora-N9'\]; allowed: .*fora-N3"):
        select_methods(grid, ["fora-N9"])


def test_full_grid_has_last_step_full_variants_with_a_ddim_of_equal_model_calls():
    from taylorseer.eval.bench import default_grid
    from taylorseer.policy.interval import IntervalPolicy

    by_name = {m.name: m for m in default_grid(num_steps=50)}
    for name in ("fora-N5-tail1", "ts-O1-N5-divided-tail1", "ts-O2-N5-divided-tail1"):
        cfg = by_name[name].config
        assert (cfg.interval, cfg.warmup_steps, cfg.tail_steps) == (5, 2, 1)
        plan = IntervalPolicy(cfg.interval, cfg.warmup_steps, cfg.tail_steps).plan(50)
        assert plan[-1] and not plan[-2]  # the last step computed, the one before it still forecast
        assert by_name[name].full_steps() == sum(plan) == 12
    assert by_name["fora-N5-tail1"].config.max_order == 0
    assert by_name["ddim-12"].num_steps == 12

def test_bench_cli_rejects_an_unknown_method_in_one_line(capsys):
    from taylorseer.cli import main

    assert main(["bench", "--methods", "no-such-method", "--out", "unused.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-method" in err and "fora-N5" in err
