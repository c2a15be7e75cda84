"""The default (fast) schedule search, its cost header, the thorough plan and bad values (issue 27, item 6)."""

from __future__ import annotations

import pytest
import torch

from taylorseer.calibration import calibrate, refine_schedule
from taylorseer.calibration.calibrate import planned_cost
from taylorseer.forecast import TaylorForecast

NUM_STEPS = 12
SECONDS_PER_CALL = 7.11 / 28  # the published FLUX.1-dev H100 figure the projection states


class CallCounter:
    """Images through the model (top-level calls) and through its first block (computed in full), counted by
    forward pre-hooks: a CFG batch [x; x] of 2B rows is B images."""

    def __init__(self, model: torch.nn.Module, rows_per_image: int):
        self.calls = self.images = self.full_images = 0
        self.rows_per_image = rows_per_image
        self.handles = [model.register_forward_pre_hook(self._top, with_kwargs=True),
                        model.transformer_blocks[0].register_forward_pre_hook(self._block, with_kwargs=True)]

    def _rows(self, args, kwargs) -> int:
        first = args[0] if args else next(iter(kwargs.values()))
        return first.shape[0] // self.rows_per_image

    def _top(self, module, args, kwargs):
        self.calls += 1
        self.images += self._rows(args, kwargs)

    def _block(self, module, args, kwargs):
        self.full_images += self._rows(args, kwargs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.slow
def test_default_search_at_output_granularity_is_fast_and_cost_counts_image_calls(tiny_dit, tmp_path):
    counter = CallCounter(tiny_dit, rows_per_image=2)  # guidance 1.5 as one CFG batch
    try:
        cal = calibrate(tiny_dit, 4, tmp_path / "fast.safetensors", num_steps=NUM_STEPS, progress=False,
                        forecaster=TaylorForecast(max_order=2), granularity="output")
    finally:
        counter.remove()
    data = cal.header["calibration_data"]
    assert data["search_plan"] == {"name": "fast", "images": 16, "search_images": 8, "max_evaluations": 32,
                                   "radius": 3, "patience": 14, "moves": "nearest"}
    assert data["images"] == 16
    cost = data["cost"]
    assert cost["image_calls"] == counter.images  # every image through the model, forecast steps included
    assert cost["full_image_calls"] == counter.full_images == cost["full_image_steps"]  # one call per step
    assert cost["recording"]["image_calls"] == 16 * NUM_STEPS
    assert cost["flux_dev_1024_h100_minutes"] == round(counter.full_images * SECONDS_PER_CALL / 60, 1)
    search = cal.header["search"]
    sampled = search["model_calls"] // NUM_STEPS  # candidates: the reference is the recording's first batch
    assert 1 <= sampled <= 1 + 5 + 32  # greedy, power-law starts, at most max_evaluations refinements
    assert counter.images == 16 * NUM_STEPS + sampled * 8 * NUM_STEPS  # recording + candidates, no reference
    assert counter.full_images <= planned_cost(4, NUM_STEPS, 16, 8, 32)["full_image_steps"]


def test_the_flux_projection_counts_steps_not_cfg_calls(tiny_dit, tmp_path):
    cal = calibrate(tiny_dit, 4, tmp_path / "split.safetensors", num_steps=NUM_STEPS, progress=False, images=2,
                    search_images=2, max_evaluations=2, cfg_mode="split", forecaster=TaylorForecast(max_order=1),
                    granularity="output")
    cost = cal.header["calibration_data"]["cost"]
    assert cost["calls_per_step"] == 2
    assert cost["full_image_steps"] * 2 == cost["full_image_calls"]
    assert cost["flux_dev_1024_h100_minutes"] == round(cost["full_image_steps"] * SECONDS_PER_CALL / 60, 1)


def test_the_default_fits_a_flux_dev_calibration_at_50_steps_budget_8_in_15_h100_minutes():
    # 16 recorded images x 50 steps + 8 search images (the first recorded batch: no reference to sample) x
    # 38 candidates (greedy, 5 power-law starts, 32 refinements) x 8 full steps
    plan = planned_cost(8, 50, images=16, search_images=8, max_evaluations=32)
    assert plan["full_image_steps"] == 16 * 50 + 8 * 38 * 8 == 3232
    assert plan["flux_dev_1024_h100_minutes"] == round(3232 * SECONDS_PER_CALL / 60, 1) <= 15
    # search images that are not the first recorded batch need their reference sampled: 8 x 50 more
    assert planned_cost(8, 50, images=16, search_images=10, max_evaluations=32)["full_image_steps"] == (
        16 * 50 + 10 * (50 + 38 * 8))
    thorough = planned_cost(8, 50, images=40, search_images=30, max_evaluations=200)
    assert thorough["flux_dev_1024_h100_minutes"] > 15


def test_thorough_is_reachable_and_given_values_override_the_plan(tiny_dit, tmp_path):
    cal = calibrate(tiny_dit, 4, tmp_path / "thorough.safetensors", num_steps=NUM_STEPS, progress=False,
                    search="thorough", images=2, search_images=2, max_evaluations=3,
                    forecaster=TaylorForecast(max_order=1), granularity="output")
    plan = cal.header["calibration_data"]["search_plan"]
    assert plan == {"name": "thorough", "images": 2, "search_images": 2, "max_evaluations": 3, "radius": 3,
                    "patience": None, "moves": "random"}
    assert cal.header["calibration_data"]["images"] == 2 and cal.header["calibration_data"]["cost"]["search"][
        "batch"] == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"search": "quick"}, "search must be one of ['fast', 'thorough'], got 'quick'"),
    ({"search": "Fast"}, "search must be one of"),
    ({"images": 0}, "images must be an int >= 1, got 0"),
    ({"search_images": -1}, "search_images must be an int >= 0, got -1"),
    ({"max_evaluations": 0}, "max_evaluations must be an int >= 1, got 0"),
    ({"radius": 1.5}, "radius must be an int >= 1, got 1.5"),
    ({"images": True}, "images must be an int >= 1, got True"),
])
def test_bad_search_values_are_refused_by_name_before_any_model_call(tiny_dit, tmp_path, kwargs, message):
    counter = CallCounter(tiny_dit, rows_per_image=2)
    try:
        with pytest.raises(ValueError) as err:
            calibrate(tiny_dit, 4, tmp_path / "x.safetensors", num_steps=NUM_STEPS, progress=False, **kwargs)
    finally:
        counter.remove()
    assert message in str(err.value)
    assert counter.calls == 0 and not (tmp_path / "x.safetensors").exists()


def test_patience_stops_the_refinement_after_that_many_candidates_without_improvement():
    seen = []

    def flat(schedule):  # nothing improves on the start
        seen.append(schedule)
        return 1.0

    refine_schedule(flat, (0, 10), num_steps=20, radius=3, patience=4)
    assert len(seen) == 1 + 4  # the start and 4 candidates
    seen.clear()
    refine_schedule(flat, (0, 10), num_steps=20, radius=3)
    assert len(seen) == 1 + 6  # without patience: the whole sweep, shifts -3..3 of step 10 but 0


def test_patience_counts_from_the_last_improvement():
    seen = []

    def towards_12(schedule):
        seen.append(schedule)
        return abs(schedule[1] - 12)

    best, error, trace = refine_schedule(towards_12, (0, 6), num_steps=20, radius=3, patience=2, seed=0)
    last = seen.index(trace[-1][0])
    assert len(trace) >= 2  # it improved at least once (every +1..+3 move from step 6 improves)
    assert len(seen) - 1 - last <= 2  # then at most patience candidates without improvement


class _Reached(Exception):
    pass


@pytest.mark.parametrize("argv, expected", [
    ([], {"search": "thorough", "search_images": None, "max_evaluations": None, "radius": None, "images": None}),
    (["--granularity", "output"], {"search": "fast", "search_images": None, "max_evaluations": None,
                                   "granularity": "output"}),
    (["--search", "fast"], {"search": "fast", "granularity": "module"}),
    (["--search", "thorough"], {"search": "thorough", "search_images": None, "max_evaluations": None,
                                "images": None}),
    (["--search", "thorough", "--search-images", "4", "--max-evals", "9", "--images", "5"],
     {"search": "thorough", "search_images": 4, "max_evaluations": 9, "images": 5}),
])
def test_calibrate_command_passes_the_search_plan(monkeypatch, tmp_path, argv, expected):
    import taylorseer.calibration
    import taylorseer.models.pretrained
    from taylorseer.cli import main

    seen = {}

    def reached(*args, **kwargs):
        seen.update(kwargs)
        raise _Reached

    monkeypatch.setattr(taylorseer.models.pretrained, "load_reference", lambda: None)
    monkeypatch.setattr(taylorseer.calibration, "calibrate", reached)
    with pytest.raises(_Reached):
        main(["calibrate", "--budget", "8", "--out", str(tmp_path / "c.safetensors"), *argv])
    assert {k: seen[k] for k in expected} == expected


def test_calibrate_command_refuses_an_unknown_search_by_name(capsys, tmp_path):
    from taylorseer.calibration.search import SEARCH_PLANS
    from taylorseer.cli import main
    from taylorseer.cli.calibrate import SEARCH_PLANS as CLI_PLANS

    assert sorted(CLI_PLANS) == sorted(SEARCH_PLANS)  # the command offers every plan, and only those
    with pytest.raises(SystemExit) as info:
        main(["calibrate", "--budget", "8", "--out", str(tmp_path / "c.safetensors"), "--search", "quick"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--search" in err and "'fast'" in err and "'thorough'" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_demo_times_with_one_thread_by_default():
    from taylorseer.cli import build_parser

    assert build_parser().parse_args(["demo"]).threads == 1
    assert build_parser().parse_args(["demo", "--threads", "2"]).threads == 2


def test_at_module_granularity_the_default_search_is_thorough(tiny_dit, tmp_path):
    cal = calibrate(tiny_dit, 4, tmp_path / "module.safetensors", num_steps=NUM_STEPS, progress=False, images=2,
                    search_images=2, max_evaluations=2)
    plan = cal.header["calibration_data"]["search_plan"]
    assert plan["name"] == "thorough" and plan["patience"] is None and cal.header["granularity"] == "module"
    fast = calibrate(tiny_dit, 4, tmp_path / "module-fast.safetensors", num_steps=NUM_STEPS, progress=False,
                     images=2, search_images=2, max_evaluations=2, search="fast")
    assert fast.header["calibration_data"]["search_plan"]["patience"] == 14  # named: the fast plan at any granularity


@pytest.mark.parametrize("argv, model_kwargs", [
    (["--model", "flux"], {}),
    (["--model", "flux", "--granularity", "module"], {"granularity": "module", "search": "thorough"}),
])
def test_flux_class_calibrations_default_to_the_output_and_the_fast_search(monkeypatch, tmp_path, argv,
                                                                           model_kwargs):
    """`calibrate --model flux` (and pipelines) records the model output by default and so takes the fast search
    (<= 15 projected H100-minutes for FLUX.1-dev); a granularity given is kept, with its own default search."""
    import taylorseer.calibration
    import taylorseer.models.flux_pipeline
    from taylorseer.cli import main

    seen = {}

    def reached(*args, **kwargs):
        seen.update(kwargs)
        raise _Reached

    monkeypatch.setattr(taylorseer.models.flux_pipeline, "load_flux_reference",
                        lambda: type("Ref", (), {"transformer": None})())
    monkeypatch.setattr(taylorseer.calibration, "calibrate", reached)
    with pytest.raises(_Reached):
        main(["calibrate", "--budget", "8", "--out", str(tmp_path / "c.safetensors"), *argv])
    expected = {"granularity": "output", "search": "fast", **model_kwargs}
    assert {k: seen[k] for k in expected} == expected


def test_a_pipelines_default_granularity_follows_its_scheduler():
    """Flow-matching pipelines (FLUX, SD3, ...) record the model output by default (the fast search); DDPM/DDIM-style
    ones keep the module recipe of the DiT."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from taylorseer.cli.calibrate import _default_granularity

    assert _default_granularity(FlowMatchEulerDiscreteScheduler()) == "output"
    assert _default_granularity(DDIMScheduler()) == "module"


def test_the_search_reuses_the_recordings_first_batch_as_its_reference_only_when_it_is_the_same_call(tiny_dit):
    """The fast plan's 8 search images are the first recorded batch (same labels, noise seed, guidance, CFG): their
    full-compute images come from the recording, bit for bit what sampling them again gives; any difference in
    how they would be sampled (another seed, count or guidance) samples the reference instead."""
    from taylorseer.calibration.calibrate import calibration_labels
    from taylorseer.calibration.record import record_trajectories
    from taylorseer.calibration.search import SampledObjective
    from taylorseer.models.sampler import sample

    stats = record_trajectories(tiny_dit, calibration_labels(16), num_steps=NUM_STEPS, seed=1000,
                                guidance_scale=1.5, progress=False, granularity="output")
    fresh = sample(tiny_dit, torch.arange(8), num_steps=NUM_STEPS, guidance_scale=1.5, seed=1000)
    assert torch.equal(stats.first_images, fresh)
    reused = SampledObjective(tiny_dit, stats, images=8, forecaster=TaylorForecast(max_order=1))
    assert reused.reference_recorded and reused.model_calls == 0 and torch.equal(reused.reference, fresh)
    for kwargs in ({"seed": 1001}, {"images": 4}, {"guidance_scale": 2.0}):
        other = SampledObjective(tiny_dit, stats, forecaster=TaylorForecast(max_order=1), **{"images": 8, **kwargs})
        assert not other.reference_recorded and other.model_calls == NUM_STEPS


def test_nearest_moves_try_every_one_step_shift_before_any_larger_one():
    tried = []

    def record(schedule):
        tried.append(schedule)
        return 1.0  # nothing improves: one whole sweep

    refine_schedule(record, (0, 5, 10), num_steps=20, radius=3, moves="nearest")
    shifts = [max(abs(a - b) for a, b in zip(s, (0, 5, 10))) for s in tried[1:]]
    assert sorted(shifts) == shifts and shifts.count(1) == 4 and len(shifts) == 12  # 2 steps x 6 shifts
    with pytest.raises(ValueError, match="moves must be one of \\['random', 'nearest'\\], got 'closest'"):
        refine_schedule(record, (0, 5), num_steps=20, moves="closest")


def test_nearest_moves_reach_a_one_step_optimum_that_random_order_with_the_same_patience_misses():
    """An objective with one improving move among many flat ones: a one-step shift of the last full step. Random
    order may spend its patience on the flat moves first; one-step shifts first find it within the first 6."""
    def one_good_move(schedule):
        return 0.0 if schedule == (0, 4, 8, 13) else 1.0

    best, error, _ = refine_schedule(one_good_move, (0, 4, 8, 12), num_steps=20, radius=3, patience=6,
                                     moves="nearest")
    assert best == (0, 4, 8, 13) and error == 0.0
    missed, _, _ = refine_schedule(one_good_move, (0, 4, 8, 12), num_steps=20, radius=3, patience=6,
                                   moves="random", seed=1)  # this seed's order spends the patience elsewhere
    assert missed != (0, 4, 8, 13)
