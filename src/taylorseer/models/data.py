"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files, no downloads).

Example:
    >>> images, labels = load_fashion_mnist("train")   # doctest: +SKIP
    >>> images.shape, images.dtype, labels.shape
    (torch.Size([60000, 1, 28, 28]), torch.float32, torch.Size([60000]))
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def data_dir() -> Path:
    """Folder holding the idx files: ``$TAYLORSEER_FMNIST_DIR`` if set, else Debian's install location."""
    return Path(os.environ.get("TAYLORSEER_FMNIST_DIR", DEFAULT_DIR))


def _open_idx(folder: Path, stem: str):
    for name in (stem + ".gz", stem):
        path = folder / name
        if path.exists():
            return gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}. Install it with "
        f"`apt-get install -y {APT_PACKAGE}` or set TAYLORSEER_FMNIST_DIR to a folder holding the idx files."
    )


def _read_idx(folder: Path, stem: str) -> np.ndarray:
    with _open_idx(folder, stem) as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":  # idx magic: two zero bytes, then 0x08 = unsigned byte
        raise ValueError(f"Fashion-MNIST file {stem} in {folder} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"Fashion-MNIST file {stem} in {folder} is truncated: {array.size} values, expected {dims}")
    return array.reshape(dims)


def load_fashion_mnist(split: str = "train", folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as images in [-1, 1] (float32, [N, 1, 28, 28]) and int64 labels [N].

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = Path(folder) if folder is not None else data_dir()
    image_stem, label_stem = _FILES[split]
    images = _read_idx(folder, image_stem)
    labels = _read_idx(folder, label_stem)
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [N, C, H, W] resized to ``size`` x ``size`` by area averaging (identity if already that size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="area")
