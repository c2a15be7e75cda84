"""The joint (summed-residual) fit of the hybrid's anchored weights: calibration/anchor_joint.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from taylorseer.calibration.anchor_joint import fit_correction, fit_joint, joint_indices, save_correction
from taylorseer.forecast.anchored import (
    AnchoredLinearForecaster,
    AnchoredMapForecast,
    AnchoredMapForecaster,
    read_correction,
)
from taylorseer.forecast.linear import LinearTable, StepWeights
from taylorseer.forecast.linear_file import CalibrationError

STEPS, ROWS, TOKENS, C = 6, 4, 5, 3
FULL = (0, 3)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = {f"b{i}": torch.randn(STEPS, ROWS, TOKENS, C, generator=g) for i in (1, 2, 3)}
    anchor = torch.randn(STEPS, ROWS, TOKENS, C, generator=g)
    # an exact relation, per channel: total(s) = 0.5 b1(a0) - 2 b2(a0) + 1.5 b3(a0) + v A(s) + bias
    w = {"b1": torch.tensor([0.5, 1.0, -1.0]), "b2": torch.tensor([-2.0, 0.3, 0.0]),
         "b3": torch.tensor([1.5, -0.7, 2.0])}
    v = torch.tensor([3.0, -1.0, 0.25])
    bias = torch.tensor([0.1, -0.2, 0.4])
    total = torch.zeros(STEPS, ROWS, TOKENS, C)
    for s in range(STEPS):
        a0 = max(a for a in FULL if a < s) if s not in FULL else s
        total[s] = sum(w[n] * features[n][a0] for n in features) + v * anchor[s] + bias
    return features, anchor, total, w, v, bias


def test_joint_indices_by_hand():
    assert joint_indices((0, 4, 6), 8, 10, history=2, anchor_history=1) == ((6, 4), (18, 16))
    assert joint_indices((0, 4, 6), 5, 10, history=3, anchor_history=0) == ((4, 0), (15,))


def test_fit_recovers_an_exact_relation_and_the_forecasts_sum_to_it():
    features, anchor, total, w, v, bias = _data()
    table, error = fit_joint(features, total, anchor, FULL, history=1, anchor_history=0, ridge=0.0, carrier="b3")
    assert error["rel_error"] < 1e-6
    for s in (1, 2, 4, 5):
        a0 = 0 if s < 3 else 3
        for name in features:
            sw = table.steps[name][s]
            assert sw.anchors[0] == a0
            torch.testing.assert_close(sw.weights[0, 0], w[name], atol=1e-5, rtol=0)
        carrier = table.steps["b3"][s]
        assert carrier.anchors == (a0, STEPS + s)
        torch.testing.assert_close(carrier.weights[1, 0], v, atol=1e-5, rtol=0)
        torch.testing.assert_close(carrier.bias[0], bias, atol=1e-5, rtol=0)
        assert table.steps["b1"][s].bias is None and len(table.steps["b1"][s].anchors) == 1
    # run as the hybrid runs it: every block forecasts, the sum is the total
    forecaster = AnchoredLinearForecaster(table, anchor="a")
    states = {n: forecaster.update(forecaster.empty(), features[n][0], 0.0) for n in features}
    states = {n: forecaster.update(states[n], features[n][3], 3.0) for n in features}
    anchor_state = forecaster.update(forecaster.update(forecaster.empty(), anchor[0], 0.0), anchor[3], 3.0)
    forecaster.observe_anchor("a", 5.0, [anchor[5]], [anchor_state])
    summed = sum(forecaster.predict(states[n], 5.0, target=n) for n in features)
    torch.testing.assert_close(summed, total[5], atol=1e-4, rtol=0)


def test_joint_fit_predicts_a_sum_that_no_block_predicts_alone():
    # Each block alone is unpredictable from its own history here, but their sum is: the joint fit finds it.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(STEPS, ROWS, TOKENS, C, generator=g)
    noise = torch.randn(STEPS, ROWS, TOKENS, C, generator=g)
    features = {"b1": base + noise, "b2": base - noise}
    total = torch.zeros_like(base)
    total[1:3] = 2.0 * base[0]
    total[4:] = 2.0 * base[3]
    anchor = torch.randn(STEPS, ROWS, TOKENS, C, generator=g)
    _, error = fit_joint(features, total, anchor, FULL, history=1, anchor_history=0, carrier="b1")
    assert error["rel_error"] < 1e-3
    for name in features:  # one block's own history alone cannot reach the sum
        _, alone = fit_joint({name: features[name]}, total, anchor, FULL, history=1, anchor_history=0, carrier=name)
        assert alone["rel_error"] > 0.5, name


@pytest.mark.parametrize("kwargs, match", [
    ({"carrier": "b9"}, "carrier must be one of"),
    ({"carrier": "b1", "history": 0}, "history must be an int"),
    ({"carrier": "b1", "anchor_history": 2, "history": 1}, "anchor_history must be an int"),
    ({"carrier": "b1", "full_steps": (1, 3)}, "full_steps must"),
    ({"carrier": "b1", "full_steps": (0, 6)}, "full_steps must"),
])
def test_refusals_name_the_field(kwargs, match):
    features, anchor, total, *_ = _data()
    kwargs = dict(kwargs)  # the parametrized dict is shared: leave it as it is
    full = kwargs.pop("full_steps", FULL)
    with pytest.raises(ValueError, match=match):
        fit_joint(features, total, anchor, full, **kwargs)


def test_shape_mismatch_is_refused():
    features, anchor, total, *_ = _data()
    with pytest.raises(ValueError, match="'anchor' has shape"):
        fit_joint(features, total, anchor[:, :2], FULL, carrier="b1")


def test_correction_recovers_a_low_rank_cross_channel_map():
    # residual(s) = A(s) @ M with M of rank 2 mixing channels: per-channel weights cannot express it, the rank-2
    # correction reproduces it exactly (x @ map) @ basis.T
    g = torch.Generator().manual_seed(2)
    anchor = torch.randn(STEPS, ROWS, TOKENS, C, generator=g)
    u = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    m_true = torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.0, 1.5]]) @ u.T  # [C, C], rank 2
    residuals = {s: anchor[s] @ m_true for s in (1, 2, 4, 5)}
    maps = fit_correction(anchor, residuals, FULL, rank=2, anchor_history=1, ridge=0.0)
    for s, res in residuals.items():
        m, basis = maps[s]
        assert m.shape == (2 * C, 2) and basis.shape == (C, 2)
        a0 = 0 if s < 3 else 3
        x = torch.cat([anchor[s], anchor[a0]], dim=-1)
        torch.testing.assert_close((x @ m) @ basis.T, res, atol=1e-4, rtol=0)
    # rank 1 cannot: the fit is then strictly worse than exact
    m, basis = fit_correction(anchor, residuals, FULL, rank=1, anchor_history=0, ridge=0.0)[4]
    assert float(((anchor[4] @ m) @ basis.T - residuals[4]).norm()) > 0.1 * float(residuals[4].norm())


def test_correction_forecaster_adds_the_map_on_its_target_only(tmp_path):
    table = LinearTable({"b1": {1: StepWeights((0,), torch.ones(1, 1, C))},
                         "b2": {1: StepWeights((0, STEPS + 1), torch.ones(2, 1, C))}},
                        num_steps=STEPS, full_steps=(0, 3), grouping="target", history=2)
    m = torch.arange(2 * C * 1, dtype=torch.float32).reshape(2 * C, 1) / 10
    basis = torch.tensor([[1.0], [0.0], [-1.0]])
    path = str(tmp_path / "map.safetensors")
    digest = save_correction(path, {1: (m, basis)}, target="b2", tokens=TOKENS, anchor_history=1)
    correction = read_correction(path, digest)
    assert correction.target == "b2" and correction.tokens == TOKENS and sorted(correction.maps) == [1]
    f = AnchoredMapForecaster(table, "a", correction)
    g = torch.Generator().manual_seed(3)
    own0, a0, a1 = (torch.randn(ROWS, TOKENS, C, generator=g) for _ in range(3))
    state = f.update(f.empty(), own0, 0.0)
    anchor_state = f.update(f.empty(), a0, 0.0)
    f.observe_anchor("a", 1.0, [a1], [anchor_state])
    expected = own0 + a1 + (torch.cat([a1, a0], -1) @ m) @ basis.T  # weights 1 on own and fresh anchor, + map
    torch.testing.assert_close(f.predict(state, 1.0, target="b2"), expected)
    torch.testing.assert_close(f.predict(state, 1.0, target="b1"), own0)  # not the correction's target
    with pytest.raises(CalibrationError, match="SHA-256"):
        read_correction(path, "0" * 64)


def test_correction_refusals(tmp_path):
    anchor = torch.zeros(STEPS, ROWS, TOKENS, C)
    with pytest.raises(ValueError, match="rank must be an int"):
        fit_correction(anchor, {1: anchor[1]}, FULL, rank=0)
    with pytest.raises(ValueError, match="rank 4 exceeds"):
        fit_correction(anchor, {1: anchor[1]}, FULL, rank=4)
    with pytest.raises(ValueError, match="correction must be the path"):
        AnchoredMapForecast("a.safetensors", "")
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(CalibrationError, match="no 'anchor-correction' header"):
        read_correction(plain)
