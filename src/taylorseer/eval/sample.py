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
import json
import os
import signal
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..distributed.layout import check_world, fail_fast
from ..runtime.step import agreement_group
from .runs import quality
from .sample_batches import EmbeddedSampler, PipelineSampler
from .sample_files import (
    SHARD_NAME,
    Ranks,
    SampleDirError,
    _encode,
    _valid_shard,
    batch_ranges,
    decode_images,
    distributed,
    rank_batches,
    read_npz,
    read_shard,
    sample_labels,
    sample_noise,
    sample_seed,
    shard_path,
    write_json,
    write_npz,
)
from .sample_spec import (
    IMAGE_DTYPES,
    MAX_BATCHES,
    MAX_SAMPLES,
    NOISE_RULE,
    SCHEMA,
    SampleSpec,
    _first_difference,
    _key,
    load_config,
    method_from_config,
    model_identity_of,
    resolve_method,
    software_versions,
)

__all__ = ["FAULT_ENV", "IMAGE_DTYPES", "MAX_BATCHES", "MAX_SAMPLES", "NOISE_RULE", "SCHEMA", "SHARD_NAME", "Ranks",
           "SampleDirError", "SampleSpec", "batch_ranges", "decode_images", "distributed", "evaluate",
           "generate_shards", "load_config", "load_samples", "merge_samples", "method_from_config",
           "model_identity_of", "rank_batches", "read_manifest", "read_npz", "read_shard", "resolve_method",
           "run_sample", "sample_labels", "sample_noise", "sample_seed", "shard_path", "software_versions",
           "write_json", "write_npz"]

FAULT_ENV = "TAYLORSEER_TEST_KILL_AFTER_SHARDS"


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
    ranks = ranks if ranks is not None else Ranks()
    out_dir = Path(out_dir)
    blocks = batch_ranges(spec.num_samples, spec.batch_size)
    layout, replica, replicas, writes = None, ranks.rank, ranks.world_size, True
    if spec.context_parallel is not None:  # on every rank before any return: the mesh and the sharding are collective
        from ..distributed.commands import shard_pipeline  # loads a pipeline's classes: only for context parallel

        make: Any = PipelineSampler(spec, ranks.device)
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
        make = (EmbeddedSampler if spec.embedded else PipelineSampler)(spec, ranks.device)
    value_range = (-1.0, 1.0) if spec.embedded else (0.0, 1.0)
    bar = tqdm(todo, desc=f"sample rank {ranks.rank}/{ranks.world_size}", disable=not progress, leave=False)
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
        labels = sample_labels(indices.tolist())
        values, reasons = quality(images, images if ref_images is None else ref_images, labels,
                                   is_reference=ref_images is None)
        metrics.update(fid_fmnist=values["fid_fmnist"], class_accuracy=values["class_accuracy"])
        metrics["reasons"].update({k: v for k, v in reasons.items() if k in ("fid_fmnist", "class_accuracy")})
        if ref_images is not None:
            metrics.update(psnr=values["psnr"], ssim=values["ssim"], fid_to_reference=values["fid_to_full"])
            metrics["reasons"].update({k: v for k, v in reasons.items() if k in ("psnr", "ssim")})
    elif ref_images is not None:
        from .metrics import psnr, ssim  # torchmetrics (the bench extra): only when a reference is compared

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

