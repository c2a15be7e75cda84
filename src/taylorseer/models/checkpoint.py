"""Safetensors checkpoints: atomic writes, SHA-256 verified loads, config and metadata kept in the header.

Weights are never unpickled. A corrupted or truncated file raises ``CheckpointError`` naming the file.

Example:
    >>> save_tensors("w.safetensors", {"a": torch.ones(2)}, {"config": "{}"})   # doctest: +SKIP
    >>> tensors, meta = load_tensors("w.safetensors", sha256=file_sha256("w.safetensors"))   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MANIFEST_PATH = ASSETS_DIR / "MANIFEST.json"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class CheckpointError(ValueError):
    """A weights file is missing, corrupted, truncated or does not match its recorded checksum."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` atomically: a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are package data, readable by all
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_sha256(sha256: str | None) -> str | None:
    """``sha256`` as a lower-case hex digest (None passes); anything but 64 hex digits raises naming ``sha256``."""
    if sha256 is None:
        return None
    if not isinstance(sha256, str):
        raise TypeError(f"sha256 must be a 64-character hex SHA-256 digest (str) or None, got {type(sha256).__name__}")
    if not _HEX64.fullmatch(sha256):
        raise ValueError(f"sha256 must be a 64-character hex SHA-256 digest (0-9, a-f) or None, got {sha256!r:.80} "
                         f"({len(sha256)} characters)")
    return sha256.lower()


def load_tensors(path: str | os.PathLike, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and header metadata from a safetensors file; verify its SHA-256 first when one is given.

    Without ``sha256`` the file's bytes are not checked against anything: a file that still parses loads as it is
    (a truncated or malformed one raises ``CheckpointError``). With ``sha256`` (64 hex digits, e.g. from
    ``file_sha256``) a file whose digest differs raises ``CheckpointError`` naming the expected and the actual
    digest, before anything is parsed.
    """
    sha256 = check_sha256(sha256)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise CheckpointError(
                f"weights file {path} is corrupted or truncated (or not the file meant): expected SHA-256 {sha256}, "
                f"actual {actual}. Reinstall the package, re-export or re-download the checkpoint."
            )
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is not a readable safetensors file: {err}") from err
    return tensors, metadata


#################################################################################
#                         Manifest of the shipped assets                        #
#################################################################################

def read_manifest(path: str | os.PathLike = MANIFEST_PATH) -> dict[str, Any]:
    """The assets manifest: file name -> {"sha256": hex digest, ...notes}; ``{}`` if there is no file."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object mapping file names to entries")
    return manifest


def update_manifest(name: str, entry: dict[str, Any], path: str | os.PathLike = MANIFEST_PATH) -> None:
    """Set ``manifest[name] = entry`` by read-modify-write, keeping every other key; atomic replace.

    Example:
        >>> update_manifest("x.safetensors", {"sha256": file_sha256("x.safetensors")})   # doctest: +SKIP
    """
    if "sha256" not in entry:
        raise ValueError("a manifest entry needs a 'sha256' key")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(path)
    manifest[name] = entry
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is package data, readable by all
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def manifest_sha256(name: str, manifest_path: str | os.PathLike = MANIFEST_PATH) -> str:
    """The SHA-256 recorded for asset ``name``; raises ``CheckpointError`` if it is not recorded."""
    entry = read_manifest(manifest_path).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointError(f"no SHA-256 recorded for {name} in {manifest_path}; the package is incomplete")
    return entry["sha256"]
