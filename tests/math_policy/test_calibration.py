"""Calibrated forecasting: the least-squares fit, the learned linear forecaster in the runtime, the schedule search,
and the calibration file (round trip and every refusal).

Synthetic trajectories are built so that each forecast step *is* a known linear combination of its anchors; the
fit must recover those weights. Files are checked byte-level: a flipped byte, a cut file and every kind of
mismatch must raise ``CalibrationError`` naming what is wrong.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from taylorseer import apply
from taylorseer.calibration import (
    CalibrationError,
    FitOptions,
    ProxyObjective,
    TrajectoryStats,
    anchors_for,
    fit_linear,
    forecast_steps,
    greedy_schedule,
    load_calibration,
    new_header,
    record_trajectories,
    refine_schedule,
    save_calibration,
    search_schedule,
)
from taylorseer.calibration.fit import solve_step
from taylorseer.forecast import LinearForecast, TaylorForecast, build_forecaster
from taylorseer.forecast.linear import LinearForecaster, LinearTable, StepWeights, group_of
from taylorseer.models.reference import build_reference
from taylorseer.models.sampler import sample
from taylorseer.parts import CacheConfig
from taylorseer.policy import FixedSchedule

NUM_STEPS = 12
SCHEDULE = (0, 1, 4, 8)


def synthetic(schedule=SCHEDULE, num_steps=NUM_STEPS, history=3, bias=True, channelwise=True, seed=0):
    """Trajectories [num_steps, P, C] whose forecast steps are exact linear combinations of their anchors."""
    g = torch.Generator().manual_seed(seed)
    rows, channels = 200, 3
    feats = torch.zeros(num_steps, rows, channels, dtype=torch.float64)
    truth = {}
    for s in range(num_steps):
        if s in schedule:
            feats[s] = torch.randn(rows, channels, generator=g, dtype=torch.float64)
            continue
        anchors = anchors_for(schedule, s, history)
        w = torch.randn(len(anchors), channels if channelwise else 1, generator=g, dtype=torch.float64)
        w = w.expand(len(anchors), channels)
        b = torch.randn(channels, generator=g, dtype=torch.float64) if bias else torch.zeros(channels,
                                                                                            dtype=torch.float64)
        if not channelwise:
            b = b[:1].expand(channels)
        feats[s] = sum(w[j] * feats[a] for j, a in enumerate(anchors)) + b
        truth[s] = (w, b)
    stats = TrajectoryStats(num_steps, "target")
    stats.add("blocks.0.attn", feats)
    return stats, truth


#################################################################################
#                                      Fit                                      #
#################################################################################

@pytest.mark.parametrize("history", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_fit_recovers_known_channel_weights(history, bias):
    stats, truth = synthetic(history=history, bias=bias)
    options = FitOptions(history=history, bias=bias, channelwise=True, ridge=0.0, match_variance=False)
    table, error = fit_linear(stats, SCHEDULE, options)
    assert set(table.steps["blocks.0.attn"]) == set(forecast_steps(SCHEDULE, NUM_STEPS))
    for s, (w, b) in truth.items():
        gram = stats.gram["blocks.0.attn"]
        w_fit, b_fit, residual, energy = solve_step(gram, s, anchors_for(SCHEDULE, s, history), options)
        assert torch.allclose(w_fit[:, 0], w, atol=1e-9, rtol=0), s  # float64 solve; one row group
        if bias:
            assert torch.allclose(b_fit[0], b, atol=1e-9, rtol=0)
        sw = table.steps["blocks.0.attn"][s]  # stored in float32
        assert sw.anchors == anchors_for(SCHEDULE, s, history)
        assert (sw.weights[:, 0].double() - w).abs().max() < 1e-6
        assert (sw.bias is None) == (not bias)
        if bias:
            assert (sw.bias[0].double() - b).abs().max() < 1e-6
        assert residual <= 1e-12 * energy
    assert error["rel_error"] < 1e-6


def test_fit_recovers_known_scalar_weights():
    stats, truth = synthetic(channelwise=False)
    options = FitOptions(history=3, bias=True, channelwise=False, ridge=0.0, match_variance=False)
    table, _ = fit_linear(stats, SCHEDULE, options)
    for s, (w, b) in truth.items():
        sw = table.steps["blocks.0.attn"][s]
        assert sw.weights.shape == (len(sw.anchors), 1, 1)
        assert (sw.weights[:, 0, 0].double() - w[:, 0]).abs().max() < 1e-6
        assert abs(float(sw.bias) - float(b[0])) < 1e-6


def test_fit_is_never_worse_than_newton_on_its_trajectories():
    # Newton (Taylor 'divided') extrapolation through the anchors is one point of the least-squares search space.
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, NUM_STEPS, dtype=torch.float64)[:, None, None]
    feats = torch.sin(3 * t + torch.randn(1, 50, 4, generator=g, dtype=torch.float64)) + 0.01 * torch.randn(
        NUM_STEPS, 50, 4, generator=g, dtype=torch.float64)
    stats = TrajectoryStats(NUM_STEPS, "target")
    stats.add("x", feats)
    options = FitOptions(history=3, bias=False, ridge=0.0, match_variance=False)
    gram = stats.gram["x"]
    for s in forecast_steps(SCHEDULE, NUM_STEPS):
        anchors = anchors_for(SCHEDULE, s, 3)
        lagrange = torch.tensor([math.prod((s - b) / (a - b) for b in anchors if b != a) for a in anchors],
                                dtype=torch.float64)
        newton = float(((feats[s] - sum(w * feats[a] for w, a in zip(lagrange, anchors))) ** 2).sum())
        assert solve_step(gram, s, anchors, options)[2] <= newton * (1 + 1e-9)


def test_ridge_shrinks_the_weights():
    stats, _ = synthetic(bias=False)
    s = 6
    anchors = anchors_for(SCHEDULE, s, 3)
    plain = FitOptions(ridge=0.0, bias=False, match_variance=False)
    free = solve_step(stats.gram["blocks.0.attn"], s, anchors, plain)[0]
    ridged = solve_step(stats.gram["blocks.0.attn"], s, anchors, dataclasses.replace(plain, ridge=10.0))[0]
    assert ridged.norm() < free.norm()


def test_fit_options_are_validated():
    with pytest.raises(ValueError, match="history"):
        FitOptions(history=5)
    with pytest.raises(ValueError, match="ridge"):
        FitOptions(ridge=-1.0)


#################################################################################
#                              Forecaster (pure math)                           #
#################################################################################

def reuse_table(targets, schedule=SCHEDULE, num_steps=NUM_STEPS, grouping="all"):
    """Weights 1 on the newest anchor (K = 1): the learned forecaster then *is* reuse (FORA)."""
    groups = {group_of(t, grouping) for t in targets}
    steps = {g: {s: StepWeights(anchors_for(schedule, s, 1), torch.tensor([1.0]), None)
                 for s in forecast_steps(schedule, num_steps)} for g in groups}
    return LinearTable(steps, num_steps, tuple(schedule), grouping, 1)


def test_forecaster_hand_values_and_refusals():
    table = LinearTable({"blocks.*.attn": {
        2: StepWeights((1, 0), torch.tensor([[2.0, 1.0], [-1.0, 0.5]]), torch.tensor([0.5, 0.0])),
        3: StepWeights((1, 0), torch.tensor([3.0, -2.0]), None)}}, 4, (0, 1), "kind", 2)
    f = LinearForecaster(table)
    s = f.update(f.empty(), torch.tensor([[1.0, 2.0]]), 0.0)
    s = f.update(s, torch.tensor([[3.0, 4.0]]), 1.0)
    # step 2, per channel: [2*3 - 1*1 + 0.5, 1*4 + 0.5*2 + 0] = [5.5, 5.0]
    assert f.predict(s, 2.0, target="blocks.7.attn").tolist() == [[5.5, 5.0]]
    # step 3, scalar weights: 3*[3, 4] - 2*[1, 2] = [7, 8]
    assert f.predict(s, 3.0, target="blocks.0.attn").tolist() == [[7.0, 8.0]]
    with pytest.raises(ValueError, match="target path"):
        f.predict(s, 2.0)
    with pytest.raises(ValueError, match="no weights for target 'blocks.0.mlp'"):
        f.predict(s, 2.0, target="blocks.0.mlp")
    with pytest.raises(ValueError, match="no weights for step 1.5"):
        f.predict(s, 1.5, target="blocks.0.attn")
    wrong = f.update(f.update(f.empty(), torch.tensor([[1.0, 2.0]]), 0.0), torch.tensor([[3.0, 4.0]]), 2.0)
    with pytest.raises(ValueError, match=r"fitted on the features of steps \[1, 0\].*held are \[2, 0\]"):
        f.predict(wrong, 3.0, target="blocks.0.attn")
    assert f.predict(s, 2.0, target="blocks.0.attn").data_ptr() != s.factors[0].data_ptr()
    assert len(f.update(s, torch.tensor([[5.0, 6.0]]), 2.0).factors) == 2  # keeps the last K = 2 only


def test_linear_table_refuses_more_anchors_than_history():
    with pytest.raises(ValueError, match="history=1"):
        LinearTable({"*": {2: StepWeights((1, 0), torch.ones(2))}}, 3, (0, 1), "all", 1)
    with pytest.raises(ValueError, match="k = 2 anchors"):
        StepWeights((1, 0), torch.ones(3))


#################################################################################
#                              Runtime integration                              #
#################################################################################

def _images(model, config, num_steps=NUM_STEPS):
    with apply(model, config) as handle:
        return sample(model, torch.tensor([0, 3]), num_steps=num_steps, seed=5, listener=handle)


def test_runtime_passes_the_target_and_reuse_weights_equal_fora(tiny_dit, tmp_path):
    paths = [t for t in record_targets(tiny_dit)]
    schedule = FixedSchedule(SCHEDULE, NUM_STEPS)
    table = reuse_table(paths, grouping="target")
    cal = save_calibration(tmp_path / "reuse.safetensors", new_header("linear", "reuse", tiny_dit, schedule), table)
    ours = _images(tiny_dit, cal.cache_config())
    fora = _images(tiny_dit, CacheConfig(schedule, TaylorForecast(max_order=0), abscissa="step"))
    assert torch.equal(ours, fora)
    full = sample(tiny_dit, torch.tensor([0, 3]), num_steps=NUM_STEPS, seed=5)
    assert not torch.equal(ours, full)  # it did forecast


@pytest.mark.parametrize("granularity", ["block", "output"])
def test_reuse_weights_equal_fora_at_other_granularities(tiny_dit, tmp_path, granularity):
    from taylorseer.calibration import target_paths
    from taylorseer.parts import Targets

    schedule = FixedSchedule(SCHEDULE, NUM_STEPS)
    table = reuse_table(target_paths(tiny_dit, granularity), grouping="target")
    header = new_header("linear", "reuse", tiny_dit, schedule, granularity=granularity)
    cal = save_calibration(tmp_path / "reuse.safetensors", header, table)
    loaded = load_calibration(cal.path, model=tiny_dit)
    assert loaded.granularity == granularity and loaded.cache_config().targets.granularity == granularity
    ours = _images(tiny_dit, loaded.cache_config())
    fora = _images(tiny_dit, CacheConfig(schedule, TaylorForecast(max_order=0), Targets(granularity=granularity),
                                         abscissa="step"))
    assert torch.equal(ours, fora)
    full = sample(tiny_dit, torch.tensor([0, 3]), num_steps=NUM_STEPS, seed=5)
    assert not torch.equal(ours, full)
    module = _images(tiny_dit, CacheConfig(schedule, TaylorForecast(max_order=0), abscissa="step"))
    assert not torch.equal(ours, module)  # the file's granularity was used, not the default


def test_block_recording_is_each_blocks_output_minus_its_input(tiny_dit):
    from taylorseer.calibration import TrajectoryRecorder, calibration_targets

    blocks = calibration_targets(tiny_dit, "block")
    assert blocks and all(t.mode == "residual" for t in blocks)
    paths = [t.path for t in blocks]
    with TrajectoryRecorder(tiny_dit, blocks) as residuals, TrajectoryRecorder(tiny_dit, paths) as outputs:
        from taylorseer.calibration.record import _Listeners

        sample(tiny_dit, torch.tensor([0, 3]), num_steps=4, seed=5, listener=_Listeners(residuals, outputs))
        r, o = residuals.take(), outputs.take()
    for before, block in zip(paths, paths[1:]):  # block i's input is block i-1's output
        torch.testing.assert_close(r[block], o[block] - o[before], rtol=0, atol=0)
    assert r[paths[0]].shape == (4, 4, *o[paths[0]].shape[2:])  # 4 steps, CFG batch of 2 images
    assert not torch.equal(r[paths[0]], o[paths[0]])


def test_output_recording_takes_the_tensor_of_a_model_output(tiny_dit):
    from taylorseer.calibration import TrajectoryRecorder, calibration_targets

    (root,) = calibration_targets(tiny_dit, "output")
    size = tiny_dit.config.sample_size
    x = torch.randn(2, tiny_dit.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with TrajectoryRecorder(tiny_dit, [root]) as recorder:
        recorder.begin(2)
        outs = []
        for i, t in enumerate((900, 500)):
            with recorder.step(i):
                out = tiny_dit(x, torch.tensor([t, t]), class_labels=torch.tensor([1, 2]))  # a ModelOutput
                outs.append(out.sample)
        recorded = recorder.take()[root.path]
    assert torch.equal(recorded, torch.stack(outs))


def test_granularity_is_checked_before_any_work(tiny_dit, tmp_path):
    from taylorseer.calibration import calibrate

    with pytest.raises(ValueError, match="granularity must be one of.*'module', 'block', 'output'.*'blocks'"):
        calibrate(tiny_dit, 4, tmp_path / "x.safetensors", num_steps=NUM_STEPS, granularity="blocks", progress=False)
    with pytest.raises(ValueError, match="granularity must be one of"):
        record_trajectories(tiny_dit, torch.tensor([0]), num_steps=NUM_STEPS, granularity="layer", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def record_targets(model):
    from taylorseer.calibration import target_paths

    return target_paths(model)


def test_fitted_weights_beat_taylor_on_the_tiny_model(tiny_dit, tmp_path):
    # Calibrated and evaluated on the same trajectories: the fit minimises exactly what Taylor only approximates.
    stats = record_trajectories(tiny_dit, torch.tensor([0, 3]), num_steps=NUM_STEPS, seed=5, batch_size=2,
                                progress=False)
    assert stats.model_calls == NUM_STEPS and stats.images == 2
    schedule = FixedSchedule(SCHEDULE, NUM_STEPS)
    table, error = fit_linear(stats, SCHEDULE, FitOptions(history=2, bias=True))
    cal = save_calibration(tmp_path / "fit.safetensors",
                           new_header("linear", "fit", tiny_dit, schedule, fit=error), table)
    full = sample(tiny_dit, torch.tensor([0, 3]), num_steps=NUM_STEPS, seed=5)
    ours = _images(tiny_dit, cal.cache_config())
    taylor = _images(tiny_dit, CacheConfig(schedule, TaylorForecast(max_order=1), abscissa="step"))
    assert ((ours - full) ** 2).mean() < ((taylor - full) ** 2).mean()


def test_linear_forecast_at_other_steps_is_refused(tiny_dit, tmp_path):
    schedule = FixedSchedule(SCHEDULE, NUM_STEPS)
    cal = save_calibration(tmp_path / "reuse.safetensors", new_header("linear", "r", tiny_dit, schedule),
                           reuse_table(record_targets(tiny_dit)))
    with pytest.raises(ValueError, match="schedule for 12 steps.*num_steps=10"):
        _images(tiny_dit, cal.cache_config(), num_steps=10)


@pytest.mark.parametrize("bias", [False, True])
def test_match_variance_gives_the_forecast_the_targets_mean_and_variance(bias):
    # Targets = a combination of the anchors plus independent noise: the least-squares forecast has less variance
    # than the target; variance matching restores it (measured on the raw features, not on the Gram).
    g = torch.Generator().manual_seed(4)
    rows, channels = 4000, 3
    feats = torch.randn(NUM_STEPS, rows, channels, generator=g, dtype=torch.float64) + 0.7
    s, anchors = 5, anchors_for(SCHEDULE, 5, 3)
    feats[s] = 0.6 * feats[anchors[0]] - 0.2 * feats[anchors[1]] + 0.5 * torch.randn(rows, channels, generator=g,
                                                                                     dtype=torch.float64)
    stats = TrajectoryStats(NUM_STEPS, "target")
    stats.add("blocks.0.attn", feats[:, :, None, :])
    plain, _ = fit_linear(stats, SCHEDULE, FitOptions(history=3, bias=bias, ridge=0.0, match_variance=False))
    matched, _ = fit_linear(stats, SCHEDULE, FitOptions(history=3, bias=bias, ridge=0.0, match_variance=True))

    def forecast(table):
        sw = table.steps["blocks.0.attn"][s]
        out = sum(sw.weights[j, 0].double() * feats[a] for j, a in enumerate(sw.anchors))
        return out + (sw.bias[0].double() if sw.bias is not None else 0)

    target, before, after = feats[s], forecast(plain), forecast(matched)
    assert (before.var(0, unbiased=False) < 0.9 * target.var(0, unbiased=False)).all()
    torch.testing.assert_close(after.var(0, unbiased=False), target.var(0, unbiased=False), rtol=1e-6, atol=0)
    torch.testing.assert_close(after.mean(0), before.mean(0), rtol=1e-6, atol=1e-6)  # kept (float32 weights)
    assert ((after - target) ** 2).mean() > ((before - target) ** 2).mean()  # at some cost in MSE


#################################################################################
#                                    Search                                     #
#################################################################################

@pytest.mark.slow
def test_searched_schedule_respects_the_budget_and_is_deterministic():
    stats, _ = synthetic(schedule=(0, 2, 5, 9), history=2)
    for budget in (1, 2, 4, 6, NUM_STEPS):
        first = search_schedule(stats, budget, seed=3, max_evaluations=40, progress=False)
        again = search_schedule(stats, budget, seed=3, max_evaluations=40, progress=False)
        assert len(first.full_steps) == budget and first.full_steps[0] == 0
        assert list(first.full_steps) == sorted(set(first.full_steps))
        assert all(0 <= s < NUM_STEPS for s in first.full_steps)
        assert first.full_steps == again.full_steps and first.error == again.error
        assert first.error <= first.greedy_error
        assert first.model_calls == 0  # the proxy costs no model call
    with pytest.raises(ValueError, match="budget"):
        search_schedule(stats, NUM_STEPS + 1, progress=False)


def test_refinement_is_deterministic_for_a_seed_and_never_grows():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(NUM_STEPS, generator=g).tolist()

    def objective(full):
        return sum(cost[s] * (s - max(f for f in full if f <= s)) for s in range(NUM_STEPS))

    start = greedy_schedule(objective, 4, NUM_STEPS)
    runs = [refine_schedule(objective, start, NUM_STEPS, seed=7, radius=2) for _ in range(2)]
    assert runs[0] == runs[1]
    best, error, trace = runs[0]
    assert len(best) == 4 and best[0] == 0 and error == objective(best) <= objective(start)
    assert [e for _, e in trace] == sorted((e for _, e in trace), reverse=True)


def test_proxy_prefers_the_schedule_the_trajectories_were_built_for():
    stats, _ = synthetic(schedule=(0, 2, 5, 9), history=2, bias=False)
    proxy = ProxyObjective(stats, FitOptions(history=2, bias=False))
    assert proxy((0, 2, 5, 9)) < 1e-9 < proxy((0, 3, 5, 9))


#################################################################################
#                                 Calibration file                              #
#################################################################################

@pytest.fixture
def saved(tiny_dit, tmp_path):
    stats = record_trajectories(tiny_dit, torch.tensor([1]), num_steps=NUM_STEPS, seed=9, batch_size=1,
                                progress=False)
    table, error = fit_linear(stats, SCHEDULE, FitOptions(history=3))
    schedule = FixedSchedule(SCHEDULE, NUM_STEPS, name="tiny-b4")
    header = new_header("linear", "tiny-b4", tiny_dit, schedule, fit=error, calibration_data=stats.sampling)
    return save_calibration(tmp_path / "cal.safetensors", header, table), table


def test_file_round_trips(saved, tiny_dit):
    cal, table = saved
    loaded = load_calibration(cal.path, model=tiny_dit, num_steps=NUM_STEPS, schedule=SCHEDULE, kind="linear")
    assert loaded.header == cal.header and loaded.sha256 == cal.sha256
    assert loaded.schedule == FixedSchedule(SCHEDULE, NUM_STEPS, name="tiny-b4")
    assert loaded.table.steps.keys() == table.steps.keys()
    for group, steps in table.steps.items():
        for s, sw in steps.items():
            other = loaded.table.steps[group][s]
            assert other.anchors == sw.anchors
            assert torch.equal(other.weights, sw.weights)
            assert sw.bias is not None and torch.equal(other.bias, sw.bias)  # the variance-matching bias
    config = loaded.cache_config()
    assert config.forecaster == LinearForecast(cal.path, cal.sha256) and config.abscissa == "step"
    assert CacheConfig.from_json(config.to_json()) == config
    assert isinstance(build_forecaster(config.forecaster), LinearForecaster)


def test_schedule_only_file_works_with_any_forecaster(tiny_dit, tmp_path):
    schedule = FixedSchedule((0, 3, 7), NUM_STEPS, name="s3")
    cal = save_calibration(tmp_path / "s.safetensors", new_header("schedule", "s3", tiny_dit, schedule))
    loaded = load_calibration(cal.path, kind="schedule")
    assert loaded.table is None and loaded.schedule == schedule
    assert loaded.cache_config(forecaster=TaylorForecast(2)).policy == schedule
    with pytest.raises(CalibrationError, match="schedule only"):
        loaded.cache_config()
    with pytest.raises(CalibrationError, match="holds a 'schedule' calibration, a 'linear' one"):
        load_calibration(cal.path, kind="linear")


def _rewrite(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def test_corrupted_file_is_refused(saved):
    cal, _ = saved
    data = bytearray(Path(cal.path).read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's data
    _rewrite(cal.path, bytes(data))
    with pytest.raises(CalibrationError, match="corrupted"):
        load_calibration(cal.path)


def test_truncated_file_is_refused(saved):
    cal, _ = saved
    data = Path(cal.path).read_bytes()
    _rewrite(cal.path, data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="truncated"):
        load_calibration(cal.path)


def test_changed_file_is_refused_by_its_digest(saved, tiny_dit):
    cal, _ = saved
    config = cal.cache_config()
    data = bytearray(Path(cal.path).read_bytes())
    data[-3] ^= 0x40
    _rewrite(cal.path, bytes(data))
    with pytest.raises(CalibrationError, match=f"differs from the expected {cal.sha256}"):
        apply(tiny_dit, config)


def test_mismatched_model_is_refused(saved):
    cal, _ = saved
    with pytest.raises(CalibrationError, match="model class DiTTransformer2DModel, not Linear"):
        load_calibration(cal.path, model=torch.nn.Linear(2, 2))
    with pytest.raises(CalibrationError, match="another config"):
        load_calibration(cal.path, model=build_reference("DiT-FM-S/4"))
    other = build_reference("DiT-FM-T/4")  # same config, other (random) weights
    with pytest.raises(CalibrationError, match="other weights"):
        load_calibration(cal.path, model=other)


def test_mismatched_steps_and_schedule_are_refused(saved):
    cal, _ = saved
    with pytest.raises(CalibrationError, match="12-step generations, not 40"):
        load_calibration(cal.path, num_steps=40)
    with pytest.raises(CalibrationError, match=r"full steps \[0, 1, 4, 8\], not \[0, 2, 4, 8\]"):
        load_calibration(cal.path, schedule=(0, 2, 4, 8))


def test_not_a_calibration_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CalibrationError, match="not a taylorseer calibration file"):
        load_calibration(path)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "missing.safetensors")


def test_row_groups_get_their_own_weights():
    # Two halves of the rows (a CFG batch [cond; uncond]) follow different linear rules; R = 2 recovers both.
    g = torch.Generator().manual_seed(2)
    feats = torch.zeros(NUM_STEPS, 8, 5, 3, dtype=torch.float64)
    rules = {}
    for s in range(NUM_STEPS):
        if s in SCHEDULE:
            feats[s] = torch.randn(8, 5, 3, generator=g, dtype=torch.float64)
            continue
        anchors = anchors_for(SCHEDULE, s, 2)
        w = torch.randn(len(anchors), 2, 3, generator=g, dtype=torch.float64)
        feats[s, :4] = sum(w[j, 0] * feats[a, :4] for j, a in enumerate(anchors))
        feats[s, 4:] = sum(w[j, 1] * feats[a, 4:] for j, a in enumerate(anchors))
        rules[s] = w
    stats = TrajectoryStats(NUM_STEPS, "target", row_groups=2)
    stats.add("t", feats)
    table, error = fit_linear(stats, SCHEDULE, FitOptions(history=2, bias=False, ridge=0.0, match_variance=False))
    assert error["rel_error"] < 1e-6
    f = LinearForecaster(table)
    for s, w in rules.items():
        assert (table.steps["t"][s].weights.double() - w).abs().max() < 1e-6
        state = f.empty()
        for a in sorted(anchors_for(SCHEDULE, s, 2)):
            state = f.update(state, feats[a].float(), float(a))
        assert torch.allclose(f.predict(state, float(s), target="t").double(), feats[s], atol=1e-5)
    state = f.update(f.update(f.empty(), torch.ones(3, 5, 3), 0.0), torch.ones(3, 5, 3), 1.0)
    with pytest.raises(ValueError, match="does not split into the calibration's 2 row groups"):
        f.predict(state, 2.0, target="t")


def test_bias_and_row_groups_round_trip(tiny_dit, tmp_path):
    stats = record_trajectories(tiny_dit, torch.tensor([1, 2]), num_steps=NUM_STEPS, seed=9, batch_size=2,
                                progress=False)
    assert stats.row_groups == 2  # a guided CFG batch: [cond; uncond]
    table, error = fit_linear(stats, SCHEDULE, FitOptions(history=2, bias=True))
    header = new_header("linear", "b", tiny_dit, FixedSchedule(SCHEDULE, NUM_STEPS), fit=error)
    cal = save_calibration(tmp_path / "b.safetensors", header, table)
    loaded = load_calibration(cal.path)
    assert loaded.header["forecaster"]["row_groups"] == 2
    for group, steps in table.steps.items():
        for s, sw in steps.items():
            other = loaded.table.steps[group][s]
            assert other.weights.shape == sw.weights.shape == (len(sw.anchors), 2, sw.weights.shape[2])
            assert torch.equal(other.weights, sw.weights) and torch.equal(other.bias, sw.bias)


#################################################################################
#                               Bench and CLI hooks                             #
#################################################################################

@pytest.mark.slow
def test_bench_builds_calibrated_methods_and_refuses_the_wrong_guidance_layout(saved, tiny_dit):
    from taylorseer.eval.bench import calibrated_methods
    from taylorseer.eval.install import applies_config

    cal, _ = saved
    methods = calibrated_methods(cal.path, tiny_dit, NUM_STEPS)
    assert [m.name for m in methods] == ["tiny-b4", "tiny-b4-taylor2"]
    assert all(m.family == "calibrated" and m.full_steps() == len(SCHEDULE) for m in methods)
    assert all(applies_config(m) for m in methods)  # a cached family, installed by taylorseer.apply
    assert isinstance(methods[0].config.forecaster, LinearForecast)
    assert methods[1].config.forecaster == TaylorForecast(max_order=2)
    with pytest.raises(CalibrationError, match="guided CFG batch.*guidance_scale=1.0"):
        calibrated_methods(cal.path, tiny_dit, NUM_STEPS, guidance_scale=1.0)
    with pytest.raises(CalibrationError, match="not 40"):
        calibrated_methods(cal.path, tiny_dit, 40)


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--budget", "60", "--out", "{tmp}/c.safetensors"], "--budget: 60 full steps exceed --steps 50"),
    (["calibrate", "--budget", "8", "--out", "{tmp}/c.safetensors", "--classes", "0-12"], "--classes"),
    (["calibrate", "--budget", "8", "--out", "{tmp}/c.safetensors", "--classes", "a-b"], "--classes"),
    (["calibrate", "--budget", "3", "--out", "{tmp}/c.safetensors", "--schedule", "0,5,9,20"],
     "4 full steps exceed --budget 3"),
    (["calibrate", "--budget", "3", "--out", "{tmp}/c.safetensors", "--schedule", "1,5"], "start with step 0"),
    (["bench", "--calibration", "{tmp}/missing.safetensors"], "no such file"),
    (["calibrate", "--budget", "3", "--out", "{tmp}/c.safetensors", "--schedule", "0,5", "--forecaster", "taylor2"],
     "--forecaster: taylor2 searches a schedule"),
    (["calibrate", "--budget", "3", "--out", "{tmp}/c.safetensors", "--forecaster", "taylor2", "--search-images",
      "0"], "--search-images"),
])
def test_cli_refuses_bad_calibration_input_before_any_work(monkeypatch, capsys, tmp_path, argv, message):
    import taylorseer.calibration
    import taylorseer.models.pretrained

    def reached(*args, **kwargs):
        raise AssertionError("work started on refused input")

    monkeypatch.setattr(taylorseer.models.pretrained, "load_reference", reached)
    monkeypatch.setattr(taylorseer.calibration, "calibrate", reached)
    from taylorseer.cli import main

    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_end_to_end_on_the_tiny_model(tiny_dit, tmp_path):
    from taylorseer.calibration import calibrate

    cal = calibrate(tiny_dit, 4, tmp_path / "c.safetensors", num_steps=NUM_STEPS, images=2, search_images=2,
                    max_evaluations=6, progress=False, name="tiny")
    search = cal.header["search"]
    assert len(cal.schedule.full_steps) == 4 and cal.schedule.full_steps[0] == 0
    assert search["full_steps"] == list(cal.schedule.full_steps)
    assert 0 < search["evaluations"] and search["model_calls"] >= NUM_STEPS  # the search images' reference
    assert search["full_calls"] < search["model_calls"] and search["seconds"] > 0
    assert cal.header["calibration_data"]["images"] == 2 and cal.header["fit"]["rel_error"] >= 0
    assert load_calibration(cal.path, model=tiny_dit, num_steps=NUM_STEPS).sha256 == cal.sha256
    again = calibrate(tiny_dit, 4, tmp_path / "d.safetensors", num_steps=NUM_STEPS, images=2, search_images=2,
                      max_evaluations=6, progress=False, name="tiny")
    assert again.schedule == cal.schedule  # deterministic for the seeds


def test_calibrate_at_block_granularity_records_and_forecasts_block_residuals(tiny_dit, tmp_path):
    from taylorseer.calibration import calibrate, target_paths

    schedule = FixedSchedule(SCHEDULE, NUM_STEPS)
    cal = calibrate(tiny_dit, 4, tmp_path / "b.safetensors", num_steps=NUM_STEPS, images=2, schedule=schedule,
                    granularity="block", progress=False)
    assert cal.header["granularity"] == "block" and cal.header["calibration_data"]["granularity"] == "block"
    assert sorted(cal.header["targets"]) == sorted(cal.header["groups"]) == sorted(target_paths(tiny_dit, "block"))
    config = load_calibration(cal.path, model=tiny_dit).cache_config()
    assert config.targets.granularity == "block"
    with apply(tiny_dit, config) as handle:
        sample(tiny_dit, torch.tensor([0, 3]), num_steps=NUM_STEPS, seed=5, listener=handle)
        assert sorted({t.path for t in handle.targets}) == sorted(cal.header["targets"])
        assert handle.stats.steps_forecast == NUM_STEPS - len(SCHEDULE)


@pytest.mark.slow
def test_on_policy_refit_is_on_for_modules_and_blocks_and_off_for_the_output(tiny_dit, tmp_path):
    from taylorseer.calibration import calibrate

    schedule = FixedSchedule(SCHEDULE, NUM_STEPS)
    fits = {}
    for granularity in ("module", "block", "output"):
        cal = calibrate(tiny_dit, 4, tmp_path / f"{granularity}.safetensors", num_steps=NUM_STEPS, images=2,
                        schedule=schedule, granularity=granularity, progress=False)
        fits[granularity] = cal.header["forecaster"]["fit"]
        assert ("on_policy" in cal.header["calibration_data"]) == (fits[granularity] == "on-policy")
    assert fits == {"module": "on-policy", "block": "on-policy", "output": "teacher-forced"}
    forced = calibrate(tiny_dit, 4, tmp_path / "forced.safetensors", num_steps=NUM_STEPS, images=2, schedule=schedule,
                       granularity="output", on_policy=True, progress=False)
    assert forced.header["forecaster"]["fit"] == "on-policy"


def test_schedule_searched_for_a_formula_forecaster(tiny_dit, tmp_path):
    from taylorseer.calibration import calibrate
    from taylorseer.eval.bench import calibrated_methods

    taylor = TaylorForecast(max_order=2)
    cal = calibrate(tiny_dit, 4, tmp_path / "s.safetensors", num_steps=NUM_STEPS, images=2, search_images=2,
                    max_evaluations=6, forecaster=taylor, granularity="output", progress=False, name="tiny-ts")
    loaded = load_calibration(cal.path, model=tiny_dit, num_steps=NUM_STEPS, kind="schedule")
    assert loaded.table is None and loaded.searched_with == taylor and loaded.header["fit"] is None
    assert len(loaded.schedule.full_steps) <= 4 and loaded.schedule.full_steps[0] == 0
    config = loaded.cache_config()
    assert config.forecaster == taylor and config.targets.granularity == "output"
    assert config.policy.full_steps == tuple(loaded.header["search"]["full_steps"])
    (method,) = calibrated_methods(cal.path, tiny_dit, NUM_STEPS)
    assert method.name == "tiny-ts" and method.cache_config().forecaster == taylor
    # The search evaluated candidates with that forecaster: the chosen schedule's error is what it gives.
    with apply(tiny_dit, config) as handle:
        images = sample(tiny_dit, torch.tensor([0, 1]), num_steps=NUM_STEPS, seed=loaded.header["calibration_data"][
            "seed"], listener=handle)
    full = sample(tiny_dit, torch.tensor([0, 1]), num_steps=NUM_STEPS, seed=loaded.header["calibration_data"]["seed"])
    mse = float(((images.double() - full.double()) ** 2).mean())
    assert mse == pytest.approx(loaded.header["search"]["error"], rel=1e-6)


def test_formula_schedule_search_refusals_come_before_any_work(tiny_dit, tmp_path, monkeypatch):
    import importlib

    from taylorseer.calibration import calibrate

    module = importlib.import_module("taylorseer.calibration.calibrate")

    def reached(*args, **kwargs):
        raise AssertionError("work started on refused input")

    monkeypatch.setattr(module, "record_trajectories", reached)
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="formula forecaster config"):
        calibrate(tiny_dit, 4, out, num_steps=NUM_STEPS, forecaster=LinearForecast("f.safetensors", ""))
    with pytest.raises(ValueError, match="needs schedule=None"):
        calibrate(tiny_dit, 4, out, num_steps=NUM_STEPS, forecaster=TaylorForecast(max_order=1),
                  schedule=FixedSchedule(SCHEDULE, NUM_STEPS))
    with pytest.raises(ValueError, match="search_images must be > 0"):
        calibrate(tiny_dit, 4, out, num_steps=NUM_STEPS, forecaster=TaylorForecast(max_order=1), search_images=0)
    with pytest.raises(TypeError, match="forecaster must be one of"):
        calibrate(tiny_dit, 4, out, num_steps=NUM_STEPS, forecaster="taylor2")
    assert not out.exists()


#################################################################################
#                               On-policy refit                                 #
#################################################################################

def test_on_policy_fit_recovers_known_weights_from_its_own_anchors():
    # Targets that are exact combinations of the *on-policy* anchors (not of the reference features at those
    # steps): fit_on_policy must recover them, reading anchors and targets at their own Gram indices.
    from taylorseer.calibration import OnPolicyStats, fit_on_policy

    g = torch.Generator().manual_seed(3)
    rows, channels, history = 300, 2, 3
    on_policy = torch.randn(len(SCHEDULE), rows, channels, generator=g, dtype=torch.float64)
    reference = torch.randn(NUM_STEPS, rows, channels, generator=g, dtype=torch.float64)
    truth = {}
    for s in forecast_steps(SCHEDULE, NUM_STEPS):
        anchors = anchors_for(SCHEDULE, s, history)
        w = torch.randn(len(anchors), channels, generator=g, dtype=torch.float64)
        reference[s] = sum(w[j] * on_policy[SCHEDULE.index(a)] for j, a in enumerate(anchors))
        truth[s] = w
    pairs = TrajectoryStats(len(SCHEDULE) + NUM_STEPS, "target")
    pairs.add("blocks.0.attn", torch.cat([on_policy, reference]))
    table, error = fit_on_policy(OnPolicyStats(SCHEDULE, NUM_STEPS, pairs),
                                 FitOptions(history=history, ridge=0.0, match_variance=False))
    assert error["rel_error"] < 1e-6
    for s, w in truth.items():
        sw = table.steps["blocks.0.attn"][s]
        assert sw.anchors == anchors_for(SCHEDULE, s, history)
        assert (sw.weights[:, 0].double() - w).abs().max() < 1e-6
    # The teacher-forced fit of the same reference trajectory cannot find them (its anchors are other features).
    stats = TrajectoryStats(NUM_STEPS, "target")
    stats.add("blocks.0.attn", reference)
    _, teacher = fit_linear(stats, SCHEDULE, FitOptions(history=history, ridge=0.0, match_variance=False))
    assert teacher["rel_error"] > 0.1


def test_on_policy_recording_sees_the_cached_run(tiny_dit, tmp_path):
    from taylorseer.calibration import record_on_policy

    labels = torch.tensor([1, 4])
    stats = record_trajectories(tiny_dit, labels, num_steps=NUM_STEPS, seed=7, batch_size=2, progress=False)
    table, _ = fit_linear(stats, SCHEDULE, FitOptions(history=2))
    cal = save_calibration(tmp_path / "tf.safetensors",
                           new_header("linear", "tf", tiny_dit, FixedSchedule(SCHEDULE, NUM_STEPS)), table)
    on = record_on_policy(tiny_dit, labels, cal.cache_config(), num_steps=NUM_STEPS, seed=7, batch_size=2,
                          progress=False)
    assert on.pairs.num_steps == len(SCHEDULE) + NUM_STEPS and on.pairs.images == 2
    assert on.pairs.model_calls == NUM_STEPS + len(SCHEDULE)
    for group, gram in on.pairs.gram.items():
        # The reference half is the teacher-forced recording (same labels, noise and batching).
        ref = gram[..., len(SCHEDULE):, len(SCHEDULE):]
        assert torch.allclose(ref, stats.gram[group], rtol=1e-10, atol=0), group
        # Step 0 is computed before any forecast: on-policy and reference agree; the last full step comes after
        # forecasts, so the cached run's feature there is not the full-compute one.
        a0, r0 = on.anchor_index(0), on.target_index(0)
        assert torch.allclose(gram[..., a0, a0], gram[..., r0, r0], rtol=1e-10)
        last = SCHEDULE[-1]
        a, r = on.anchor_index(last), on.target_index(last)
        cross = gram[..., a, r] / (gram[..., a, a] * gram[..., r, r]).sqrt()
        assert not torch.allclose(gram[..., a, a], gram[..., r, r], rtol=1e-6), group
        assert cross.min() < 1 - 1e-9  # the two features are not the same vector


@pytest.mark.slow
def test_on_policy_refit_lowers_the_error_to_full_compute(tmp_path):
    # On the shipped model (on the random tiny one the forecasts barely drift, so there is nothing to correct):
    # held-out images, 20 DDIM steps, 6 full.
    from taylorseer.calibration import calibrate
    from taylorseer.models.pretrained import load_reference

    model = load_reference()
    steps, schedule = 20, FixedSchedule((0, 1, 3, 6, 10, 15), 20)
    labels = torch.arange(8) % 10
    full = sample(model, labels, num_steps=steps, seed=DEFAULT_EVAL_SEED)
    errors = {}
    for on_policy in (False, True):
        cal = calibrate(model, 6, tmp_path / f"c{on_policy}.safetensors", num_steps=steps, images=16,
                        schedule=schedule, progress=False, on_policy=on_policy)
        assert cal.header["forecaster"]["fit"] == ("on-policy" if on_policy else "teacher-forced")
        assert ("on_policy" in cal.header["calibration_data"]) == on_policy
        with apply(model, cal.cache_config()) as handle:
            images = sample(model, labels, num_steps=steps, seed=DEFAULT_EVAL_SEED, listener=handle)
        errors[on_policy] = float(((images - full) ** 2).mean())
    assert errors[True] < 0.95 * errors[False]  # measured 0.87 with 16 calibration images (2026-12-01)


DEFAULT_EVAL_SEED = 11  # held out: the calibrations use noise seeds from 1000


def test_on_policy_needs_a_recorded_sampling_before_any_search(tiny_dit, tmp_path, monkeypatch):
    import importlib

    from taylorseer.calibration import calibrate

    module = importlib.import_module("taylorseer.calibration.calibrate")  # the package's calibrate is the function

    stats, _truth = synthetic(num_steps=NUM_STEPS)  # built by hand: no sampling record to sample again from
    monkeypatch.setattr(module, "search_schedule", lambda *a, **k: pytest.fail("searched before refusing"))
    with pytest.raises(ValueError, match="on_policy=True samples the calibration images again"):
        calibrate(tiny_dit, 4, tmp_path / "x.safetensors", num_steps=NUM_STEPS, stats=stats, progress=False)
    assert not (tmp_path / "x.safetensors").exists()
