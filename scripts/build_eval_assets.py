"""Build the evaluation assets: the FID-FMNIST classifier and the reference statistics of the real test set.

Writes ``src/taylorseer/assets/fmnist_classifier.safetensors`` and ``fmnist_test_stats.safetensors`` and
records their SHA-256 and notes in ``src/taylorseer/assets/MANIFEST.json`` (other manifest entries are kept).
Also reports sanity values of FID-FMNIST: the real train split (first 10k images, a floor) and the test
images with Gaussian noise added (the metric must grow with the noise).

Example:
    python scripts/build_eval_assets.py                 # train (~5 min on one CPU thread) and build
    python scripts/build_eval_assets.py --skip-train    # keep the shipped classifier, rebuild statistics
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone

import torch

from taylorseer.eval import classifier as clf_mod
from taylorseer.eval import metrics
from taylorseer.eval.classifier import (
    CLASSIFIER_FILE,
    CLASSIFIER_PATH,
    evaluate_accuracy,
    load_classifier,
    train_classifier,
)
from taylorseer.models.checkpoint import file_sha256, read_manifest, save_tensors, update_manifest
from taylorseer.models.data import load_fashion_mnist


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-train", action="store_true", help="reuse the existing classifier weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    today = datetime.now(timezone.utc).date().isoformat()

    # 1. classifier
    if args.skip_train:
        entry = dict(read_manifest().get(CLASSIFIER_FILE, {}))
    else:
        info = train_classifier(CLASSIFIER_PATH, epochs=args.epochs, seed=args.seed, threads=args.threads)
        entry = {
            "sha256": info.pop("sha256"),
            **info,
            "date": today,
            "size_bytes": CLASSIFIER_PATH.stat().st_size,
            "dtype": "float32",
            "notes": "FMNISTClassifier (3 conv blocks + 128-d penultimate layer) trained on the 60k train "
            "split; test_accuracy on the 10k test split; train_seconds is wall-clock on a shared 2-core CPU.",
        }
        update_manifest(CLASSIFIER_FILE, entry)
    clf_mod.shipped_classifier.cache_clear()
    metrics.reference_statistics.cache_clear()
    classifier = load_classifier()  # verifies the SHA-256 just recorded
    classifier.requires_grad_(False)

    # 2. reference statistics of the real test set
    test_x, test_y = load_fashion_mnist("test")
    accuracy = evaluate_accuracy(classifier, test_x, test_y)
    mu, sigma = metrics.feature_statistics(test_x, classifier)
    classifier_sha = file_sha256(CLASSIFIER_PATH)
    save_tensors(
        metrics.STATS_PATH,
        {"mu": mu, "sigma": sigma},
        {"classifier_sha256": classifier_sha, "n_images": str(test_x.shape[0]), "split": "test"},
    )
    stats_entry = {
        "sha256": file_sha256(metrics.STATS_PATH),
        "classifier_sha256": classifier_sha,
        "n_images": int(test_x.shape[0]),
        "feature_dim": int(mu.shape[0]),
        "dtype": "float64",
        "date": today,
        "notes": "mean and unbiased covariance of the shipped classifier's penultimate features over the 10k "
        "Fashion-MNIST test images; reference of fid_fmnist().",
    }
    update_manifest(metrics.STATS_FILE, stats_entry)
    metrics.reference_statistics.cache_clear()

    # 3. sanity values: a real-data floor and a response to noise
    generator = torch.Generator().manual_seed(args.seed)
    train_x, _ = load_fashion_mnist("train")
    sanity = {"fid_train_first10k": metrics.fid_fmnist(train_x[:10000])}
    sanity["fid_test_first1k"] = metrics.fid_fmnist(test_x[:1000])
    for std in (0.1, 0.3):
        noisy = (test_x + std * torch.randn(test_x.shape, generator=generator)).clamp(-1.0, 1.0)
        sanity[f"fid_test_noise_std{std}"] = metrics.fid_fmnist(noisy)
    sanity = {k: round(v, 4) for k, v in sanity.items()}
    stats_entry["sanity"] = {
        **sanity,
        "sanity_notes": "fid_train_first10k: real train images 0..9999 (floor for 10k samples); "
        "fid_test_first1k: 1k real test images (shows the small-sample upward bias); fid_test_noise_std*: "
        "all 10k test images plus N(0, std^2) noise, clamped to [-1, 1], "
        f"noise generator seeded with {args.seed}.",
    }
    update_manifest(metrics.STATS_FILE, stats_entry)
    entry = dict(read_manifest()[CLASSIFIER_FILE])
    entry["test_accuracy"] = round(accuracy, 4)  # re-measured with the file as loaded from disk
    update_manifest(CLASSIFIER_FILE, entry)

    for name in (CLASSIFIER_FILE, metrics.STATS_FILE, "MANIFEST.json"):  # temp-file writes are 0600
        os.chmod(CLASSIFIER_PATH.parent / name, 0o644)

    report = {"classifier": entry, "statistics": stats_entry}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
