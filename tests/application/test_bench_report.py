"""The measuring instrument end to end on the tiny random DiT: quick bench -> JSONL records -> report + plots.

No timing is asserted: only the schema, counted facts (steps, FLOPs, cache bytes), the run markers (an interrupted
run is refused), and what the report draws (names, colours, markers, fronts, layout).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from taylorseer.eval import bench, records
from taylorseer.eval.bench import Method, default_grid, run_bench
from taylorseer.eval.report import (
    IncompleteRunError,
    PartialRecordWarning,
    check_p1,
    check_p2,
    check_p3,
    family_colour,
    method_label,
    pareto_front,
    plot_memory,
    plot_pareto,
    plot_probe_errors,
    read_records,
    read_run,
    variant_label,
    variant_marker,
    write_report,
)
from taylorseer.models.reference import build_reference

torch.set_num_threads(1)
NUM_STEPS, NUM_IMAGES = 10, 6
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
SCHEMA = {  # key -> allowed JSON types
    "kind": str, "schema": str, "run_id": str, "name": str, "family": str, "num_steps": int,
    "config": (dict, type(None)), "counterpart": (str, type(None)), "model": dict, "machine": dict,
    "num_images": int, "seed": int, "repeats": int, "group": int, "error": (str, type(None)), "reasons": dict,
    "flops": (int, type(None)),
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


@pytest.mark.slow
def test_jsonl_holds_every_record_with_the_schema(bench_run):
    out, records = bench_run
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    start, end = lines[0], lines[-1]
    assert lines[1:-1] == records and all(r["kind"] == "method" for r in records)
    assert start["kind"] == "run_start" and start["schema"] == bench.SCHEMA == "taylorseer.bench/2"
    assert start["methods_planned"] == [m.name for m in default_grid(quick=True, num_steps=NUM_STEPS)]
    assert {r["run_id"] for r in records} == {start["run_id"]}
    assert end == {"kind": "run_end", "run_id": start["run_id"], "complete": True, "methods": len(records)}
    assert read_run(out).status == "complete" and read_run(out).records == records
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


@pytest.mark.slow
def test_reference_record_is_the_unit(bench_run):
    full = _by_name(bench_run[1])["full"]
    assert full["error"] is None and full["config"] is None
    assert full["psnr"] is None and "reference" in full["reasons"]["psnr"]
    assert full["ssim"] == pytest.approx(1.0) and full["fid_to_full"] == 0.0
    assert full["flops_speedup"] == 1.0 and full["wall_speedup"] == 1.0 and full["efficiency"] == 1.0
    assert (full["steps_full"], full["steps_forecast"], full["peak_cache_bytes"]) == (NUM_STEPS, 0, 0)
    assert full["wall_min_s"] <= full["wall_s"] <= full["wall_max_s"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_peer_is_measured_or_records_its_error(bench_run):
    peer = next(r for r in bench_run[1] if r["family"] == "diffusers-peer")
    assert peer["counterpart"] == "ts-O1-N3-divided"
    if peer["error"] is None:
        # Same schedule and modules; our DiT block shortcut also skips the non-gate rows of each block's adaLN
        # modulation on forecast steps (a small matmul), which the peer computes.
        ours = _by_name(bench_run[1])[peer["counterpart"]]["flops"]
        assert 0 <= peer["flops"] - ours < 0.02 * peer["flops"]
    else:
        assert peer["wall_s"] is None and peer["reasons"]["wall_s"]


def test_a_failing_method_is_recorded_and_the_bench_goes_on(tmp_path, monkeypatch):
    def broken(model, method):
        raise ImportError("No module named 'peers'")

    monkeypatch.setitem(bench.INSTALLERS, "diffusers-peer", broken)
    grid = default_grid(quick=True, num_steps=4)
    methods = [grid[0], next(m for m in grid if m.family == "diffusers-peer"), Method("ddim-2", None, 2,
                                                                                       family="fewer-steps")]
    records = run_bench(build_reference("DiT-FM-T/4"), methods, num_images=2, repeats=1, out_path=tmp_path / "r.jsonl",
                        progress=False, save_samples=False)
    peer = records[1]
    assert peer["error"] == "ImportError: No module named 'peers'"
    assert peer["flops"] is None and peer["psnr"] is None and peer["reasons"]["psnr"]
    assert records[2]["error"] is None and records[2]["flops_speedup"] == pytest.approx(2.0)


@pytest.mark.slow
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


@pytest.mark.slow
def test_plot_axes(bench_run):
    import matplotlib.pyplot as plt

    records = read_records(bench_run[0])
    fig = plot_pareto(records, "psnr")
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["FLOPs speedup (x)", "wall speedup (x)"]
    assert fig.axes[0].get_ylabel() == "PSNR vs full (dB)" and len(fig.axes[0].lines) >= 4
    assert plot_pareto(records, "fid_fmnist").axes[0].get_ylabel() == "FID-FMNIST (lower is better)"
    fig = plot_probe_errors(records)
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("sampling step", "relative L2 forecast error")
    # one panel per order >= 1 of the quick grid (N=3), each against FORA on the same schedule
    assert [ax.get_title() for ax in fig.axes] == ["TaylorSeer O=1, N=3", "TaylorSeer O=2, N=3, reference scheme"]
    assert [[line.get_label() for line in ax.lines] for ax in fig.axes] == [
        ["FORA N=3", "TaylorSeer O=1, N=3"], ["FORA N=3", "TaylorSeer O=2, N=3, reference scheme"]]
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
        cfg = by_name[name].config.policy  # a CacheConfig's IntervalSchedule
        assert (cfg.interval, cfg.warmup_steps, cfg.tail_steps) == (5, 2, 1)
        plan = IntervalPolicy(cfg.interval, cfg.warmup_steps, cfg.tail_steps).plan(50)
        assert plan[-1] and not plan[-2]  # the last step computed, the one before it still forecast
        assert by_name[name].full_steps() == sum(plan) == 12
    assert by_name["fora-N5-tail1"].config.forecaster.max_order == 0
    assert by_name["ddim-12"].num_steps == 12

def test_bench_cli_rejects_an_unknown_method_in_one_line(capsys):
    from taylorseer.cli import main

    assert main(["bench", "--methods", "no-such-method", "--out", "unused.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-method" in err and "fora-N5" in err


#################################################################################
#                  Run markers: complete, interrupted, legacy runs              #
#################################################################################

def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _second_run(rows, run_id="20990101T000000Z-1-abcdef"):
    """The rows of a complete run relabelled as a later run (the same header and methods)."""
    return [{**r, "run_id": run_id} for r in rows]


@pytest.mark.slow
def test_an_interrupted_bench_leaves_no_run_end_and_report_refuses_it(tmp_path, monkeypatch, capsys):
    plain = bench.INSTALLERS["fewer-steps"]

    def interrupt_at_ddim3(model, method):
        if method.name == "ddim-3":
            raise KeyboardInterrupt  # what Ctrl-C or a kill between records looks like to the bench
        return plain(model, method)

    monkeypatch.setitem(bench.INSTALLERS, "fewer-steps", interrupt_at_ddim3)
    methods = [Method("full", None, 4), Method("ddim-2", None, 2, family="fewer-steps"),
               Method("ddim-3", None, 3, family="fewer-steps")]
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_bench(build_reference("DiT-FM-T/4"), methods, num_images=2, repeats=1, out_path=out, progress=False,
                  save_samples=False, group_size=1)  # groups: [full, ddim-2], [full, ddim-3]
    rows = _lines(out)
    assert [r["kind"] for r in rows] == ["run_start", "method", "method"]  # group 0 recorded, no run_end
    run_id = rows[0]["run_id"]
    with pytest.raises(IncompleteRunError, match=re.escape(f"{out}: the latest run {run_id} is incomplete")) as err:
        read_run(out)
    assert "2 of 3 planned methods recorded" in str(err.value) and "--allow-incomplete" in str(err.value)
    run = read_run(out, allow_incomplete=True)
    assert (run.status, run.complete, [r["name"] for r in run.records]) == ("incomplete", False, ["full", "ddim-2"])
    text = write_report(out, tmp_path / "report", allow_incomplete=True).read_text()
    assert text.startswith("# TaylorSeer benchmark: INCOMPLETE RUN\n")
    assert "- INCOMPLETE RUN: no run_end record: 2 of 3 planned methods" in text and "not recorded: ddim-3" in text

    from taylorseer.cli import main  # the command: one line naming the file and the run, exit status 2

    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and run_id in err and str(out) in err
    assert main(["report", str(out), "--out", str(tmp_path / "cli"), "--allow-incomplete"]) == 0


@pytest.mark.slow
def test_a_run_cut_after_a_few_records_is_refused_and_names_the_last_complete_run(bench_run, tmp_path):
    rows = _lines(bench_run[0])
    cut = _write(tmp_path / "cut.jsonl", rows + _second_run(rows)[:4])  # run_start + 3 methods, then killed
    with pytest.raises(IncompleteRunError) as err:
        write_report(cut, tmp_path / "report")
    message = str(err.value)
    assert str(cut) in message and "20990101T000000Z-1-abcdef" in message
    assert f"3 of {len(rows) - 2} planned methods recorded" in message
    assert f"the last complete run in the file is {rows[0]['run_id']}" in message
    assert not (tmp_path / "report").exists()  # nothing written for a refused run
    assert len(read_run(cut, run_id=rows[0]["run_id"]).records) == len(rows) - 2  # the earlier run still reports
    assert len(read_records(cut, allow_incomplete=True)) == 3


@pytest.mark.slow
def test_a_half_written_last_line_is_skipped_with_a_warning(bench_run, tmp_path):
    rows = _lines(bench_run[0])
    later = _second_run(rows)
    half = json.dumps(later[5])[:200]  # the bench was killed while writing its 5th method record
    path = _write(tmp_path / "half.jsonl", rows + later[:5], tail=half)
    with pytest.warns(PartialRecordWarning, match=r"half\.jsonl: skipping its last line \(no newline after it\)"):
        with pytest.raises(IncompleteRunError, match="4 of .* planned methods recorded"):
            read_run(path)
    with pytest.warns(PartialRecordWarning):
        assert len(read_run(path, allow_incomplete=True).records) == 4
    # The next run first ends the partial line, so its own records stay whole (the old line is skipped, warned).
    records.end_partial_line(path)
    for row in later:
        bench.append_record(path, {**row, "run_id": "20990102T000000Z-2-fedcba"})
    with pytest.warns(PartialRecordWarning, match=rf"line {len(rows) + 6}"):
        run = read_run(path)
    assert run.run_id == "20990102T000000Z-2-fedcba" and run.status == "complete"


@pytest.mark.slow
def test_a_run_end_that_miscounts_is_incomplete(bench_run, tmp_path):
    rows = _lines(bench_run[0])
    path = _write(tmp_path / "short.jsonl", rows[:3] + rows[-1:])  # records lost, the run_end kept
    with pytest.raises(IncompleteRunError, match=f"says {len(rows) - 2} methods .* holds 2"):
        read_run(path)


@pytest.mark.slow
def test_legacy_records_without_markers_still_report(bench_run, tmp_path):
    methods = [{k: v for k, v in r.items() if k != "kind"} | {"schema": "taylorseer.bench/1"}
               for r in _lines(bench_run[0])[1:-1]]
    run = read_run(_write(tmp_path / "legacy.jsonl", methods))
    assert run.status == "legacy" and run.complete and len(run.records) == len(methods)
    text = write_report(tmp_path / "legacy.jsonl", tmp_path / "report").read_text()
    assert text.startswith("# TaylorSeer benchmark\n") and "- Completeness: not recorded" in text
    no_ids = [{k: v for k, v in r.items() if k != "run_id"} for r in methods]
    assert read_run(_write(tmp_path / "no_ids.jsonl", no_ids)).status == "legacy"


def test_the_committed_results_are_legacy_runs_that_report():
    from pathlib import Path

    results = Path(__file__).parents[2] / "docs" / "results" / "archive" / "2026-11-24"  # archived, still readable
    assert [(r.status, len(r.records)) for r in map(read_run, (results / "records.jsonl",
                                                                results / "p3_200" / "records.jsonl"))] == [
        ("legacy", 68), ("legacy", 7)]


#################################################################################
#                      Names, colours, markers, fronts, layout                  #
#################################################################################

def _grid_records(num_steps=50):
    """The grid's methods as the bench records them (its ``to_dict`` and ``knobs``), before any measurement."""
    return [{**m.to_dict(), "knobs": m.knobs(), "error": None} for m in default_grid(num_steps=num_steps)]


def test_method_labels_are_human_and_unique_over_the_grid():
    labels = {r["name"]: method_label(r) for r in _grid_records()}
    assert labels["ts-O2-N5-divided"] == "TaylorSeer O=2, N=5"
    assert labels["fora-N5"] == "FORA N=5" and labels["ddim-11"] == "DDIM 11 steps"
    assert labels["diffusers-O1-N5"] == "diffusers TaylorSeer O=1, N=5"
    assert labels["ts-O2-N4-reference"] == "TaylorSeer O=2, N=4, reference scheme"
    assert labels["ts-O1-N5-divided-sigma"] == "TaylorSeer O=1, N=5, sigma abscissa"
    assert labels["fora-N5-tail1"] == "FORA N=5, last step full"
    assert labels["paper_dit"] == "paper_dit preset (O=4, N=4)" and labels["full"] == "full compute (50 steps)"
    assert len(set(labels.values())) == len(labels)
    assert all("((" not in label and "))" not in label for label in labels.values())


def test_unknown_families_get_a_readable_label_and_a_stable_colour():
    gate = {"family": "gate", "name": "gate-t0.1", "config": {"max_order": 2, "interval": 6}}
    new = {"family": "foo-cache", "name": "foo-cache-t0.2", "config": {"threshold": 0.2}}
    assert method_label(gate) == "TaylorSeer gate O=2, N=6" and variant_label(gate) == "TaylorSeer gate O=2"
    assert method_label(new) == "foo cache (foo-cache-t0.2)"
    assert family_colour("foo-cache") == family_colour("foo-cache") == variant_marker(new)["color"]
    known = {family_colour(f) for f in ("full", "fewer-steps", "fora", "taylorseer", "preset", "diffusers-peer",
                                        "gate", "budget", "adams", "hermite", "corrector", "firstblockcache",
                                        "magcache", "calibrated")}
    assert len(known) == 14  # one colour per family of the table


def test_each_variant_of_a_family_has_its_own_marker():
    by_variant = {}
    for rec in _grid_records():
        style = variant_marker(rec)
        assert style["color"] == family_colour(rec["family"])
        by_variant.setdefault((rec["family"], variant_label(rec)), (style["marker"], style["fillstyle"]))
    for family in {f for f, _ in by_variant}:
        markers = [m for (f, _), m in by_variant.items() if f == family]
        assert len(markers) == len(set(markers)), family
    assert by_variant[("taylorseer", "TaylorSeer O=2")] != by_variant[("taylorseer", "TaylorSeer O=1")]


def test_pareto_front_keeps_the_non_dominated_points():
    pts = [(2.0, 40.0), (3.0, 38.0), (3.0, 35.0), (2.5, 37.0), (4.0, 30.0), (1.0, 40.0)]
    assert pareto_front(pts) == [(2.0, 40.0), (3.0, 38.0), (4.0, 30.0)]
    assert pareto_front([(1.0, 9.0), (2.0, 8.0), (3.0, 8.5), (2.5, 8.0)], higher_is_better=False) == [
        (2.5, 8.0), (3.0, 8.5)]
    assert pareto_front([]) == []


def _synthetic():
    """Measured-looking records of the full grid at N=5 (step abscissa) with made-up but ordered values."""
    out = []
    for rec in _grid_records():
        order, interval = rec["knobs"].get("max_order"), rec["knobs"].get("interval")
        speed = 50 / (rec["num_steps"] if rec["config"] is None else 1 + 49 / (interval or 1))
        out.append({**rec, "flops_speedup": speed, "wall_speedup": 0.8 * speed, "num_images": 8,
                    "psnr": None if rec["family"] == "full" else 20 + 5 * (order or 0) - speed,
                    "fid_fmnist": 10 + speed / 10 - (order or 0) / 10,
                    "peak_cache_bytes": (order + 1) * 10**6 // {"block": 2, "output": 500}.get(
                        rec["knobs"].get("granularity"), 1) if order is not None else 0})
    return out


def test_figures_share_colours_and_draw_fronts_and_keep_legends_off_the_axes():
    import matplotlib.pyplot as plt

    records = _synthetic()
    for metric in ("psnr", "fid_fmnist"):
        fig = plot_pareto(records, metric)
        fig.canvas.draw()
        colours = {line.get_color() for ax in fig.axes for line in ax.lines}
        assert colours <= {family_colour(r["family"]) for r in records}
        fronts = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
        assert {line.get_color() for line in fronts} >= {family_colour(f) for f in ("fora", "taylorseer")}
        for line in fronts:  # a front runs to more speed and (psnr) less quality, never back
            xs, ys = line.get_xdata(), line.get_ydata()
            assert list(xs) == sorted(xs)
            assert list(ys) == (sorted(ys, reverse=True) if metric == "psnr" else sorted(ys))
        legend = fig.legends[0].get_window_extent()
        assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
        title = fig.get_suptitle()
        assert not re.search(r"\([^)]*\(", title) and "\n" in title  # no nested parentheses, wrapped
    fig = plot_memory(records)
    series = [line for line in fig.axes[0].lines if len(line.get_xdata()) > 1]
    assert len(series) == 4  # module, reference scheme, block, output: one line each, never joined
    for line in series:
        assert list(line.get_xdata()) == sorted(line.get_xdata()) and line.get_color() == family_colour("taylorseer")
    plt.close("all")


def test_plots_without_their_records_draw_nothing():
    """No probe errors and no cache records (e.g. a peers-only run): no placeholder figure, so the report (whose
    ``_save`` skips None) has no picture of it and no link to one."""
    records = [_rec("full", "full", 50), _rec("euler-8", "fewer-steps", 8)]
    assert plot_probe_errors(records) is None and plot_memory(records) is None
