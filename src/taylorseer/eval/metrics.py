"""Image metrics for generated 28x28 Fashion-MNIST images in [-1, 1]: PSNR, SSIM, class accuracy, FID-FMNIST.

FID-FMNIST is the Fréchet distance between Gaussians fitted to the penultimate features (128-d) of the shipped
``FMNISTClassifier`` on generated images and on the 10,000 real test images (statistics shipped in
``taylorseer/assets/fmnist_test_stats.safetensors``). It is in squared feature units, lower is better, and it
is biased upward for small sample counts: compare runs only at the same number of generated images.

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
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..models.checkpoint import ASSETS_DIR, CheckpointError, load_tensors, manifest_sha256
from ..models.data import load_fashion_mnist
from .classifier import CLASSIFIER_FILE, shipped_classifier

STATS_FILE = "fmnist_test_stats.safetensors"
STATS_PATH = ASSETS_DIR / STATS_FILE

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
    return float(structural_similarity_index_measure(a.double(), b.double(), data_range=data_range))


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected images of shape [N, 1, 28, 28], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("expected at least one image")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -2.0 or hi > 2.0:
        raise ValueError(f"images must be scaled to [-1, 1]; got values in [{lo:.3g}, {hi:.3g}]")


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
    """Fraction (in [0, 1]) of ``images`` ([N, 1, 28, 28] in [-1, 1]) classified as their ``labels`` [N].

    For class-conditional samples, ``labels`` are the conditioning classes. ``classifier`` defaults to the
    shipped ``FMNISTClassifier`` (about 0.92 on the real test set).

    Example:
        >>> class_accuracy(samples, torch.arange(10).repeat_interleave(100))   # doctest: +SKIP
        0.87
    """
    _check_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels of shape [{images.shape[0]}], got {tuple(labels.shape)}")
    classifier = classifier if classifier is not None else shipped_classifier()
    logits = _batched(classifier, classifier, images, batch_size)  # [N, 10]
    return float((logits.argmax(1) == labels.cpu()).double().mean())


def feature_statistics(
    images: torch.Tensor, classifier: nn.Module | None = None, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of the classifier's penultimate features.

    ``images`` are [N, 1, 28, 28] in [-1, 1] with N >= 2; ``classifier`` (with a ``features`` method)
    defaults to the shipped one, D = 128.

    Example:
        >>> mu, sigma = feature_statistics(samples)   # doctest: +SKIP
        >>> mu.shape, sigma.shape, sigma.dtype          # doctest: +SKIP
        (torch.Size([128]), torch.Size([128, 128]), torch.float64)
    """
    _check_images(images)
    if images.shape[0] < 2:
        raise ValueError("feature statistics need at least 2 images")
    classifier = classifier if classifier is not None else shipped_classifier()
    feats = _batched(classifier, classifier.features, images, batch_size).double()  # [N, D]
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
    path: str | os.PathLike | None = None, sha256: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (mu [D], sigma [D, D]) float64 from a statistics file after verifying its SHA-256.

    Defaults to the shipped ``fmnist_test_stats.safetensors``, checked against ``MANIFEST.json``; the file
    must also have been computed with the shipped classifier (its SHA-256 is recorded in the file's header).
    Raises ``CheckpointError`` on any mismatch.
    """
    path = Path(path) if path is not None else STATS_PATH
    if sha256 is None:
        sha256 = manifest_sha256(path.name)
    tensors, metadata = load_tensors(path, sha256=sha256)
    if set(tensors) != {"mu", "sigma"}:
        raise CheckpointError(f"statistics file {path} must hold exactly 'mu' and 'sigma': {sorted(tensors)}")
    expected_clf = manifest_sha256(CLASSIFIER_FILE)
    if metadata.get("classifier_sha256") != expected_clf:
        raise CheckpointError(
            f"statistics file {path} was computed with classifier {metadata.get('classifier_sha256')!r}, "
            f"not the shipped one ({expected_clf[:16]}...); rebuild with scripts/build_eval_assets.py"
        )
    return tensors["mu"].double(), tensors["sigma"].double()


@lru_cache(maxsize=1)
def reference_statistics() -> tuple[torch.Tensor, torch.Tensor]:
    """Shipped (mu [128], sigma [128, 128]) float64 of the classifier's features on the 10k test images.

    Loaded once per process and verified against ``MANIFEST.json``. Treat the tensors as read-only.

    Example:
        >>> mu, sigma = reference_statistics()   # doctest: +SKIP
    """
    return load_reference_statistics()


def fid_fmnist(
    images: torch.Tensor,
    classifier: nn.Module | None = None,
    reference: tuple[ArrayLike, ArrayLike] | None = None,
    batch_size: int = 500,
) -> float:
    """FID-FMNIST (squared feature units, lower is better) of ``images`` [N, 1, 28, 28] in [-1, 1].

    Fréchet distance between the classifier-feature Gaussian of ``images`` and that of the 10,000 real test
    images. With the defaults both use the shipped classifier and shipped reference statistics. If a custom
    ``classifier`` is given without ``reference``, the reference is recomputed from the test split with it.

    The estimate is biased upward for small N (the covariance of few samples is noisy), so values are only
    comparable between runs with the same number of generated images (e.g. always 10,000 or always 1,000).

    Example:
        >>> fid_fmnist(samples)   # samples: [10000, 1, 28, 28] in [-1, 1]   # doctest: +SKIP
        3.41
    """
    mu, sigma = feature_statistics(images, classifier, batch_size)
    if reference is None:
        if classifier is None:
            reference = reference_statistics()
        else:
            reference = feature_statistics(load_fashion_mnist("test")[0], classifier, batch_size)
    return frechet_distance(mu, sigma, reference[0], reference[1])
