"""Block shortcuts: bit-identical to running the block with forecast modules, and they really skip work."""

import pytest
import torch

import taylorseer
from taylorseer import TaylorSeerConfig, count_flops
from taylorseer.adapters.shortcuts import find_shortcut
from taylorseer.models.sampler import sample

LABELS = torch.tensor([1, 4, 9])


def _run(model, cfg, steps=12):
    calls = {"norm3": 0}
    hook = model.transformer_blocks[1].norm3.register_forward_hook(lambda *a: calls.__setitem__("norm3",
                                                                                             calls["norm3"] + 1))
    try:
        with taylorseer.apply(model, cfg) as handle:
            out, flops = count_flops(lambda: sample(model, LABELS, num_steps=steps, seed=5, listener=handle))
            stats = handle.stats
            shortcuts = len(handle.shortcuts)
    finally:
        hook.remove()
    return out, flops, stats, calls["norm3"], shortcuts


def n_blocks(model):
    return model.transformer_blocks


@pytest.mark.slow
def test_shortcut_is_bit_identical_and_skips_the_norms(tiny_dit):
    for order, scheme in ((0, "reference"), (2, "divided"), (3, "reference")):
        cfg = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=order, scheme=scheme)
        fast, flops_fast, stats_fast, norms_fast, n_fast = _run(tiny_dit, cfg)
        slow, flops_slow, stats_slow, norms_slow, n_slow = _run(tiny_dit, cfg.replace(block_shortcuts=False))
        assert (n_fast, n_slow) == (len(tiny_dit.transformer_blocks), 0)
        assert torch.equal(fast, slow)
        # Besides elementwise work, the shortcut skips the 4 non-gate rows of each block's [6D, D] modulation
        # matmul on every forecast step: 2 * batch * D * 4D FLOPs per block (batch 6: 3 labels, CFG batched).
        width = tiny_dit.config.num_attention_heads * tiny_dit.config.attention_head_dim
        blocks = len(n_blocks(tiny_dit))
        assert flops_slow - flops_fast == stats_fast.steps_forecast * blocks * 2 * 6 * width * 4 * width
        assert stats_fast.module_forecast == stats_slow.module_forecast
        assert norms_slow == 12 and norms_fast == stats_fast.steps_full < 12


def test_shortcut_only_for_dit_style_blocks(tiny_dit):
    from diffusers import PixArtTransformer2DModel

    assert find_shortcut(tiny_dit.transformer_blocks[0]) is not None
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=1, sample_size=8, cross_attention_dim=16, caption_channels=16)
    assert find_shortcut(pixart.transformer_blocks[0]) is None  # ada_norm_single + cross-attention: no shortcut


def test_probe_and_outside_steps_take_the_original_block(tiny_dit):
    ref = sample(tiny_dit, LABELS, num_steps=6, seed=0)
    with taylorseer.apply(tiny_dit, TaylorSeerConfig(interval=2, warmup_steps=1, max_order=1)) as handle:
        handle.auto_steps = False
        assert torch.equal(sample(tiny_dit, LABELS, num_steps=6, seed=0), ref)  # no steps told, none read
        handle.auto_steps = True
        handle.probe("transformer_blocks.0.attn1")
        sample(tiny_dit, LABELS, num_steps=6, seed=0, listener=handle)
        assert len(handle.stats.probe_errors) == handle.stats.steps_forecast > 0
    assert not any("forward" in m.__dict__ for m in tiny_dit.modules())
