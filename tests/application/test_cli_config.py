"""``--config JSON|FILE|NAME`` on plan, generate, calibrate and demo (issue 21): any registered parts -- here the
toy forecaster and policy of ``toy_decay.py`` / ``toy_alternate.py``, which the package does not know -- read by
``taylorseer.parts.load_config``; a bad config or a clash with other flags is one line naming the flag and the field,
before any model is loaded or any file written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import toy_alternate  # noqa: F401  (registers AlternatePolicy)
import toy_decay  # noqa: F401  (registers DecayForecast)
from PIL import Image
from test_diffusers import tiny_dit_pipeline

import taylorseer
import taylorseer.demo as demo
import taylorseer.generate as gen
import taylorseer.models.pretrained as pretrained
from taylorseer.cli import main
from taylorseer.demo import DemoMethod, run_demo
from taylorseer.parts import load_config

STEPS = 6  # AlternatePolicy(warmup_steps=2): F F f F f F -> 4 full steps
CONFIG = {"policy": {"type": "AlternatePolicy", "warmup_steps": 2},
          "forecaster": {"type": "DecayForecast", "decay": 0.9}, "name": "toy-alt-decay"}
TOY = json.dumps(CONFIG)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(argv: list[str], capsys, *named: str) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or a pipeline fails the test: refusals come first."""
    def reached(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gen, "load_pipeline", reached)
    monkeypatch.setattr(pretrained, "load_reference", reached)
    monkeypatch.setattr(demo, "run_demo", reached)


#################################################################################
#                                     plan                                      #
#################################################################################

def test_plan_config_prints_the_toy_parts_and_their_pattern(capsys):
    code, out, err = _run(["plan", "--steps", str(STEPS), "--config", TOY], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert json.loads(lines[0]) == load_config(CONFIG).to_dict()
    assert json.loads(lines[0])["policy"]["type"] == "AlternatePolicy"
    assert lines[1:] == ["FFfFfF", "4 full / 6 steps (F = computed, f = forecast)"]


def test_plan_config_by_name_or_file_prints_the_presets_pattern(tmp_path, capsys):
    code, by_preset, _ = _run(["plan", "--preset", "paper_flux", "--steps", "10"], capsys)
    assert code == 0 and by_preset.splitlines()[-2:] == ["FFFfffffFf", "4 full / 10 steps (F = computed, f = forecast)"]
    file = tmp_path / "flux.json"
    file.write_text(load_config("paper_flux").to_json())
    for spec in ("paper_flux", str(file)):
        code, out, err = _run(["plan", "--config", spec, "--steps", "10"], capsys)
        assert code == 0, err
        assert out.splitlines()[-2:] == by_preset.splitlines()[-2:]
        assert json.loads(out.splitlines()[0])["name"] == "paper_flux"


def test_plan_config_of_an_adaptive_policy_says_it_has_no_fixed_pattern(capsys):
    gate = {"policy": {"type": "ConfidenceGate"}, "forecaster": {"type": "TaylorForecast"}}
    code, out, err = _run(["plan", "--config", json.dumps(gate), "--steps", "8"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == "ConfidenceGate decides each step while generating: no fixed pattern"


def test_plan_model_with_config_says_which_config_is_used(capsys):
    code, out, err = _run(["plan", "--model", "FluxTransformer2DModel", "--config", TOY, "--steps", str(STEPS)],
                          capsys)
    assert code == 0, err
    assert "recommended preset: paper_flux" in out and "config used: toy-alt-decay (--config, given)" in out
    assert "FFfFfF" in out


#################################################################################
#                      refusals: one line, before any work                      #
#################################################################################

BAD_FIELD = json.dumps({**CONFIG, "policy": {"type": "IntervalSchedule", "interval": 0}})
UNKNOWN = json.dumps({**CONFIG, "forecaster": {"type": "NoSuchForecast"}})


@pytest.mark.parametrize("argv, named", [
    (["plan", "--config", BAD_FIELD], ("argument --config", "interval")),
    (["plan", "--config", UNKNOWN], ("argument --config", "NoSuchForecast", "DecayForecast")),
    (["plan", "--config", "paper_nope"], ("argument --config", "preset name", "paper_flux")),
    (["plan", "--config", "{not json"], ("argument --config", "not valid JSON")),
    (["plan", "--config", TOY, "--order", "2"], ("argument --config", "--order")),
    (["generate", "--model", "m", "--config", BAD_FIELD], ("argument --config", "interval")),
    (["generate", "--model", "m", "--config", TOY, "--preset", "fora"], ("argument --config", "--preset")),
    (["generate", "--model", "m", "--config", TOY, "--no-cache"], ("argument --no-cache", "--config")),
    (["generate", "--model", "m", "--config", TOY, "--calibration", "c.safetensors"],
     ("argument --calibration", "--config")),
    (["calibrate", "--budget", "3", "--steps", "6", "--config", UNKNOWN], ("argument --config", "NoSuchForecast")),
    (["calibrate", "--budget", "3", "--steps", "6", "--config", TOY, "--forecaster", "taylor2"],
     ("argument --config", "--forecaster taylor2")),
    (["calibrate", "--budget", "3", "--steps", "6", "--config", TOY, "--schedule", "0,2"],
     ("argument --config", "--schedule")),
    (["calibrate", "--budget", "3", "--steps", "6", "--config", TOY, "--search-images", "0"],
     ("argument --search-images", "--config")),
    (["calibrate", "--budget", "3", "--steps", "6", "--config", json.dumps({**CONFIG, "abscissa": "sigma"})],
     ("argument --config", "abscissa='sigma'")),
    (["calibrate", "--budget", "3", "--steps", "6", "--config",
      json.dumps({**CONFIG, "targets": {"granularity": "output"}}), "--granularity", "block"],
     ("argument --granularity", "'output'")),
    (["demo", "--config", BAD_FIELD], ("argument --config", "interval")),
])
def test_a_bad_config_or_a_clash_is_one_line_before_any_work(argv, named, tmp_path, capsys, nothing_loads):
    out = tmp_path / "out"
    target = {"plan": [], "calibrate": ["--out", str(out / "cal.safetensors")]}.get(argv[0], ["--out", str(out)])
    _refused([*argv, *target], capsys, *named)
    assert not out.exists()


#################################################################################
#                     generate, calibrate, demo: the toy parts run              #
#################################################################################

@pytest.fixture(scope="module")
def saved_dit(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-dit")
    tiny_dit_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.slow  # a generation / a calibration search / a demo run (tests/README.md)
def test_generate_config_runs_the_toy_parts_as_apply_does(saved_dit, tmp_path, capsys):
    import diffusers
    from diffusers.utils.pil_utils import numpy_to_pil

    out = tmp_path / "gen"
    code, printed, err = _run(["generate", "--model", str(saved_dit), "--prompt", "0", "--steps", str(STEPS),
                               "--config", TOY, "--no-baseline", "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "001.json").read_text())
    assert record["config"] == load_config(CONFIG).to_dict() and record["preset_reason"] is None
    assert (record["stats"]["steps_full"], record["stats"]["steps_forecast"]) == (4, 2)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(saved_dit))
    pipe.set_progress_bar_config(disable=True)
    with taylorseer.apply(pipe, load_config(CONFIG)):
        expected = pipe(class_labels=[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                        output_type="np").images
    full = pipe(class_labels=[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="np").images
    saved = np.asarray(Image.open(record["images"][0]))
    assert np.array_equal(saved, np.asarray(numpy_to_pil(expected)[0]))
    assert not np.array_equal(saved, np.asarray(numpy_to_pil(full)[0]))  # the toy parts did forecast
    assert "config: toy-alt-decay" in printed


@pytest.mark.slow  # a generation / a calibration search / a demo run (tests/README.md)
def test_calibrate_config_searches_a_schedule_for_the_toy_forecaster(tmp_path, capsys):
    from taylorseer.calibration import load_calibration

    out = tmp_path / "toy.safetensors"
    config = {**CONFIG, "targets": {"granularity": "output"}}
    code, printed, err = _run(["calibrate", "--budget", "3", "--steps", str(STEPS), "--images", "2",
                               "--search-images", "1", "--max-evals", "2", "--config", json.dumps(config),
                               "--out", str(out)], capsys)
    assert code == 0, err
    cal = load_calibration(out)
    assert cal.header["forecaster"]["searched_with"] == {"type": "DecayForecast", "decay": 0.9}
    assert cal.header["granularity"] == "output" and cal.cache_config().targets.granularity == "output"
    assert len(cal.schedule.full_steps) <= 3 and cal.num_steps == STEPS
    assert "searched for DecayForecast" in printed


@pytest.mark.slow  # a generation / a calibration search / a demo run (tests/README.md)
def test_demo_config_passes_the_config_through_and_adds_its_row(tmp_path, tiny_dit, monkeypatch, capsys):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(Stop):
        main(["demo", "--config", TOY, "--out", str(tmp_path / "demo")])
    assert seen["config"] == load_config(CONFIG) and seen["config"].name == "toy-alt-decay"
    monkeypatch.undo()
    methods = [DemoMethod("full", None, STEPS), DemoMethod("ddim-4", None, 4)]
    rows = run_demo(out_dir=tmp_path, per_class=1, num_steps=STEPS, model=tiny_dit, methods=methods,
                    progress=False, rounds=1, config=load_config(CONFIG))
    assert [r["method"] for r in rows] == ["full", "ddim-4", "--config toy-alt-decay"]
    assert rows[-1]["full_steps"] == 4 and rows[-1]["psnr"] < float("inf")


def test_calibrate_keeps_a_file_that_appeared_meanwhile_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import taylorseer.calibration as calibration

    out = tmp_path / "cal.safetensors"

    def calibrate(model, budget, staged, **kwargs):  # the work: writes the staged file; meanwhile --out appears
        Path(staged).write_bytes(b"calibration")
        out.write_bytes(b"appeared meanwhile")

    monkeypatch.setattr(calibration, "calibrate", calibrate)
    code, printed, err = _run(["calibrate", "--budget", "3", "--steps", str(STEPS), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "was created while calibrating" in err, err
    assert out.read_bytes() == b"appeared meanwhile"
    assert [p.read_bytes() for p in tmp_path.glob(".cal.safetensors.*.partial")] == [b"calibration"]
