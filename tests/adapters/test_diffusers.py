"""Contract suite over every diffusers adapter x granularity x forecaster, on tiny random configs of the real classes.

Pipelines: DiTPipeline runs for real (tiny transformer + tiny VAE). The text-conditioned pipelines of the other
families need ``transformers`` for their text encoders, which is not installed here, so those families run through
``LoopPipeline``: a ``DiffusionPipeline`` subclass with the real transformer and a real diffusers scheduler whose
``__call__`` is the standard diffusers denoising loop (``set_timesteps``, transformer call(s) with CFG as one
doubled batch or two calls, ``scheduler.step``). Either way ``taylorseer.apply(pipe, config)`` is the only
integration: nothing tells the handle the step except the pipeline's scheduler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch.utils.flop_counter import FlopCounterMode

import taylorseer
from taylorseer import TaylorSeerConfig, count_flops
from taylorseer.adapters import find_adapter, match_modules, resolve_targets
from taylorseer.integrations.peers import adapter_regexes, apply_diffusers_taylorseer

STEPS = 8
TEXT = 5  # text tokens


#################################################################################
#                        Tiny models of the real classes                        #
#################################################################################

def _grid_ids(n: int, side: int, width: int = 3) -> torch.Tensor:
    ids = torch.zeros(n, width)
    ids[:, 1], ids[:, 2] = torch.arange(n) // side, torch.arange(n) % side
    return ids


@dataclass(frozen=True)
class Family:
    """A tiny model of one transformer class and how a pipeline of that family calls it."""

    name: str
    build: Callable[[], torch.nn.Module]
    latent: tuple[int, ...]  # one image's latent shape
    context: dict[str, tuple[int, ...]]  # per-row conditioning tensors (random for cond, zeros for uncond)
    forward: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]
    flow: bool  # flow matching (FlowMatchEulerDiscreteScheduler) or epsilon prediction (DDIM)
    counts: tuple[int, int, int]  # (module targets, skip targets, block targets) on this tiny config

    def scheduler(self):
        return FlowMatchEulerDiscreteScheduler() if self.flow else DDIMScheduler(clip_sample=False)


def _t(t: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (t / scale).expand(x.shape[0])


FAMILIES = [
    Family(
        "dit",
        lambda: diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1),
        (4, 8, 8), {"class_labels": ()},
        lambda m, x, t, c: m(x, timestep=_t(t, x), class_labels=c["class_labels"]).sample[:, :4],
        False, (4, 0, 2)),
    Family(
        "pixart",
        lambda: diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=1),
        (4, 8, 8), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                             **c).sample[:, :4],
        False, (6, 0, 2)),
    Family(
        "sd3",
        lambda: diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
        (4, 8, 8), {"encoder_hidden_states": (TEXT, 16), "pooled_projections": (16,)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), **c).sample,
        True, (6, 0, 2)),
    Family(
        "flux",
        lambda: diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
        (16, 16), {"encoder_hidden_states": (TEXT, 16), "pooled_projections": (16,)},
        lambda m, x, t, c: m(x, timestep=_t(t, x, 1000), img_ids=_grid_ids(16, 4), txt_ids=torch.zeros(TEXT, 3),
                             **c).sample,
        True, (4, 2, 2)),
    Family(
        "hunyuan_video",
        lambda: diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False),
        (4, 2, 4, 4), {"encoder_hidden_states": (TEXT, 16), "pooled_projections": (8,)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), encoder_attention_mask=torch.ones(x.shape[0], TEXT),
                             **c).sample,
        True, (4, 2, 2)),
    Family(
        "wan",
        lambda: diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32),
        (4, 2, 4, 4), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), **c).sample,
        True, (6, 0, 2)),
    Family(
        "qwen_image",
        lambda: diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
        (16, 16), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x, 1000), img_shapes=[(1, 4, 4)] * x.shape[0],
                             encoder_hidden_states_mask=torch.ones(x.shape[0], TEXT), **c).sample,
        True, (6, 0, 2)),
    Family(
        "sana",
        lambda: diffusers.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=4, patch_size=1),
        (4, 4, 4), {"encoder_hidden_states": (TEXT, 8)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), **c).sample,
        True, (6, 0, 2)),
    Family(
        "ltx_video",
        lambda: diffusers.LTXVideoTransformer3DModel(
            in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, num_layers=2, caption_channels=16),
        (32, 4), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), encoder_attention_mask=torch.ones(x.shape[0], TEXT),
                             num_frames=2, height=4, width=4, **c).sample,
        True, (6, 0, 2)),
    Family(
        "chroma",
        lambda: diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
            approximator_hidden_dim=16, approximator_layers=1),
        (16, 16), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x, 1000), img_ids=_grid_ids(16, 4), txt_ids=torch.zeros(TEXT, 3),
                             **c).sample,
        True, (4, 2, 2)),
    Family(
        "flux2",
        lambda: diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 2, 2), timestep_guidance_channels=16),
        (16, 16), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x, 1000), img_ids=_grid_ids(16, 4, 4).expand(x.shape[0], -1, -1),
                             txt_ids=torch.zeros(x.shape[0], TEXT, 4), guidance=torch.full((x.shape[0],), 3.5),
                             **c).sample,
        True, (4, 0, 2)),
    Family(
        "cogvideox",
        lambda: diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=TEXT),
        (3, 4, 8, 8), {"encoder_hidden_states": (TEXT, 16)},
        lambda m, x, t, c: m(x, timestep=_t(t, x), **c).sample,
        False, (4, 0, 2)),
]
FAMILY = {f.name: f for f in FAMILIES}
GRANULARITIES = ("module", "block", "output")
FORECASTERS = [(scheme, order) for scheme in ("reference", "divided") for order in (0, 1, 2)]
_MODELS: dict[str, torch.nn.Module] = {}


def tiny(name: str) -> torch.nn.Module:
    """The tiny model of a family (built once per session, eval mode, random weights from a fixed seed)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        model = FAMILY[name].build().eval().requires_grad_(False)
        # Random weights everywhere: zero-initialised gates/projections would hide whole modules.
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
        _MODELS[name] = model
    return _MODELS[name]


#################################################################################
#                     A pipeline that runs the diffusers loop                   #
#################################################################################

class LoopPipeline(DiffusionPipeline):
    """The standard diffusers denoising loop around a real transformer and scheduler (conditioning precomputed)."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, family: Family, num_inference_steps: int = STEPS, batch_size: int = 2,
                 num_images_per_prompt: int = 1, guidance_scale: float = 3.0, cfg_mode: str = "batch",
                 seed: int = 0, begin_index: int = 0) -> torch.Tensor:
        # Row r's prompt and image k's noise come from their own seeds, so a row does not depend on the batch.
        cond = {k: torch.stack([torch.randint(0, 1000, (), generator=_generator(seed, r)) if not shape
                                else torch.randn(*shape, generator=_generator(seed, r)) for r in range(batch_size)])
                for k, shape in family.context.items()}
        uncond = {k: torch.full_like(v, 1000) if not family.context[k] else torch.zeros_like(v)
                  for k, v in cond.items()}
        cond, uncond = ({k: v.repeat_interleave(num_images_per_prompt, 0) for k, v in c.items()}
                        for c in (cond, uncond))
        latents = torch.stack([torch.randn(*family.latent, generator=_generator(seed, 1000 + k))
                               for k in range(batch_size * num_images_per_prompt)])
        # As diffusers' retrieve_timesteps: inspect the scheduler's signature, then set the timesteps.
        assert "num_inference_steps" in inspect.signature(self.scheduler.set_timesteps).parameters
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps[begin_index:]
        if begin_index:
            self.scheduler.set_begin_index(begin_index)
        for t in timesteps:
            if guidance_scale == 1.0:
                noise = family.forward(self.transformer, latents, t, cond)
            elif cfg_mode == "batch":
                both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
                noise_cond, noise_uncond = family.forward(self.transformer, torch.cat([latents] * 2), t, both).chunk(2)
            else:
                noise_cond = family.forward(self.transformer, latents, t, cond)
                noise_uncond = family.forward(self.transformer, latents, t, uncond)
            if guidance_scale != 1.0:
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_000 * seed + stream)


def loop_pipeline(name: str) -> LoopPipeline:
    pipe = LoopPipeline(tiny(name), FAMILY[name].scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def traces(pipe) -> tuple:
    """Everything apply() may touch: instance attributes of the scheduler and forward swaps/hooks on modules."""
    modules = list(pipe.transformer.modules())
    return (sorted({"set_timesteps", "step"} & set(vars(pipe.scheduler))), [("forward" in m.__dict__) for m in modules],
            [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules])


_FULL: dict[tuple, torch.Tensor] = {}


def full_run(name: str, **kwargs) -> torch.Tensor:
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _FULL:
        _FULL[key] = loop_pipeline(name)(FAMILY[name], **kwargs)
    return _FULL[key]


_FLOPS: dict[str, tuple[int, dict[str, int]]] = {}


def flops_per_call(name: str) -> tuple[int, dict[str, int]]:
    """FLOPs of one CFG-batched transformer call and of each sub-module in it (by path; '' = the whole model)."""
    if name not in _FLOPS:
        family, model = FAMILY[name], tiny(name)
        pipe = loop_pipeline(name)
        pipe.scheduler.set_timesteps(STEPS)
        x = torch.zeros(4, *family.latent)
        context = {k: torch.zeros(4, *shape, dtype=torch.long if not shape else torch.float32)
                   for k, shape in family.context.items()}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            family.forward(model, x, pipe.scheduler.timesteps[0], context)
        root = type(model).__name__
        per_module = {k.removeprefix(root).removeprefix("."): sum(v.values())
                      for k, v in counter.get_flop_counts().items() if k.startswith(root)}
        _FLOPS[name] = (counter.get_total_flops(), per_module)
    return _FLOPS[name]


#################################################################################
#                                 The contract                                  #
#################################################################################

@pytest.mark.parametrize("name", list(FAMILY))
def test_adapter_declaration_matches_the_real_modules(name):
    model = tiny(name)
    spec = find_adapter(model)
    assert spec is not None and spec.name.startswith("diffusers-")
    module = resolve_targets(model, TaylorSeerConfig(granularity="module"))
    block = resolve_targets(model, TaylorSeerConfig(granularity="block"))
    forecast = [t.path for t in module if t.mode == "output"]
    skipped = [t.path for t in module if t.mode == "skip"]
    assert (len(forecast), len(skipped), len(block)) == FAMILY[name].counts
    # Hooked count equals the adapter's declaration: the matches of its patterns.
    assert forecast == match_modules(model, spec.modules, require_each=False)
    assert skipped == match_modules(model, spec.skip, require_each=False)
    assert [t.path for t in block] == match_modules(model, spec.blocks)
    # Each module target sits directly in a declared block; every block has targets; block inputs are arguments.
    blocks = {t.path for t in block}
    assert {p.rsplit(".", 1)[0] for p in forecast + skipped} == blocks
    for target in block:
        parameters = inspect.signature(model.get_submodule(target.path).forward).parameters
        assert set(target.inputs) <= set(parameters), (target.path, target.inputs)


def test_every_declared_pattern_matches_some_tiny_model():
    for name in FAMILY:
        spec = find_adapter(tiny(name))
        for pattern in spec.modules + spec.skip + spec.blocks:
            assert match_modules(tiny(name), (pattern,)), (name, pattern)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_interval_one_and_remove_are_bit_identical(name, granularity):
    pipe = loop_pipeline(name)
    family = FAMILY[name]
    before = traces(pipe)
    reference = full_run(name)
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=1, granularity=granularity)) as handle:
        assert torch.equal(pipe(family), reference)
        assert handle.stats.steps_full == STEPS and handle.stats.steps_forecast == 0
        assert traces(pipe) != before
    handle = taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=1, granularity=granularity))
    forecast = pipe(family)
    assert handle.stats.steps_forecast == STEPS - sum(handle.plan(STEPS)) > 0
    assert not torch.equal(forecast, reference) and torch.isfinite(forecast).all()
    handle.remove()
    assert traces(pipe) == before
    assert torch.equal(pipe(family), reference)


@pytest.mark.parametrize("scheme, order", FORECASTERS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.slow
def test_forecasting_removes_exactly_the_target_flops(name, granularity, scheme, order):
    pipe, family = loop_pipeline(name), FAMILY[name]
    per_call, per_module = flops_per_call(name)
    config = TaylorSeerConfig(interval=3, warmup_steps=2, max_order=order, scheme=scheme, granularity=granularity)
    with taylorseer.apply(pipe, config) as handle:
        out, flops = count_flops(lambda: pipe(family))
        forecast_steps = STEPS - sum(handle.plan(STEPS))
        assert handle.stats.steps_forecast == forecast_steps == 4  # FFffFffF
        assert dict(handle.stats.module_forecast) == {t.path: forecast_steps for t in handle.targets}
        saved = sum(per_module[t.path] if t.path else per_call for t in handle.targets)
        # A block shortcut (DiT-style blocks) also computes only the 2 gate rows of the block's [6D, D] modulation.
        saved += sum(per_module[f"{t.path}.norm1.linear"] * 4 // 6 for t in handle.cache.shortcuts)
    assert 0 < saved <= per_call
    assert flops == STEPS * per_call - forecast_steps * saved
    assert STEPS * per_call / flops > 1.0
    assert torch.isfinite(out).all() and not torch.equal(out, full_run(name))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_cfg_one_batch_equals_two_calls(name, granularity):
    pipe, family = loop_pipeline(name), FAMILY[name]
    config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2, granularity=granularity)
    with taylorseer.apply(pipe, config) as handle:
        batch = pipe(family, cfg_mode="batch")
        split = pipe(family, cfg_mode="split")
        assert handle.stats.steps_forecast == STEPS - sum(handle.plan(STEPS))
        # Two calls per step are two branches with their own factors, forecast on the same steps.
        assert set(handle.stats.module_forecast.values()) == {2 * handle.stats.steps_forecast}
    # Same math; only the matmul blocking differs with the batch size (then amplified a little by extrapolation).
    scale = full_run(name).abs().max()
    assert (batch - split).abs().max() <= 1e-4 * scale


# docs/models.md: bytes = (O + 1) * bytes/element * rows per step * sum over targets of (tokens x channels).
# Tiny FLUX: C = 16, L = 16 image + T = 5 text tokens, 1 double + 1 single block; tiny Wan: C = 24, L = 8, 2 blocks.
@pytest.mark.parametrize("name, granularity, cfg_mode, expected", [
    ("flux", "module", "batch", 3 * 4 * 4 * 16 * (16 + TEXT) * (2 * 1 + 1)),  # double: 2 (L+T)C, single: (L+T)C
    ("flux", "block", "batch", 3 * 4 * 4 * 16 * (16 + TEXT) * (1 + 1)),
    ("flux", "output", "batch", 3 * 4 * 4 * 16 * 16),
    ("wan", "module", "split", 3 * 4 * (2 * 2) * 3 * 2 * 8 * 24),  # two branches of 2 rows; attn1, attn2, ffn
    ("wan", "block", "split", 3 * 4 * (2 * 2) * 2 * 8 * 24),
])
def test_cache_bytes_follow_the_documented_formula(name, granularity, cfg_mode, expected):
    pipe, family = loop_pipeline(name), FAMILY[name]
    config = TaylorSeerConfig(interval=2, warmup_steps=2, max_order=2, granularity=granularity)  # FFfFfFfF
    with taylorseer.apply(pipe, config) as handle:
        pipe(family, cfg_mode=cfg_mode)
        assert handle.stats.peak_cache_bytes == expected
        assert handle.cache_bytes() == 0  # freed after the last forecast step


@pytest.mark.parametrize("name", ["flux", "hunyuan_video", "chroma"])
def test_skipped_modules_feed_only_forecast_targets(name):
    """Skipping a single-stream block's attention/MLP on forecast steps changes nothing but the FLOPs."""
    pipe, family = loop_pipeline(name), FAMILY[name]
    spec = find_adapter(pipe.transformer)
    results = {}
    for label, modules in (("adapter", ()), ("no skip", spec.modules)):
        config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=1, modules=modules)
        with taylorseer.apply(pipe, config):
            results[label] = count_flops(lambda: pipe(family))
    (with_skip, flops_skip), (without, flops_without) = results["adapter"], results["no skip"]
    assert torch.equal(with_skip, without)
    assert flops_skip < flops_without


#################################################################################
#                  Pipeline integration: the scheduler tells the step           #
#################################################################################

def spy_steps(handle) -> list[tuple]:
    """Record what the pipeline integration tells the handle: (index, timestep, branch) per transformer call."""
    told, original = [], handle.cache.step

    def step(index, timestep=None, sigma=None, branch=None):
        told.append((index, float(timestep), branch))
        return original(index, timestep, sigma, branch)

    handle.cache.step = step
    return told


@pytest.mark.parametrize("cfg_mode", ["batch", "split"])
def test_steps_come_from_the_scheduler(cfg_mode):
    pipe, family = loop_pipeline("flux"), FAMILY["flux"]
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=2, warmup_steps=1)) as handle:
        told = spy_steps(handle)
        for steps in (5, 9):  # any num_inference_steps; every call is a new generation
            told.clear()
            pipe(family, num_inference_steps=steps, cfg_mode=cfg_mode)
            timesteps = [float(t) for t in pipe.scheduler.timesteps]
            calls = 1 if cfg_mode == "batch" else 2
            assert told == [(i, timesteps[i], b) for i in range(steps) for b in range(calls)]
            assert handle.stats.steps_full == sum(handle.plan(steps))
            assert handle.stats.steps_full + handle.stats.steps_forecast == steps
        # Later-starting schedules (img2img: scheduler.set_begin_index) plan the steps that actually run.
        told.clear()
        pipe(family, num_inference_steps=10, begin_index=4)
        assert [i for i, _, _ in told] == list(range(6))
        assert [t for _, t, _ in told] == [float(t) for t in pipe.scheduler.timesteps[4:]]
        assert handle.stats.steps_full == sum(handle.plan(6))
        assert "sigmas" in inspect.signature(pipe.scheduler.set_timesteps).parameters  # signature kept


def test_same_call_twice_gives_the_same_result_and_rows_are_independent():
    pipe, family = loop_pipeline("sd3"), FAMILY["sd3"]
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2)):
        first = pipe(family, batch_size=2, num_images_per_prompt=2, seed=5)
        second = pipe(family, batch_size=2, num_images_per_prompt=2, seed=5)
        rows = pipe(family, batch_size=1, num_images_per_prompt=1, seed=5)
    assert torch.equal(first, second)  # state reset per pipeline call
    assert first.shape[0] == 4
    # Forecasting is elementwise per row: the first image of a batch of 4 is the single-image result.
    assert (first[0] - rows[0]).abs().max() <= 1e-4 * rows.abs().max()


def test_abscissa_timestep_and_sigma_are_read_from_the_scheduler():
    pipe, family = loop_pipeline("wan"), FAMILY["wan"]
    reference = full_run("wan")
    for abscissa in ("timestep", "sigma"):
        config = TaylorSeerConfig(interval=3, warmup_steps=1, max_order=2, abscissa=abscissa)
        with taylorseer.apply(pipe, config) as handle:
            out = pipe(family)
            assert handle.stats.steps_forecast == STEPS - sum(handle.plan(STEPS)) == 5  # FffFffFf
        assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_scheduler_swapped_after_apply_is_followed_and_restored():
    pipe, family = loop_pipeline("pixart"), FAMILY["pixart"]
    first = pipe.scheduler
    handle = taylorseer.apply(pipe, TaylorSeerConfig(interval=3, warmup_steps=1))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(first.config)
    told = spy_steps(handle)
    pipe(family)
    assert [i for i, _, _ in told] == list(range(STEPS)) and handle.stats.steps_forecast > 0
    assert "step" not in vars(first) and "step" in vars(pipe.scheduler)
    handle.remove()
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)


def test_calls_outside_the_denoising_loop_run_the_original():
    pipe, family = loop_pipeline("qwen_image"), FAMILY["qwen_image"]
    x = torch.randn(2, *family.latent)
    context = {"encoder_hidden_states": torch.randn(2, TEXT, 16)}
    t = torch.tensor(500.0)
    with torch.no_grad():
        reference = family.forward(pipe.transformer, x, t, context)
        with taylorseer.apply(pipe, TaylorSeerConfig(interval=3)) as handle:
            assert torch.equal(family.forward(pipe.transformer, x, t, context), reference)  # before any call
            pipe(family)
            with pytest.warns(UserWarning, match="after the last of 8 scheduler steps"):
                assert torch.equal(family.forward(pipe.transformer, x, t, context), reference)
            assert handle.stats.steps_full + handle.stats.steps_forecast == STEPS


def test_apply_errors_name_what_is_wrong():
    pipe = loop_pipeline("dit")
    with taylorseer.apply(pipe, TaylorSeerConfig()):
        with pytest.raises(ValueError, match="already applied"):
            taylorseer.apply(pipe, TaylorSeerConfig())
    assert traces(pipe) == traces(loop_pipeline("dit"))

    class UNetPipeline:
        unet = torch.nn.Linear(2, 2)
        scheduler = DDIMScheduler()

    with pytest.raises(ValueError, match="UNet pipelines are not supported"):
        taylorseer.apply(UNetPipeline(), TaylorSeerConfig())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or a diffusers pipeline"):
        taylorseer.apply("facebook/DiT-XL-2-256", TaylorSeerConfig())


def test_lora_loaded_transformer():
    peft = pytest.importorskip("peft", reason="peft is not installed here (LoRA layers come from peft)")
    pipe, family = loop_pipeline("flux"), FAMILY["flux"]
    pipe.transformer.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                 adapter_name="tiny")
    try:
        reference = pipe(family)
        with taylorseer.apply(pipe, TaylorSeerConfig(interval=1)) as handle:
            assert len(handle.targets) == sum(FAMILY["flux"].counts[:2])
            assert torch.equal(pipe(family), reference)
        with taylorseer.apply(pipe, TaylorSeerConfig(interval=3)) as handle:
            pipe(family)
            assert handle.stats.steps_forecast > 0
        assert torch.equal(pipe(family), reference)
    finally:
        pipe.transformer.delete_adapters("tiny")


#################################################################################
#                          The real DiTPipeline                                 #
#################################################################################

def tiny_dit_pipeline() -> diffusers.DiTPipeline:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=2, layers_per_block=1).eval()
    pipe = diffusers.DiTPipeline(tiny("dit"), vae, DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_pipeline_end_to_end():
    pipe = tiny_dit_pipeline()

    def run(steps=10, labels=(0, 1, 1)):
        return pipe(class_labels=list(labels), num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    reference = run()
    with taylorseer.apply(pipe, TaylorSeerConfig(interval=1)):
        assert torch.equal(run(), reference)
    with taylorseer.apply(pipe, taylorseer.preset("paper_dit")) as handle:
        told = spy_steps(handle)
        cached, flops = count_flops(run)
        assert [i for i, _, b in told] == list(range(10)) and {b for *_, b in told} == {0}  # CFG: one batch
        assert handle.stats.steps_full == 4 and handle.stats.steps_forecast == 6
        assert handle.cache_bytes() == 0 < handle.stats.peak_cache_bytes  # freed after the last forecast step
        for steps in (7, 13):
            run(steps)
            assert handle.stats.steps_full == sum(handle.plan(steps))
    _, flops_full = count_flops(run)
    assert flops < flops_full and not torch.equal(cached, reference)
    assert torch.equal(run(), reference)


#################################################################################
#                  diffusers' own TaylorSeer on the same modules                #
#################################################################################

@pytest.mark.parametrize("name", ["dit", "flux"])
def test_diffusers_taylorseer_peer(name):
    pipe, family = loop_pipeline(name), FAMILY[name]
    model, reference = pipe.transformer, full_run(name)
    cache, skip = adapter_regexes(model)
    assert len(cache) + len(skip) == sum(family.counts[:2])
    for order in (0, 1, 2):
        ours_config = TaylorSeerConfig(interval=3, warmup_steps=2, max_order=order, scheme="reference")
        with taylorseer.apply(pipe, ours_config):
            ours = pipe(family)
        peer = apply_diffusers_taylorseer(model, 3, 2, order, (cache, skip))
        assert len(peer.hooked) == sum(family.counts[:2]) > 0
        with PeerDriver(pipe, peer):
            theirs = pipe(family)
        peer.remove()
        assert not torch.equal(theirs, reference)
        # Same modules, same schedule, same differences (latest spacing): the same numbers.
        assert torch.equal(ours, theirs)
    assert torch.equal(pipe(family), reference)


def test_diffusers_taylorseer_native_schedule_differs():
    pipe, family = loop_pipeline("dit"), FAMILY["dit"]
    runs = {}
    for match in (True, False):
        peer = apply_diffusers_taylorseer(pipe.transformer, 4, 2, 1, adapter_regexes(pipe.transformer),
                                          match_schedule=match)
        with PeerDriver(pipe, peer):
            runs[match] = pipe(family)
        peer.remove()
    assert not torch.equal(runs[True], runs[False])  # diffusers forecasts step W and computes W + 1
    with pytest.raises(ValueError, match="hooked no module"):
        apply_diffusers_taylorseer(pipe.transformer, 4, 2, 1, ["nothing_here"])


class PeerDriver:
    """Tells a DiffusersTaylorSeer the steps of a pipeline call, the way a sampler would (test scaffolding)."""

    def __init__(self, pipe, peer):
        self.pipe, self.peer = pipe, peer

    def __enter__(self):
        pipe, peer = self.pipe, self.peer
        state = {"index": 0, "open": None}
        original_set, original_step = pipe.scheduler.set_timesteps, pipe.scheduler.step

        @functools.wraps(original_set)
        def set_timesteps(*args, **kwargs):
            original_set(*args, **kwargs)
            peer.begin(len(pipe.scheduler.timesteps))
            state["index"] = 0

        def step(*args, **kwargs):
            state["index"] += 1
            return original_step(*args, **kwargs)

        def enter(module, args):
            state["open"] = peer.step(state["index"])
            state["open"].__enter__()

        def leave(module, args, output):
            state["open"].__exit__(None, None, None)

        pipe.scheduler.set_timesteps, pipe.scheduler.step = set_timesteps, step
        self.hooks = [pipe.transformer.register_forward_pre_hook(enter, prepend=True),
                      pipe.transformer.register_forward_hook(leave)]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        del self.pipe.scheduler.set_timesteps, self.pipe.scheduler.step


#################################################################################
#                   generate(): a locally saved tiny pipeline                   #
#################################################################################

@pytest.fixture(scope="module")
def saved_dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit")
    pipe = tiny_dit_pipeline()
    pipe.register_to_config(id2label={0: "cat", 1: "dog, puppy"})  # saved in model_index.json, as on the hub
    pipe.save_pretrained(folder)
    return folder


def test_generate_writes_images_and_reports_stats(saved_dit, tmp_path):
    from PIL import Image

    from taylorseer.generate import generate

    out = generate(str(saved_dit), "puppy, 0", taylorseer.preset("paper_dit"), num_inference_steps=10, seed=3,
                   out_dir=tmp_path / "out", num_images=2, measure_flops=True)
    assert (out["pipeline"], out["transformer"]) == ("DiTPipeline", "DiTTransformer2DModel")
    assert len(out["images"]) == 4 and all(Image.open(p).size == (8, 8) for p in out["images"])
    stats = out["stats"]
    assert (stats["steps_full"], stats["steps_forecast"]) == (4, 6)
    assert stats["flops_speedup"] > 1.0 and out["config"]["name"] == "paper_dit"
    baseline = generate(str(saved_dit), "puppy, 0", None, num_inference_steps=10, seed=3, out_dir=tmp_path / "full")
    assert baseline["stats"] is None and len(baseline["images"]) == 2


def test_generate_errors_are_one_line(saved_dit, tmp_path):
    from taylorseer.generate import generate

    cases = [
        (str(tmp_path / "missing"), FileNotFoundError, "neither an existing folder nor a Hugging Face Hub id"),
        (str(tmp_path), FileNotFoundError, "no model_index.json"),
        ("nobody-here/no-such-model-xyz", FileNotFoundError, "could not load model"),
    ]
    ddpm = tmp_path / "ddpm"
    diffusers.DDPMPipeline(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,),
                                                 down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                                 norm_num_groups=2, layers_per_block=1),
                           DDIMScheduler()).save_pretrained(ddpm)
    cases.append((str(ddpm), ValueError, "unsupported model: DDPMPipeline has no transformer"))
    for model, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            generate(model, None, TaylorSeerConfig(), num_inference_steps=2, out_dir=tmp_path / "x")
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="unknown class label 'zebra': pass a class id or one of") as caught:
        generate(str(saved_dit), "zebra", TaylorSeerConfig(), num_inference_steps=2, out_dir=tmp_path / "x")
    assert "\n" not in str(caught.value)


def test_generate_cli(saved_dit, tmp_path, capsys):
    from taylorseer.cli import main

    out = tmp_path / "cli"
    assert main(["generate", "--model", str(saved_dit), "--prompt", "cat", "--steps", "8", "--preset", "paper_dit",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps_forecast" in printed and list(out.glob("*.png"))
    assert main(["generate", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "nope" in err
