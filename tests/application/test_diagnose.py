"""``apply(..., diagnose=True)``: the first generation also computes its forecast steps in full and records the
forecast error per step and target; the images are the method's; later generations measure nothing."""

from __future__ import annotations

import pytest
import torch

import taylorseer
from taylorseer.eval.diagnose import forecast_errors, plot_forecast_errors, summary

LABELS = torch.arange(3)
STEPS = 12


@pytest.fixture(scope="module")
def model():
    return taylorseer.load_reference()


def _tensor(output):
    return output.sample if hasattr(output, "sample") else output[0]


def test_diagnose_measures_every_forecast_against_full_compute_and_leaves_the_images_alone(model):
    config = taylorseer.TaylorSeerConfig(interval=4, warmup_steps=2, max_order=0, granularity="output")  # reuse
    with taylorseer.apply(model, config) as handle:
        plain = taylorseer.sample(model, LABELS, num_steps=STEPS, listener=handle)
    calls = []
    hooks = [model.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True),
             model.register_forward_hook(lambda m, args, output: calls.append(_tensor(output)))]
    try:
        with taylorseer.apply(model, config, diagnose=True) as handle:
            diagnosed = taylorseer.sample(model, LABELS, num_steps=STEPS, listener=handle)
            first = list(handle.stats.probe_errors)
            plan = handle.plan(STEPS)
            again = taylorseer.sample(model, LABELS, num_steps=STEPS, listener=handle)
            assert handle.stats.probe_errors == []  # one generation only
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(diagnosed, plain) and torch.equal(again, plain)
    inputs, outputs = calls[0:2 * STEPS:2], calls[1:2 * STEPS:2]  # the diagnosed generation, one call per step
    forecast_steps = [i for i, full in enumerate(plan) if not full]
    assert [r["step"] for r in first] == forecast_steps and {r["path"] for r in first} == {""}
    for record in first:  # the oracle: the model's own output on the step's inputs, computed here without taylorseer
        step = record["step"]
        args, kwargs = inputs[step]
        with torch.no_grad():
            true = _tensor(model(*args, **kwargs)).double()
        expected = float((outputs[step].double() - true).norm() / true.norm())
        assert record["rel_l2"] == pytest.approx(expected, rel=1e-6)
    assert all(r["rel_l2"] > 0 for r in first)


def test_diagnose_reports_every_target_at_every_forecast_step_and_plots_them(model, tmp_path):
    with taylorseer.apply(model, taylorseer.preset("paper_dit"), diagnose=True) as handle:
        taylorseer.sample(model, LABELS, num_steps=STEPS, cfg_mode="split", listener=handle)
        errors = forecast_errors(handle.stats)
        targets = {t.path for t in handle.targets}
        forecast_steps = [i for i, full in enumerate(handle.plan(STEPS)) if not full]
    assert set(errors) == targets and len(targets) > 1
    for pairs in errors.values():
        assert [s for s, _ in pairs] == forecast_steps and all(e > 0 for _, e in pairs)
    rows = summary(errors)
    assert [r["step"] for r in rows] == forecast_steps and all(r["targets"] == len(targets) for r in rows)
    assert all(r["max"] == max(dict(errors[t])[r["step"]] for t in targets) for r in rows)
    png = plot_forecast_errors(errors, tmp_path / "errors.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="no forecast"):
        plot_forecast_errors({}, tmp_path / "none.png")


def test_diagnose_works_with_a_speed_target(model):
    with taylorseer.apply(model, speedup=6, diagnose=True) as handle:
        taylorseer.sample(model, LABELS[:1], num_steps=50, listener=handle)
        errors = forecast_errors(handle.stats)
        assert [s for s, _ in errors[""]] == [i for i, full in enumerate(handle.plan(50)) if not full]
