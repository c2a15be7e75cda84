"""Build the evaluation assets: the FID-FMNIST classifier and the reference statistics of the real test set.

For 28x28 images (default) writes ``src/taylorseer/assets/fmnist_classifier.safetensors`` and
``fmnist_test_stats.safetensors``; with ``--image-size 16`` the classifier is trained and evaluated on both
splits downsampled to 16x16 by area averaging (``resize_images``) and the files are
``fmnist_classifier_16.safetensors`` and ``fmnist_test_stats_16.safetensors``. Records their SHA-256 and notes
in ``src/taylorseer/assets/MANIFEST.json`` (read-modify-write per entry: other entries are kept). Also reports
sanity values of FID-FMNIST: the real train split (first 10k images, a floor) and the test images with
Gaussian noise added (the metric must grow with the noise), all at the chosen size.

Example:
    python scripts/build_eval_assets.py                     # train (~5 min on one CPU thread) and build
    python scripts/build_eval_assets.py --image-size 16     # the 16x16 classifier (10 epochs, ~3 min) and stats
    python scripts/build_eval_assets.py --skip-train        # keep the shipped classifier, rebuild statistics
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
    CLASSIFIER_FILES,
    SUPPORTED_SIZES,
    classifier_path,
    evaluate_accuracy,
    load_classifier,
    train_classifier,
)
from taylorseer.models.checkpoint import file_sha256, read_manifest, save_tensors, update_manifest
from taylorseer.models.data import load_fashion_mnist, resize_images

# at 16x16, 6 epochs give test accuracy 0.8998 and 10 epochs (~160 s on one thread) 0.9058: the shipped file
DEFAULT_EPOCHS = {28: 6, 16: 10}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {DEFAULT_EPOCHS[28]} at 28x28, {DEFAULT_EPOCHS[16]} at 16x16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28, choices=SUPPORTED_SIZES,
                        help="image size the classifier and statistics are built for (16: area-downsampled)")
    parser.add_argument("--skip-train", action="store_true", help="reuse the existing classifier weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    today = datetime.now(timezone.utc).date().isoformat()
    size = args.image_size
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[size]
    clf_file, clf_path = CLASSIFIER_FILES[size], classifier_path(size)
    stats_file, stats_path = metrics.STATS_FILES[size], metrics.stats_path(size)
    resized = "" if size == 28 else f", downsampled to {size}x{size} by area averaging (resize_images)"

    # 1. classifier
    if args.skip_train:
        entry = dict(read_manifest().get(clf_file, {}))
    else:
        info = train_classifier(clf_path, epochs=epochs, seed=args.seed, threads=args.threads, image_size=size)
        entry = {
            "sha256": info.pop("sha256"),
            **info,
            "date": today,
            "size_bytes": clf_path.stat().st_size,
            "dtype": "float32",
            "notes": f"FMNISTClassifier (3 conv blocks + 128-d penultimate layer) for {size}x{size} images, "
            f"trained on the 60k train split{resized}; test_accuracy on the 10k test split at the same size; "
            "train_seconds is wall-clock on a shared 2-core CPU.",
        }
        update_manifest(clf_file, entry)
    clf_mod.shipped_classifier.cache_clear()
    metrics.reference_statistics.cache_clear()
    classifier = load_classifier(image_size=size)  # verifies the SHA-256 just recorded
    classifier.requires_grad_(False)
    if classifier.image_size != size:
        raise SystemExit(f"{clf_file} holds a classifier for {classifier.image_size}x{classifier.image_size} images")

    # 2. reference statistics of the real test set
    test_x, test_y = load_fashion_mnist("test")
    test_x = resize_images(test_x, size)  # [10000, 1, S, S]
    accuracy = evaluate_accuracy(classifier, test_x, test_y)
    mu, sigma = metrics.feature_statistics(test_x, classifier)
    classifier_sha = file_sha256(clf_path)
    header = {"classifier_sha256": classifier_sha, "n_images": str(test_x.shape[0]), "split": "test"}
    if size != 28:  # the 28x28 file predates the key (absent means 28)
        header["image_size"] = str(size)
    save_tensors(stats_path, {"mu": mu, "sigma": sigma}, header)
    stats_entry = {
        "sha256": file_sha256(stats_path),
        "classifier_sha256": classifier_sha,
        "n_images": int(test_x.shape[0]),
        "feature_dim": int(mu.shape[0]),
        "dtype": "float64",
        "date": today,
        "notes": f"mean and unbiased covariance of the shipped {size}x{size} classifier's penultimate features "
        f"over the 10k Fashion-MNIST test images{resized}; reference of fid_fmnist() for {size}x{size} images.",
    }
    if size != 28:
        stats_entry["image_size"] = size
    update_manifest(stats_file, stats_entry)
    metrics.reference_statistics.cache_clear()

    # 3. sanity values: a real-data floor and a response to noise
    generator = torch.Generator().manual_seed(args.seed)
    train_x = resize_images(load_fashion_mnist("train")[0], size)  # [60000, 1, S, S]
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
        f"all 10k test images{' (after resizing)' if size != 28 else ''} plus N(0, std^2) noise, clamped to "
        f"[-1, 1], noise generator seeded with {args.seed}.",
    }
    update_manifest(stats_file, stats_entry)  # update_manifest re-reads the manifest right before writing
    entry = dict(read_manifest()[clf_file])
    entry["test_accuracy"] = round(accuracy, 4)  # re-measured with the file as loaded from disk
    update_manifest(clf_file, entry)

    for path in (clf_path, stats_path, clf_path.parent / "MANIFEST.json"):  # temp-file writes are 0600
        os.chmod(path, 0o644)

    report = {"classifier": entry, "statistics": stats_entry}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
