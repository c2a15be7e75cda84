"""The shipped, trained reference DiT: export from a training state, load with checksum verification.

Example:
    >>> model = load_reference()          # float32, eval mode, SHA-256 checked   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from .checkpoint import ASSETS_DIR, CheckpointError, file_sha256, load_tensors, manifest_sha256, save_tensors
from .checkpoint import update_manifest as _update_manifest
from .reference import model_from_config

REFERENCE_FILE = "dit_fmnist.safetensors"
REFERENCE_PATH = ASSETS_DIR / REFERENCE_FILE


def export_reference(
    state_path: str | os.PathLike,
    out_path: str | os.PathLike = REFERENCE_PATH,
    dtype: torch.dtype = torch.float16,
    notes: dict | None = None,
    update_manifest: bool = True,
) -> Path:
    """Write the EMA weights of a training state as ``dtype`` safetensors (config in the header) and record the
    file's SHA-256 in the assets manifest. Returns the written path."""
    tensors, meta = load_tensors(state_path)
    ema = {k[4:]: v.to(dtype) for k, v in tensors.items() if k.startswith("ema.")}
    header = {"model_config": meta["model_config"], "train_step": meta["step"], "train_config": meta["train_config"],
              "source": "EMA weights", "dtype": str(dtype).replace("torch.", "")}
    save_tensors(out_path, ema, header)
    if update_manifest:
        entry = {"sha256": file_sha256(out_path), "train_step": int(meta["step"]),
                 "train_elapsed_s": float(meta.get("elapsed_s", 0.0)), "dtype": header["dtype"], **(notes or {})}
        _update_manifest(Path(out_path).name, entry)
    return Path(out_path)


def load_reference(path: str | os.PathLike | None = None, sha256: str | None = None) -> DiTTransformer2DModel:
    """The trained reference DiT in float32 and eval mode (parameters frozen), from a safetensors file.

    With no ``path`` the shipped weights are loaded and always checked against the SHA-256 recorded in the assets
    manifest; a corrupted or truncated file raises ``CheckpointError``.
    An explicit ``path`` (e.g. a file written by ``export_reference``) is NOT checksummed unless ``sha256`` is
    given: a file that still parses loads silently even if its values were changed. Pass ``sha256`` (64 hex
    digits, e.g. ``file_sha256(path)`` noted when the file was made) to have a mismatch raise ``CheckpointError``
    naming the expected and the actual digest. A malformed ``sha256`` raises ``ValueError``; ``sha256`` without
    ``path`` too (the shipped file's digest is the manifest's).

    Example:
        >>> model = load_reference("ref.safetensors", sha256=file_sha256("ref.safetensors"))   # doctest: +SKIP
    """
    if path is None:
        if sha256 is not None:
            raise ValueError("sha256 checks an explicit path; the shipped weights (path=None) are always checked "
                             "against the manifest's SHA-256")
        path, sha256 = REFERENCE_PATH, manifest_sha256(REFERENCE_FILE)
    tensors, meta = load_tensors(path, sha256=sha256)
    if "model_config" not in meta:
        raise CheckpointError(f"{path} has no model_config in its header: not a taylorseer reference checkpoint")
    model = model_from_config(json.loads(meta["model_config"]))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.requires_grad_(False)
    return model.eval()
