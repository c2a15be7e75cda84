"""The shipped reference DiT: checksum-verified load, bit-exact N=1, a regression anchor, corruption errors."""

import shutil
from pathlib import Path

import pytest
import torch

import taylorseer
from taylorseer.models.checkpoint import CheckpointError, load_tensors, manifest_sha256
from taylorseer.models.pretrained import REFERENCE_FILE, REFERENCE_PATH, load_reference
from taylorseer.models.sampler import sample

ANCHOR = Path(__file__).with_name("shipped_sample.safetensors")
LABELS = torch.tensor([1, 7])  # trouser, sneaker
SEED = 1234


@pytest.fixture(scope="module")
def shipped():
    return load_reference()  # verifies the SHA-256 recorded in assets/MANIFEST.json


@pytest.fixture(scope="module")
def full_sample(shipped):
    return sample(shipped, LABELS, num_steps=50, seed=SEED)


@pytest.mark.slow
def test_interval_one_is_bit_identical_on_the_shipped_model(shipped, full_sample):
    with taylorseer.apply(shipped, taylorseer.TaylorSeerConfig(interval=1)) as handle:
        assert torch.equal(sample(shipped, LABELS, num_steps=50, seed=SEED, listener=handle), full_sample)


def test_full_compute_sample_matches_the_anchor(full_sample):
    # Regression anchor written once by scripts/make_golden.py when the checkpoint was exported: it pins the
    # loader, the model and the sampler together. Tolerance covers BLAS differences between CPUs.
    anchor, meta = load_tensors(ANCHOR)
    assert meta["checkpoint_sha256"] == manifest_sha256(REFERENCE_FILE)
    assert (full_sample - anchor["images"]).abs().max() < 2e-3


def test_corrupted_or_truncated_shipped_weights_are_refused(tmp_path):
    sha = manifest_sha256(REFERENCE_FILE)
    bad = tmp_path / REFERENCE_FILE
    shutil.copy(REFERENCE_PATH, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0x10
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_reference(bad, sha256=sha)
    bad.write_bytes(REFERENCE_PATH.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_reference(bad, sha256=sha)
    with pytest.raises(CheckpointError):
        load_reference(bad)  # even without a checksum: not readable, never garbage
