"""The Adams-Bashforth, HiCache (Hermite) and forecast-then-calibrate forecasters: the families each is exact on,
hand-computed values, what each claims, and the forecaster contract (no mutation, dtypes, bounded memory, registry).

Every expected number below is worked out by hand in the comment next to it, not produced by the code under test.
"""

import dataclasses
import math
import re

import pytest
import torch

from taylorseer.forecast import (
    AdamsForecast,
    CorrectorForecast,
    FactorState,
    Forecaster,
    HermiteForecast,
    TaylorForecast,
    build_forecaster,
    registered_forecasters,
)

DTYPE = torch.float64
BASE = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]], dtype=DTYPE)  # a [B, L, C] = [1, 2, 2] feature pattern

SPACINGS = {
    "uniform": [0.0, 4.0, 8.0, 12.0, 16.0, 20.0],
    "nonuniform": [0.0, 1.0, 5.0, 6.5, 11.0, 20.0],
    "descending-timesteps": [999.0, 979.0, 899.0, 819.0, 739.0, 659.0],
}
# targets a_0 + r * (a_0 - a_1): inside the next interval, one interval ahead, beyond it, behind a_0
OFFSETS = (0.25, 1.0, 2.5, -0.5)

QUADRATIC = [0.3, -1.2, 0.5]
LINEAR = [0.3, -1.2]


def poly(coeffs, x):
    return sum(c * x**k for k, c in enumerate(coeffs))


def feed(config, points, values, **kw):
    """The forecaster and its state after computing ``value * BASE`` at each point (oldest first)."""
    forecaster = build_forecaster(config)
    state = forecaster.empty()
    for p, v in zip(points, values):
        state = forecaster.update(state, v * BASE, p, **kw)
    return forecaster, state


def feed_poly(config, points, coeffs):
    return feed(config, points, [poly(coeffs, p) for p in points])


def targets(points):
    return [points[-1] + r * (points[-1] - points[-2]) for r in OFFSETS]


def assert_forecast(forecaster, state, x, expected, tol=1e-9):
    out = forecaster.predict(state, x)
    assert out.shape == BASE.shape
    want = expected * BASE
    assert torch.allclose(out, want, rtol=0, atol=tol * max(1.0, abs(expected))), (x, out, want)


def scalar(forecaster, state, x):
    """The forecast's scale factor on ``BASE`` (the first element, whose BASE entry is 1)."""
    return float(forecaster.predict(state, x)[0, 0, 0])


#################################################################################
#                       Contract, for every new forecaster                      #
#################################################################################

CONFIGS = [
    AdamsForecast(),
    AdamsForecast(order=4, slope_at="newer"),
    HermiteForecast(),
    HermiteForecast(max_order=3, scale=0.3, scheme="reference"),
    CorrectorForecast(),
    CorrectorForecast(calibrate=False),
]
BOUND = {AdamsForecast: lambda c: c.order + 1, HermiteForecast: lambda c: c.max_order + 1,
         CorrectorForecast: lambda c: 3}
IDS = [repr(c) for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_reachable_through_build_forecaster(config):
    forecaster = build_forecaster(config)
    assert isinstance(forecaster, Forecaster)
    assert forecaster.history_from_step == 0
    assert registered_forecasters()[type(config).__name__] is type(config)
    assert forecaster.empty() == FactorState((), ())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_update_and_predict_never_mutate_the_state(config):
    forecaster, state = feed(config, [0.0, 1.0, 3.0, 4.0], [1.0, -2.0, 5.0, 0.5])
    factors = [f.clone() for f in state.factors]
    points = state.points
    newer = forecaster.update(state, 7.0 * BASE, 6.0)
    restarted = forecaster.update(state, 7.0 * BASE, 6.0, keep_history=False)
    for x in (4.0, 5.0, 6.0, 9.0):
        out = forecaster.predict(state, x)
        out.add_(1000.0)  # the result must be a new tensor, not a view of a factor
        forecaster.predict(state, x, dtype=torch.float32).add_(1000.0)
    for x in (6.5, 8.0):
        forecaster.predict(newer, x).mul_(-3.0)
        forecaster.predict(restarted, x).mul_(-3.0)  # a one-factor state returns a copy of F_0
    assert state.points == points
    assert len(state.factors) == len(factors)
    assert all(torch.equal(a, b) for a, b in zip(state.factors, factors))
    assert restarted.points == (6.0,) and torch.equal(restarted.factors[0], 7.0 * BASE)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_predict_on_an_empty_state_raises(config):
    forecaster = build_forecaster(config)
    with pytest.raises(ValueError, match="empty state"):
        forecaster.predict(forecaster.empty(), 1.0)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_repeated_or_non_finite_point_raises(config):
    forecaster, state = feed(config, [0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="repeats"):
        forecaster.update(state, BASE, 1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            forecaster.update(state, BASE, bad)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_one_computed_step_is_reuse(config):
    forecaster, state = feed(config, [3.0], [2.5])
    for x in (3.0, 4.0, -10.0):
        assert torch.equal(forecaster.predict(state, x), 2.5 * BASE)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_bfloat16_factors_and_output_dtype(config):
    # F = 1000 + 0.01 t: in bfloat16, 1000.01 rounds to 1000, so a slope taken after the cast would be 0.
    forecaster, state = feed(config, [0.0, 1.0], [1000.0, 1000.01], factor_dtype=torch.bfloat16)
    assert [f.dtype for f in state.factors] == [torch.bfloat16, torch.bfloat16]
    assert abs(float(state.factors[1][0, 0, 0]) - 0.01) < 1e-4  # the difference was taken in float64
    forecaster, state = feed(config, [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 4.0, 8.0], factor_dtype=torch.bfloat16)
    assert all(f.dtype == torch.bfloat16 for f in state.factors)
    assert forecaster.predict(state, 4.0).dtype == torch.bfloat16
    assert forecaster.predict(state, 4.0, dtype=torch.float32).dtype == torch.float32
    assert forecaster.predict(state, 4.0, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_stored_factors_are_bounded(config):
    bound = BOUND[type(config)](config)
    forecaster = build_forecaster(config)
    state = forecaster.empty()
    for i in range(12):
        state = forecaster.update(state, float(i) ** 2 * BASE, float(i))
        assert len(state.factors) == min(i + 1, bound)
        assert len(state.points) == len(state.factors)
    assert state.points == tuple(float(i) for i in range(11, 11 - bound, -1))
    assert state.nbytes() == bound * BASE.numel() * BASE.element_size()


INVALID = [
    (lambda: AdamsForecast(order=7), "AdamsForecast.order must be an int in [1, 4], got 7"),
    (lambda: AdamsForecast(order=0), "AdamsForecast.order must be an int in [1, 4], got 0"),
    (lambda: AdamsForecast(order=2.0), "AdamsForecast.order must be an int in [1, 4], got 2.0"),
    (lambda: AdamsForecast(order=True), "AdamsForecast.order must be an int in [1, 4], got True"),
    (lambda: AdamsForecast(slope_at="end"), "AdamsForecast.slope_at must be one of ['midpoint', 'newer'], got 'end'"),
    (lambda: HermiteForecast(max_order=-1), "HermiteForecast.max_order must be an int >= 0, got -1"),
    (lambda: HermiteForecast(scale=1.0), "HermiteForecast.scale must be a float in (0, 1), got 1.0"),
    (lambda: HermiteForecast(scale=0), "HermiteForecast.scale must be a float in (0, 1), got 0"),
    (lambda: HermiteForecast(scale=True), "HermiteForecast.scale must be a float in (0, 1), got True"),
    (lambda: HermiteForecast(scale="0.5"), "HermiteForecast.scale must be a float in (0, 1), got '0.5'"),
    (lambda: HermiteForecast(scheme="exact"),
     "HermiteForecast.scheme must be one of ['reference', 'divided'], got 'exact'"),
    (lambda: CorrectorForecast(calibrate=1), "CorrectorForecast.calibrate must be a bool (True or False), got 1"),
]


@pytest.mark.parametrize("make,message", INVALID, ids=[m for _, m in INVALID])
def test_config_validation_names_the_field_and_the_allowed_values(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_configs_are_frozen(config):
    field = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, getattr(config, field))


#################################################################################
#                                Adams-Bashforth                                #
#################################################################################

@pytest.mark.parametrize("slope_at", ["midpoint", "newer"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_adams_is_exact_on_linear_features(order, slope_at, spacing):
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(AdamsForecast(order, slope_at), points, LINEAR)
    for x in targets(points):
        assert_forecast(forecaster, state, x, poly(LINEAR, x))


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_adams_midpoint_is_exact_on_quadratics_from_order_2(order, spacing):
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(AdamsForecast(order, "midpoint"), points, QUADRATIC)
    for x in targets(points):
        assert_forecast(forecaster, state, x, poly(QUADRATIC, x))


@pytest.mark.parametrize("config,coeffs", [
    (AdamsForecast(1, "midpoint"), [0.0, 0.0, 1.0]),  # order 1: linear only
    (AdamsForecast(2, "newer"), [0.0, 0.0, 1.0]),     # newer placement: linear only
    (AdamsForecast(4, "newer"), [0.0, 0.0, 1.0]),
    (AdamsForecast(3, "midpoint"), [0.0, 0.0, 0.0, 1.0]),  # midpoint: quadratics, never cubics
    (AdamsForecast(4, "midpoint"), [0.0, 0.0, 0.0, 1.0]),
], ids=repr)
def test_adams_is_not_exact_one_degree_above_its_family(config, coeffs):
    points = [0.0, 1.0, 2.0, 3.0, 4.0]
    forecaster, state = feed_poly(config, points, coeffs)
    assert abs(scalar(forecaster, state, 6.0) - poly(coeffs, 6.0)) > 1e-3


def test_adams_uniform_hand_values():
    # Features 1, 4, 10 at 0, 1, 2 (h = 1): slopes s0 = 10 - 4 = 6, s1 = 4 - 1 = 3. Target 3.
    points, values = [0.0, 1.0, 2.0], [1.0, 4.0, 10.0]
    # Classical AB2 (slope at the newer end): F0 + h (3/2 s0 - 1/2 s1) = 10 + 9 - 1.5 = 17.5.
    f, s = feed(AdamsForecast(2, "newer"), points, values)
    assert_forecast(f, s, 3.0, 17.5, tol=1e-12)
    # Midpoint placement: F0 + h (2 s0 - s1) = 10 + 12 - 3 = 19 (= 3*10 - 3*4 + 1, quadratic extrapolation).
    f, s = feed(AdamsForecast(2, "midpoint"), points, values)
    assert_forecast(f, s, 3.0, 19.0, tol=1e-12)
    # Order 3 on t**3 at 0, 1, 2, 3 (values 0, 1, 8, 27): s0 = 19, s1 = 7, s2 = 1; target 4 (true 64).
    points, values = [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 8.0, 27.0]
    # Classical AB3: 27 + (23 * 19 - 16 * 7 + 5 * 1) / 12 = 27 + 330 / 12 = 54.5.
    f, s = feed(AdamsForecast(3, "newer"), points, values)
    assert_forecast(f, s, 4.0, 54.5, tol=1e-12)
    # Midpoint: weights integral_0^1 of the Lagrange basis on nodes -1/2, -3/2, -5/2: 73/24, -37/12, 25/24;
    # 27 + (73 * 19 - 74 * 7 + 25 * 1) / 24 = 27 + 894 / 24 = 64.25.
    f, s = feed(AdamsForecast(3, "midpoint"), points, values)
    assert_forecast(f, s, 4.0, 64.25, tol=1e-12)


def test_adams_nonuniform_and_mid_interval_hand_values():
    # t**2 at 0, 1, 3 (values 0, 1, 9): s0 = (9 - 1) / 2 = 4, s1 = 1. Target 4 (true 16).
    points, values = [0.0, 1.0, 3.0], [0.0, 1.0, 9.0]
    # newer: nodes 3, 1; q(t) = 4 + 1.5 (t - 3); integral_3^4 = 4 + 0.75 -> 9 + 4.75 = 13.75.
    f, s = feed(AdamsForecast(2, "newer"), points, values)
    assert_forecast(f, s, 4.0, 13.75, tol=1e-12)
    # midpoint: nodes 2, 0.5; q(t) = 4 + 2 (t - 2) = 2t = F'(t); integral_3^4 = 7 -> 16 (exact).
    f, s = feed(AdamsForecast(2, "midpoint"), points, values)
    assert_forecast(f, s, 4.0, 16.0, tol=1e-12)
    # Inside an interval: 1, 4, 10 at 0, 4, 8 (h = 4), target 10. s0 = 1.5, s1 = 0.75; newer nodes 8, 4:
    # q(t) = 1.5 + 0.1875 (t - 8); integral_8^10 = 3 + 0.375 -> 13.375.
    f, s = feed(AdamsForecast(2, "newer"), [0.0, 4.0, 8.0], [1.0, 4.0, 10.0])
    assert_forecast(f, s, 10.0, 13.375, tol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_adams_midpoint_up_to_order_2_is_the_newton_forecast(order):
    points = SPACINGS["nonuniform"]
    values = [1.3, -0.4, 2.2, 0.9, -1.7, 0.6]
    f, s = feed(AdamsForecast(order, "midpoint"), points, values)
    t, ts = feed(TaylorForecast(max_order=order), points, values)
    for x in targets(points):
        assert torch.allclose(f.predict(s, x), t.predict(ts, x), rtol=1e-12, atol=1e-12)


def test_adams_order_3_differs_from_newton_order_3():
    points, values = [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 8.0, 27.0]
    f, s = feed(AdamsForecast(3), points, values)
    t, ts = feed(TaylorForecast(max_order=3), points, values)
    assert scalar(t, ts, 4.0) == pytest.approx(64.0, abs=1e-12)  # Newton is exact on cubics
    assert abs(scalar(f, s, 4.0) - 64.0) > 0.2                    # 64.25, as above


def test_adams_coinciding_slope_nodes_raise():
    # Abscissae 0, 2, 0 (not monotone) put both secant midpoints at 1.
    forecaster, state = feed(AdamsForecast(2), [0.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="monotone"):
        forecaster.update(state, BASE, 0.0)


#################################################################################
#                              HiCache (Hermite)                                #
#################################################################################

def test_hermite_hand_values():
    # t**2 at 0, 1, 2: F0 = 4, c1 = 3, c2 = 1 (d1 = 3, d2 = 2). sigma = 0.5, H_1(y) = 2y, H_2(y) = 4y**2 - 2.
    for scheme in ("divided", "reference"):
        f, s = feed(HermiteForecast(2, 0.5, scheme), [0.0, 1.0, 2.0], [0.0, 1.0, 4.0])
        # x = 4: y = 0.5 * 2 = 1; 4 + 3 * 0.5 * H_1(1) + 2 / 2 * 0.25 * H_2(1) = 4 + 3 + 0.5 = 7.5.
        assert_forecast(f, s, 4.0, 7.5, tol=1e-12)
        # x = 2 (the newest computed point): y = 0; 4 + 0 + 1 * 0.25 * (-2) = 3.5, not F0.
        assert_forecast(f, s, 2.0, 3.5, tol=1e-12)


def test_hermite_reference_and_divided_differ_after_a_spacing_change():
    # t**2 at 0, 1, 5, order 2, sigma 0.5, target 7 (y = 1, H_1 = 2, H_2 = 2).
    # reference factors: d = 25, (25 - 1) / 4 = 6, (6 - 1) / 4 = 1.25 -> 25 + 6 * 0.5 * 2 + 1.25 / 2 * 0.25 * 2.
    f, s = feed(HermiteForecast(2, 0.5, "reference"), [0.0, 1.0, 5.0], [0.0, 1.0, 25.0])
    assert_forecast(f, s, 7.0, 31.3125, tol=1e-12)
    # divided: c = 25, 6, (6 - 1) / (5 - 0) = 1 -> 25 + 6 * 0.5 * 2 + 1 * 0.25 * 2 = 31.5.
    f, s = feed(HermiteForecast(2, 0.5, "divided"), [0.0, 1.0, 5.0], [0.0, 1.0, 25.0])
    assert_forecast(f, s, 7.0, 31.5, tol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_hermite_reference_equals_divided_on_uniform_spacing(order):
    points, values = SPACINGS["uniform"], [1.3, -0.4, 2.2, 0.9, -1.7, 0.6]
    f, s = feed(HermiteForecast(order, 0.5, "reference"), points, values)
    g, gs = feed(HermiteForecast(order, 0.5, "divided"), points, values)
    for x in targets(points):
        assert torch.allclose(f.predict(s, x), g.predict(gs, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_hermite_is_exact_on_constants(order, scale, spacing):
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(HermiteForecast(order, scale), points, [1.7])
    for x in targets(points):
        assert_forecast(forecaster, state, x, 1.7, tol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_hermite_at_scale_one_over_sqrt2_is_exact_on_linear_features(order, spacing):
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(HermiteForecast(order, math.sqrt(0.5)), points, LINEAR)
    for x in targets(points):
        assert_forecast(forecaster, state, x, poly(LINEAR, x))


def test_hermite_order_1_is_taylor_with_the_slope_scaled_by_two_sigma_squared():
    # F = 3t + 1 at 0, 1: F0 = 4, slope 3; target 3 (X = 2, true 10): F0 + 2 sigma**2 * X * 3.
    for scale, expected in ((0.5, 4.0 + 0.5 * 2 * 3), (0.3, 4.0 + 0.18 * 2 * 3)):  # 7.0 and 5.08
        f, s = feed(HermiteForecast(1, scale), [0.0, 1.0], [1.0, 4.0])
        assert_forecast(f, s, 3.0, expected, tol=1e-12)


def test_hermite_at_scale_one_over_sqrt2_is_the_probabilists_series():
    # t**2 at 0, 1, 2 (F0 = 4, d1 = 3, d2 = 2), target 4 (X = 2): He_1(2) = 2, He_2(2) = 2**2 - 1 = 3;
    # 4 + 3 * 2 + 2 / 2 * 3 = 13.
    f, s = feed(HermiteForecast(2, math.sqrt(0.5)), [0.0, 1.0, 2.0], [0.0, 1.0, 4.0])
    assert_forecast(f, s, 4.0, 13.0, tol=1e-12)
    # Order 3 on t**3 at 0..3 (F0 = 27, d1 = 19, d2 = 2 * 6 = 12, d3 = 6), X = 1: He_1 = 1, He_2 = 0, He_3 = 1 - 3;
    # 27 + 19 + 0 + 6 / 6 * (-2) = 44.
    f, s = feed(HermiteForecast(3, math.sqrt(0.5)), [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 8.0, 27.0])
    assert_forecast(f, s, 4.0, 44.0, tol=1e-12)


def test_hermite_tends_to_reuse_as_the_scale_goes_to_zero():
    points, values = [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 8.0, 27.0]
    f, s = feed(HermiteForecast(3, 1e-7), points, values)
    for x in (4.0, 6.0, 10.0):
        assert_forecast(f, s, x, 27.0, tol=1e-9)


@pytest.mark.parametrize("scale", [0.3, 0.5])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_hermite_damps_order_k_by_two_sigma_squared_to_the_k_against_taylor(order, scale):
    # Feature t**order: its order-th divided difference is 1, so at a large offset X the order-th term dominates:
    # Taylor/Newton grows like X**order, HiCache like (2 sigma**2)**order * X**order.
    points = [0.0, 1.0, 2.0, 3.0, 4.0]
    coeffs = [0.0] * order + [1.0]
    f, s = feed_poly(HermiteForecast(order, scale), points, coeffs)
    t, ts = feed_poly(TaylorForecast(max_order=order), points, coeffs)
    x = 4.0 + 1e6
    hicache = (scalar(f, s, x) - 4.0**order) / (x - 4.0) ** order
    taylor = (scalar(t, ts, x) - 4.0**order) / (x - 4.0) ** order
    assert taylor == pytest.approx(1.0, rel=1e-3)
    assert hicache == pytest.approx((2 * scale**2) ** order, rel=1e-3)


#################################################################################
#                         Forecast then calibrate (FoCa)                        #
#################################################################################

@pytest.mark.parametrize("calibrate", [True, False])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_corrector_is_exact_on_linear_features(calibrate, spacing):
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(CorrectorForecast(calibrate), points, LINEAR)
    for x in targets(points):
        assert_forecast(forecaster, state, x, poly(LINEAR, x))


@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_corrector_predictor_alone_is_exact_on_quadratics(spacing):
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(CorrectorForecast(calibrate=False), points, QUADRATIC)
    for x in targets(points):
        assert_forecast(forecaster, state, x, poly(QUADRATIC, x))


@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_corrector_halves_the_curvature_term_on_quadratics(spacing):
    # Claim: on F = a + b t + c t**2 the calibrated forecast is exactly F(x) - c (x - a_0)**2 / 2, on any spacing.
    points = SPACINGS[spacing]
    forecaster, state = feed_poly(CorrectorForecast(), points, QUADRATIC)
    for x in targets(points):
        miss = QUADRATIC[2] * (x - points[-1]) ** 2 / 2
        assert_forecast(forecaster, state, x, poly(QUADRATIC, x) - miss)
        assert abs(scalar(forecaster, state, x) - poly(QUADRATIC, x)) > 1e-3  # so: never exact on quadratics


def test_corrector_hand_values():
    # t**2 at 0, 1, 2: F0 = 4, c1 = 3, c2 = 1, h0 = 1. Target 3 (X = 1, true 9).
    # Predictor: P(3) = 4 + 3 + 1 * 1 * 2 = 9. Heun: g0 = P'(2) = 3 + 1 = 4, g_x = (9 - 4) / 1 = 5;
    # 4 + 1/2 * (4 + 5) = 8.5.
    f, s = feed(CorrectorForecast(), [0.0, 1.0, 2.0], [0.0, 1.0, 4.0])
    assert_forecast(f, s, 3.0, 8.5, tol=1e-12)
    assert_forecast(f, s, 2.0, 4.0, tol=1e-12)  # X = 0: the newest computed feature itself
    f, s = feed(CorrectorForecast(calibrate=False), [0.0, 1.0, 2.0], [0.0, 1.0, 4.0])
    assert_forecast(f, s, 3.0, 9.0, tol=1e-12)
    # Non-uniform: t**2 at 0, 1, 3: F0 = 9, c1 = (9 - 1) / 2 = 4, c2 = (4 - 1) / 3 = 1, h0 = 2. Target 4 (true 16).
    # Predictor: 9 + 4 + 1 * 1 * 3 = 16 (also the variable-step BDF2 value with w = 1/2, g = 8:
    # (2.25 * 9 - 0.25 * 1 + 1.5 * 8) / 2 = 16). Heun: g0 = 4 + 2 * 1 = 6, g_x = 7; 9 + (6 + 7) / 2 = 15.5.
    f, s = feed(CorrectorForecast(), [0.0, 1.0, 3.0], [0.0, 1.0, 9.0])
    assert_forecast(f, s, 4.0, 15.5, tol=1e-12)
    f, s = feed(CorrectorForecast(calibrate=False), [0.0, 1.0, 3.0], [0.0, 1.0, 9.0])
    assert_forecast(f, s, 4.0, 16.0, tol=1e-12)


@pytest.mark.parametrize("calibrate", [True, False])
def test_corrector_with_two_computed_steps_is_linear_extrapolation(calibrate):
    # t**2 at 0, 1: slope 1; target 3: 1 + 1 * 2 = 3 (true 9), calibrated or not.
    f, s = feed(CorrectorForecast(calibrate), [0.0, 1.0], [0.0, 1.0])
    assert_forecast(f, s, 3.0, 3.0, tol=1e-12)


@pytest.mark.parametrize("factor_dtype", [None, torch.float16])
def test_store_finite_check_is_exact_when_the_sum_overflows(factor_dtype):
    # finite() takes a float32 sum first; finite elements whose sum overflows must still count as finite, and a
    # single NaN or infinity anywhere must not.
    from taylorseer.forecast import TaylorForecast, build_forecaster
    from taylorseer.runtime.state import FactorStore

    def finite(values):
        store = FactorStore(build_forecaster(TaylorForecast(max_order=0)), factor_dtype)
        store.record((0, "t"), [values], None, point=0.0, keep_history=True, shape=(1,))
        return store.finite((0, "t"))

    big = 3e38 if factor_dtype is None else 6e4
    assert finite(torch.full((64,), big))  # the float32 sum is inf (or fp16 values near their maximum)
    assert finite(torch.linspace(-1, 1, 100))
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.full((64,), big)
        x[17] = bad
        assert not finite(x)
    x = torch.zeros(10)
    x[3] = math.nan
    assert not finite(x)
