"""What a sample folder holds: the run's identity (``SampleSpec``: method, seeds, batches, model, layout), the
method by name or from a config, and the software that computed it.

Example:
    >>> SampleSpec(resolve_method("ddim-11"), num_samples=8, batch_size=4).identity()["batch_size"]   # doctest: +SKIP
    4
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from .. import __version__
from ..calibration.io import calibration_of, pin_config
from ..config import TaylorSeerConfig
from ..models.checkpoint import file_sha256, manifest_sha256
from ..models.pretrained import REFERENCE_FILE
from ..parts import CacheConfig, parts_of
from ..parts import load_config as load_cache_config
from .grids import default_grid
from .methods import Method
from .methods import method_from_config as _method_of

SCHEMA = "taylorseer.sample/1"
NOISE_RULE = ("noise of sample i: torch.randn([C, S, S]) from a CPU torch.Generator seeded with "
              "numpy SeedSequence([seed, i]).generate_state(1, uint64); label of sample i: i % 10 (embedded model) "
              "or the prompt's class ids in turn")
IMAGE_DTYPES = ("float16", "float32", "uint8")
MAX_SAMPLES = 10**7  # samples of one run (an FID needs 5e4); bounded so that a typo cannot exhaust memory
MAX_BATCHES = 10**6  # batches (shards) of one run: their list is built up front


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
        if self.model is not None and not isinstance(self.method.config, (CacheConfig, type(None))):
            raise ValueError(f"method {self.method.name!r} (family {self.method.family}) is a peer that runs on the "
                             f"embedded model only; with a pipeline give full, ddim-K, a grid method or a config "
                             f"(--preset / --config)")
        if self.context_parallel is not None and self.model is None:
            raise ValueError("SampleSpec.context_parallel: the embedded DiT has no context-parallel plan in diffusers; "
                             "give a pipeline whose transformer has one (e.g. model='flux-tiny-random')")
        self._bind_calibration()

    def _bind_calibration(self) -> None:
        """A config naming a calibration file: bound to the file's content (its SHA-256 joins the run identity, and
        a file changed later is refused instead of mixing calibrations), checked against the sampling (guidance
        scale, CFG layout); a pipeline run without a guidance scale takes the calibration's own."""
        config = self.method.config
        if not isinstance(config, CacheConfig) or calibration_of(config) is None:
            return
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
    match = re.fullmatch(r"ddim-(\d+)", name)
    if match and int(match.group(1)) >= 1:
        return Method(name, None, int(match.group(1)), family="fewer-steps")
    if name == "full":
        return Method("full", None, num_steps)
    grid = {m.name: m for m in default_grid(num_steps=num_steps)}
    if name not in grid:
        raise ValueError(f"unknown method {name!r}; allowed: ddim-K or one of {sorted(grid)}")
    return grid[name]


def method_from_config(config: TaylorSeerConfig | CacheConfig, num_steps: int = 50) -> Method:
    """A method that applies ``config`` (any registered parts; a ``TaylorSeerConfig`` as its ``CacheConfig``) at
    ``num_steps`` steps, named after the config; its family comes from its part types.

    Example:
        >>> method_from_config(TaylorSeerConfig(interval=5, name="mine")).name
        'mine'
    """
    return _method_of(parts_of(config), num_steps)


def load_config(source: str) -> CacheConfig:
    """A ``CacheConfig`` from ``--config JSON|FILE|NAME``: inline JSON, a JSON file or a preset name
    (``taylorseer.parts.load_config``; a JSON object with ``policy`` is a ``CacheConfig``, any other one
    ``TaylorSeerConfig`` fields).

    Example:
        >>> load_config('{"interval": 5, "max_order": 2}').policy.interval
        5
    """
    return load_cache_config(source)


def software_versions() -> dict[str, str]:
    """Versions of what computes the samples (python, numpy, torch, diffusers, taylorseer)."""
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "taylorseer": __version__}
