"""Issue 21's target: a new forecaster and a new policy (``toy_decay.py``, ``toy_alternate.py``: one file and one
registration line each, no edit to the package) are built from JSON by every command's ``--config`` and appear in
the bench records and the report, with a family, label and colour derived from their types."""

from __future__ import annotations

import json

import pytest
import toy_alternate
import toy_decay

from taylorseer.cli import main
from taylorseer.eval.methods import Method, family_of
from taylorseer.eval.report import budget_rows, method_label, read_records, write_report
from taylorseer.parts import CacheConfig, load_config

STEPS = 6  # warm-up 2, then every other step: F F f F f F -> 4 full steps
CONFIG = {"policy": {"type": "AlternatePolicy", "warmup_steps": 2}, "forecaster": {"type": "DecayForecast",
                                                                                      "decay": 0.9},
          "name": "toy-alt-decay"}


def test_the_toy_parts_are_typed_methods_of_their_own_family():
    config = load_config(json.dumps(CONFIG))
    assert isinstance(config.policy, toy_alternate.AlternatePolicy)
    assert config.forecaster == toy_decay.DecayForecast(decay=0.9)
    assert CacheConfig.from_json(config.to_json()) == config
    method = Method("toy", config, STEPS)
    assert family_of(config) == "decay" == method.family  # no family hook: the forecaster type's name
    assert method.full_steps() == 4
    assert method.to_dict()["config"]["policy"]["type"] == "AlternatePolicy"
    with pytest.raises(TypeError, match="config must be a CacheConfig"):
        Method("toy", "decay", STEPS)  # type: ignore[arg-type]


@pytest.mark.slow
def test_bench_config_runs_the_toy_parts_and_the_report_shows_them(tmp_path, capsys):
    out = tmp_path / "bench" / "records.jsonl"
    code = main(["bench", "--steps", str(STEPS), "--images", "2", "--repeats", "1", "--methods", "full",
                 "--config", json.dumps(CONFIG), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = {r["name"]: r for r in read_records(out)}
    assert sorted(records) == ["full", "toy-alt-decay"]
    toy = records["toy-alt-decay"]
    assert toy["error"] is None and toy["family"] == "decay"
    assert toy["steps_full"] == 4 and toy["steps_forecast"] == 2
    assert toy["config"] == {**load_config(json.dumps(CONFIG)).to_dict()}
    assert toy["label"] == "decay (toy-alt-decay)" == method_label(toy)
    assert toy["flops_fraction"] < 1 and toy["psnr"] is not None
    report = write_report(out, tmp_path / "report").read_text()
    assert "| toy-alt-decay | decay | 4 / 6 |" in report
    row = budget_rows(list(records.values()), budgets=(1.0,))[0]  # at a budget of all compute
    assert row[1] == f"{toy['psnr']:.2f} (toy-alt-decay)"  # group "ours": a new family needs no edit of the report


def test_bench_config_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    bad = {**CONFIG, "forecaster": {"type": "NoSuchForecast"}}
    assert main(["bench", "--methods", "full", "--config", json.dumps(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "NoSuchForecast" in err and "DecayForecast" in err
    assert not out.exists()


@pytest.mark.slow
def test_sample_config_samples_the_toy_parts(tmp_path, capsys):
    out = tmp_path / "sample"
    code = main(["sample", "--config", json.dumps(CONFIG), "--num-samples", "2", "--batch-size", "2", "--steps",
                 str(STEPS), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    method = manifest["identity"]["method"]
    assert method["name"] == "toy-alt-decay" and method["family"] == "decay" and method["num_steps"] == STEPS
    assert load_config(method["config"]) == load_config(json.dumps(CONFIG))
    assert manifest["status"]["complete"] is True


def test_a_part_may_offer_a_label_and_grid_points_that_join_the_default_grid(monkeypatch):
    from taylorseer.eval.bench import default_grid, select_methods
    from taylorseer.eval.sample import resolve_method

    def grid(cls, num_steps):
        return [(f"toy-d{d}", CacheConfig(toy_alternate.AlternatePolicy(), cls(decay=d), name=f"toy-d{d}"))
                for d in (0.5, 0.9)]

    monkeypatch.setattr(toy_decay.DecayForecast, "grid", classmethod(grid), raising=False)
    monkeypatch.setattr(toy_decay.DecayForecast, "label", lambda self: f"decay {self.decay}", raising=False)
    names = [m.name for m in default_grid(num_steps=STEPS)]
    assert "toy-d0.5" in names and "toy-d0.9" in names and "ddim-4" in names  # DDIM at the toy's 4 full steps
    chosen = select_methods(default_grid(num_steps=STEPS), ["toy-d0.9"])
    assert [m.name for m in chosen] == ["full", "toy-d0.9"] and chosen[1].family == "decay"
    assert resolve_method("toy-d0.5", STEPS).config.forecaster.decay == 0.5  # sample --method by name
    record = {**chosen[1].to_dict(), "knobs": chosen[1].knobs()}
    assert method_label(record) == "decay (decay 0.9)"


@pytest.mark.slow
def test_plan_and_generate_config_take_the_toy_parts(tmp_path, capsys):
    assert main(["plan", "--config", json.dumps(CONFIG), "--steps", str(STEPS)]) == 0
    assert "FFfFfF" in capsys.readouterr().out  # the toy policy's plan: warm-up 2, then every other step
    out = tmp_path / "generate"
    code = main(["generate", "--model", "flux-tiny-random", "--prompt", "1", "--config", json.dumps(CONFIG),
                 "--steps", str(STEPS), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "toy-alt-decay" in printed and "(4 full / 2 forecast steps)" in printed
    assert (out / "001-taylorseer-0.png").is_file()


@pytest.mark.slow
def test_calibrate_config_searches_a_schedule_for_the_toy_forecaster_and_bench_runs_it(tmp_path, capsys):
    path = tmp_path / "toy.safetensors"
    code = main(["calibrate", "--budget", "4", "--steps", "8", "--images", "2", "--search-images", "2",
                 "--max-evals", "4", "--config", json.dumps(CONFIG), "--out", str(path)])
    assert code == 0, capsys.readouterr().err
    assert "searched for DecayForecast" in capsys.readouterr().out
    out = tmp_path / "records.jsonl"
    assert main(["bench", "--steps", "8", "--images", "2", "--repeats", "1", "--calibration", str(path),
                 "--methods", "cal-b4-s8", "--out", str(out)]) == 0
    toy = {r["name"]: r for r in read_records(out)}["cal-b4-s8"]
    assert toy["error"] is None and toy["family"] == "calibrated" and toy["steps_full"] == 4
    assert toy["config"]["forecaster"] == {"type": "DecayForecast", "decay": 0.9}
