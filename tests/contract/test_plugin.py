"""A new forecaster and a new policy plug in with one registration each and no edit to the runtime (the worked
example of docs/design.md, "Parts, and how a method plugs in")."""

from dataclasses import dataclass

import torch

import taylorseer
from taylorseer.forecast import FactorState, register_forecaster
from taylorseer.parts import CacheConfig, Targets
from taylorseer.policy import Decision, IntervalSchedule, Policy, register_policy


@dataclass(frozen=True)
class DampedForecast:
    factor: float = 0.5


@register_forecaster(DampedForecast)
class DampedForecaster:
    history_from_step = 0

    def __init__(self, config):
        self.config = config

    def empty(self):
        return FactorState.empty()

    def update(self, state, feature, point, *, keep_history=True, factor_dtype=None):
        return FactorState((feature,) + state.factors[:1], (point,) + state.points[:1])

    def predict(self, state, point, *, dtype=None):
        new, old = state.factors[0], state.factors[-1]
        return new + self.config.factor * (new - old)


@dataclass(frozen=True)
class EveryOther:
    """Compute the even steps."""


@register_policy(EveryOther)
class EveryOtherPolicy(Policy):
    def __init__(self, config):
        pass

    def decide(self, info):
        return Decision(info.index % 2 == 0, reason="even")


def test_a_registered_forecaster_and_policy_run_on_a_model(toy):
    config = CacheConfig(EveryOther(), DampedForecast(), Targets(modules=("blocks.*.poly",)), abscissa="timestep")
    assert CacheConfig.from_json(config.to_json()) == config
    h0 = torch.zeros(8, dtype=torch.float64)
    with taylorseer.apply(toy, config) as handle:
        handle.begin(6)
        outs = []
        for i in range(6):
            with handle.step(i, timestep=float(i)):
                outs.append(toy(h0, float(i)))
        assert handle.stats.pattern() == "FfFfFf"
    # Step 3 is forecast from the features of steps 2 and 0: poly(2) + 0.5 * (poly(2) - poly(0)), hand-derived.
    poly = [block.poly for block in toy.blocks]
    with torch.no_grad():
        expected = h0
        for block, p in zip(toy.blocks, poly):
            a, (b, _) = block.pair(3.0)
            expected = expected + 0.5 * (p(2.0) + 0.5 * (p(2.0) - p(0.0))) + a - b
        expected = toy.out(expected)
    assert torch.allclose(outs[3], expected, atol=1e-12)
    assert not torch.allclose(outs[3], toy(h0, 3.0))


def test_interval_schedule_with_the_new_forecaster_matches_its_plan(toy):
    config = CacheConfig(IntervalSchedule(interval=3, warmup_steps=1), DampedForecast(0.0),
                         Targets(modules=("blocks.*.poly",)))
    with taylorseer.apply(toy, config) as handle:
        handle.begin(7)
        for i in range(7):
            with handle.step(i):
                toy(torch.zeros(8, dtype=torch.float64), float(i))
        assert handle.stats.pattern() == "FffFffF" == "".join("F" if x else "f" for x in handle.plan(7))
