"""Many samples of one method, data-parallel under ``torchrun``, resumable, identical whatever the process count:
the function behind ``taylorseer sample``.

The job is cut into fixed batches of indices, batch ``k`` = ``[k * B, (k + 1) * B)`` (the last one shorter), and
rank ``r`` of ``W`` takes the batches with ``k % W == r``. Sample ``i`` starts from noise drawn by its own CPU
``torch.Generator`` seeded from ``(seed, i)`` (``sample_seed``), its label is ``i % 10`` (embedded model) or the
prompt's labels in turn, and every batch has the same composition for any ``W``: so the set of samples is
bitwise the same for 1, 2 or 64 processes (same device type, torch build and threads; docs/sampling.md).

The output folder ``DIR``::

    manifest.json                      what was sampled (the run's identity), software, runs, shards, status
    shards/shard-{rank}-{k:06d}.npz    one batch: images, indices, the run key, full/forecast step counts
    samples.npz                        the merged set: images and indices sorted by index (labels too)
    metrics.json                       FID-FMNIST, class accuracy, FID and PSNR to a reference run

Every file is written to a temporary file in its folder and renamed (``os.replace``), so a killed job never
leaves a file that looks complete; shards are read back with ``np.load(allow_pickle=False)`` and checked (zip
CRC, key, indices, shape) before they count. Rerunning the same command generates only the missing batches; a
different identity (method, config, seed, num_samples, batch size, model, ...) against the same ``DIR`` is
refused naming the field.

Adaptive policies (``gate-*``, ``budget-*``) decide each step from a probe observation that the runtime agrees
across ranks (``runtime.step.agree``). That is right when the ranks share one sample (context parallelism) but
wrong here, where each rank holds different samples: a rank's batch would steer the others' decisions, and ranks
with unequal batch counts would wait on each other. Sampling therefore runs inside
``runtime.step.agreement_group(None)``: each batch decides from its own samples, as in a single process.

Test-only fault injection: with ``TAYLORSEER_TEST_KILL_AFTER_SHARDS=RANK:K`` in the environment, rank ``RANK``
sends itself SIGKILL right after writing its ``K``-th shard of the run (it changes no numerics).

Example:
    >>> spec = SampleSpec(resolve_method("ts-O2-N5-divided"), num_samples=1000, seed=0)     # doctest: +SKIP
    >>> metrics = run_sample(spec, "out/sample/ts-O2", reference="out/sample/full")          # doctest: +SKIP
    >>> round(metrics["psnr"], 1), metrics["complete"]                                     # doctest: +SKIP
    (39.4, True)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import signal
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import TaylorSeerConfig
from ..parts import CacheConfig
from ..runtime.step import agreement_group

if TYPE_CHECKING:
    from .bench import Method

SCHEMA = "taylorseer.sample/1"
NOISE_RULE = ("noise of sample i: torch.randn([C, S, S]) from a CPU torch.Generator seeded with "
              "numpy SeedSequence([seed, i]).generate_state(1, uint64); label of sample i: i % 10 (embedded model) "
              "or the prompt's class ids in turn")
IMAGE_DTYPES = ("float16", "float32", "uint8")
FAULT_ENV = "TAYLORSEER_TEST_KILL_AFTER_SHARDS"
DIST_TIMEOUT = _dt.timedelta(hours=4)  # the final barrier waits for the slowest rank (unequal work on resume)
SHARD_NAME = re.compile(r"shard-(\d+)-(\d{6})\.npz")
_KEY_BYTES = 64  # hex SHA-256
MAX_SAMPLES = 10**7  # samples of one run (an FID needs 5e4); bounded so that a typo cannot exhaust memory
MAX_BATCHES = 10**6  # batches (shards) of one run: their list is built up front


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
#                       What is sampled: the run's identity                     #
#################################################################################

@dataclass(frozen=True)
class SampleSpec:
    """What a sample folder holds; equal specs (and model weights) give bitwise-equal folders on one device type.

    ``method`` is a bench ``Method`` (``resolve_method``); ``num_samples`` the indices 0..N-1; ``seed`` the run
    seed (``sample_seed``); ``batch_size`` the samples per model call and per shard (it fixes the batch
    composition, so it is part of the identity); ``guidance_scale`` None: 1.5 for the embedded model, the
    pipeline's own default for ``model``; ``image_dtype`` (``IMAGE_DTYPES``; None: float16 for the embedded model,
    uint8 for pipelines); ``model`` a diffusers pipeline (local folder or hub id; None: the embedded DiT) with
    ``prompt`` (text, or class ids/names for DiT pipelines) and ``weights_dtype``; ``config_file`` the JSON file
    the method's config came from (its SHA-256 is recorded).

    Example:
        >>> spec = SampleSpec(resolve_method("ddim-11"), num_samples=8, batch_size=4)
        >>> spec.identity()["method"]["num_steps"], spec.identity()["batch_size"]
        (11, 4)
    """

    method: Method
    num_samples: int
    seed: int = 0
    batch_size: int = 50
    guidance_scale: float | None = None
    image_dtype: str | None = None
    model: str | None = None
    prompt: str | None = None
    weights_dtype: str | None = None
    config_file: str | None = None
    cfg_mode: str = "batch"
    context_parallel: Any = None  # a distributed.layout.ContextParallel: each sample's tokens over K ranks

    def __post_init__(self) -> None:
        for name, minimum in (("num_samples", 1), ("seed", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"SampleSpec.{name} must be an int >= {minimum}, got {value!r}")
        for name, maximum in (("num_samples", MAX_SAMPLES), ("batch_size", MAX_SAMPLES), ("seed", 2**63 - 1)):
            if getattr(self, name) > maximum:
                raise ValueError(f"SampleSpec.{name} must be an int <= {maximum}, got {getattr(self, name)!r}")
        if -(-self.num_samples // self.batch_size) > MAX_BATCHES:
            raise ValueError(f"SampleSpec: num_samples / batch_size must make at most {MAX_BATCHES} batches (shards), "
                             f"got {self.num_samples} / {self.batch_size}; raise batch_size")
        if self.cfg_mode not in ("batch", "split"):
            raise ValueError(f"SampleSpec.cfg_mode must be 'batch' or 'split', got {self.cfg_mode!r}")
        if self.image_dtype is not None and self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"SampleSpec.image_dtype must be one of {list(IMAGE_DTYPES)} or None, "
                             f"got {self.image_dtype!r}")
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"SampleSpec.guidance_scale must be a finite float >= 0 or None, "
                             f"got {self.guidance_scale!r}")
        if self.model is None and (self.prompt is not None or self.weights_dtype is not None):
            raise ValueError("SampleSpec: prompt and weights_dtype are for a diffusers pipeline (model=...); the "
                             "embedded model is class-conditional (labels i % 10) and float32")
        if self.model is not None and self.method.family not in _PIPELINE_FAMILIES:
            raise ValueError(f"method {self.method.name!r} (family {self.method.family}) runs on the embedded model "
                             f"only; with a pipeline give full, ddim-K or a config (--preset / --config)")
        if self.context_parallel is not None and self.model is None:
            raise ValueError("SampleSpec.context_parallel: the embedded DiT has no context-parallel plan in diffusers; "
                             "give a pipeline whose transformer has one (e.g. model='flux-tiny-random')")
        self._bind_calibration()

    def _bind_calibration(self) -> None:
        """A config naming a calibration file: bound to the file's content (its SHA-256 joins the run identity, and
        a file changed later is refused instead of mixing calibrations), checked against the sampling (guidance
        scale, CFG layout); a pipeline run without a guidance scale takes the calibration's own."""
        from ..calibration.io import calibration_of, pin_config

        config = self.method.config
        if not isinstance(config, CacheConfig) or calibration_of(config) is None:
            return
        import dataclasses

        pinned = pin_config(config)
        calibration = calibration_of(pinned)
        assert calibration is not None, "pin_config keeps the calibration"
        object.__setattr__(self, "method", dataclasses.replace(self.method, config=pinned))
        made = (calibration.header.get("calibration_data") or {}).get("guidance_scale")
        if self.resolved_guidance() is None and made is not None:
            object.__setattr__(self, "guidance_scale", float(made))
        calibration.check_sampling(self.resolved_guidance(), self.cfg_mode)

    @property
    def embedded(self) -> bool:
        return self.model is None

    def resolved_image_dtype(self) -> str:
        return self.image_dtype or ("float16" if self.embedded else "uint8")

    def resolved_guidance(self) -> float | None:
        return 1.5 if self.embedded and self.guidance_scale is None else self.guidance_scale

    def identity(self, model_identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields a resumed run must share with the folder's manifest, JSON-ready (``model_identity``: that of
        ``model_identity_of``, computed here when not given; ``run_sample`` adds the device type)."""
        return {
            "schema": SCHEMA,
            "model": model_identity if model_identity is not None else model_identity_of(self),
            "method": self.method.to_dict(),
            "config_file_sha256": _file_or_text_sha256(self.config_file),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "guidance_scale": self.resolved_guidance(),
            "cfg_mode": self.cfg_mode,
            "prompt": self.prompt,
            "weights_dtype": self.weights_dtype,
            "image_dtype": self.resolved_image_dtype(),
            "images": _layout(self),
            "noise": NOISE_RULE,
        } | ({} if self.context_parallel is None else {"context_parallel": self.context_parallel.to_dict()})


_PIPELINE_FAMILIES = ("full", "fewer-steps", "fora", "taylorseer", "preset", "gate", "budget", "adams", "hermite",
                      "corrector")


def _layout(spec: SampleSpec) -> dict[str, Any]:
    dtype = spec.resolved_image_dtype()
    if spec.embedded:
        value_range = [0, 255] if dtype == "uint8" else [-1.0, 1.0]
        return {"layout": "NCHW", "dtype": dtype, "range": value_range}
    return {"layout": "NHWC", "dtype": dtype, "range": [0, 255] if dtype == "uint8" else [0.0, 1.0]}


def _file_or_text_sha256(source: str | None) -> str | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    data = path.read_bytes() if path.is_file() else source.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def model_identity_of(spec: SampleSpec) -> dict[str, Any]:
    """Class and weights digest of the model a spec samples: the shipped file's manifest SHA-256 for the embedded
    model; for a pipeline folder (or a hub id found in the local cache) one SHA-256 over its weight files (path and
    content), else ``None`` with the reason.

    Example:
        >>> model_identity_of(SampleSpec(resolve_method("full"), 1))["weights_file"]
        'dit_fmnist.safetensors'
    """
    if spec.embedded:
        from ..models.checkpoint import manifest_sha256
        from ..models.pretrained import REFERENCE_FILE

        return {"kind": "embedded", "class": "DiTTransformer2DModel", "weights_file": REFERENCE_FILE,
                "weights_sha256": manifest_sha256(REFERENCE_FILE)}
    assert spec.model is not None, "not embedded: spec.model names the pipeline"
    from ..distributed.flux import build_model, is_builtin

    if is_builtin(spec.model):  # built from a config by name: the digest of the weights it builds
        pipe = build_model(spec.model)
        return {"kind": "builtin", "source": spec.model, "pipeline": type(pipe).__name__,
                "transformer": type(pipe.transformer).__name__, "weights_sha256": pipe.weights_sha256()}
    folder, note = _pipeline_folder(spec.model)
    identity: dict[str, Any] = {"kind": "pipeline", "source": str(folder) if folder else spec.model,
                                "pipeline": None, "transformer": None, "weights_sha256": None}
    if folder is None:
        identity["weights_note"] = note
        return identity
    index = json.loads((folder / "model_index.json").read_text())
    identity["pipeline"] = index.get("_class_name")
    config = folder / "transformer" / "config.json"
    if config.is_file():
        identity["transformer"] = json.loads(config.read_text()).get("_class_name")
    identity["weights_sha256"] = _weights_digest(folder)
    return identity


def _pipeline_folder(model: str) -> tuple[Path | None, str]:
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), ""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True)), ""
    except Exception as err:  # noqa: BLE001 - not cached, offline, no hub client: identity without a digest
        return None, f"weights not hashed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _weights_digest(folder: Path) -> str:
    from ..models.checkpoint import file_sha256

    digest = hashlib.sha256()
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            found = _first_difference(old.get(name), new.get(name), f"{path}.{name}" if path else name)
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


#################################################################################
#                          Methods, configs, software                           #
#################################################################################

def resolve_method(name: str, num_steps: int = 50) -> Method:
    """The bench method called ``name`` for ``num_steps``-step sampling (``default_grid`` names, e.g. ``full``,
    ``ts-O2-N5-divided``, ``fora-N5``, ``gate-t0.08``), or plain DDIM with K steps for ``ddim-K``.

    Example:
        >>> resolve_method("ddim-7").num_steps
        7
    """
    from .bench import Method, default_grid

    match = re.fullmatch(r"ddim-(\d+)", name)
    if match and int(match.group(1)) >= 1:
        return Method(name, "fewer-steps", None, int(match.group(1)))
    if name == "full":
        return Method("full", "full", None, num_steps)
    grid = {m.name: m for m in default_grid(num_steps=num_steps)}
    if name not in grid:
        raise ValueError(f"unknown method {name!r}; allowed: ddim-K or one of {sorted(grid)}")
    return grid[name]


def method_from_config(config: TaylorSeerConfig | CacheConfig, num_steps: int = 50) -> Method:
    """A method that applies ``config`` at ``num_steps`` steps (named after the config).

    Example:
        >>> method_from_config(TaylorSeerConfig(interval=5, name="mine")).name
        'mine'
    """
    from .bench import Method

    return Method(config.name, "taylorseer", config, num_steps)


def load_config(source: str) -> TaylorSeerConfig | CacheConfig:
    """A ``TaylorSeerConfig`` or ``CacheConfig`` (it has ``policy``) from a JSON file or inline JSON text.

    Example:
        >>> load_config('{"interval": 5, "max_order": 2}').interval
        5
    """
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text()
    elif source.lstrip().startswith("{"):
        text = source
    else:
        raise FileNotFoundError(f"config {source!r} is neither a JSON file nor inline JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config {source!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {source!r} must be a JSON object, got {type(data).__name__}")
    return CacheConfig.from_dict(data) if "policy" in data else TaylorSeerConfig.from_dict(data)


def software_versions() -> dict[str, str]:
    """Versions of what computes the samples (python, numpy, torch, diffusers, taylorseer)."""
    import diffusers

    from .. import __version__

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "taylorseer": __version__}


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


#################################################################################
#                              Generating batches                               #
#################################################################################

@torch.no_grad()
def denoise(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int = 50,
            guidance_scale: float = 1.5, cfg_mode: str = "batch", listener: Any = None) -> torch.Tensor:
    """``models.sampler.sample`` started from the given ``noise`` [N, C, S, S] (on the model's device) instead of
    one seed: the same DDIM steps, guidance and listener calls, bitwise the same images for the same noise on CPU
    (tests/application/test_sample.py), timesteps made on the noise's device. Images in [-1, 1].

    Example:
        >>> noise, labels = sample_noise(0, range(4), (1, 16, 16)), sample_labels(range(4))
        >>> denoise(load_reference(), noise, labels, num_steps=6).shape   # doctest: +SKIP
        torch.Size([4, 1, 16, 16])
    """
    from ..models.reference import GUIDANCE_INTERVAL, NULL_CLASS
    from ..models.sampler import CFG_MODES, _check_interval, make_scheduler

    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {list(CFG_MODES)}, got {cfg_mode!r}")
    low, high = _check_interval(GUIDANCE_INTERVAL)  # the sampler's default
    scheduler = make_scheduler()
    scheduler.set_timesteps(num_steps)
    labels = labels.long().to(noise.device)
    null = torch.full_like(labels, NULL_CLASS)
    x = noise
    if listener is not None:
        listener.begin(num_steps)
    guided = guidance_scale != 1.0

    def eps(inputs: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        return model(inputs, timestep=torch.full((len(y),), t, device=inputs.device), class_labels=y).sample

    for i, t in enumerate(scheduler.timesteps):
        alpha = scheduler.alphas_cumprod[int(t)]
        sigma = float(((1 - alpha) / alpha).sqrt())
        context = listener.step(i, int(t), sigma) if listener is not None else contextlib.nullcontext()
        with context:
            scale = (guidance_scale if low <= int(t) < high else 1.0) if guided else None
            if scale is None:
                out = eps(x, labels, int(t))
            else:
                if cfg_mode == "batch":
                    cond, uncond = eps(torch.cat([x, x]), torch.cat([labels, null]), int(t)).chunk(2)
                else:
                    cond, uncond = eps(x, labels, int(t)), eps(x, null, int(t))
                out = cond if scale == 1.0 else uncond + scale * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x.clamp(-1, 1)


class _EmbeddedSampler:
    """Generates batches of the embedded model with one method."""

    def __init__(self, spec: SampleSpec, device: torch.device):
        from ..models.pretrained import load_reference

        self.spec, self.device = spec, device
        self.model = load_reference().to(device)
        config = self.model.config
        self.shape = (config.in_channels, config.sample_size, config.sample_size)

    def __call__(self, indices: range) -> tuple[torch.Tensor, dict[str, Any]]:
        from .bench import INSTALLERS

        method = self.spec.method
        noise = sample_noise(self.spec.seed, indices, self.shape).to(self.device)
        labels = sample_labels(indices)
        guidance = self.spec.resolved_guidance()
        assert guidance is not None, "the embedded model's guidance scale defaults to 1.5"
        installed = INSTALLERS[method.family](self.model, method)
        try:
            images = denoise(installed.model, noise, labels, num_steps=method.num_steps,
                             guidance_scale=guidance, cfg_mode=self.spec.cfg_mode,
                             listener=installed.listener)
            stats = installed.stats()
        finally:
            installed.remove()
        return images, stats


class _PipelineSampler:
    """Generates batches of a diffusers pipeline: one CPU generator per sample (``generator=[...]``)."""

    def __init__(self, spec: SampleSpec, device: torch.device):
        import inspect

        from ..generate import _class_labels, _supported, load_pipeline

        self.spec = spec
        assert spec.model is not None, "a pipeline sampler needs spec.model"
        self.pipe = load_pipeline(spec.model, str(device), spec.weights_dtype)
        self.config = None if spec.method.config is None else spec.method.cache_config()
        _supported(self.pipe, self.config if isinstance(self.config, TaylorSeerConfig) else None)
        self.pipe.set_progress_bar_config(disable=True)
        parameters = inspect.signature(self.pipe.__call__).parameters
        self.classes = _class_labels(self.pipe, spec.prompt) if "class_labels" in parameters else None
        if self.classes is None and not spec.prompt:
            raise ValueError(f"{type(self.pipe).__name__} needs a text prompt (--prompt)")
        self.per_prompt = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt") if n in parameters),
                               None)

    def __call__(self, indices: range) -> tuple[torch.Tensor, dict[str, Any]]:
        from ..api import apply

        kwargs: dict[str, Any] = {}
        if self.classes is not None:
            kwargs["class_labels"] = sample_labels(indices, self.classes).tolist()
        else:
            kwargs["prompt"] = self.spec.prompt
            if self.per_prompt:
                kwargs[self.per_prompt] = len(indices)
        if self.spec.guidance_scale is not None:
            kwargs["guidance_scale"] = self.spec.guidance_scale
        generators = [torch.Generator().manual_seed(sample_seed(self.spec.seed, i)) for i in indices]
        handle = apply(self.pipe, self.config) if self.config is not None else None
        try:
            result = self.pipe(num_inference_steps=self.spec.method.num_steps, generator=generators,
                               output_type="np", **kwargs)
            stats = handle.stats.to_dict() if handle is not None else {"steps_full": self.spec.method.num_steps,
                                                                       "steps_forecast": 0}
        finally:
            if handle is not None:
                handle.remove()
        images = getattr(result, "images", None)
        if images is None:
            raise ValueError(f"{type(self.pipe).__name__} returned no images (videos are not supported by sample)")
        return torch.from_numpy(np.asarray(images)), stats


#################################################################################
#                                  The job                                      #
#################################################################################

def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``DIR/manifest.json`` as a dict (None if absent); ``SampleDirError`` if it is not a sample manifest."""
    path = Path(out_dir) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SampleDirError(f"{path} is unreadable ({err}); remove it or choose another --out") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or "identity" not in manifest:
        raise SampleDirError(f"{path} is not a taylorseer sample manifest ({SCHEMA}); choose another --out")
    return manifest


def _open_run(spec: SampleSpec, out_dir: Path, ranks: Ranks, threads: int | None) -> dict[str, Any]:
    """Rank 0: check ``DIR`` against the spec (refuse another run's folder), write or update the manifest."""
    identity = {**spec.identity(), "device_type": ranks.device.type}  # CPU and GPU kernels differ in the last bits
    key = _key(identity)
    manifest = read_manifest(out_dir)
    software = software_versions()
    if manifest is not None:
        found = _first_difference(manifest["identity"], identity)
        if found:
            field, theirs, ours = found
            raise SampleDirError(f"{out_dir} holds another run: {field} is {_short(theirs)} there but "
                                 f"{_short(ours)} here; rerun with the same settings to resume it, or choose "
                                 f"another --out")
        changed = {k: (v, software[k]) for k, v in manifest.get("software", {}).items() if software.get(k) != v}
        if changed:
            warnings.warn(f"resuming {out_dir} with other software {changed}: new shards may differ in the last "
                          f"bits from the old ones", RuntimeWarning, stacklevel=2)
    else:
        manifest = {"schema": SCHEMA, "identity": identity, "key": key, "software": software,
                    "created": _now(), "runs": [], "shards": [], "status": {"complete": False}}
    manifest["runs"].append({"started": _now(), "world_size": ranks.world_size, "backend": ranks.backend,
                             "device": str(ranks.device.type), "threads": threads or torch.get_num_threads(),
                             "host": socket.gethostname(), "software": software})
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fault_after() -> tuple[int, int] | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    rank, count = text.split(":")
    return int(rank), int(count)


def generate_shards(spec: SampleSpec, out_dir: str | os.PathLike, key: str, ranks: Ranks | None = None,
                    progress: bool = False) -> dict[str, int]:
    """Generate this rank's batches that have no valid shard yet and write their shards; returns
    ``{"generated": g, "kept": k}`` (batches made now / found valid). Invalid shards of this rank's batches are
    reported (warning) and replaced.

    Example:
        >>> generate_shards(spec, "out/run", key, Ranks(rank=1, world_size=2))   # doctest: +SKIP
        {'generated': 10, 'kept': 0}
    """
    from tqdm import tqdm

    ranks = ranks if ranks is not None else Ranks()
    out_dir = Path(out_dir)
    blocks = batch_ranges(spec.num_samples, spec.batch_size)
    layout, replica, replicas, writes = None, ranks.rank, ranks.world_size, True
    if spec.context_parallel is not None:  # on every rank before any return: the mesh and the sharding are collective
        from ..distributed.commands import shard_pipeline

        make: Any = _PipelineSampler(spec, ranks.device)
        layout = shard_pipeline(make.pipe, spec.context_parallel, str(ranks.device))
        replica, replicas, writes = layout.replica, layout.replicas, layout.cp_rank == 0  # batches per replica
    mine = rank_batches(len(blocks), replica, replicas)
    dtype = spec.resolved_image_dtype()
    todo = [k for k in mine if _valid_shard(out_dir, k, key, blocks[k], dtype, remove_invalid=writes)[0] is None]
    counts = {"generated": 0, "kept": len(mine) - len(todo)}
    if not todo:
        return counts
    fault = _fault_after()
    if layout is None:
        make = (_EmbeddedSampler if spec.embedded else _PipelineSampler)(spec, ranks.device)
    value_range = (-1.0, 1.0) if spec.embedded else (0.0, 1.0)
    bar = tqdm(todo, desc=f"sample rank {ranks.rank}/{ranks.world_size}", disable=not progress, leave=False)
    from ..distributed.layout import fail_fast

    # data parallelism: each batch decides from its own samples (module docstring); under context parallelism the
    # ranks of a replica pool their probes (distributed.vote), and one that fails takes the job down at once
    with agreement_group(None), fail_fast() if layout is not None else contextlib.nullcontext():
        for k in bar:
            images, stats = make(blocks[k])
            if not writes:  # a replica's other ranks hold the same gathered images
                counts["generated"] += 1
                continue
            write_npz(shard_path(out_dir, ranks.rank, k), {
                "images": _encode(images, dtype, value_range),
                "indices": np.arange(blocks[k].start, blocks[k].stop, dtype=np.int64),
                "key": np.array(key),
                "steps_full": np.array(int(stats.get("steps_full") or 0), dtype=np.int64),
                "steps_forecast": np.array(int(stats.get("steps_forecast") or 0), dtype=np.int64)})
            counts["generated"] += 1
            if fault is not None and fault == (ranks.rank, counts["generated"]):
                os.kill(os.getpid(), signal.SIGKILL)
    return counts


def _ranges(values: list[int]) -> list[list[int]]:
    """Sorted ints as [first, last] runs."""
    out: list[list[int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def merge_samples(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every shard of ``DIR``, write ``DIR/samples.npz`` (``images`` and ``indices`` sorted by index,
    ``labels`` for class-conditional models) and the manifest's ``shards`` and ``status``; returns the status.

    A missing or invalid batch leaves ``status.complete`` false (with the missing indices as [first, last] runs)
    and raises ``SampleDirError``: rerun the sampling command to generate it.

    Example:
        >>> merge_samples("out/run")["complete"]   # doctest: +SKIP
        True
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise SampleDirError(f"{out_dir} has no manifest.json: not a sample folder (run taylorseer sample first)")
    identity, key = manifest["identity"], manifest["key"]
    blocks = batch_ranges(identity["num_samples"], identity["batch_size"])
    shards, parts, missing, duplicates = [], [], [], []
    for k, block in enumerate(blocks):
        path, arrays, extra = _valid_shard(out_dir, k, key, block, identity["image_dtype"], remove_invalid=False)
        duplicates += [p.name for p in extra]
        if path is None or arrays is None:
            missing += list(block)
            continue
        parts.append(arrays)
        name = SHARD_NAME.fullmatch(path.name)
        if name is None:  # the batch's glob (shard-*-BATCH.npz) also takes a non-numeric rank
            raise SampleDirError(f"shard {path} is not named shard-RANK-BATCH.npz (RANK digits)")
        shards.append({"file": path.relative_to(out_dir).as_posix(), "indices": [block.start, block.stop - 1],
                       "count": len(block), "rank": int(name.group(1)),
                       "steps_full": int(arrays["steps_full"]), "steps_forecast": int(arrays["steps_forecast"])})
    indices = np.concatenate([p["indices"] for p in parts]) if parts else np.zeros(0, np.int64)
    status = {"complete": not missing, "num_samples": identity["num_samples"], "samples_present": int(len(indices)),
              "missing_indices": _ranges(missing), "duplicate_indices": [], "duplicate_shards": duplicates,
              "checked": _now()}
    if duplicates:
        warnings.warn(f"{out_dir}: duplicate shards {duplicates} are not used", RuntimeWarning, stacklevel=2)
    if len(np.unique(indices)) != len(indices):  # cannot happen with one shard per batch; checked all the same
        values, counts = np.unique(indices, return_counts=True)
        status["duplicate_indices"] = _ranges(values[counts > 1].tolist())
        status["complete"] = False
    manifest["shards"], manifest["status"] = shards, status
    if status["complete"]:
        arrays = {"images": np.concatenate([p["images"] for p in parts]), "indices": indices, "key": np.array(key)}
        if identity["model"]["kind"] == "embedded":
            arrays["labels"] = sample_labels(indices.tolist()).numpy()
        write_npz(out_dir / "samples.npz", arrays)
        manifest["samples"] = {"file": "samples.npz", **identity["images"]}
        # temporary files of killed writers (every rank has passed the barrier: nobody writes now)
        for stale in [*(out_dir / "shards").glob(".shard-*.tmp"), *out_dir.glob(".*.tmp")]:
            with contextlib.suppress(OSError):
                stale.unlink()
    write_json(out_dir / "manifest.json", manifest)
    if not status["complete"]:
        raise SampleDirError(f"{out_dir}: {len(missing)} of {identity['num_samples']} samples missing (indices "
                             f"{_short(status['missing_indices'])}); rerun the sampling command to generate them")
    return status


def load_samples(out_dir: str | os.PathLike) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """The merged set of ``DIR``: images as float32 in the model's range (embedded: [N, 1, S, S] in [-1, 1];
    pipelines: [N, H, W, C] in [0, 1]), indices [N], and the manifest.

    Example:
        >>> images, indices, manifest = load_samples("out/run")   # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None or not (out_dir / "samples.npz").is_file():
        raise SampleDirError(f"{out_dir} has no merged samples.npz: run taylorseer sample --merge --out {out_dir}")
    arrays = read_npz(out_dir / "samples.npz")
    if str(arrays.get("key")) != manifest["key"]:
        raise SampleDirError(f"{out_dir}/samples.npz does not belong to its manifest's run; run --merge again")
    layout = {**manifest["identity"]["images"],
              "model_range": [-1.0, 1.0] if manifest["identity"]["model"]["kind"] == "embedded" else [0.0, 1.0]}
    return decode_images(arrays["images"], layout), arrays["indices"], manifest


_SAME_SAMPLES = ("model", "num_samples", "seed", "prompt", "noise", "images.layout")


def evaluate(out_dir: str | os.PathLike, reference: str | os.PathLike | None = None) -> dict[str, Any]:
    """Score the merged samples of ``DIR`` and write ``DIR/metrics.json``; returns the metrics.

    Embedded model: FID-FMNIST and class accuracy (labels i % 10); with ``reference`` (another sample folder of the
    same model, seeds and count, e.g. full compute) also PSNR, SSIM and FID to it (``fid_to_reference``, 0 for the
    same images). Pipelines: PSNR and SSIM to ``reference`` only. Full steps per batch come from the shards.

    Example:
        >>> evaluate("out/ts-O2", reference="out/full")["psnr"]   # doctest: +SKIP
        39.4
    """
    out_dir = Path(out_dir)
    images, indices, manifest = load_samples(out_dir)
    identity = manifest["identity"]
    steps = [s["steps_full"] for s in manifest["shards"]]
    metrics: dict[str, Any] = {"num_samples": int(len(indices)), "method": identity["method"]["name"],
                               "num_steps": identity["method"]["num_steps"], "seed": identity["seed"],
                               "guidance_scale": identity["guidance_scale"], "complete": True,
                               "steps_full_mean": float(np.mean(steps)), "steps_full_min": int(min(steps)),
                               "steps_full_max": int(max(steps)), "reference": None, "reasons": {}}
    ref_images = None
    if reference is not None:
        ref_images, ref_indices, ref_manifest = load_samples(reference)
        for name in _SAME_SAMPLES:
            ours, theirs = _field(identity, name), _field(ref_manifest["identity"], name)
            if ours != theirs:
                raise SampleDirError(f"reference {reference} is not of the same samples: {name} is {_short(theirs)} "
                                     f"there but {_short(ours)} here")
        metrics["reference"] = {"dir": str(reference), "method": ref_manifest["identity"]["method"]["name"]}
    if identity["model"]["kind"] == "embedded":
        from .bench import _quality

        labels = sample_labels(indices.tolist())
        values, reasons = _quality(images, images if ref_images is None else ref_images, labels,
                                   is_reference=ref_images is None)
        metrics.update(fid_fmnist=values["fid_fmnist"], class_accuracy=values["class_accuracy"])
        metrics["reasons"].update({k: v for k, v in reasons.items() if k in ("fid_fmnist", "class_accuracy")})
        if ref_images is not None:
            metrics.update(psnr=values["psnr"], ssim=values["ssim"], fid_to_reference=values["fid_to_full"])
            metrics["reasons"].update({k: v for k, v in reasons.items() if k in ("psnr", "ssim")})
    elif ref_images is not None:
        from .metrics import psnr, ssim

        a, b = images.permute(0, 3, 1, 2), ref_images.permute(0, 3, 1, 2)
        metrics.update(psnr=psnr(a, b, data_range=1.0), ssim=ssim(a, b, data_range=1.0))
    if ref_images is None:
        metrics["reasons"]["psnr"] = "no reference run given (--reference DIR)"
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _field(identity: dict[str, Any], dotted: str) -> Any:
    value: Any = identity
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def run_sample(spec: SampleSpec, out_dir: str | os.PathLike, *, device: str = "cpu", threads: int | None = 1,
               merge: bool = True, reference: str | os.PathLike | None = None,
               progress: bool = False) -> dict[str, Any] | None:
    """Generate the missing samples of ``spec`` into ``out_dir`` on this rank's share, then (rank 0, after all
    ranks are done) merge and score them. Run it alone or in every process of a ``torchrun`` job.

    ``threads`` sets torch's CPU threads (None: leave them; the bitwise guarantee needs the same count in every
    run). Returns, on rank 0, the run's facts (``generated``/``kept`` batches of rank 0, ``world_size``,
    ``seconds``) and, with ``merge``, the metrics (see ``evaluate``); None on the other ranks.

    Example:
        >>> run_sample(SampleSpec(resolve_method("full", 6), num_samples=8, batch_size=4), "out/full")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    with distributed(device) as ranks:
        if spec.context_parallel is not None:
            from ..distributed.layout import check_world

            check_world(spec.context_parallel, ranks.world_size)
        refusal: BaseException | None = None
        key = None
        if ranks.rank == 0:
            try:
                key = _open_run(spec, out_dir, ranks, threads)["key"]
            except (ValueError, OSError) as err:
                refusal = err
        key = ranks.broadcast_key(key)
        if refusal is not None:
            raise refusal
        if key is None:
            raise SampleDirError(f"rank 0 refused the run in {out_dir} (its error message says why)")
        counts = generate_shards(spec, out_dir, key, ranks, progress=progress and ranks.rank == 0)
        ranks.barrier()
        if ranks.rank != 0:
            return None
        result: dict[str, Any] = {"dir": str(out_dir), "world_size": ranks.world_size, **counts}
        if merge:
            merge_samples(out_dir)
            result.update(evaluate(out_dir, reference))
        result["seconds"] = time.perf_counter() - start
        return result

