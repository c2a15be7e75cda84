"""Works wherever the transformer runs: steps read from the call's own timestep when nothing tells them, family
defaults, LoRA injected after apply, branches numbered where the targets see the calls."""

import pytest
import torch
from test_diffusers import FAMILIES, FAMILY, LoopPipeline, loop_pipeline, tiny

import taylorseer
from taylorseer import TaylorSeerConfig, preset
from taylorseer.adapters.registry import registered_adapters
from taylorseer.models.sampler import sample

LABELS = torch.tensor([0, 3, 7])
CONFIG = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
@pytest.mark.parametrize("cfg_mode", ["batch", "split"])
def test_transformer_alone_in_a_pipeline_forecasts_and_equals_the_pipeline_handle(name, cfg_mode):
    pipe, family = loop_pipeline(name), FAMILY[name]
    with taylorseer.apply(pipe, CONFIG) as handle:
        told = pipe(family, cfg_mode=cfg_mode)
        told_stats = handle.stats.to_dict()
    with taylorseer.apply(pipe.transformer, CONFIG) as handle:
        read = pipe(family, cfg_mode=cfg_mode)
        stats = handle.stats.to_dict()
        assert stats["steps_forecast"] > 0
    assert torch.equal(read, told)
    for key in ("steps_full", "steps_forecast", "module_calls_full", "module_calls_forecast"):
        assert stats[key] == told_stats[key]
    assert not any("forward" in m.__dict__ for m in pipe.transformer.modules())


@pytest.mark.parametrize("cfg_mode", ["batch", "split"])
def test_a_loop_that_tells_nothing_is_accelerated_like_a_told_one(tiny_dit, cfg_mode):
    with taylorseer.apply(tiny_dit, CONFIG) as handle:
        told = sample(tiny_dit, LABELS, num_steps=10, seed=2, cfg_mode=cfg_mode, listener=handle)
        pattern = handle.stats.pattern()
        untold = sample(tiny_dit, LABELS, num_steps=10, seed=2, cfg_mode=cfg_mode)  # no listener
        assert handle.stats.pattern() == pattern == "FffFffFffF"
        assert handle.stats.steps_forecast == 6
    assert torch.equal(told, untold)


def test_a_timestep_restart_begins_a_new_generation(tiny_dit):
    with taylorseer.apply(tiny_dit, CONFIG) as handle:
        first = sample(tiny_dit, LABELS, num_steps=8, seed=0)
        second = sample(tiny_dit, LABELS, num_steps=8, seed=0)  # timesteps jump back to 999: a new generation
        assert handle.stats.steps_full + handle.stats.steps_forecast == 8
    with taylorseer.apply(tiny_dit, CONFIG):
        fresh = sample(tiny_dit, LABELS, num_steps=8, seed=0)
    assert torch.equal(first, second) and torch.equal(second, fresh)


def test_told_steps_keep_priority_and_mixing_them_is_refused(tiny_dit):
    y = torch.tensor([1, 2])
    x = torch.zeros(2, 1, tiny_dit.config.sample_size, tiny_dit.config.sample_size)
    with taylorseer.apply(tiny_dit, CONFIG) as handle:
        handle.begin(5)
        with handle.step(0, 999):
            tiny_dit(x, timestep=torch.full((2,), 999), class_labels=y)
        with pytest.raises(RuntimeError, match="without a told step"):
            tiny_dit(x, timestep=torch.full((2,), 799), class_labels=y)
        handle.auto_steps = False
        plain = tiny_dit(x, timestep=torch.full((2,), 799), class_labels=y).sample
    assert torch.equal(plain, tiny_dit(x, timestep=torch.full((2,), 799), class_labels=y).sample)


def test_a_model_without_a_timestep_argument_warns_and_runs_in_full(toy):
    class NoTime(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = toy

        def forward(self, h):
            return self.inner(h, 0.5)

    model = NoTime()
    with taylorseer.apply(model, TaylorSeerConfig(modules=("inner.blocks.*.poly",))) as handle:
        with pytest.warns(UserWarning, match="cannot read the step"):
            model(torch.zeros(8, dtype=torch.float64))
        assert handle.stats.steps_full == handle.stats.steps_forecast == 0


def test_self_forward_calls_get_their_own_branches(tiny_dit):
    """facebookresearch/DiT's forward_with_cfg calls self.forward, so no root hook fires: the branches are still
    numbered where the targets see the calls (two calls per step, as CFG split)."""

    def forward_with_cfg(model, x, t, y, null):
        cond = model.forward(x, timestep=torch.full((len(y),), t), class_labels=y).sample
        uncond = model.forward(x, timestep=torch.full((len(y),), t), class_labels=null).sample
        return uncond + 1.5 * (cond - uncond)

    size = tiny_dit.config.sample_size
    x, y, null = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(0)), LABELS, LABELS * 0 + 10
    outs = {}
    for mode in ("self-forward", "call"):
        with taylorseer.apply(tiny_dit, CONFIG) as handle:
            handle.begin(7)
            steps = []
            for i, t in enumerate(range(900, 200, -100)):
                with handle.step(i, t):
                    if mode == "self-forward":
                        steps.append(forward_with_cfg(tiny_dit, x, t, y, null))
                    else:
                        cond = tiny_dit(x, timestep=torch.full((3,), t), class_labels=y).sample
                        uncond = tiny_dit(x, timestep=torch.full((3,), t), class_labels=null).sample
                        steps.append(uncond + 1.5 * (cond - uncond))
            assert {d["branch"] for d in handle.stats.decisions} == {0, 1}
            outs[mode] = torch.stack(steps)
    assert torch.equal(outs["self-forward"], outs["call"])


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_every_family_has_a_recommended_preset_used_without_a_config(name):
    model = tiny(name)
    spec = registered_adapters()[type(model).__name__]
    assert spec.preset in taylorseer.PRESET_NAMES and "preset:" in spec.notes
    with taylorseer.apply(model) as handle:
        assert handle.config == preset(spec.preset)
        assert spec.preset in repr(handle)


def _own_pipeline(name):
    """A pipeline with its own tiny model (LoRA layers and replaced modules must not leak into the shared one)."""
    torch.manual_seed(0)
    model = FAMILY[name].build().eval().requires_grad_(False)
    for p in model.parameters():
        if p.abs().max() == 0:
            p.normal_(0, 0.05)
    pipe = LoopPipeline(model, FAMILY[name].scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_injected_after_apply_equals_lora_injected_before():
    peft = pytest.importorskip("peft")
    family = FAMILY["flux"]
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=1)
    lora = dict(r=2, lora_alpha=6, target_modules=["to_q", "to_v", "proj_out", "proj_mlp"], init_lora_weights=False)
    results = {}
    for order in ("before", "after"):
        pipe = _own_pipeline("flux")
        if order == "before":
            torch.manual_seed(1)
            pipe.transformer.add_adapter(peft.LoraConfig(**lora), adapter_name="tiny")
        handle = taylorseer.apply(pipe.transformer, config)
        if order == "after":
            torch.manual_seed(1)
            pipe.transformer.add_adapter(peft.LoraConfig(**lora), adapter_name="tiny")
        try:
            results[order] = pipe(family)
            assert handle.stats.steps_forecast > 0
        finally:
            handle.remove()
            pipe.transformer.delete_adapters("tiny")
    assert (results["after"] - results["before"]).abs().max() <= 1e-5


class _LoraLike(torch.nn.Module):
    """base(x) + B(A(x)): what a LoRA layer put in place of a Linear computes."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base
        generator = torch.Generator().manual_seed(3)
        self.lora_A = torch.nn.Parameter(torch.randn(2, base.in_features, generator=generator) * 0.3)
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, 2, generator=generator) * 0.3)

    def forward(self, x):
        return self.base_layer(x) + x @ self.lora_A.T @ self.lora_B.T


def test_a_target_replaced_after_apply_is_re_resolved():
    """A layer put in place of the single-stream proj_out after apply (as PEFT does) reads the concatenated
    attention/MLP outputs, which are zeros on forecast steps: the replacement itself must become the target."""
    family = FAMILY["flux"]
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=1)
    results = {}
    for order in ("before", "after"):
        pipe = _own_pipeline("flux")
        block = pipe.transformer.single_transformer_blocks[0]
        original = block.proj_out
        if order == "before":
            block.proj_out = _LoraLike(original)
        handle = taylorseer.apply(pipe.transformer, config)
        if order == "after":
            block.proj_out = _LoraLike(original)
        try:
            results[order] = pipe(family)
            assert "single_transformer_blocks.0.proj_out" in [t.path for t in handle.targets]
            assert "forward" in block.proj_out.__dict__  # the replacement is intercepted, not its base layer
        finally:
            handle.remove()
            block.proj_out = original
    assert torch.equal(results["after"], results["before"])
