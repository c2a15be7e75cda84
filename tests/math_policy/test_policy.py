"""Schedules as literal compute/forecast lists."""

import pytest

from taylorseer import preset
from taylorseer.policy import IntervalPolicy

# Literal patterns over 50 steps (F = full, f = forecast), written out from ALGORITHM.md's rule.
PAPER_DIT = "FF" + "fffF" * 12
PAPER_FLUX = "FFF" + "fffffF" * 7 + "fffff"
PAPER_HUNYUAN = "F" + "ffffF" * 9 + "ffff"


@pytest.mark.parametrize(
    "name, pattern, full",
    [("paper_dit", PAPER_DIT, 14), ("paper_flux", PAPER_FLUX, 10),
     ("paper_hunyuan_video", PAPER_HUNYUAN, 10), ("paper_wan", PAPER_HUNYUAN, 10)],
)
def test_paper_presets_over_50_steps(name, pattern, full):
    policy = IntervalPolicy.from_config(preset(name))
    assert len(pattern) == 50
    assert policy.pattern(50) == pattern
    assert policy.plan(50) == [c == "F" for c in pattern]
    assert sum(policy.plan(50)) == full == preset(name).full_steps(50)


def test_full_step_indices_for_dit():
    plan = IntervalPolicy(4, 2).plan(50)
    assert [i for i, f in enumerate(plan) if f] == [0, 1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49]


def test_interval_one_computes_every_step():
    assert IntervalPolicy(1, 0).plan(7) == [True] * 7


def test_tail_steps_forced_full():
    assert IntervalPolicy(5, 1, tail_steps=3).pattern(12) == "FffffFfffFFF"


def test_no_warmup_starts_with_forecast_pattern():
    # Without warm-up the counter starts at 0: the first step is forecast (the handle computes it anyway,
    # since nothing is cached yet).
    assert IntervalPolicy(3, 0).pattern(7) == "ffFffFf"


def test_plan_prefix_property():
    policy = IntervalPolicy(4, 2)
    full = policy.plan(50)
    assert all(policy.plan(n) == full[:n] for n in range(1, 50))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"interval": 0}, "interval"), ({"interval": 2, "warmup_steps": -1}, "warmup_steps"),
     ({"interval": 2, "tail_steps": -2}, "tail_steps")],
)
def test_invalid(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IntervalPolicy(**kwargs)


def test_invalid_num_steps():
    with pytest.raises(ValueError, match="num_steps"):
        IntervalPolicy(2).plan(0)
