"""torch.compile holds: regional (per block, either order with apply) and whole-model compile, no recompile-limit
hit over several generations with CFG and a batch change, outputs within float rounding of eager."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.config

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.models.sampler import sample

STEPS = 16
CFG = TaylorSeerConfig(interval=4, warmup_steps=2, max_order=2)


def _generations(model, handle):
    return [sample(model, torch.tensor([0, 3, 7]), num_steps=STEPS, seed=0, listener=handle),
            sample(model, torch.tensor([1, 2]), num_steps=STEPS, seed=1, listener=handle, cfg_mode="split"),
            sample(model, torch.tensor([0, 3, 7]), num_steps=STEPS, seed=0, listener=handle)]


def _compiled(model, mode):
    """The model to call, and the handle, for one way of compiling."""
    if mode == "regional-after":
        handle = taylorseer.apply(model, CFG)
        for block in model.transformer_blocks:
            block.compile()
        return model, handle
    if mode == "regional-before":
        for block in model.transformer_blocks:
            block.compile()
        return model, taylorseer.apply(model, CFG)
    compiled = torch.compile(model)
    return compiled, taylorseer.apply(compiled, CFG)  # an OptimizedModule: installed on its original module


@pytest.mark.parametrize("mode", ["regional-after", "regional-before", "whole"])
@pytest.mark.slow
def test_compiled_forecasting_matches_eager_without_hitting_the_recompile_limit(tiny_dit, mode):
    with taylorseer.apply(tiny_dit, CFG) as handle:
        eager = _generations(tiny_dit, handle)
        eager_pattern = handle.stats.pattern()
    full_eager = sample(tiny_dit, torch.tensor([0, 3, 7]), num_steps=STEPS, seed=0)
    torch._dynamo.reset()
    # config.patch restores the setting as it found it (monkeypatch's undo deleted dynamo's config alias, so every
    # later parametrization failed with "no attribute 'fail_on_recompile_limit_hit'").
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a hit raises, not falls back
        model, handle = _compiled(tiny_dit, mode)
        try:
            compiled = _generations(model, handle)
            assert handle.stats.pattern() == eager_pattern and "f" in eager_pattern
            full_compiled = sample(model, torch.tensor([0, 3, 7]), num_steps=STEPS, seed=0)  # no step told: full
        finally:
            handle.remove()
            torch._dynamo.reset()
    # Inductor reorders float32 operations; the same rounding, extrapolated, is what separates the two runs.
    rounding = float((full_compiled - full_eager).abs().max())
    for a, b in zip(compiled, eager):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= max(1e-4, 20 * rounding)
    assert not any("forward" in m.__dict__ for m in tiny_dit.modules())


def test_compiled_module_is_accepted_and_targets_its_original(tiny_dit):
    compiled = torch.compile(tiny_dit)
    with taylorseer.apply(compiled, CFG) as handle:
        assert handle.model is tiny_dit
        assert "forward" in tiny_dit.transformer_blocks[0].attn1.__dict__
    assert "forward" not in tiny_dit.transformer_blocks[0].attn1.__dict__
