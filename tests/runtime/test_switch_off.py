"""Forecasting switches itself off for a generation too short for its fixed-interval schedule (runtime/switch.py):
fewer steps than warm-up + tail + interval runs at full compute, with one warning and ``stats.switched_off``."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_diffusers import FAMILY, loop_pipeline

import taylorseer
from taylorseer import TaylorSeerConfig

LABELS = torch.arange(3)


@pytest.fixture(scope="module")
def model():
    return taylorseer.load_reference()


def _switch_warnings(caught):
    return [w for w in caught if "switched off" in str(w.message)]


def test_a_four_step_generation_under_flux_preset_runs_at_full_compute_with_one_warning(model):
    config = taylorseer.preset("paper_flux")  # W=3, N=6: a generation needs 9 steps to reach a full step after W
    full = taylorseer.sample(model, LABELS, num_steps=4)
    with taylorseer.apply(model, config) as handle, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = taylorseer.sample(model, LABELS, num_steps=4, listener=handle)
        stats = handle.stats.to_dict()
        second = taylorseer.sample(model, LABELS, num_steps=4, listener=handle)
        assert handle.plan(4) == [True] * 4
        longer = taylorseer.sample(model, LABELS, num_steps=12, listener=handle)
        assert handle.stats.switched_off is None and handle.stats.pattern() == "FFFfffffFfff"
    assert torch.equal(first, full) and torch.equal(second, full)
    assert (stats["steps_full"], stats["steps_forecast"], stats["peak_cache_bytes"]) == (4, 0, 0)
    assert "4 steps are fewer than warm-up 3 + tail 0 + interval 6 = 9" in stats["switched_off"]
    assert len(_switch_warnings(caught)) == 1  # once per handle and reason, not per generation
    assert not torch.equal(longer, taylorseer.sample(model, LABELS, num_steps=12))  # 12 steps: forecast again


@pytest.mark.parametrize("steps, plan", [(5, "FFFFF"), (6, "FFfffF")])
def test_the_boundary_is_warm_up_plus_one_interval(model, steps, plan):
    with taylorseer.apply(model, TaylorSeerConfig(interval=4, warmup_steps=2)) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            taylorseer.sample(model, LABELS, num_steps=steps, listener=handle)
        assert handle.stats.pattern() == plan
        assert (handle.stats.switched_off is None) == (plan != "FFFFF")
        assert len(_switch_warnings(caught)) == (plan == "FFFFF")


def test_tail_steps_count_in_the_rule():
    from taylorseer.policy import IntervalSchedule
    from taylorseer.runtime.switch import too_few_steps

    assert too_few_steps(IntervalSchedule(interval=4, warmup_steps=2, tail_steps=2), 7) is not None
    assert too_few_steps(IntervalSchedule(interval=4, warmup_steps=2, tail_steps=2), 8) is None
    assert too_few_steps(IntervalSchedule(interval=1, warmup_steps=0), 1) is None  # nothing to switch off


def test_img2img_at_low_strength_on_a_pipeline_runs_at_full_compute():
    family = FAMILY["flux"]
    pipe = loop_pipeline("flux")
    # img2img: the scheduler's 28 timesteps, the pipeline starting at index 20 (strength ~0.29): 8 steps run
    full = pipe(family, num_inference_steps=28, begin_index=20)
    with taylorseer.apply(pipe, taylorseer.preset("paper_flux")) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            low = pipe(family, num_inference_steps=28, begin_index=20)
        assert handle.stats.steps_full == 8 and handle.stats.steps_forecast == 0
        assert "8 steps are fewer than" in handle.stats.switched_off and len(_switch_warnings(caught)) == 1
        higher = pipe(family, num_inference_steps=28, begin_index=18)  # 10 steps: forecasting runs
        assert handle.stats.switched_off is None and handle.stats.steps_forecast > 0
    assert torch.equal(low, full)
    assert not torch.equal(higher, pipe(family, num_inference_steps=28, begin_index=18))
