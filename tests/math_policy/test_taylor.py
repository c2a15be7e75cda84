"""Forecast math on polynomials: exactness, scheme agreement, hand-computed reference values."""

import math

import pytest
import torch

from taylorseer.forecast import TaylorState, derivatives, forecast, update

DTYPE = torch.float64


def poly(coeffs, x):
    return sum(c * x**k for k, c in enumerate(coeffs))


def run(points, coeffs, order, scheme, **kw):
    state = TaylorState.empty()
    for p in points:
        value = torch.tensor([poly(coeffs, p), 2.0 * poly(coeffs, p)], dtype=DTYPE)
        state = update(state, value, p, max_order=order, scheme=scheme, **kw)
    return state


SPACINGS = {
    "uniform": [0.0, 4.0, 8.0, 12.0, 16.0, 20.0],
    "nonuniform": [0.0, 1.0, 5.0, 6.5, 11.0, 20.0],
    "descending-timesteps": [999.0, 979.0, 899.0, 819.0, 739.0, 659.0],
}


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_divided_is_exact_for_polynomials_up_to_order(order, spacing):
    gen = torch.Generator().manual_seed(order)
    coeffs = (torch.randn(order + 1, generator=gen, dtype=DTYPE) / 10 ** torch.arange(order + 1)).tolist()
    points = SPACINGS[spacing]
    state = run(points, coeffs, order, "divided")
    for x in (points[-1] + 1.0, points[-1] + 3.5, points[-1] - 2.0):
        expected = poly(coeffs, x)
        got = forecast(state, x, "divided")
        want = torch.tensor([expected, 2 * expected], dtype=DTYPE)
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * max(1, abs(expected)))


@pytest.mark.parametrize("order", [2, 3])
def test_divided_is_not_exact_one_degree_above_order(order):
    coeffs = [0.0] * (order + 1) + [1.0]  # x**(order+1)
    state = run([0.0, 1.0, 2.0, 3.0, 4.0], coeffs, order, "divided")
    assert not torch.allclose(forecast(state, 6.0, "divided")[0], torch.tensor(6.0 ** (order + 1), dtype=DTYPE))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_reference_factors_equal_divided_derivatives_on_uniform_spacing(order):
    coeffs = [0.3, -1.2, 0.5, 0.07, -0.01]
    ref = run(SPACINGS["uniform"], coeffs, order, "reference")
    div = run(SPACINGS["uniform"], coeffs, order, "divided")
    for a, b in zip(derivatives(ref, "reference"), derivatives(div, "divided")):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [0, 1])
def test_reference_forecast_equals_divided_on_uniform_spacing_orders_0_1(order):
    coeffs = [0.3, -1.2, 0.5]
    ref = run(SPACINGS["uniform"], coeffs, order, "reference")
    div = run(SPACINGS["uniform"], coeffs, order, "divided")
    for x in (21.0, 22.0, 23.0):
        assert torch.allclose(forecast(ref, x, "reference"), forecast(div, x, "divided"), rtol=1e-12)


def test_reference_quadratic_with_spacing_change_hand_computed():
    # f(s) = s**2 computed at s = 0, 1 (warm-up, spacing 1), then s = 5 (spacing 4), order 2.
    # d0 = 25; d1 = (25 - 1) / 4 = 6; old d1 = (1 - 0) / 1 = 1, so d2 = (6 - 1) / 4 = 1.25.
    # Forecast at s = 7 (x = 2): 25 + 6 * 2 + 1.25 * 4 / 2 = 39.5 (true value 49).
    state = run([0.0, 1.0, 5.0], [0.0, 0.0, 1.0], 2, "reference")
    assert [float(f[0]) for f in state.factors] == [25.0, 6.0, 1.25]
    assert float(forecast(state, 7.0, "reference")[0]) == 39.5
    # Divided differences use the true abscissae: exact.
    assert float(forecast(run([0.0, 1.0, 5.0], [0.0, 0.0, 1.0], 2, "divided"), 7.0, "divided")[0]) == 49.0


def test_order_grows_one_per_computed_step_until_max():
    state = TaylorState.empty()
    orders = []
    for p in range(6):
        state = update(state, torch.ones(3), float(p), max_order=3)
        orders.append(state.order)
    assert orders == [0, 1, 2, 3, 3, 3]
    assert len(state.points) == 4


def test_order_zero_is_reuse():
    state = run([0.0, 4.0, 8.0], [1.0, 2.0], 0, "divided")
    assert torch.equal(forecast(state, 11.0, "divided"), state.factors[0])
    assert forecast(state, 11.0, "divided") is not state.factors[0]


def test_keep_history_false_drops_factors():
    state = run([0.0, 1.0], [0.0, 1.0], 2, "reference")
    state = update(state, torch.tensor([5.0, 5.0], dtype=DTYPE), 2.0, 2, "reference", keep_history=False)
    assert state.order == 0 and state.points == (2.0,)


def test_direction_of_abscissa_does_not_change_reference_forecast_bits():
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(64, generator=gen) for _ in range(4)]
    up, down = TaylorState.empty(), TaylorState.empty()
    for k, f in zip([0, 1, 5, 9], feats):
        up = update(up, f, float(k), 3, "reference")
        down = update(down, f, float(49 - k), 3, "reference")
    assert torch.equal(forecast(up, 11.0, "reference"), forecast(down, 38.0, "reference"))


def test_reference_evaluation_order_matches_term_by_term_formula_bitwise():
    gen = torch.Generator().manual_seed(1)
    state = TaylorState.empty()
    for k in (0, 1, 5, 9, 13):
        state = update(state, 100 * torch.randn(256, generator=gen), float(k), 4, "reference")
    x = 3
    expected = 0
    for i, d in enumerate(state.factors):  # the official code's taylor_formula, verbatim in arithmetic order
        expected += (1 / math.factorial(i)) * d * (x**i)
    assert torch.equal(forecast(state, 16.0, "reference"), expected)


def test_factor_dtype_and_result_dtype():
    state = TaylorState.empty()
    for k in range(3):
        state = update(state, torch.full((4,), float(k)), float(k), 2, factor_dtype=torch.bfloat16)
    assert all(f.dtype == torch.bfloat16 for f in state.factors)
    assert forecast(state, 3.0, dtype=torch.float32).dtype == torch.float32
    assert state.nbytes() == 3 * 4 * 2


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        forecast(TaylorState.empty(), 1.0)
    state = update(TaylorState.empty(), torch.ones(2), 1.0, 2)
    with pytest.raises(ValueError, match="spacing would be zero"):
        update(state, torch.ones(2), 1.0, 2)
    with pytest.raises(ValueError, match="scheme must be one of"):
        update(state, torch.ones(2), 2.0, 2, scheme="newton")
