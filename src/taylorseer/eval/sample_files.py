"""Sample folders on disk and the processes that write them: which sample is which (seeds, labels, batches),
atomic file writes, shards, and the ranks of a ``torchrun`` job. ``eval.sample`` runs the job.

Example:
    >>> [list(r) for r in batch_ranges(5, 2)]
    [[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIST_TIMEOUT = _dt.timedelta(hours=4)  # the final barrier waits for the slowest rank (unequal work on resume)
SHARD_NAME = re.compile(r"shard-(\d+)-(\d{6})\.npz")
_KEY_BYTES = 64  # hex SHA-256


class SampleDirError(ValueError):
    """``DIR`` cannot be used as asked: another run's identity, an unreadable manifest, missing samples."""


#################################################################################
#                    Which sample is which: seeds, labels, batches              #
#################################################################################

def sample_seed(seed: int, index: int) -> int:
    """The generator seed (an int in [0, 2**64)) of sample ``index`` of a run with ``seed``: a function of the pair
    alone, through numpy's ``SeedSequence`` (well mixed; no two pairs of small ints collide in practice).

    Example:
        >>> sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(1, 0)
        True
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Initial noise [len(indices), *shape] (float32, CPU): row j drawn alone from ``sample_seed(seed, indices[j])``,
    so a sample's noise does not depend on which other samples share its batch.

    Example:
        >>> a = sample_noise(0, [3, 4], (1, 2, 2))
        >>> torch.equal(a[1], sample_noise(0, [4], (1, 2, 2))[0])
        True
    """
    rows = [torch.randn(*shape, generator=torch.Generator().manual_seed(sample_seed(seed, i))) for i in indices]
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def sample_labels(indices: Sequence[int], classes: Sequence[int] | int = 10) -> torch.Tensor:
    """Class label of each sample [len(indices)] (int64): ``classes[i % len(classes)]`` (an int: ``range(classes)``).

    Example:
        >>> sample_labels([0, 9, 10, 11]).tolist()
        [0, 9, 0, 1]
    """
    table = list(range(classes)) if isinstance(classes, int) else list(classes)
    return torch.tensor([table[i % len(table)] for i in indices], dtype=torch.long)


def batch_ranges(num_samples: int, batch_size: int) -> list[range]:
    """The fixed batches of a run: batch k holds indices ``k * batch_size`` to ``(k + 1) * batch_size - 1``.

    Example:
        >>> [list(r) for r in batch_ranges(5, 2)]
        [[0, 1], [2, 3], [4]]
    """
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` of ``world_size`` generates: ``k % world_size == rank`` (disjoint, complete).

    Example:
        >>> rank_batches(5, 1, 2)
        [1, 3]
    """
    return list(range(rank, num_batches, world_size))


#################################################################################
#                          Files: atomic writes, shards                         #
#################################################################################

def _atomic_write(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then ``os.replace`` onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (temporary file, then rename)."""
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` (no object arrays) to an ``.npz`` at ``path`` atomically."""
    named: dict[str, Any] = arrays  # (for mypy, ** of ndarray values could also fill savez's allow_pickle: bool)
    _atomic_write(Path(path), lambda f: np.savez(f, **named))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` read in full (so the zip CRC of each is checked), without pickle."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def shard_path(out_dir: str | os.PathLike, rank: int, batch: int) -> Path:
    """``DIR/shards/shard-{rank}-{batch:06d}.npz``: batch ``batch`` as written by rank ``rank``."""
    return Path(out_dir) / "shards" / f"shard-{rank}-{batch:06d}.npz"


def read_shard(path: str | os.PathLike, key: str, indices: range, image_shape: tuple[int, ...] | None = None,
               image_dtype: str | None = None) -> dict[str, np.ndarray]:
    """A shard's arrays after checking them: readable (zip CRCs), of run ``key``, holding exactly ``indices``,
    images of ``len(indices)`` rows (of ``image_shape`` and ``image_dtype`` if given). Raises ``ValueError``
    saying what is wrong.

    Example:
        >>> arrays = read_shard("DIR/shards/shard-0-000000.npz", key, range(0, 50))   # doctest: +SKIP
    """
    try:
        arrays = read_npz(path)
    except Exception as err:  # noqa: BLE001 - zipfile.BadZipFile, EOFError, OSError, ValueError (pickle), ...
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    missing = sorted({"images", "indices", "key", "steps_full", "steps_forecast"} - set(arrays))
    if missing:
        raise ValueError(f"arrays {missing} missing")
    if str(arrays["key"]) != key:
        raise ValueError(f"belongs to another run (key {str(arrays['key'])[:12]}..., this run {key[:12]}...)")
    if not np.array_equal(arrays["indices"], np.arange(indices.start, indices.stop)):
        raise ValueError(f"holds other indices than {indices.start}..{indices.stop - 1}")
    images = arrays["images"]
    if images.shape[:1] != (len(indices),) or (image_shape is not None and images.shape[1:] != image_shape):
        raise ValueError(f"images of shape {images.shape}, expected [{len(indices)}, ...]")
    if image_dtype is not None and images.dtype != np.dtype(image_dtype):
        raise ValueError(f"images of dtype {images.dtype}, expected {image_dtype}")
    return arrays


def _batch_shards(out_dir: Path, batch: int) -> list[Path]:
    return sorted((out_dir / "shards").glob(f"shard-*-{batch:06d}.npz"))


def _valid_shard(out_dir: Path, batch: int, key: str, indices: range, image_dtype: str,
                 remove_invalid: bool) -> tuple[Path | None, dict[str, np.ndarray] | None, list[Path]]:
    """The first valid shard of ``batch`` (path, arrays), and the other valid ones (duplicates). Invalid ones are
    reported with a warning and, with ``remove_invalid`` (the batch's owner), deleted."""
    found: tuple[Path | None, dict[str, np.ndarray] | None] = (None, None)
    duplicates = []
    for path in _batch_shards(out_dir, batch):
        try:
            arrays = read_shard(path, key, indices, image_dtype=image_dtype)
        except ValueError as err:
            action = "it is regenerated" if remove_invalid else "it is not used"
            warnings.warn(f"shard {path} is ignored: {err}; {action}", RuntimeWarning, stacklevel=2)
            if remove_invalid:
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        if found[0] is None:
            found = (path, arrays)
        else:
            duplicates.append(path)
    return found[0], found[1], duplicates


def _encode(images: torch.Tensor, image_dtype: str, value_range: tuple[float, float]) -> np.ndarray:
    x = images.detach().float().cpu()
    if image_dtype == "uint8":
        lo, hi = value_range
        return ((x - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return x.to(getattr(torch, image_dtype)).numpy()


def decode_images(images: np.ndarray, layout: dict[str, Any]) -> torch.Tensor:
    """Stored images as float32 in the model's own range ([-1, 1] embedded, [0, 1] pipelines), layout unchanged.

    Example:
        >>> decode_images(np.array([[0, 255]], np.uint8), {"dtype": "uint8", "range": [0, 255], "layout": "NCHW",
        ...               "model_range": [-1.0, 1.0]}).tolist()
        [[-1.0, 1.0]]
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    if layout["dtype"] == "uint8":
        lo, hi = layout.get("model_range", [0.0, 1.0])
        x = lo + x / 255.0 * (hi - lo)
    return x


#################################################################################
#                             torch.distributed                                 #
#################################################################################

@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size``, its ``device``, the ``backend`` (None alone)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    def barrier(self) -> None:
        if self.backend is not None:
            dist = torch.distributed
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_key(self, key: str | None) -> str | None:
        """Rank 0's ``key`` on every rank (None on every rank when rank 0 has none: it refused the run)."""
        if self.backend is None:
            return key
        where = self.device if self.backend == "nccl" else torch.device("cpu")
        buffer = torch.zeros(_KEY_BYTES, dtype=torch.int64, device=where)
        if self.rank == 0 and key is not None:
            buffer = torch.tensor(list(key.encode("ascii")), dtype=torch.int64, device=where)
        torch.distributed.broadcast(buffer, src=0)
        values = buffer.tolist()
        return None if not any(values) else bytes(values).decode("ascii")


@contextlib.contextmanager
def distributed(device: str = "cpu") -> Iterator[Ranks]:
    """This process's ``Ranks``: under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) it
    joins the job's process group, gloo on CPU, nccl with ``device="cuda"`` (the local rank's GPU), and leaves it
    on exit; in a process group that is already initialized it uses that one (and leaves it to its owner); alone it
    runs without one.

    Example:
        >>> with distributed("cpu") as ranks:
        ...     ranks.rank, ranks.world_size
        (0, 1)
    """
    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else int(os.environ["WORLD_SIZE"]) if launched else 1
    if device.startswith("cuda"):
        if ":" in device and world > 1:
            raise ValueError(f"device {device!r}: with {world} processes give --device cuda (each rank takes "
                             f"cuda:LOCAL_RANK)")
        where = torch.device(device) if ":" in device else torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    else:
        where = torch.device(device)
    if initialized:
        yield Ranks(dist.get_rank(), world, where, dist.get_backend())
        return
    if not launched:
        yield Ranks(0, 1, where, None)
        return
    backend = "nccl" if where.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=DIST_TIMEOUT, device_id=where if backend == "nccl" else None)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), where, backend)
    finally:
        if dist.is_initialized():  # a failed context-parallel rank has already left it (distributed.layout.fail_fast)
            dist.destroy_process_group()
