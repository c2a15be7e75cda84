"""The calibration file as the calibration package writes and reads it: ``Calibration`` (the file's record plus the
``CacheConfig`` it stands for), ``new_header``, ``save_calibration`` and ``load_calibration``.

The format (``taylorseer.calibration/1``: safetensors tensors + a JSON header) and its validated read live with the
learned forecaster that reads it, ``taylorseer.forecast.linear_file`` (below the parts and the runtime); this
module adds what builds configs (``cache_config``) and what writes files. Loading validates everything and never
falls back: an unreadable, truncated or corrupted file, an unknown format, a header that disagrees with the
tensors, another model (class, config hash or weights), other ``num_steps`` or another schedule raise
``CalibrationError`` naming the mismatch.

Example:
    >>> cal = load_calibration("dit-b8.safetensors", model=model, num_steps=50)   # doctest: +SKIP
    >>> handle = taylorseer.apply(model, cal.cache_config())                      # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..config import GRANULARITIES
from ..forecast.linear import LinearTable
from ..forecast.linear_file import (
    FORMAT,
    HEADER_KEY,
    KINDS,
    CalibrationError,
    CalibrationFile,
    calibration_of,
    model_identity,
    pin_config,
    read_calibration,
    tensor_digest,
)
from ..models.checkpoint import file_sha256, save_tensors
from ..parts import CacheConfig, calibrated_config, searched_forecaster
from ..policy.schedule import FixedSchedule

__all__ = ["FORMAT", "HEADER_KEY", "KINDS", "Calibration", "CalibrationError", "CalibrationFile", "calibration_of",
           "load_calibration", "model_identity", "new_header", "pin_config", "save_calibration"]


@dataclass(frozen=True)
class Calibration(CalibrationFile):
    """A loaded (or freshly saved) calibration: the file's record (``CalibrationFile``: ``header``, weights ``table``,
    ``path``, ``sha256`` and the checks) and the ``CacheConfig`` it stands for (``cache_config``)."""

    @property
    def searched_with(self) -> Any:
        """For a schedule searched for a formula forecaster (``calibrate(..., forecaster=...)``), that forecaster's
        config; else None (``parts.searched_forecaster``)."""
        return searched_forecaster(self)

    def cache_config(self, forecaster: Any = None, name: str | None = None) -> CacheConfig:
        """A ``CacheConfig``: the file's ``FixedSchedule`` with its ``LinearForecast`` (the file must have been
        saved or loaded, so that the config can name it), or with ``forecaster`` (any forecaster config; for a
        schedule searched for a formula forecaster, that one by default), at the file's ``granularity``
        (``parts.calibrated_config``)."""
        return calibrated_config(self, forecaster, name)


def new_header(kind: str, name: str, model: nn.Module, schedule: FixedSchedule, **fields: Any) -> dict[str, Any]:
    """A header for ``save_calibration`` (``fields``: forecaster, fit, search, calibration_data, ...)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    header = {"format": FORMAT, "kind": kind, "name": name, "library_version": __version__,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "model": model_identity(model), "granularity": "module", "num_steps": schedule.num_steps,
              "schedule": schedule.to_dict(),
              "forecaster": None, "groups": [], "targets": {}, "fit": None, "search": None, "calibration_data": None}
    unknown = sorted(set(fields) - set(header))
    if unknown:
        raise ValueError(f"unknown header field(s) {unknown}; allowed: {sorted(header)}")
    header.update(fields)
    if header["granularity"] not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {header['granularity']!r}")
    return header


#################################################################################
#                                   Write / read                                #
#################################################################################

def _pack(table: LinearTable) -> tuple[list[str], dict[str, torch.Tensor]]:
    groups = sorted(table.steps)
    tensors: dict[str, torch.Tensor] = {}
    for g, group in enumerate(groups):
        entries = sorted(table.steps[group].items())
        k = table.history
        first = entries[0][1]
        shape = tuple(first.weights.shape[1:])  # () or (C,)
        steps = torch.tensor([s for s, _ in entries], dtype=torch.int64)
        anchors = torch.full((len(entries), k), -1, dtype=torch.int64)
        weights = torch.zeros((len(entries), k, *shape), dtype=torch.float32)
        has_bias = first.bias is not None
        bias = torch.zeros((len(entries), *shape), dtype=torch.float32)
        for i, (_, sw) in enumerate(entries):
            if tuple(sw.weights.shape[1:]) != shape or (sw.bias is not None) != has_bias:
                raise ValueError(f"group {group!r}: every step needs the same weight shape and bias choice")
            anchors[i, : len(sw.anchors)] = torch.tensor(sw.anchors)
            weights[i, : len(sw.anchors)] = sw.weights.float()
            if sw.bias is not None:
                bias[i] = sw.bias.float()
        tensors[f"g{g}.steps"], tensors[f"g{g}.anchors"], tensors[f"g{g}.weights"] = steps, anchors, weights
        if has_bias:
            tensors[f"g{g}.bias"] = bias
    return groups, tensors


def save_calibration(path: str | os.PathLike, header: dict[str, Any], table: LinearTable | None = None
                     ) -> Calibration:
    """Write a calibration file atomically (``header`` from ``new_header``; ``table`` for kind ``"linear"``) and
    return it as loaded, with its path and SHA-256.

    Example:
        >>> cal = save_calibration("b8.safetensors", new_header("schedule", "b8", model, schedule))  # doctest: +SKIP
    """
    header = dict(header)
    schedule = FixedSchedule.from_dict(header["schedule"])
    if (header["kind"] == "linear") != (table is not None):
        raise ValueError(f"kind {header['kind']!r} {'needs' if header['kind'] == 'linear' else 'takes no'} weights")
    tensors = {"schedule.full_steps": torch.tensor(schedule.full_steps, dtype=torch.int64)}
    if table is not None:
        if (table.num_steps, table.full_steps) != (schedule.num_steps, schedule.full_steps):
            raise ValueError(f"the weights were fitted for {list(table.full_steps)} of {table.num_steps} steps, the "
                             f"header names {list(schedule.full_steps)} of {schedule.num_steps}")
        groups, packed = _pack(table)
        tensors.update(packed)
        header["groups"] = groups
        first = next(iter(next(iter(table.steps.values())).values()))
        header["forecaster"] = {**(header.get("forecaster") or {}), "grouping": table.grouping,
                                "history": table.history, "row_groups": first.row_groups}
    header["tensor_sha256"] = tensor_digest(tensors)
    save_tensors(path, tensors, {HEADER_KEY: json.dumps(header, sort_keys=True, allow_nan=False)})
    return Calibration(header, table, str(path), file_sha256(path))


def load_calibration(path: str | os.PathLike, *, sha256: str | None = None, model: nn.Module | None = None,
                     num_steps: int | None = None, schedule: FixedSchedule | tuple[int, ...] | None = None,
                     kind: str | None = None) -> Calibration:
    """Read and validate a calibration file (``forecast.linear_file.read_calibration``: the format, the tensor
    digest, the schedule, the weights); check it against ``model``, ``num_steps``, ``schedule`` and ``kind`` when
    given. ``sha256``: the expected digest of the whole file.

    Raises ``CalibrationError`` (a ``ValueError``) naming what is wrong or does not match.

    Example:
        >>> cal = load_calibration("b8.safetensors", model=load_reference(), num_steps=50)   # doctest: +SKIP
    """
    read = read_calibration(path, sha256=sha256, model=model, num_steps=num_steps, schedule=schedule, kind=kind)
    return Calibration(read.header, read.table, read.path, read.sha256)
