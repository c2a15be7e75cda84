"""The flow-matching reference: FluxPipeline layout, determinism, apply(pipe) == apply(pipe.transformer), training
resume, export/load with checksum. Tiny random-weight models (the shipped weights have their own golden test)."""

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

import taylorseer
from taylorseer.eval.flux import FluxSampler, HookSettings, flux_grid, interval_for
from taylorseer.models.checkpoint import CheckpointError, file_sha256, load_tensors
from taylorseer.models.flux_pipeline import FluxReference, export_flux_reference, load_flux_reference
from taylorseer.models.flux_reference import (
    ClassPrompts,
    build_flux_reference,
    image_ids,
    pack,
    shift_mu,
    shift_sigmas,
    unpack,
)
from taylorseer.models.train_flux import FluxTrainConfig, train_flux_reference

TINY = "Flux-FM-T-16"


@pytest.fixture(scope="module")
def tiny_ref() -> FluxReference:
    torch.manual_seed(0)
    model = build_flux_reference(TINY)
    for p in model.parameters():  # diffusers zero-initialises nothing we need; make every block matter
        p.data.normal_(0, 0.05)
    return FluxReference(model.requires_grad_(False), ClassPrompts(TINY).requires_grad_(False))


def test_packing_and_ids_are_flux_pipelines_own():
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 3, 1, 16, 16))
    assert torch.equal(unpack(pack(x)), x)
    assert torch.equal(image_ids(), FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))


def test_time_shift_matches_the_scheduler():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from taylorseer.models.flux_pipeline import make_flux_scheduler

    assert shift_mu() == pytest.approx(calculate_shift(64, 256, 4096, 0.5, 1.15))
    scheduler = make_flux_scheduler()
    sigmas = torch.linspace(1.0, 1 / 28, 28)
    scheduler.set_timesteps(sigmas=sigmas.numpy(), mu=shift_mu())
    assert torch.allclose(scheduler.sigmas[:-1], shift_sigmas(sigmas, shift_mu()), atol=1e-6)


def test_pipeline_generates_deterministically_through_true_cfg(tiny_ref):
    labels = torch.tensor([0, 3, 7])
    a = tiny_ref.generate(labels, num_steps=6, guidance_scale=2.0, seed=1)
    b = tiny_ref.generate(labels, num_steps=6, guidance_scale=2.0, seed=1)
    c = tiny_ref.generate(labels, num_steps=6, guidance_scale=2.0, seed=2)
    d = tiny_ref.generate(labels, num_steps=6, guidance_scale=1.0, seed=1)
    assert a.shape == (3, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    calls = []
    hook = tiny_ref.transformer.register_forward_pre_hook(
        lambda m, args, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        tiny_ref.generate(labels, num_steps=6, guidance_scale=2.0, seed=1)
    finally:
        hook.remove()
    assert calls == [3] * 12  # true CFG: two calls of 3 rows per step


def test_apply_to_pipe_equals_apply_to_transformer(tiny_ref):
    labels = torch.tensor([1, 2])
    cfg = taylorseer.preset("paper_flux")
    full = tiny_ref.generate(labels, num_steps=12, seed=0)
    with taylorseer.apply(tiny_ref.pipe, cfg) as handle:
        via_pipe = tiny_ref.generate(labels, num_steps=12, seed=0)
        pattern = handle.stats.pattern()
    with taylorseer.apply(tiny_ref.pipe.transformer, cfg):
        via_transformer = tiny_ref.generate(labels, num_steps=12, seed=0)
    assert torch.equal(via_pipe, via_transformer)
    assert pattern.count("F") == cfg.full_steps(12) and "f" in pattern
    assert not torch.equal(via_pipe, full)
    assert torch.equal(tiny_ref.generate(labels, num_steps=12, seed=0), full)  # removal is exact


def test_sampler_tells_the_steps_to_a_handle(tiny_ref):
    cfg = interval_for(4, 12)
    assert cfg is not None and cfg.full_steps(12) == 4
    sampler = FluxSampler(tiny_ref)
    handle = taylorseer.apply(tiny_ref.transformer, cfg.replace(granularity="output"))
    try:
        sampler(tiny_ref.transformer, torch.tensor([5]), num_steps=12, guidance_scale=2.0, seed=0, listener=handle)
        assert handle.stats.steps_full == 4 and handle.stats.steps_forecast == 8
    finally:
        handle.remove()
    assert sampler.model_calls == 24
    with pytest.raises(ValueError, match="cfg_mode"):
        sampler(tiny_ref.transformer, torch.tensor([5]), num_steps=4, guidance_scale=2.0, seed=0, cfg_mode="batch")


def test_bad_generation_arguments_are_refused_by_name(tiny_ref):
    with pytest.raises(ValueError, match="class_labels"):
        tiny_ref.generate(torch.tensor([10]), num_steps=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_ref.generate(torch.tensor([1]), num_steps=2, guidance_scale=0.5)
    with pytest.raises(ValueError, match="noise"):
        tiny_ref.generate(torch.tensor([1]), num_steps=2, noise=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="kind"):
        HookSettings("teacache")


def test_grid_hits_the_issue_budgets():
    for steps, budgets in ((28, (5, 6, 8)), (50, (6, 8, 11))):
        grid = flux_grid(steps)
        counts = {m.full_steps() for m in grid if m.family == "taylorseer"}
        assert counts == set(budgets)
        assert {m.name for m in grid} >= {"full", "paper_flux", "fora-paper_flux"}


@pytest.mark.slow
def test_training_resume_is_bit_identical_and_exports_with_checksum(tmp_path):
    pytest.importorskip("taylorseer.models.data").load_fashion_mnist("test")  # the data package (CI installs it)
    cfg = FluxTrainConfig(out_dir=str(tmp_path / "a"), size=TINY, steps=6, batch_size=4, checkpoint_every=2,
                          warmup_steps=2)
    train_flux_reference(cfg, stop_at=3)
    resumed = train_flux_reference(cfg)
    straight = train_flux_reference(FluxTrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "b")}))
    a, meta = load_tensors(resumed)
    b, _ = load_tensors(straight)
    assert meta["step"] == "6" and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.startswith("opt."))

    out = export_flux_reference(resumed, tmp_path / "flux.safetensors", update_manifest=False)
    ref = load_flux_reference(out, sha256=file_sha256(out))
    assert torch.equal(ref.prompts.sequence, a["ema.prompts.sequence"].half().float())
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_flux_reference(tmp_path / "bad.safetensors", sha256=file_sha256(out))
