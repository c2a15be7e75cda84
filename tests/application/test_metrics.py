"""Unit tests of the evaluation metrics and of the shipped, checksum-verified classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taylorseer.eval.classifier import (
    CLASSIFIER_FILE,
    CLASSIFIER_PATH,
    FMNISTClassifier,
    load_classifier,
    manifest_sha256,
    shipped_classifier,
)
from taylorseer.eval.metrics import (
    class_accuracy,
    feature_statistics,
    fid_fmnist,
    frechet_distance,
    psnr,
    reference_statistics,
    ssim,
)
from taylorseer.models.checkpoint import CheckpointError
from taylorseer.models.data import load_fashion_mnist, resize_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist("test")
    return images[:1000], labels[:1000]


def _random_images(n: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=generator, dtype=torch.float64) * 2 - 1


# ----------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_is_infinite() -> None:
    x = _random_images(4)
    assert math.isinf(psnr(x, x)) and psnr(x, x) > 0


def test_psnr_matches_formula_for_known_mse() -> None:
    a = torch.zeros(3, 1, 28, 28, dtype=torch.float64)
    b = a.clone()
    b[:, :, ::2] = 0.2  # half of the pixels differ by 0.2 -> MSE = 0.5 * 0.04 = 0.02
    # 10 * log10(2.0**2 / 0.02) = 10 * log10(200) = 23.0103 dB (by hand); torchmetrics converts ln to log10
    # with a float32 constant, hence the 1e-5 dB tolerance
    assert psnr(a, b) == pytest.approx(23.010299956639813, abs=1e-5)
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1.0 / 0.02), abs=1e-5)
    assert psnr(a, b) > psnr(a, b * 2)  # larger error, lower PSNR


def test_psnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        psnr(torch.zeros(2, 1, 28, 28), torch.zeros(3, 1, 28, 28))


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    x = _random_images(4).clamp(-0.5, 0.5)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert ssim(x, noisy) < 0.9


# ------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_identical_statistics_is_zero() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16))
    sigma = a @ a.T  # symmetric positive definite
    mu = rng.standard_normal(16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    singular = sigma.copy()
    singular[:, 0] = singular[0, :] = 0.0  # a dead feature: still fine
    assert frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    # |mu1 - mu2|^2 = 1 + 0 + 4 = 5; sum (sqrt(v1) - sqrt(v2))^2 = (1 - 2)^2 + (2 - 1)^2 + 0 = 2 -> 7
    assert frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(7.0, abs=1e-10)
    # symmetric in its two arguments
    assert frechet_distance(mu2, torch.diag(var2), mu1, torch.diag(var1)) == pytest.approx(7.0, abs=1e-10)


# ------------------------------------------------------------------------------------------- classifier / FID


def test_shipped_classifier_accuracy_on_real_test_images(test_split) -> None:
    images, labels = test_split
    assert class_accuracy(images, labels) >= 0.9
    assert class_accuracy(images, (labels + 1) % 10) < 0.1  # wrong labels are detected as wrong


@pytest.mark.slow
def test_feature_statistics_shapes_and_fid_ordering(test_split) -> None:
    images, _ = test_split
    mu, sigma = feature_statistics(images)
    ref_mu, ref_sigma = reference_statistics()
    assert mu.dtype == sigma.dtype == ref_sigma.dtype == torch.float64
    assert mu.shape == ref_mu.shape and sigma.shape == ref_sigma.shape == (mu.shape[0], mu.shape[0])
    assert torch.allclose(sigma, sigma.T)
    real = fid_fmnist(images)
    noise = fid_fmnist(_random_images(1000).float())
    assert 0.0 <= real < noise


@pytest.mark.slow
def test_fid_between_is_a_symmetric_distance_between_image_sets(test_split) -> None:
    from taylorseer.eval.metrics import classifier_features, fid_between

    images, _ = test_split
    real_a, real_b, noise = images[:500], images[500:], _random_images(500).float()
    assert fid_between(real_a, real_a) == 0.0  # the same set
    assert fid_between(real_a, real_a.clone()) == pytest.approx(0.0, abs=1e-6)  # an equal copy
    assert 0.0 < fid_between(real_a, real_b) < fid_between(real_a, noise)  # two real halves are closer than noise
    assert fid_between(real_a, noise) == pytest.approx(fid_between(noise, real_a), rel=1e-6)
    feats = classifier_features(real_a)
    assert feats.shape == (500, 128) and feats.dtype == torch.float64
    with pytest.raises(ValueError, match="same size"):
        fid_between(real_a, resize_images(real_b, 16))


def test_corrupted_classifier_file_is_rejected(tmp_path) -> None:
    expected = manifest_sha256(CLASSIFIER_FILE)
    data = bytearray(CLASSIFIER_PATH.read_bytes())
    good = tmp_path / CLASSIFIER_FILE
    good.write_bytes(bytes(data))
    load_classifier(good, sha256=expected)  # an intact copy loads

    data[len(data) // 2] ^= 0x01  # flip one bit inside the weights
    bad = tmp_path / "corrupted.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_classifier(bad, sha256=expected)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError):
        load_classifier(truncated, sha256=expected)


# ------------------------------------------------------------------------------------------------ 16x16 images


def test_classifier_flattened_size_follows_image_size() -> None:
    for size, side in ((28, 3), (16, 2)):
        model = FMNISTClassifier(image_size=size).eval()
        assert model.fc1.in_features == 128 * side * side
        assert model.features(torch.zeros(2, 1, size, size)).shape == (2, 128)
    with pytest.raises(ValueError, match="16, 16"):
        FMNISTClassifier(image_size=16).features(torch.zeros(2, 1, 28, 28))


def test_shipped_16x16_classifier_accuracy_on_resized_test_images(test_split) -> None:
    images, labels = test_split
    small = resize_images(images, 16)  # [1000, 1, 16, 16]
    assert shipped_classifier(16).image_size == 16 and shipped_classifier().image_size == 28
    assert class_accuracy(small, labels) >= 0.88
    assert class_accuracy(small, (labels + 1) % 10) < 0.1


def test_fid_16x16_real_below_noise() -> None:
    train, _ = load_fashion_mnist("train")
    real = fid_fmnist(resize_images(train[:1000], 16))
    noise = fid_fmnist(_random_images(1000, size=16).float())
    ref_mu, ref_sigma = reference_statistics(16)
    assert ref_mu.shape == (128,) and ref_sigma.shape == (128, 128) and ref_sigma.dtype == torch.float64
    assert 0.0 <= real < noise


def test_unsupported_image_size_is_rejected() -> None:
    images = _random_images(4, size=20).float()
    for call in (lambda: fid_fmnist(images), lambda: class_accuracy(images, torch.zeros(4, dtype=torch.long)),
                 lambda: feature_statistics(images), lambda: reference_statistics(20),
                 lambda: shipped_classifier(20)):
        with pytest.raises(ValueError, match=r"\{16, 28\}"):
            call()
