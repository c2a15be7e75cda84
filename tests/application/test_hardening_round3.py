"""Hardening, round 3 (issue 25): calibrations that cannot be misapplied, ``sample`` runs that cannot mix
calibrations, steps read from the call that do not continue a dead generation, CLI outputs that are not overwritten.

Each test reproduces one failure of the adversarial pass (silent on the code before it) and checks the refusal or
the right result; each also checks that the legitimate use still works, so a refusal of everything cannot pass.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.calibration import (
    CalibrationError,
    FitOptions,
    fit_linear,
    load_calibration,
    new_header,
    record_trajectories,
    save_calibration,
)
from taylorseer.forecast import LinearForecast, build_forecaster
from taylorseer.models.reference import NULL_CLASS, build_reference
from taylorseer.models.sampler import make_scheduler, sample
from taylorseer.policy import FixedSchedule

NUM_STEPS = 12
SCHEDULE = (0, 1, 4, 8)
MAX_BRANCHES = 8  # the documented bound on calls read as CFG branches of one step (runtime.autostep)


def _calibrate(model, path: Path, guidance_scale: float = 1.5, cfg_mode: str = "batch"):
    stats = record_trajectories(model, torch.tensor([1]), num_steps=NUM_STEPS, seed=9, batch_size=1,
                                guidance_scale=guidance_scale, cfg_mode=cfg_mode, progress=False)
    table, error = fit_linear(stats, SCHEDULE, FitOptions(history=3))
    header = new_header("linear", "tiny-b4", model, FixedSchedule(SCHEDULE, NUM_STEPS, name="tiny-b4"), fit=error,
                        calibration_data=stats.sampling)
    return save_calibration(path, header, table)


@pytest.fixture
def cfg_cal(tiny_dit, tmp_path):
    """Weights fitted on a guided CFG batch (guidance 1.5, two row groups)."""
    cal = _calibrate(tiny_dit, tmp_path / "cal.safetensors")
    assert cal.header["forecaster"]["row_groups"] == 2 and cal.header["calibration_data"]["guidance_scale"] == 1.5
    return cal


def _untouched(model: torch.nn.Module) -> bool:
    return not any("forward" in m.__dict__ or "_old_forward" in m.__dict__ for m in model.modules())


def _counting(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


#################################################################################
#          1-3. Model identity, CFG layout and guidance scale, on every path       #
#################################################################################

def test_apply_refuses_a_calibrated_config_for_other_weights_before_touching_the_model(tiny_dit, cfg_cal):
    other = build_reference("DiT-FM-T/4")
    other.load_state_dict({k: v * 1.02 for k, v in tiny_dit.state_dict().items()})
    with pytest.raises(CalibrationError, match="other weights"):
        taylorseer.apply(other, cfg_cal.cache_config())
    assert _untouched(other)
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:  # the model it was made for
        sample(tiny_dit, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=0, listener=handle)
        assert handle.stats.steps_forecast == NUM_STEPS - len(SCHEDULE)


def test_model_identity_follows_in_place_weight_changes(tiny_dit, cfg_cal):
    config = cfg_cal.cache_config()
    taylorseer.apply(tiny_dit, config).remove()  # identity remembered for these weights
    with torch.no_grad():
        next(tiny_dit.parameters()).mul_(1.5)  # the same tensors, written in place
    with pytest.raises(CalibrationError, match="other weights"):
        taylorseer.apply(tiny_dit, config)


@pytest.mark.parametrize("told", [True, False])
def test_cfg_batch_weights_on_an_unguided_batch_are_refused_at_the_first_call(tiny_dit, cfg_cal, told):
    calls = _counting(tiny_dit)
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:
        handle.begin(NUM_STEPS)  # a fixed schedule needs the step count, told or not
        with pytest.raises(CalibrationError, match="two halves .* differ"):
            sample(tiny_dit, torch.arange(4), num_steps=NUM_STEPS, guidance_scale=1.0, seed=0,
                   listener=handle if told else None)
        assert len(calls) == 1 and handle.stats.steps_forecast == 0  # at step 0, before any forecast
        calls.clear()
        handle.begin(NUM_STEPS)
        with pytest.raises(CalibrationError, match="3 rows, an odd count"):  # was: an error after three calls
            sample(tiny_dit, torch.arange(3), num_steps=NUM_STEPS, guidance_scale=1.0, seed=0,
                   listener=handle if told else None)
        assert len(calls) == 1


@pytest.mark.parametrize("told", [True, False])
def test_cfg_batch_weights_with_two_calls_per_step_are_refused_at_step_0(tiny_dit, cfg_cal, told):
    calls = _counting(tiny_dit)
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:
        handle.begin(NUM_STEPS)
        with pytest.raises(CalibrationError, match="two halves .* differ.*cfg_mode='split'"):
            sample(tiny_dit, torch.arange(2), num_steps=NUM_STEPS, cfg_mode="split", seed=0,
                   listener=handle if told else None)
        assert len(calls) == 1 and handle.stats.steps_forecast == 0


def test_a_second_call_at_step_0_is_refused_even_on_a_cfg_shaped_batch(tiny_dit, cfg_cal):
    x = torch.randn(1, 1, tiny_dit.config.sample_size, tiny_dit.config.sample_size)
    doubled, t, y = torch.cat([x, x]), torch.full((2,), 980), torch.tensor([1, NULL_CLASS])
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:
        handle.begin(NUM_STEPS)
        with handle.step(0, 980):
            tiny_dit(doubled, timestep=t, class_labels=y)  # one CFG batch: accepted
            with pytest.raises(CalibrationError, match="more than once"):
                tiny_dit(doubled, timestep=t, class_labels=y)


def test_apply_refuses_another_guidance_scale_or_layout_by_name(tiny_dit, cfg_cal):
    config = cfg_cal.cache_config()
    with pytest.raises(CalibrationError, match="guidance_scale 1.5, not 4"):
        taylorseer.apply(tiny_dit, config, guidance_scale=4.0)
    with pytest.raises(CalibrationError, match="guidance_scale 1.5, not 1:"):
        taylorseer.apply(tiny_dit, config, guidance_scale=1.0)
    with pytest.raises(CalibrationError, match="cfg_mode=split"):
        taylorseer.apply(tiny_dit, config, guidance_scale=1.5, cfg_mode="split")
    assert _untouched(tiny_dit)
    taylorseer.apply(tiny_dit, config, guidance_scale=1.5, cfg_mode="batch").remove()


def test_one_branch_weights_on_any_batch_pass_the_layout_check(tiny_dit, tmp_path):
    cal = _calibrate(tiny_dit, tmp_path / "g1.safetensors", guidance_scale=1.0)
    assert cal.header["forecaster"]["row_groups"] == 1
    with taylorseer.apply(tiny_dit, cal.cache_config(), guidance_scale=1.0) as handle:
        sample(tiny_dit, torch.arange(3), num_steps=NUM_STEPS, guidance_scale=1.0, seed=0, listener=handle)
        assert handle.stats.steps_forecast == NUM_STEPS - len(SCHEDULE)
    with pytest.raises(CalibrationError, match="guidance_scale 1, not 1.5"):
        taylorseer.apply(tiny_dit, cal.cache_config(), guidance_scale=1.5)


#################################################################################
#                4-5. Content-bound identities: caches and sample runs            #
#################################################################################

def test_a_file_replaced_with_the_same_size_and_mtime_is_read_again(tiny_dit, cfg_cal, tmp_path):
    path = Path(cfg_cal.path)
    header = dict(cfg_cal.header)
    doubled = type(cfg_cal.table)({g: {s: type(sw)(sw.anchors, sw.weights * 2, sw.bias) for s, sw in steps.items()}
                                   for g, steps in cfg_cal.table.steps.items()},
                                  NUM_STEPS, SCHEDULE, cfg_cal.table.grouping, cfg_cal.table.history)
    other = save_calibration(tmp_path / "other.safetensors", header, doubled)
    stat = path.stat()
    assert Path(other.path).stat().st_size == stat.st_size  # a replacement that size and mtime cannot tell
    first = build_forecaster(LinearForecast(str(path)))
    os.replace(other.path, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p, rsync -t, a restore
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = build_forecaster(LinearForecast(str(path)))
    group = next(iter(doubled.steps))
    step = next(iter(doubled.steps[group]))
    assert second is not first and second.calibration.sha256 == other.sha256
    assert torch.equal(second.table.steps[group][step].weights, doubled.steps[group][step].weights)
    assert build_forecaster(LinearForecast(str(path))) is second  # unchanged content: the cached one


def test_sample_run_identity_holds_the_calibration_content(cfg_cal, tmp_path):
    from taylorseer.eval.sample import SampleSpec, load_config, method_from_config

    config_file = tmp_path / "config.json"
    unpinned = cfg_cal.cache_config().to_dict()
    unpinned["forecaster"]["sha256"] = ""  # a hand-written config naming the file only
    config_file.write_text(json.dumps(unpinned))

    def identity():
        method = method_from_config(load_config(str(config_file)), NUM_STEPS)
        spec = SampleSpec(method, 4, batch_size=2, config_file=str(config_file))
        return spec, spec.identity(model_identity={"kind": "test"})

    spec, before = identity()
    assert spec.method.config.forecaster.sha256 == cfg_cal.sha256  # bound to the content
    data = bytearray(Path(cfg_cal.path).read_bytes())
    table = cfg_cal.table
    doubled = type(table)({g: {s: type(sw)(sw.anchors, sw.weights * 2, sw.bias) for s, sw in steps.items()}
                           for g, steps in table.steps.items()}, NUM_STEPS, SCHEDULE, table.grouping, table.history)
    changed = save_calibration(cfg_cal.path, dict(cfg_cal.header), doubled)
    assert changed.sha256 != cfg_cal.sha256 and len(Path(cfg_cal.path).read_bytes()) == len(data)
    _, after = identity()
    assert after != before and after["method"]["config"]["forecaster"]["sha256"] == changed.sha256
    with pytest.raises(CalibrationError, match="differs from the expected"):  # the first run's config: refused
        build_forecaster(spec.method.config.forecaster)


def test_sample_spec_refuses_another_guidance_or_an_unguided_run(cfg_cal):
    from taylorseer.eval.sample import SampleSpec, method_from_config

    method = method_from_config(cfg_cal.cache_config(), NUM_STEPS)
    with pytest.raises(CalibrationError, match="guidance_scale 1.5, not 4"):
        SampleSpec(method, 4, guidance_scale=4.0)
    with pytest.raises(CalibrationError, match="guidance_scale 1.5, not 1:"):
        SampleSpec(method, 4, guidance_scale=1.0)
    with pytest.raises(CalibrationError, match="cfg_mode=split"):
        SampleSpec(method, 4, cfg_mode="split")
    assert SampleSpec(method, 4).resolved_guidance() == 1.5


def test_cli_sample_refuses_a_calibration_at_cfg_scale_1_before_any_work(cfg_cal, tmp_path, capsys):
    from taylorseer.cli import main

    config = tmp_path / "c.json"
    config.write_text(cfg_cal.cache_config().to_json())
    out = tmp_path / "out"
    argv = ["sample", "--num-samples", "4", "--config", str(config), "--steps", str(NUM_STEPS), "--cfg-scale", "1.0",
            "--out", str(out)]
    assert main(argv) == 2
    assert "calibrated at guidance_scale 1.5, not 1:" in capsys.readouterr().err
    assert not out.exists()


#################################################################################
#              6. Steps read from the call: a new generation is seen             #
#################################################################################

def _untold(model, x, labels, timesteps):
    """A loop that tells nothing: CFG batch, DDIM update, from ``x`` over ``timesteps`` (a slice of a schedule)."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(50)
    null = torch.full_like(labels, NULL_CLASS)
    for t in timesteps:
        both = model(torch.cat([x, x]), timestep=torch.full((2 * len(labels),), int(t)),
                     class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        x = scheduler.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("cut, start", [(600, 500), (520, 500)])  # a timestep jump; a continuing timestep
def test_a_cut_off_generation_is_not_continued_by_a_new_one(tiny_dit, cut, start):
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)
    timesteps = make_scheduler()
    timesteps.set_timesteps(50)
    ts = [int(t) for t in timesteps.timesteps]
    labels = torch.tensor([1, 2])
    size = tiny_dit.config.sample_size
    a = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    b = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(1))
    new = ts[ts.index(start):ts.index(start) + 8]  # img2img at strength 0.5, or a front end after a cancel
    with taylorseer.apply(tiny_dit, config) as handle:
        _untold(tiny_dit, a, labels, ts[: ts.index(cut) + 1])
        assert handle.stats.steps_forecast > 0
        read = _untold(tiny_dit, b, labels, new)
        assert handle.stats.steps_full + handle.stats.steps_forecast == len(new)  # counted as a new generation
    with taylorseer.apply(tiny_dit, config):
        fresh = _untold(tiny_dit, b, labels, new)
    assert torch.equal(read, fresh)


def test_cancel_makes_the_restart_explicit(tiny_dit):
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)
    scheduler = make_scheduler()
    scheduler.set_timesteps(50)
    ts = [int(t) for t in scheduler.timesteps]
    labels = torch.tensor([1, 2])
    a = torch.randn(2, 1, tiny_dit.config.sample_size, tiny_dit.config.sample_size)
    with taylorseer.apply(tiny_dit, config) as handle:
        _untold(tiny_dit, a, labels, ts[:1])  # cut off after one step: nothing in the inputs can tell
        handle.cancel()
        read = _untold(tiny_dit, a * 0.5, labels, ts[1:9])
        assert handle.stats.steps_full + handle.stats.steps_forecast == 8
    with taylorseer.apply(tiny_dit, config):
        fresh = _untold(tiny_dit, a * 0.5, labels, ts[1:9])
    assert torch.equal(read, fresh)


def test_per_sample_timesteps_with_a_constant_row_are_steps_not_branches(tiny_dit):
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)
    x = torch.randn(2, 1, tiny_dit.config.sample_size, tiny_dit.config.sample_size)
    with taylorseer.apply(tiny_dit, config) as handle:
        for t in range(900, 100, -50):  # a clean context sample (t = 0) beside a noisy one
            tiny_dit(x, timestep=torch.tensor([0, t]), class_labels=torch.tensor([1, 2]))
        assert {branch for branch, _ in handle.cached_keys()} == {0}
        assert handle.stats.steps_forecast > 0


def test_branches_per_step_are_bounded_with_a_warning(tiny_dit):
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)
    x = torch.randn(2, 1, tiny_dit.config.sample_size, tiny_dit.config.sample_size)
    with taylorseer.apply(tiny_dit, config) as handle:
        with pytest.warns(RuntimeWarning, match=f"more than {MAX_BRANCHES} model calls"):
            for _ in range(3 * MAX_BRANCHES):
                out = tiny_dit(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2])).sample
        assert len({branch for branch, _ in handle.cached_keys()}) == MAX_BRANCHES
        nbytes = handle.cache_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once
            for _ in range(MAX_BRANCHES):
                again = tiny_dit(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2])).sample
        assert handle.cache_bytes() == nbytes and torch.equal(again, out)  # computed in full, nothing kept


#################################################################################
#                  7. CLI outputs and numeric arguments                          #
#################################################################################

def test_calibrate_refuses_an_existing_out_file_unless_forced(monkeypatch, tmp_path, capsys):
    import taylorseer.calibration
    import taylorseer.models.pretrained
    from taylorseer.cli import main

    def reached(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(taylorseer.models.pretrained, "load_reference", reached)
    monkeypatch.setattr(taylorseer.calibration, "calibrate", reached)
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"the user's file")
    assert main(["calibrate", "--budget", "3", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"the user's file"
    with pytest.raises(AssertionError, match="work started"):  # --force: the work begins
        main(["calibrate", "--budget", "3", "--out", str(out), "--force"])


def test_calibrate_publishes_without_replacing_a_file_created_meanwhile(cfg_cal, tmp_path):
    from taylorseer.calibration.publish import publish as _publish
    from taylorseer.calibration.publish import staging_path as _staging

    out = tmp_path / "new.safetensors"
    staged = Path(_staging(str(out)))
    staged.write_bytes(Path(cfg_cal.path).read_bytes())
    out.write_bytes(b"appeared during the work")
    with pytest.raises(FileExistsError, match="was created while calibrating"):
        _publish(str(staged), str(out), force=False)
    assert out.read_bytes() == b"appeared during the work" and staged.is_file()
    assert _publish(str(staged), str(out), force=True).sha256 == cfg_cal.sha256 and not staged.exists()
    fresh = tmp_path / "fresh.safetensors"
    staged.write_bytes(Path(cfg_cal.path).read_bytes())
    assert load_calibration(_publish(str(staged), str(fresh), force=False).path).sha256 == cfg_cal.sha256


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "10000000000000"], "--num-samples: must be <= 10000000"),
    (["--num-samples", "5000000", "--batch-size", "1"], "more than 1000000 shards"),
])
def test_sample_bounds_its_numbers_before_any_work(tmp_path, capsys, argv, message):
    from taylorseer.cli import main

    assert main(["sample", "--method", "full", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_steps_are_read_from_the_call_at_output_granularity(tiny_dit):
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2, granularity="output")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: "cannot read the step from this call", every step in full
        with taylorseer.apply(tiny_dit, config) as handle:
            read = sample(tiny_dit, torch.tensor([1, 2]), num_steps=8, seed=0)
            assert handle.stats.pattern() == "FffFffFf"  # warm-up 1, then every third step
    with taylorseer.apply(tiny_dit, config) as handle:
        told = sample(tiny_dit, torch.tensor([1, 2]), num_steps=8, seed=0, listener=handle)
    assert torch.equal(read, told)


def test_weights_changed_after_apply_are_refused_at_the_next_generation(tiny_dit, cfg_cal):
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:
        sample(tiny_dit, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=0, listener=handle)
        with torch.no_grad():
            next(tiny_dit.parameters()).mul_(1.02)  # a fine-tuning step, a LoRA merged in place
        with pytest.raises(CalibrationError, match="other weights"):
            sample(tiny_dit, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=0, listener=handle)


def test_a_lora_injected_after_apply_is_refused_at_the_next_generation(tiny_dit, cfg_cal):
    peft = pytest.importorskip("peft")
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:
        model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["to_q"]), tiny_dit)
        with pytest.raises(CalibrationError, match="other weights"):
            sample(model, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=0, listener=handle)


def test_an_offloaded_model_is_identified_from_its_offloaded_weights(tiny_dit, cfg_cal):
    accelerate = pytest.importorskip("accelerate")
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:
        expected = sample(tiny_dit, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=0, listener=handle)
    accelerate.cpu_offload(tiny_dit, execution_device=torch.device("cpu"))  # parameters on the meta device
    assert next(tiny_dit.parameters()).device.type == "meta"
    with taylorseer.apply(tiny_dit, cfg_cal.cache_config()) as handle:  # was: "Tensor.item() ... meta tensors"
        offloaded = sample(tiny_dit, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=0, listener=handle)
        assert handle.stats.steps_forecast == NUM_STEPS - len(SCHEDULE)
    assert torch.equal(offloaded, expected)


def test_a_file_overwritten_in_place_with_its_mtime_restored_is_read_again(cfg_cal, tmp_path):
    path = Path(cfg_cal.path)
    table = cfg_cal.table
    doubled = type(table)({g: {s: type(sw)(sw.anchors, sw.weights * 2, sw.bias) for s, sw in steps.items()}
                           for g, steps in table.steps.items()}, NUM_STEPS, SCHEDULE, table.grouping, table.history)
    other = save_calibration(tmp_path / "other.safetensors", dict(cfg_cal.header), doubled)
    stat = path.stat()
    first = build_forecaster(LinearForecast(str(path)))
    with open(path, "r+b") as f:  # the same inode, new bytes (cp -p onto an existing file)
        f.write(Path(other.path).read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_size,
                                                                                  stat.st_mtime_ns)
    second = build_forecaster(LinearForecast(str(path)))
    assert second is not first and second.calibration.sha256 == other.sha256


def test_bench_refuses_a_calibration_made_at_another_guidance_scale():
    from taylorseer.calibration import CalibrationError
    from taylorseer.eval.bench import calibrated_methods
    from taylorseer.models.checkpoint import ASSETS_DIR

    path = ASSETS_DIR / "calibrations" / "ts2-output-b8-s50.safetensors"  # made at guidance 1.5
    assert [m.name for m in calibrated_methods(path, num_steps=50, guidance_scale=1.5)] == ["ts2-output-b8-s50"]
    with pytest.raises(CalibrationError, match="guidance"):
        calibrated_methods(path, num_steps=50, guidance_scale=4.0)
