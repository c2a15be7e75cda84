"""Image metrics for generated Fashion-MNIST images in [-1, 1]: PSNR, SSIM, class accuracy, FID-FMNIST.

The classifier-based metrics take 28x28 images or 16x16 ones (Fashion-MNIST downsampled by area averaging,
``resize_images(images, 16)``) and pick the shipped classifier and reference statistics by the image size
(``images.shape[-1]``); other sizes raise ``ValueError``.

FID-FMNIST is the Fréchet distance between Gaussians fitted to the penultimate features (128-d) of the shipped
``FMNISTClassifier`` for that size on generated images and on the 10,000 real test images at the same size
(statistics shipped in ``taylorseer/assets/fmnist_test_stats.safetensors`` for 28x28 and
``fmnist_test_stats_16.safetensors`` for 16x16). It is in squared feature units, lower is better, and it is
biased upward for small sample counts: compare runs only at the same number of generated images. Values at
16x16 and at 28x28 come from different classifiers and are not comparable with each other.

Example:
    >>> real, labels = load_fashion_mnist("test")            # doctest: +SKIP
    >>> psnr(real[:64], real[:64]), ssim(real[:64], real[:64])   # doctest: +SKIP
    (inf, 1.0)
    >>> class_accuracy(real[:1000], labels[:1000]) > 0.9   # doctest: +SKIP
    True
    >>> fid_fmnist(real) < 1e-6                             # same images as the reference   # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._extras import require
from ..models.checkpoint import ASSETS_DIR, CheckpointError, load_tensors, manifest_sha256
from ..models.data import load_fashion_mnist, resize_images
from .classifier import CLASSIFIER_FILES, SUPPORTED_SIZES, check_image_size, shipped_classifier

require("torchmetrics")  # the bench extra: without it, one line that names the pip command
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure  # noqa: E402

STATS_FILES = {28: "fmnist_test_stats.safetensors", 16: "fmnist_test_stats_16.safetensors"}
STATS_FILE = STATS_FILES[28]
STATS_PATH = ASSETS_DIR / STATS_FILE


def stats_path(image_size: int = 28) -> Path:
    """Path of the shipped reference statistics for ``image_size`` x ``image_size`` images (16 or 28)."""
    return ASSETS_DIR / STATS_FILES[check_image_size(image_size)]

ArrayLike = torch.Tensor | np.ndarray


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two image batches of equal shape [N, C, H, W], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB between image batches ``a``, ``b`` ([N, C, H, W], values in [-1, 1]).

    ``10 * log10(data_range**2 / MSE)`` with the MSE pooled over every pixel of the batch (torchmetrics'
    default), computed in float64 (torchmetrics' float32 ln-to-log10 constant limits accuracy to ~1e-5 dB).
    ``data_range`` is the value span, 2.0 for [-1, 1] images. Identical batches give ``inf``.

    Example:
        >>> x = torch.zeros(2, 1, 28, 28)
        >>> round(psnr(x, x + 0.1), 4)   # MSE 0.01 -> 10 * log10(4 / 0.01)
        26.0206
    """
    _check_pair(a, b)
    return float(peak_signal_noise_ratio(a.double(), b.double(), data_range=data_range))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean structural similarity (unitless, at most 1) between image batches [N, C, H, W] in [-1, 1].

    torchmetrics' SSIM with its defaults (11x11 Gaussian window, sigma 1.5, k1=0.01, k2=0.03), averaged over
    the images of the batch, computed in float64. Identical batches give 1.0.

    Example:
        >>> x = torch.rand(4, 1, 28, 28) * 2 - 1
        >>> round(ssim(x, x), 6)
        1.0
    """
    _check_pair(a, b)
    value = structural_similarity_index_measure(a.double(), b.double(), data_range=data_range)
    assert isinstance(value, torch.Tensor), "a (value, image) pair comes only with return_full_image=True"
    return float(value)


def _check_images(images: torch.Tensor, classifier: nn.Module | None = None) -> int:
    """Validate a batch [N, 1, S, S] in [-1, 1] with S in ``SUPPORTED_SIZES``; returns S."""
    sizes = " or ".join(f"[N, 1, {s}, {s}]" for s in SUPPORTED_SIZES)
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected images of shape {sizes}, got {tuple(images.shape)}")
    image_size = int(images.shape[-1])
    if image_size not in SUPPORTED_SIZES:
        raise ValueError(f"unsupported image size {image_size}x{image_size}: expected images of shape {sizes} "
                         f"(allowed sizes {{{', '.join(str(s) for s in SUPPORTED_SIZES)}}})")
    clf_size = getattr(classifier, "image_size", image_size)
    if clf_size != image_size:
        raise ValueError(f"the classifier takes {clf_size}x{clf_size} images, got {image_size}x{image_size}")
    if images.shape[0] == 0:
        raise ValueError("expected at least one image")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -2.0 or hi > 2.0:
        raise ValueError(f"images must be scaled to [-1, 1]; got values in [{lo:.3g}, {hi:.3g}]")
    return image_size


def _batched(
    classifier: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Apply ``fn`` (a method of ``classifier``) over batches in eval mode without gradients; concatenate."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    try:
        with torch.inference_mode():
            outs = [fn(images[i : i + batch_size].to(device, torch.float32)).cpu()
                    for i in range(0, images.shape[0], batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(outs)


def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None, batch_size: int = 500
) -> float:
    """Fraction (in [0, 1]) of ``images`` ([N, 1, S, S], S = 28 or 16, in [-1, 1]) classified as ``labels`` [N].

    For class-conditional samples, ``labels`` are the conditioning classes. ``classifier`` defaults to the
    shipped ``FMNISTClassifier`` for the images' size (about 0.93 on the real 28x28 test set; see
    ``MANIFEST.json`` for the 16x16 one).

    Example:
        >>> class_accuracy(samples, torch.arange(10).repeat_interleave(100))   # doctest: +SKIP
        0.87
    """
    image_size = _check_images(images, classifier)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels of shape [{images.shape[0]}], got {tuple(labels.shape)}")
    classifier = classifier if classifier is not None else shipped_classifier(image_size)
    logits = _batched(classifier, classifier, images, batch_size)  # [N, 10]
    return float((logits.argmax(1) == labels.cpu()).double().mean())


def classifier_features(
    images: torch.Tensor, classifier: nn.Module | None = None, batch_size: int = 500
) -> torch.Tensor:
    """The classifier's penultimate features [N, D] (float64) of ``images`` [N, 1, S, S] (S = 28 or 16) in [-1, 1].

    ``classifier`` (with a ``features`` method) defaults to the shipped one for size S, D = 128.

    Example:
        >>> classifier_features(samples).shape   # samples: [1000, 1, 16, 16]   # doctest: +SKIP
        torch.Size([1000, 128])
    """
    image_size = _check_images(images, classifier)
    classifier = classifier if classifier is not None else shipped_classifier(image_size)
    features = classifier.features
    if not callable(features):
        raise TypeError(f"the classifier needs a features(images) method, {type(classifier).__name__} has none")
    return _batched(classifier, features, images, batch_size).double()


def feature_statistics(
    images: torch.Tensor, classifier: nn.Module | None = None, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of the classifier's penultimate features.

    ``images`` are [N, 1, S, S] (S = 28 or 16) in [-1, 1] with N >= 2; ``classifier`` (with a ``features``
    method) defaults to the shipped one for size S, D = 128.

    Example:
        >>> mu, sigma = feature_statistics(samples)   # doctest: +SKIP
        >>> mu.shape, sigma.shape, sigma.dtype          # doctest: +SKIP
        (torch.Size([128]), torch.Size([128, 128]), torch.float64)
    """
    _check_images(images, classifier)
    if images.shape[0] < 2:
        raise ValueError("feature statistics need at least 2 images")
    feats = classifier_features(images, classifier, batch_size)  # [N, D]
    mu = feats.mean(0)  # [D]
    centered = feats - mu  # [N, D]
    sigma = centered.T @ centered / (feats.shape[0] - 1)  # [D, D]
    return mu, sigma


def _to_numpy64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2), in squared units.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. The trace of the matrix square
    root is computed from the eigenvalues of the symmetric PSD matrix ``S1^(1/2) sigma2 S1^(1/2)`` (which has
    the same spectrum as ``sigma1 sigma2``), so no complex arithmetic is involved: there are no imaginary
    parts to discard, singular covariances are fine, and round-off that would make the result slightly
    negative is clipped to 0. Inputs are tensors or arrays, computed in float64.

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))   # 2 + 2 * (2 - 1)^2
        4.0
    """
    m1, m2 = _to_numpy64(mu1), _to_numpy64(mu2)
    s1, s2 = _to_numpy64(sigma1), _to_numpy64(sigma2)
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {m1.shape}, {m2.shape}; sigma {s1.shape}, {s2.shape}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def load_reference_statistics(
    path: str | os.PathLike | None = None, sha256: str | None = None, image_size: int = 28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (mu [D], sigma [D, D]) float64 from a statistics file after verifying its SHA-256.

    Defaults to the shipped statistics for ``image_size`` (16 or 28), checked against ``MANIFEST.json``; a
    ``path`` given is checked against ``sha256`` (default: the manifest entry for its name). The file must
    have been computed with the shipped classifier for ``image_size`` (its SHA-256 is recorded in the file's
    header). Raises ``CheckpointError`` on any mismatch.
    """
    image_size = check_image_size(image_size)
    path = Path(path) if path is not None else stats_path(image_size)
    if sha256 is None:
        sha256 = manifest_sha256(path.name)
    tensors, metadata = load_tensors(path, sha256=sha256)
    if set(tensors) != {"mu", "sigma"}:
        raise CheckpointError(f"statistics file {path} must hold exactly 'mu' and 'sigma': {sorted(tensors)}")
    if metadata.get("image_size", "28") != str(image_size):  # files without the key are the original 28x28 ones
        raise CheckpointError(f"statistics file {path} is for {metadata.get('image_size', '28')}x"
                              f"{metadata.get('image_size', '28')} images, not {image_size}x{image_size}")
    expected_clf = manifest_sha256(CLASSIFIER_FILES[image_size])
    if metadata.get("classifier_sha256") != expected_clf:
        raise CheckpointError(
            f"statistics file {path} was computed with classifier {metadata.get('classifier_sha256')!r}, "
            f"not the shipped one ({expected_clf[:16]}...); rebuild with scripts/build_eval_assets.py"
        )
    return tensors["mu"].double(), tensors["sigma"].double()


def reference_statistics(image_size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Shipped (mu [128], sigma [128, 128]) float64 of the classifier's features on the 10k test images.

    ``image_size`` (16 or 28) selects the classifier and the test images' size (16: resized by area
    averaging). Loaded once per process and size, verified against ``MANIFEST.json``. Treat the tensors as
    read-only; ``reference_statistics.cache_clear()`` forgets them.

    Example:
        >>> mu, sigma = reference_statistics()     # 28x28   # doctest: +SKIP
        >>> mu, sigma = reference_statistics(16)   # 16x16   # doctest: +SKIP
    """
    return _reference_statistics(check_image_size(image_size))


@lru_cache(maxsize=len(SUPPORTED_SIZES))
def _reference_statistics(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_reference_statistics(image_size=image_size)


reference_statistics.cache_clear = _reference_statistics.cache_clear  # type: ignore[attr-defined]


def fid_fmnist(
    images: torch.Tensor,
    classifier: nn.Module | None = None,
    reference: tuple[ArrayLike, ArrayLike] | None = None,
    batch_size: int = 500,
) -> float:
    """FID-FMNIST (squared feature units, lower is better) of ``images`` [N, 1, S, S] in [-1, 1], S = 28 or 16.

    Fréchet distance between the classifier-feature Gaussian of ``images`` and that of the 10,000 real test
    images at the same size. With the defaults both use the shipped classifier and shipped reference
    statistics for size S. If a custom ``classifier`` is given without ``reference``, the reference is
    recomputed from the test split (resized to S) with it. Values at different sizes are not comparable.

    The estimate is biased upward for small N (the covariance of few samples is noisy), so values are only
    comparable between runs with the same number of generated images (e.g. always 10,000 or always 1,000).

    Example:
        >>> fid_fmnist(samples)   # samples: [10000, 1, 28, 28] or [10000, 1, 16, 16] in [-1, 1]   # doctest: +SKIP
        3.41
    """
    mu, sigma = feature_statistics(images, classifier, batch_size)
    image_size = int(images.shape[-1])  # validated by feature_statistics
    if reference is None:
        if classifier is None:
            reference = reference_statistics(image_size)
        else:
            real = resize_images(load_fashion_mnist("test")[0], image_size)  # [10000, 1, S, S]
            reference = feature_statistics(real, classifier, batch_size)
    return frechet_distance(mu, sigma, reference[0], reference[1])


def fid_between(images: torch.Tensor, target: torch.Tensor, classifier: nn.Module | None = None) -> float:
    """Fréchet distance (squared feature units) between the classifier-feature Gaussians of two image sets.

    Both are [N, 1, S, S] in [-1, 1] at the same size S (16 or 28). Used as "FID to full": ``target`` is the
    full-compute images of the same seeds, so a method that reproduces full compute scores 0, whatever the
    real data look like. The same tensor passed twice gives exactly 0.0 (no eigendecomposition round-off).

    Example:
        >>> fid_between(fast_images, full_images)   # doctest: +SKIP
        0.071
    """
    if images is target:
        return 0.0
    if images.shape[-1] != target.shape[-1]:
        raise ValueError(f"images and target must have the same size, got {tuple(images.shape)} and "
                         f"{tuple(target.shape)}")
    return fid_fmnist(images, classifier, reference=feature_statistics(target, classifier))
