"""The shipped flow-matching reference: checksum-verified load, FluxPipeline determinism, a regression anchor of
full compute and of the FLUX preset, corruption refused."""

import shutil
from pathlib import Path

import pytest
import torch

import taylorseer
from taylorseer.models.checkpoint import CheckpointError, load_tensors, manifest_sha256
from taylorseer.models.flux_pipeline import FLUX_FILE, FLUX_PATH, load_flux_reference

ANCHOR = Path(__file__).with_name("shipped_flux_sample.safetensors")
LABELS = torch.tensor([1, 7])  # trouser, sneaker
SEED = 1234


@pytest.fixture(scope="module")
def shipped():
    return load_flux_reference()  # verifies the SHA-256 recorded in assets/MANIFEST.json


@pytest.fixture(scope="module")
def full_sample(shipped):
    return shipped.generate(LABELS, num_steps=28, seed=SEED)


@pytest.mark.slow
def test_the_pipeline_is_diffusers_own_and_deterministic(shipped, full_sample):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    assert type(shipped.pipe) is FluxPipeline and type(shipped.transformer) is FluxTransformer2DModel
    assert torch.equal(shipped.generate(LABELS, num_steps=28, seed=SEED), full_sample)
    blocks = len(shipped.transformer.transformer_blocks) + len(shipped.transformer.single_transformer_blocks)
    assert blocks == 12


def test_full_compute_and_the_flux_preset_match_the_anchor(shipped, full_sample):
    # Written once by scripts/make_golden_flux.py when the checkpoint was exported: pins loader, model, pipeline
    # and the FLUX preset's forecasts together. Tolerance covers BLAS differences between CPUs.
    anchor, meta = load_tensors(ANCHOR)
    assert meta["checkpoint_sha256"] == manifest_sha256(FLUX_FILE)
    assert (full_sample - anchor["full"]).abs().max() < 2e-3
    with taylorseer.apply(shipped.pipe, taylorseer.preset("paper_flux")) as handle:
        cached = shipped.generate(LABELS, num_steps=28, seed=SEED)
        assert handle.stats.steps_full == 7
    assert (cached - anchor["paper_flux"]).abs().max() < 2e-3
    assert not torch.equal(cached, full_sample)


def test_corrupted_shipped_weights_are_refused(tmp_path):
    sha = manifest_sha256(FLUX_FILE)
    bad = tmp_path / FLUX_FILE
    shutil.copy(FLUX_PATH, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0x10
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_flux_reference(bad, sha256=sha)


def test_a_speed_target_finds_the_shipped_flux_calibration(shipped, full_sample, caplog):
    import logging

    from taylorseer.auto import _pipeline_guidance

    assert _pipeline_guidance(shipped.pipe) is None  # true CFG: the scale is not kept by FluxPipeline
    with caplog.at_level(logging.INFO, logger="taylorseer"):
        with taylorseer.apply(shipped.pipe, speedup=4.5) as handle:
            images = shipped.generate(LABELS, num_steps=28, seed=SEED)
            assert handle.stats.steps_full == 6
    assert "ts2-output-b6-s28 (shipped" in caplog.text
    mse = float((images - full_sample).pow(2).mean())
    assert 10 * torch.log10(torch.tensor(4.0 / mse)) > 35  # the searched schedule on 2 images, 38.5 dB held out


def test_the_commands_name_the_trained_reference_flux(shipped):
    from taylorseer.distributed.flux import build_model

    pipe = build_model("flux")  # what `taylorseer generate/sample --model flux` run
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), shipped.transformer.state_dict().items()):
        assert torch.equal(a, b), name
    noise = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = shipped.generate(torch.tensor([7]), num_steps=4, noise=noise)
    theirs = pipe(class_labels=[7], num_inference_steps=4, guidance_scale=2.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(3)]).images
    assert torch.allclose(ours, theirs, atol=1e-5)
