"""The handle's contract: exact removal, reset, told steps, branches, errors that leave the model untouched."""

import pytest
import torch

import taylorseer
from taylorseer import TaylorSeerConfig, count_flops, preset
from taylorseer.models.sampler import sample

LABELS = torch.tensor([0, 3, 7])


def run_toy(model, handle, steps=range(12), h0=None):
    h0 = torch.zeros(8, dtype=torch.float64) if h0 is None else h0
    outs = []
    for i in steps:
        t = 1.0 - i / 12
        if handle is None:
            outs.append(model(h0, t))
        else:
            with handle.step(i, timestep=t):
                outs.append(model(h0, t))
    return outs


def test_interval_one_is_bit_identical_and_remove_restores(tiny_dit):
    ref = sample(tiny_dit, LABELS, num_steps=8, seed=1)
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=1)) as handle:
        same = sample(tiny_dit, LABELS, num_steps=8, seed=1, listener=handle)
        assert handle.stats.steps_full == 8 and handle.stats.steps_forecast == 0
    assert torch.equal(ref, same)
    assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=1), ref)
    assert not any("forward" in m.__dict__ for m in tiny_dit.modules())


def test_forecasting_changes_output_then_remove_restores_bitwise(tiny_dit):
    ref = sample(tiny_dit, LABELS, num_steps=10, seed=1)
    handle = taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=3, max_order=2))
    cached = sample(tiny_dit, LABELS, num_steps=10, seed=1, listener=handle)
    assert handle.stats.steps_forecast > 0 and handle.cache_bytes() >= 0
    assert not torch.equal(cached, ref)
    handle.remove()
    assert handle.cache_bytes() == 0 and not handle.cached_keys()
    assert torch.equal(sample(tiny_dit, LABELS, num_steps=10, seed=1), ref)
    with pytest.raises(RuntimeError, match="removed"):
        handle.begin(10)


def test_two_generations_in_a_row_match(tiny_dit):
    with taylorseer.apply(tiny_dit, preset("paper_dit")) as handle:
        first = sample(tiny_dit, LABELS, num_steps=12, seed=2, listener=handle)
        second = sample(tiny_dit, LABELS, num_steps=12, seed=2, listener=handle)
        # Implicit reset: telling step 0 again starts a new generation.
        for _ in range(2):
            outs = []
            for i in range(6):
                with handle.step(i, 999 - 100 * i):
                    outs.append(tiny_dit(torch.ones(1, 1, 28, 28), timestep=torch.tensor([999 - 100 * i]),
                                         class_labels=torch.tensor([1])).sample)
            if _ == 0:
                first_loop = outs
        assert all(torch.equal(a, b) for a, b in zip(first_loop, outs))
    assert torch.equal(first, second)


def test_forecast_steps_do_not_execute_targets_and_are_exact_on_polynomials(toy):
    ref = run_toy(toy, None)
    calls_before = toy.blocks[0].poly.calls
    cfg = TaylorSeerConfig(interval=4, warmup_steps=3, max_order=2, abscissa="timestep",
                           modules=("blocks.*.poly", "blocks.*.pair"))
    with taylorseer.apply(toy, cfg) as handle:
        handle.begin(12)
        out = run_toy(toy, handle)
        full = sum(handle.plan(12))
        assert toy.blocks[0].poly.calls - calls_before == full
        assert handle.stats.module_forecast["blocks.0.poly"] == 12 - full
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-9)  # quadratic and linear features, order 2: exact


def test_branch_keys_keep_cfg_calls_apart(tiny_dit):
    """CFG as two calls per step (automatic branch keys) equals CFG as one doubled batch."""
    cfg = TaylorSeerConfig(interval=3, max_order=2, warmup_steps=1)
    with taylorseer.apply(tiny_dit, cfg) as handle:
        batch = sample(tiny_dit, LABELS, num_steps=10, seed=3, cfg_mode="batch", guidance_scale=2.0, listener=handle)
        split = sample(tiny_dit, LABELS, num_steps=10, seed=3, cfg_mode="split", guidance_scale=2.0, listener=handle)
        assert handle.cached_keys() == []  # freed after the last forecast step
        # Forcing both calls into one branch is caught, not silently mixed.
        with pytest.raises(ValueError, match="twice in step 0 of branch 'same'"):
            sample(tiny_dit, LABELS, num_steps=10, seed=3, cfg_mode="split", guidance_scale=2.0,
                   listener=_OneBranch(handle))
    # Equal up to float rounding (batch size changes matmul blocking; extrapolation amplifies it a little).
    assert (batch - split).abs().max() < 1e-3


class _OneBranch:
    """A listener that (wrongly) puts both CFG calls of a step in one branch."""

    def __init__(self, handle):
        self.handle = handle

    def begin(self, num_steps=None):
        self.handle.begin(num_steps)

    def step(self, index, timestep=None, sigma=None):
        return self.handle.step(index, timestep, sigma, branch="same")


def test_named_branches(toy):
    cfg = TaylorSeerConfig(interval=2, warmup_steps=1, max_order=1, modules=("blocks.*.poly",))
    with taylorseer.apply(toy, cfg) as handle:
        h0 = torch.zeros(8, dtype=torch.float64)
        for i in range(4):
            with handle.step(i, branch="cond"):
                toy(h0, float(i))
            with handle.step(i, branch="uncond"):
                toy(h0, float(i))
            assert {k[0] for k in handle.cached_keys()} == {"cond", "uncond"}


@pytest.mark.slow
def test_flops_ratio_close_to_ideal(tiny_dit):
    steps = 20
    full_run, flops_full = count_flops(lambda: sample(tiny_dit, LABELS, num_steps=steps, seed=0))
    cfg = TaylorSeerConfig(interval=4, warmup_steps=0, max_order=1)
    with taylorseer.apply(tiny_dit, cfg) as handle:
        _, flops_cached = count_flops(lambda: sample(tiny_dit, LABELS, num_steps=steps, seed=0, listener=handle))
        plan = handle.plan(steps)
        with handle.count_flops():
            sample(tiny_dit, LABELS, num_steps=steps, seed=0, listener=handle)
        stats = handle.stats
    # FLOPs of the forecast modules alone, in one full step, counted the same way.
    x = torch.zeros(2 * len(LABELS), 1, 28, 28)
    _, per_step = count_flops(lambda: tiny_dit(x, timestep=torch.full((6,), 500), class_labels=torch.zeros(6).long()))
    modules_flops = 0
    for block in tiny_dit.transformer_blocks:
        h = torch.zeros(6, 49, 64)
        modules_flops += count_flops(lambda b=block, h=h: b.attn1(h))[1] + count_flops(lambda b=block, h=h: b.ff(h))[1]
    assert flops_full == steps * per_step
    full_steps = sum(plan) + (0 if plan[0] else 1)  # without warm-up the first step is computed anyway
    # The block shortcut also skips the 4 non-gate rows of each block's [6D, D] modulation: 2 * 6 * D * 4D.
    modulation = len(tiny_dit.transformer_blocks) * 2 * 6 * 64 * 4 * 64
    ideal = steps * per_step - (steps - full_steps) * (modules_flops + modulation)
    assert flops_cached == ideal
    assert flops_full / flops_cached > 1.5
    # The handle's own measurement reports the same numbers.
    assert stats.flops_executed == flops_cached
    assert stats.flops_executed + stats.flops_skipped == flops_full
    assert stats.to_dict()["flops_speedup"] == pytest.approx(flops_full / flops_cached)


@pytest.mark.slow
def test_granularities_interval_one_identical_and_forecast_reduces_calls(tiny_dit):
    ref = sample(tiny_dit, LABELS, num_steps=8, seed=4)
    for granularity in ("module", "block", "output"):
        with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=1, granularity=granularity)) as handle:
            assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=4, listener=handle), ref)
        _, flops_full = count_flops(lambda: sample(tiny_dit, LABELS, num_steps=8, seed=4))
        cfg = TaylorSeerConfig(interval=2, warmup_steps=2, granularity=granularity)
        with taylorseer.apply(tiny_dit, cfg) as handle:
            out, flops = count_flops(lambda: sample(tiny_dit, LABELS, num_steps=8, seed=4, listener=handle))
            assert handle.stats.steps_forecast == 3
        assert flops < flops_full and torch.isfinite(out).all()
        assert torch.equal(sample(tiny_dit, LABELS, num_steps=8, seed=4), ref)


def test_factor_dtype_halves_cache(tiny_dit):
    sizes = {}
    for dtype in (None, "bfloat16"):
        with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=3, max_order=2, factor_dtype=dtype)) as handle:
            out = sample(tiny_dit, LABELS, num_steps=10, seed=0, listener=handle)
            sizes[dtype] = handle.stats.peak_cache_bytes
            assert out.dtype == torch.float32
    assert sizes["bfloat16"] * 2 == sizes[None] > 0


def test_cache_freed_after_last_forecast_step(tiny_dit):
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=3, warmup_steps=1, tail_steps=3)) as handle:
        sample(tiny_dit, LABELS, num_steps=10, seed=0, listener=handle)
        assert handle.cache_bytes() == 0 and handle.stats.peak_cache_bytes > 0


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [("forward" in m.__dict__) for m in model.modules()]


@pytest.mark.parametrize(
    "cfg, match",
    [(TaylorSeerConfig(modules=("blocks.*.nothing",)), "blocks.*.nothing"),
     (TaylorSeerConfig(modules=("transformer_blocks.*.attn1", "nope.*")), "nope")],
)
def test_bad_pattern_leaves_model_untouched(tiny_dit, cfg, match):
    before, swapped = state_of(tiny_dit)
    with pytest.raises(ValueError, match=match):
        taylorseer.apply(tiny_dit, cfg)
    after, swapped_after = state_of(tiny_dit)
    assert swapped_after == swapped and not any(swapped_after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unregistered_model_without_patterns_suggests_patterns(toy):
    with pytest.raises(ValueError, match=r"blocks\.\*\.poly"):
        taylorseer.apply(toy, TaylorSeerConfig())


def test_step_errors(toy):
    with taylorseer.apply(toy, TaylorSeerConfig(modules=("blocks.*.poly",))) as handle:
        handle.begin(5)
        with pytest.raises(ValueError, match=r"step index must be in \[0, 4\]"):
            with handle.step(5):
                pass
        with pytest.raises(ValueError, match="step index must be an int >= 0"):
            with handle.step(-1):
                pass
        with handle.step(3):
            pass
        with pytest.raises(ValueError, match="must not decrease"):
            with handle.step(2):
                pass
    with taylorseer.apply(toy, TaylorSeerConfig(modules=("blocks.*.poly",), abscissa="sigma")) as handle:
        with pytest.raises(ValueError, match="sigma"):
            with handle.step(0, timestep=3):
                pass


def test_apply_twice_refused_and_type_errors(toy):
    cfg = TaylorSeerConfig(modules=("blocks.*.poly",))
    with taylorseer.apply(toy, cfg):
        with pytest.raises(ValueError, match="already applied"):
            taylorseer.apply(toy, cfg)
        assert "forward" in toy.blocks[0].poly.__dict__
    assert "forward" not in toy.blocks[0].poly.__dict__
    with pytest.raises(TypeError, match="config must be a TaylorSeerConfig"):
        taylorseer.apply(toy, {"interval": 3})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        taylorseer.apply(object(), cfg)


def test_calls_outside_a_step_run_the_original_when_auto_steps_is_off(toy):
    ref = run_toy(toy, None, steps=range(3))
    with taylorseer.apply(toy, TaylorSeerConfig(interval=5, modules=("blocks.*.poly",))) as handle:
        handle.auto_steps = False  # else the steps are read from the calls' own t (tests/adapters/test_autostep.py)
        assert all(torch.equal(a, b) for a, b in zip(ref, run_toy(toy, None, steps=range(3))))
        assert handle.stats.steps_full == handle.stats.steps_forecast == 0


def test_probe_records_forecast_error(tiny_dit):
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=3, max_order=1)) as handle:
        handle.probe("transformer_blocks.1.attn1")
        sample(tiny_dit, LABELS, num_steps=9, seed=0, listener=handle)
        errors = handle.stats.probe_errors
        assert len(errors) == handle.stats.steps_forecast == 5  # one doubled-batch CFG call per step
        assert all(0 < e["rel_l2"] < 2 and e["path"] == "transformer_blocks.1.attn1" for e in errors)
    with pytest.raises(ValueError, match="not targets"):
        handle.probe("nope")
