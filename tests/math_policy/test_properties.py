"""Property-based tests (hypothesis, derandomized: the same examples on every run).

Forecast math: every registered forecaster is exact, on random abscissae and random coefficients, on the
polynomial family its docstring states (Newton divided differences: degree <= order on any distinct abscissae).
"Exact" means within ``TOLERANCE * scale`` (``TOLERANCE = 1e-9``) in float64, where ``scale = 1 + sum_k |c_k| R**k``
bounds the polynomial's magnitude on the abscissae and the forecast point (``R`` the largest of their absolute
values). Abscissae are multiples of 1/4 in [-10, 10], at least 1/4 apart; forecast points are multiples of 1/8 in
[-10, 10]. The worst error seen for Newton over 5,000 such random cases was 1.6e-12 of the scale, and a forecast
one degree too low misses by at least 1 (``test_newton_is_not_exact_one_degree_above_its_order``), so the
tolerance separates exact from wrong by orders of magnitude on both sides.
Interval 1: every policy plan is all-full and a handle with ``interval=1`` is bit-identical to none.
Configs: ``TaylorSeerConfig`` and ``CacheConfig`` round-trip through JSON, and invalid values raise naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.config import ABSCISSAE, FACTOR_DTYPES, GRANULARITIES, SCHEMES
from taylorseer.forecast import (
    AdamsForecast,
    CorrectorForecast,
    HermiteForecast,
    LinearForecast,
    TaylorForecast,
    build_forecaster,
    registered_forecasters,
)
from taylorseer.parts import CacheConfig, Store, Targets, parts_of
from taylorseer.policy import (
    AnchorSchedule,
    ConfidenceGate,
    ErrorBudget,
    FixedSchedule,
    IntervalSchedule,
    build_policy,
    registered_policies,
)

TOLERANCE = 1e-9
# Forecasters whose config names a calibration file (a required ``calibration`` field): they have no defaults to
# build from (tests/math_policy/test_calibration.py and the anchored forecaster's tests round-trip them).
NEEDS_A_FILE = {t for t in registered_forecasters().values()
                if any(f.name == "calibration" and f.default is dataclasses.MISSING for f in dataclasses.fields(t))}
assert LinearForecast in NEEDS_A_FILE
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#################################################################################
#                            Forecast math on polynomials                        #
#################################################################################

def distinct_points(n: int, monotone: bool = False) -> st.SearchStrategy[list[float]]:
    """``n`` distinct multiples of 1/4 in [-10, 10], in random order (or sorted, either direction)."""
    points = st.lists(st.integers(-40, 40), min_size=n, max_size=n, unique=True).map(lambda xs: [x / 4 for x in xs])
    if not monotone:
        return points
    return st.tuples(points, st.booleans()).map(lambda pr: sorted(pr[0], reverse=pr[1]))


def uniform_points(n: int) -> st.SearchStrategy[list[float]]:
    """``n`` equally spaced abscissae (step +-1/4 .. +-2), starting in [-10, 10]."""
    return st.tuples(st.integers(-40, 40), st.integers(1, 8), st.sampled_from([1, -1])).map(
        lambda s: [(s[0] + i * s[1] * s[2]) / 4 for i in range(n)])


def coefficients(degree: int) -> st.SearchStrategy[torch.Tensor]:
    """Coefficients ``c[k, j]`` of ``degree + 1`` powers for 3 features, in [-2, 2]."""
    value = st.floats(-2, 2, allow_nan=False, allow_infinity=False)
    return st.lists(value, min_size=3 * (degree + 1), max_size=3 * (degree + 1)).map(
        lambda v: torch.tensor(v, dtype=torch.float64).reshape(degree + 1, 3))


def polynomial(coeffs: torch.Tensor, x: float) -> torch.Tensor:
    return sum(coeffs[k] * x**k for k in range(coeffs.shape[0]))


def check_exact(config, coeffs: torch.Tensor, points: list[float], x: float) -> None:
    forecaster = build_forecaster(config)
    state = forecaster.empty()
    for p in points:
        state = forecaster.update(state, polynomial(coeffs, p), p)
    radius = max(abs(v) for v in [*points, x])
    scale = 1 + sum(float(coeffs[k].abs().max()) * radius**k for k in range(coeffs.shape[0]))
    error = float((forecaster.predict(state, x) - polynomial(coeffs, x)).abs().max())
    assert error <= TOLERANCE * scale, (config, points, x, error, scale)


@st.composite
def newton_case(draw):
    order = draw(st.integers(0, 4))
    degree = draw(st.integers(0, order))
    points = draw(distinct_points(draw(st.integers(order + 1, order + 3))))
    return order, draw(coefficients(degree)), points, draw(st.integers(-80, 80)) / 8


@SETTINGS
@given(newton_case())
def test_newton_divided_differences_are_exact_up_to_their_order(case):
    """TaylorForecast(scheme='divided'): the polynomial through the last order + 1 points, any spacing/order."""
    order, coeffs, points, x = case
    check_exact(TaylorForecast(max_order=order, scheme="divided"), coeffs, points, x)


@SETTINGS
@given(st.integers(1, 4), st.data())
def test_newton_is_not_exact_one_degree_above_its_order(order, data):
    """The same bound fails on x**(order + 1): the tolerance is tight enough to see a wrong forecast."""
    points = data.draw(distinct_points(order + 1))
    x = max(points) + data.draw(st.integers(8, 40)) / 8  # at least 1 from every node: the error is >= 1
    coeffs = torch.zeros(order + 2, 3, dtype=torch.float64)
    coeffs[order + 1] = 1.0
    with pytest.raises(AssertionError):
        check_exact(TaylorForecast(max_order=order, scheme="divided"), coeffs, points, x)


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 1), st.data())
def test_reference_scheme_is_exact_on_linear_features_with_uniform_spacing(order, degree, data):
    points = data.draw(uniform_points(order + 2))
    check_exact(TaylorForecast(max_order=order, scheme="reference"), data.draw(coefficients(degree)), points,
                data.draw(st.integers(-80, 80)) / 8)


@SETTINGS
@given(st.integers(1, 4), st.sampled_from(["midpoint", "newer"]), st.data())
def test_adams_is_exact_on_its_family(order, slope_at, data):
    """AdamsForecast: degree <= min(order, 2) at secant midpoints, degree <= 1 classically; monotone abscissae."""
    top = min(order, 2) if slope_at == "midpoint" else 1
    degree = data.draw(st.integers(0, top))
    points = data.draw(distinct_points(order + 1 + data.draw(st.integers(0, 2)), monotone=True))
    check_exact(AdamsForecast(order=order, slope_at=slope_at), data.draw(coefficients(degree)), points,
                data.draw(st.integers(-80, 80)) / 8)


@SETTINGS
@given(st.booleans(), st.integers(0, 1), st.data())
def test_corrector_is_exact_on_linear_features(calibrate, degree, data):
    points = data.draw(distinct_points(data.draw(st.integers(2, 5))))
    check_exact(CorrectorForecast(calibrate=calibrate), data.draw(coefficients(degree)), points,
                data.draw(st.integers(-80, 80)) / 8)


@SETTINGS
@given(st.integers(0, 4), st.sampled_from(SCHEMES), st.floats(0.05, 0.95), st.data())
def test_hermite_is_exact_on_constants_and_at_one_over_root_two_on_linear(order, scheme, scale, data):
    points = data.draw(uniform_points(order + 2) if scheme == "reference" else distinct_points(order + 2))
    x = data.draw(st.integers(-80, 80)) / 8
    check_exact(HermiteForecast(max_order=order, scale=scale, scheme=scheme), data.draw(coefficients(0)), points, x)
    if order >= 1:
        check_exact(HermiteForecast(max_order=order, scale=2**-0.5, scheme=scheme), data.draw(coefficients(1)),
                    points, x)


@SETTINGS
@given(st.sampled_from([{TaylorForecast: TaylorForecast(3), AdamsForecast: AdamsForecast(3),
                          HermiteForecast: HermiteForecast(3)}.get(t) or t()
                         for t in registered_forecasters().values() if t not in NEEDS_A_FILE]), st.data())
def test_forecasts_are_new_tensors_and_leave_the_state_alone(config, data):
    forecaster = build_forecaster(config)
    points = data.draw(distinct_points(4, monotone=True))
    state = forecaster.empty()
    for p in points:
        state = forecaster.update(state, torch.full((3,), p, dtype=torch.float64), p)
    before = [f.clone() for f in state.factors]
    out = forecaster.predict(state, data.draw(st.integers(-80, 80)) / 8)
    out.add_(1.0)  # writing the forecast must not write the factors
    assert all(torch.equal(a, b) for a, b in zip(before, state.factors))


#################################################################################
#                                Interval 1 is exact                             #
#################################################################################

@SETTINGS
@given(st.integers(0, 20), st.integers(0, 20), st.integers(1, 60))
def test_interval_one_plans_every_step_full(warmup, tail, num_steps):
    assert build_policy(IntervalSchedule(1, warmup, tail)).plan(num_steps) == [True] * num_steps
    assert TaylorSeerConfig(interval=1, warmup_steps=warmup, tail_steps=tail).full_steps(num_steps) == num_steps


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 4), st.integers(0, 5), st.sampled_from(SCHEMES), st.sampled_from(ABSCISSAE),
       st.sampled_from(FACTOR_DTYPES), st.integers(2, 14))
def test_interval_one_handle_is_bit_identical(warmup, order, scheme, abscissa, factor_dtype, num_steps):
    from toy_models import Toy

    model = Toy()
    h = torch.zeros(8, dtype=torch.float64)
    times = [1.0 - i / num_steps for i in range(num_steps)]
    reference = [model(h, t) for t in times]
    config = TaylorSeerConfig(interval=1, warmup_steps=warmup, max_order=order, scheme=scheme, abscissa=abscissa,
                              factor_dtype=factor_dtype, modules=("blocks.*.poly", "blocks.*.pair"))
    with taylorseer.apply(model, config) as handle:
        handle.begin(num_steps)
        for i, t in enumerate(times):
            with handle.step(i, timestep=t, sigma=t):
                assert torch.equal(model(h, t), reference[i])
        assert handle.stats.steps_full == num_steps and handle.stats.steps_forecast == 0


#################################################################################
#                         Configs: JSON round-trip, validation                   #
#################################################################################

PATTERN = st.from_regex(r"[a-z_]{1,8}(\.(\*|[0-9]|[a-z_]{1,6})){0,3}", fullmatch=True)
NAME = st.text(max_size=12)

taylorseer_configs = st.builds(
    TaylorSeerConfig, interval=st.integers(1, 50), warmup_steps=st.integers(0, 10), max_order=st.integers(0, 6),
    tail_steps=st.integers(0, 5), scheme=st.sampled_from(SCHEMES), abscissa=st.sampled_from(ABSCISSAE),
    modules=st.lists(PATTERN, max_size=3).map(tuple), granularity=st.sampled_from(GRANULARITIES),
    factor_dtype=st.sampled_from(FACTOR_DTYPES), block_shortcuts=st.booleans(), name=NAME)

POSITIVE = st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False)
probe_fields = dict(warmup_steps=st.integers(0, 5), tail_steps=st.integers(0, 3), max_forecast=st.integers(1, 8),
                    probe_blocks=st.integers(1, 3))
# Field strategies of the registered parts that take more than their defaults; every other registered part is
# built with its defaults (``st.builds(T)``), so a new part joins these properties without an edit here.
POLICY_STRATEGIES = {
    IntervalSchedule: st.builds(IntervalSchedule, interval=st.integers(1, 10), warmup_steps=st.integers(0, 5),
                                tail_steps=st.integers(0, 3)),
    ConfidenceGate: st.builds(ConfidenceGate, threshold=POSITIVE, **probe_fields),
    ErrorBudget: st.builds(ErrorBudget, budget=POSITIVE, **probe_fields),
    FixedSchedule: st.text(alphabet="Ff", min_size=1, max_size=30).map(lambda p: "F" + p[1:]).flatmap(
        lambda p: NAME.map(lambda name: FixedSchedule.from_pattern(p, name))),
    AnchorSchedule: st.builds(AnchorSchedule.from_interval, st.integers(1, 10), st.integers(1, 5),
                              st.integers(12, 60)),
}
FORECASTER_STRATEGIES = {
    TaylorForecast: st.builds(TaylorForecast, max_order=st.integers(0, 6), scheme=st.sampled_from(SCHEMES),
                              history_from_step=st.integers(0, 4)),
    AdamsForecast: st.builds(AdamsForecast, order=st.integers(1, 4), slope_at=st.sampled_from(["midpoint", "newer"])),
    HermiteForecast: st.builds(HermiteForecast, max_order=st.integers(0, 6), scale=st.floats(0.01, 0.99),
                               scheme=st.sampled_from(SCHEMES)),
    CorrectorForecast: st.builds(CorrectorForecast, calibrate=st.booleans()),
}


def registered_strategies(registered: dict[str, type], known: dict[type, Any]) -> Any:
    """One strategy over every registered part type: its entry in ``known``, else built with its defaults."""
    types = [t for t in registered.values() if t not in NEEDS_A_FILE]
    return st.one_of(*(known[t] if t in known else st.builds(t) for t in types))


policies = registered_strategies(registered_policies(), POLICY_STRATEGIES)
forecasters = registered_strategies(registered_forecasters(), FORECASTER_STRATEGIES)
cache_configs = st.builds(
    CacheConfig, policy=policies, forecaster=forecasters,
    targets=st.builds(Targets, granularity=st.sampled_from(GRANULARITIES),
                      modules=st.lists(PATTERN, max_size=3).map(tuple), block_shortcuts=st.booleans()),
    store=st.builds(Store, factor_dtype=st.sampled_from(FACTOR_DTYPES)), abscissa=st.sampled_from(ABSCISSAE),
    name=NAME)


@SETTINGS
@given(taylorseer_configs)
def test_taylorseer_config_round_trips_through_json(config):
    again = TaylorSeerConfig.from_json(config.to_json())
    assert again == config and again.name == config.name
    assert TaylorSeerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert parts_of(again) == parts_of(config)


@SETTINGS
@given(cache_configs)
def test_cache_config_round_trips_through_json(config):
    again = CacheConfig.from_json(config.to_json())
    assert again == config and again.name == config.name
    assert again.to_json() == config.to_json()
    assert type(again.policy) is type(config.policy) and type(again.forecaster) is type(config.forecaster)


def invalid_ints(minimum: int) -> st.SearchStrategy:
    return st.one_of(st.integers(max_value=minimum - 1), st.booleans(), st.floats(allow_nan=True),
                     st.text(max_size=3), st.none())


TAYLORSEER_INTS = {"interval": 1, "warmup_steps": 0, "max_order": 0, "tail_steps": 0}
TAYLORSEER_CHOICES = {"scheme": SCHEMES, "abscissa": ABSCISSAE, "granularity": GRANULARITIES,
                      "factor_dtype": FACTOR_DTYPES}


@SETTINGS
@given(st.sampled_from(sorted(TAYLORSEER_INTS)), st.data())
def test_taylorseer_config_refuses_bad_ints_naming_the_field(field, data):
    value = data.draw(invalid_ints(TAYLORSEER_INTS[field]))
    with pytest.raises((TypeError, ValueError), match=rf"^{field} must be an int >= {TAYLORSEER_INTS[field]}"):
        TaylorSeerConfig(**{field: value})
    with pytest.raises((TypeError, ValueError), match=rf"^{field} must be an int"):
        TaylorSeerConfig.from_json(json.dumps({field: value}))


@SETTINGS
@given(st.sampled_from(sorted(TAYLORSEER_CHOICES)), st.one_of(st.text(max_size=8), st.integers(), st.booleans()))
def test_taylorseer_config_refuses_bad_choices_naming_the_field(field, value):
    if value in TAYLORSEER_CHOICES[field]:
        return
    with pytest.raises(ValueError, match=rf"^{field} must be one of"):
        TaylorSeerConfig(**{field: value})


@SETTINGS
@given(st.text(min_size=1, max_size=10).filter(lambda k: k not in TaylorSeerConfig.__dataclass_fields__
                                               and k not in CacheConfig.__dataclass_fields__))
def test_unknown_fields_are_named(field):
    with pytest.raises(ValueError, match="unknown TaylorSeerConfig field"):
        TaylorSeerConfig.from_dict({field: 1})
    with pytest.raises(ValueError, match="unknown CacheConfig field"):
        CacheConfig.from_dict({**CacheConfig(IntervalSchedule(), TaylorForecast()).to_dict(), field: 1})


PART_CHOICES = [
    (lambda v: CacheConfig(IntervalSchedule(), TaylorForecast(), abscissa=v), "CacheConfig.abscissa", ABSCISSAE),
    (lambda v: Targets(granularity=v), "Targets.granularity", GRANULARITIES),
    (lambda v: Store(factor_dtype=v), "Store.factor_dtype", FACTOR_DTYPES),
    (lambda v: TaylorForecast(scheme=v), "TaylorForecast.scheme", SCHEMES),
    (lambda v: AdamsForecast(slope_at=v), "AdamsForecast.slope_at", ("midpoint", "newer")),
    (lambda v: HermiteForecast(scheme=v), "HermiteForecast.scheme", SCHEMES),
]
PART_INTS = [
    (lambda v: TaylorForecast(max_order=v), "TaylorForecast.max_order", 0),
    (lambda v: TaylorForecast(history_from_step=v), "TaylorForecast.history_from_step", 0),
    (lambda v: AdamsForecast(order=v), "AdamsForecast.order", 1),
    (lambda v: HermiteForecast(max_order=v), "HermiteForecast.max_order", 0),
    (lambda v: IntervalSchedule(interval=v), "interval", 1),
    (lambda v: IntervalSchedule(warmup_steps=v), "warmup_steps", 0),
    (lambda v: ConfidenceGate(max_forecast=v), "ConfidenceGate.max_forecast", 1),
    (lambda v: ErrorBudget(probe_blocks=v), "ErrorBudget.probe_blocks", 1),
    (lambda v: FixedSchedule((0,), num_steps=v), "FixedSchedule.num_steps", 1),
]


@SETTINGS
@given(st.sampled_from(PART_CHOICES), st.one_of(st.text(max_size=8), st.integers(), st.floats()))
def test_parts_refuse_bad_choices_naming_the_field(case, value):
    make, name, allowed = case
    if value in allowed:
        return
    with pytest.raises(ValueError, match=rf"^{name.replace('.', '[.]')} must be one of"):
        make(value)


@SETTINGS
@given(st.sampled_from(PART_INTS), st.data())
def test_parts_refuse_bad_ints_naming_the_field(case, data):
    make, name, minimum = case
    with pytest.raises((TypeError, ValueError), match=rf"\b{name.replace('.', '[.]')}\b"):
        make(data.draw(invalid_ints(minimum)))


@SETTINGS
@given(st.sampled_from([(ConfidenceGate, "threshold"), (ErrorBudget, "budget")]),
       st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan), st.booleans(), st.text(max_size=2)))
def test_policy_floats_refuse_bad_values_naming_the_field(case, value):
    policy, field = case
    with pytest.raises(ValueError, match=rf"{policy.__name__}\.{field} must be a finite float > 0"):
        policy(**{field: value})

