"""The joint (summed-residual) fit of the hybrid's anchored weights: calibration/anchor_joint.py."""

from __future__ import annotations

import pytest
import torch

from taylorseer.calibration.anchor_joint import fit_joint, joint_indices
from taylorseer.forecast.anchored import AnchoredLinearForecaster

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


@pytest.mark.parametrize("kwargs, match", [
    ({"carrier": "b9"}, "carrier must be one of"),
    ({"carrier": "b1", "history": 0}, "history must be an int"),
    ({"carrier": "b1", "anchor_history": 2, "history": 1}, "anchor_history must be an int"),
    ({"carrier": "b1", "full_steps": (1, 3)}, "full_steps must"),
    ({"carrier": "b1", "full_steps": (0, 6)}, "full_steps must"),
])
def test_refusals_name_the_field(kwargs, match):
    features, anchor, total, *_ = _data()
    full = kwargs.pop("full_steps", FULL)
    with pytest.raises(ValueError, match=match):
        fit_joint(features, total, anchor, full, **kwargs)


def test_shape_mismatch_is_refused():
    features, anchor, total, *_ = _data()
    with pytest.raises(ValueError, match="'anchor' has shape"):
        fit_joint(features, total, anchor[:, :2], FULL, carrier="b1")
