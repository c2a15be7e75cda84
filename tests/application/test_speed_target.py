"""``apply(model_or_pipe, speedup=X)``: the best known method reaching X FLOPs, said by name; the calibration store.

The embedded model finds its shipped calibrations by fingerprint; an uncalibrated tiny diffusers pipeline gets the
family preset adapted to X; a stale or mismatched calibration in the user cache is refused by name in the log.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from test_diffusers import tiny_dit_pipeline
from torch.utils.flop_counter import FlopCounterMode

import taylorseer
from taylorseer.auto import SHIPPED_DIR, adapted_interval, cache_dir, find_calibrations
from taylorseer.calibration.io import new_header, save_calibration
from taylorseer.eval.metrics import psnr
from taylorseer.policy import FixedSchedule

# The shipped files' schedules, read from docs/results/calibration.md's logs (not from the code under test).
B8 = (0, 2, 7, 13, 20, 29, 39, 47)
B6 = (0, 3, 11, 20, 33, 45)
LABELS = torch.arange(4)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "taylorseer" / "calibrations"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def reference():
    return taylorseer.load_reference()


def _pattern(full_steps, num_steps=50):
    return "".join("F" if i in full_steps else "f" for i in range(num_steps))


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def test_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "taylorseer" / "calibrations"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: relative values are ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "taylorseer" / "calibrations"


@pytest.mark.slow
def test_speedup_6_on_the_embedded_model_uses_the_shipped_calibration(reference, user_cache, caplog):
    with caplog.at_level(logging.INFO, logger="taylorseer"):
        handle = taylorseer.apply(reference, speedup=6)
    try:
        assert "ts2-output-b8-s50" in repr(handle) and "speedup>=6" in repr(handle)
        assert handle.config.policy.full_steps == B8  # the config repr shows is what 50 steps run
        said = [r.getMessage() for r in caplog.records if r.name == "taylorseer"]
        assert len(said) == 1 and "ts2-output-b8-s50" in said[0] and "guidance_scale 1.5" in said[0]
        cached, flops_cached = _flops(lambda: taylorseer.sample(reference, LABELS, num_steps=50, listener=handle))
        assert handle.stats.pattern() == _pattern(B8) and handle.stats.switched_off is None
        assert "ts2-output-b8-s50" in repr(handle)
    finally:
        handle.remove()
    full, flops_full = _flops(lambda: taylorseer.sample(reference, LABELS, num_steps=50))
    assert flops_full / flops_cached >= 6.0
    assert psnr(cached, full) >= 40.0  # the target; 200 held-out images in the closing note


def test_speedup_8_takes_the_six_step_schedule_and_other_step_counts_the_adapted_interval(reference, user_cache):
    with taylorseer.apply(reference, speedup=8) as handle:
        assert handle.plan(50) == [c == "F" for c in _pattern(B6)]
        # 30 steps at 8x: at most 3 full steps: the warm-up's 2 and one at interval 15 (14 would give 4: 7.5x)
        assert handle.plan(30) == [i in (0, 1, 16) for i in range(30)]
        # 12 steps at 8x: 1.5 full steps, fewer than the warm-up: full compute, and it says why
        assert handle.plan(12) == [True] * 12
        assert "at most 1.5 full steps of 12" in handle.planner.choose(12).switched_off
    with taylorseer.apply(reference, speedup=6) as handle:  # 30 steps at 6x: interval 8 (7 gives 6 full: 5x)
        assert handle.plan(30) == [i in (0, 1, 9, 17, 25) for i in range(30)]
    assert adapted_interval(6, 50, 2).interval == 7  # 2 + floor(48 / 7) = 8 full steps: 6.25x
    assert adapted_interval(6, 10, 2) is None  # the warm-up alone is more than 10 / 6 steps


def test_speedup_and_config_are_mutually_exclusive_and_bad_values_are_refused(reference):
    with pytest.raises(ValueError, match="speedup and config are mutually exclusive"):
        taylorseer.apply(reference, taylorseer.preset("paper_dit"), speedup=6)
    for bad in (1, 0.5, float("nan"), True, "6"):
        with pytest.raises(ValueError, match="speedup must be"):
            taylorseer.apply(reference, speedup=bad)
    with pytest.raises(TypeError, match="diagnose must be a bool"):
        taylorseer.apply(reference, speedup=6, diagnose="yes")
    assert not any("forward" in m.__dict__ for m in reference.modules())  # nothing was installed


def test_a_stale_cached_calibration_is_refused_by_name(reference, user_cache, caplog):
    stale = user_cache / "stale-ts2.safetensors"
    shutil.copy(SHIPPED_DIR / "ts2-output-b8-s50.safetensors", stale)
    other = taylorseer.load_reference()
    with torch.no_grad():
        for p in other.parameters():  # other weights of the same class (a fine-tune)
            p.mul_(1.001)
    with caplog.at_level(logging.INFO, logger="taylorseer"):
        found, skipped = find_calibrations(other)
        handle = taylorseer.apply(other, speedup=6)
    handle.remove()
    assert found == [] and str(stale) in [path for path, _ in skipped]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stale-ts2.safetensors" in m and "other weights" in m for m in warned)
    assert "uncalibrated" in repr(handle)


def test_a_cached_calibration_at_another_guidance_scale_is_refused_by_name(reference, user_cache, caplog):
    mine = save_calibration(user_cache / "mine-b7.safetensors", new_header(
        "schedule", "mine-b7", reference, FixedSchedule((0, 2, 7, 13, 20, 29, 39), 50), granularity="output",
        forecaster={"searched_with": {"type": "TaylorForecast", "max_order": 2, "scheme": "divided",
                                      "history_from_step": 0}},
        calibration_data={"guidance_scale": 1.5}))
    with caplog.at_level(logging.INFO, logger="taylorseer"):
        handle = taylorseer.apply(reference, speedup=7, guidance_scale=4.0)
    handle.remove()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mine-b7.safetensors" in m and "guidance_scale 1.5, not 4" in m for m in warned)
    assert "mine-b7" not in repr(handle) and "uncalibrated" in repr(handle)
    with taylorseer.apply(reference, speedup=7, guidance_scale=1.5) as handle:  # at its scale: used, by name
        assert "mine-b7 (user, 50 steps)" in repr(handle)
        assert handle.plan(50) == [c == "F" for c in _pattern(mine.schedule.full_steps)]


@pytest.mark.slow
def test_calibrate_writes_to_the_user_cache_by_default_and_apply_finds_it(reference, user_cache, capsys):
    from taylorseer.cli import main

    assert main(["calibrate", "--budget", "8", "--schedule", ",".join(map(str, B8)), "--images", "2",
                 "--teacher-forced", "--granularity", "output", "--name", "cli-b8"]) == 0
    written = list(user_cache.glob("cli-b8-*.safetensors"))
    assert len(written) == 1 and str(written[0]) in capsys.readouterr().out
    with taylorseer.apply(reference, speedup=6) as handle:  # the user's file (fitted weights) comes first
        assert "cli-b8 (user, 50 steps)" in repr(handle)
        assert handle.plan(50) == [c == "F" for c in _pattern(B8)]
        assert handle.plan(30) == [True] * 30  # fitted weights are for 50 steps only: switched off at 30
        assert "50" in handle.planner.choose(30).switched_off


def test_uncalibrated_tiny_pipeline_reaches_6x_with_the_preset_and_says_so(caplog):
    pipe = tiny_dit_pipeline()

    def transformer_flops():
        """The FLOPs executed inside the transformer's calls of one 50-step generation (the VAE excluded)."""
        counts, open_ = [], []

        def enter(*args):
            open_.append(FlopCounterMode(display=False))
            open_[-1].__enter__()

        def leave(*args):
            counter = open_.pop()
            counter.__exit__(None, None, None)
            counts.append(counter.get_total_flops())

        hooks = [pipe.transformer.register_forward_pre_hook(enter),
                 pipe.transformer.register_forward_hook(leave)]
        try:
            pipe(class_labels=[0, 1], num_inference_steps=50, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
        finally:
            for hook in hooks:
                hook.remove()
        assert len(counts) == 50  # one transformer call per step (CFG as one doubled batch)
        return sum(counts)

    full = transformer_flops()
    with caplog.at_level(logging.INFO, logger="taylorseer"):
        handle = taylorseer.apply(pipe, speedup=6)
    with handle:
        assert "uncalibrated" in repr(handle)
        cached = transformer_flops()
        assert handle.stats.steps_full == 8 and handle.stats.switched_off is None
    said = " ".join(r.getMessage() for r in caplog.records if r.name == "taylorseer")
    assert "uncalibrated" in said and "paper_dit" in said
    assert full / cached >= 6.0
