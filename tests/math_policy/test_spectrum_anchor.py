"""Spectrum's forecaster and schedule, and the hybrid policy (``AnchorSchedule``: the first block computed on every
step): hand-computed values, literal plans, and on the tiny DiT which blocks really run."""

from __future__ import annotations

import pytest
import torch

import taylorseer
from taylorseer.forecast import SpectrumForecast, TaylorForecast, build_forecaster
from taylorseer.forecast.spectrum import chebyshev
from taylorseer.models.sampler import sample
from taylorseer.parts import CacheConfig, Targets
from taylorseer.policy import (
    AnchorSchedule,
    FixedSchedule,
    IntervalPolicy,
    Observation,
    SpectrumSchedule,
    StepInfo,
    build_policy,
)
from taylorseer.policy.spectrum import spectrum_for_budget

STEPS = 10
LABELS = torch.tensor([0, 1])


#################################################################################
#                              Spectrum forecaster                              #
#################################################################################

def _fit(config: SpectrumForecast, xs, f):
    forecaster = build_forecaster(config)
    state = forecaster.empty()
    for x in xs:
        state = forecaster.update(state, torch.tensor([f(x)], dtype=torch.float64), float(x))
    return forecaster, state


def test_chebyshev_values_by_hand():
    # T0..T3 at 0.5: 1, 0.5, 2*0.25-1 = -0.5, 4*0.125-3*0.5 = -1
    assert chebyshev(torch.tensor([0.5], dtype=torch.float64), 3).tolist() == [[1.0, 0.5, -0.5, -1.0]]


def test_without_ridge_a_polynomial_of_the_degree_is_forecast_exactly():
    def f(x):
        return 1 + 2 * x - 0.5 * x * x

    forecaster, state = _fit(SpectrumForecast(degree=2, ridge=0.0, history=4, span=20.0), (0, 2, 3, 5), f)
    assert float(forecaster.predict(state, 9.0)) == pytest.approx(f(9.0), abs=1e-9)  # -21.5


def test_the_ridge_shrinks_a_single_point_by_one_over_one_plus_lambda():
    # degree 0, one point: w = T0 T0 / (T0 T0 + ridge) = 1 / 1.1
    forecaster, state = _fit(SpectrumForecast(degree=0, ridge=0.1, history=6, span=50.0), (0,), lambda x: 3.0)
    assert float(forecaster.predict(state, 4.0)) == pytest.approx(3.0 / 1.1, abs=1e-12)


def test_history_keeps_the_newest_features_first():
    forecaster, state = _fit(SpectrumForecast(history=3), (0, 1, 2, 3, 4), lambda x: float(x))
    assert state.points == (4.0, 3.0, 2.0)
    assert [float(f) for f in state.factors] == [4.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="repeats the latest"):
        forecaster.update(state, torch.tensor([0.0]), 4.0)
    with pytest.raises(ValueError, match="empty state"):
        forecaster.predict(forecaster.empty(), 1.0)


@pytest.mark.parametrize("field, value", [("degree", -1), ("degree", 9), ("ridge", -0.1), ("span", 0.0),
                                          ("history", 0), ("ridge", float("nan"))])
def test_spectrum_forecast_refuses_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=f"SpectrumForecast.{field}"):
        SpectrumForecast(**{field: value})


#################################################################################
#                          Spectrum schedule, hybrid                            #
#################################################################################

def test_spectrum_schedule_plan_by_hand():
    # full 0, 1; then gaps 2, 3, round(4.5) = 5, round(6.75) = 7 (next: 10 would pass step 19)
    plan = SpectrumSchedule(interval=2, growth=1.5, warmup_steps=2).plan(20)
    assert [i for i, full in enumerate(plan) if full] == [0, 1, 3, 6, 11, 18]
    assert sum(spectrum_for_budget(8, 50).plan(50)) == 8
    with pytest.raises(ValueError, match="SpectrumSchedule.growth"):
        SpectrumSchedule(growth=0.9)
    with pytest.raises(ValueError, match="no first window"):
        spectrum_for_budget(49, 50)


def test_anchor_policy_probes_every_forecast_step_and_never_computes_it():
    policy = build_policy(AnchorSchedule((0, 3), num_steps=5, probe_blocks=2))
    assert policy.probe_blocks == 2
    policy.begin(5)
    decisions = [policy.decide(StepInfo(i, 5, float(i))) for i in range(5)]
    assert [(d.compute, d.probe) for d in decisions] == [(True, False), (False, True), (False, True), (True, False),
                                                         (False, True)]
    assert policy.resolve(StepInfo(1, 5, 1.0), Observation(float("nan"), float("inf"))) is False
    assert policy.plan(5) == [True, False, False, True, False]
    assert AnchorSchedule.from_interval(4, 2, 10).full_steps == (0, 1, 5, 9)
    assert IntervalPolicy(4, 2).pattern(10) == "FFfffFfffF"
    with pytest.raises(ValueError, match="AnchorSchedule.full_steps"):
        AnchorSchedule((1, 3), num_steps=5)
    with pytest.raises(ValueError, match="AnchorSchedule.probe_blocks"):
        AnchorSchedule((0,), num_steps=5, probe_blocks=0)
    with pytest.raises(ValueError, match="for 5 steps"):
        policy.begin(6)


@pytest.mark.parametrize("config", [
    CacheConfig(AnchorSchedule((0, 4), 10), TaylorForecast(2), Targets("block")),
    CacheConfig(SpectrumSchedule(2.5, 1.3), SpectrumForecast(degree=3, ridge=0.05, history=5, span=10.0)),
])
def test_configs_round_trip_through_json(config):
    assert CacheConfig.from_json(config.to_json()) == config


#################################################################################
#                            On the tiny DiT                                    #
#################################################################################

def _calls(model, config):
    """(images, calls of each block's first attention projection) for one generation under ``config``."""
    counts = [0] * len(model.transformer_blocks)
    hooks = [block.attn1.to_q.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, block in enumerate(model.transformer_blocks)]
    handle = taylorseer.apply(model, config)
    try:
        images = sample(model, LABELS, num_steps=STEPS, seed=0, listener=handle)
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    return images, counts


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_the_hybrid_computes_the_first_block_on_every_step_and_the_rest_on_full_steps(tiny_dit, granularity):
    full = (0, 1, 5, 9)
    anchored, counts = _calls(tiny_dit, CacheConfig(AnchorSchedule(full, STEPS), TaylorForecast(1),
                                                    Targets(granularity)))
    assert counts == [STEPS, len(full)]  # one model call per step (CFG as one batch)
    plain, plain_counts = _calls(tiny_dit, CacheConfig(FixedSchedule(full, STEPS), TaylorForecast(1),
                                                       Targets(granularity)))
    assert plain_counts == [len(full), len(full)]
    assert torch.isfinite(anchored).all()
    assert not torch.equal(anchored, plain)  # the fresh first block changes what the later blocks see


def test_the_hybrid_with_every_step_full_is_plain_sampling(tiny_dit):
    reference = sample(tiny_dit, LABELS, num_steps=STEPS, seed=0)
    images, counts = _calls(tiny_dit, CacheConfig(AnchorSchedule(tuple(range(STEPS)), STEPS), TaylorForecast(1),
                                                  Targets("block")))
    assert counts == [STEPS, STEPS]
    assert torch.equal(images, reference)


def test_the_hybrid_is_refused_at_output_granularity(tiny_dit):
    with pytest.raises(ValueError, match="probes 1 block"):
        taylorseer.apply(tiny_dit, CacheConfig(AnchorSchedule((0, 5), STEPS), TaylorForecast(1), Targets("output")))
