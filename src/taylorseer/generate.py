"""Generate with a diffusers pipeline (hub id or local folder), accelerated by taylorseer, and show what it gained:
the function behind ``taylorseer generate``.

Loads ``DiffusionPipeline.from_pretrained(model)`` once, then runs it with the config applied (the scheduler tells
the steps) and, with ``baseline=True``, first at full compute with the same seed: the result holds both wall times,
the measured speedup and the PSNR of the accelerated images against the baseline's. ``config="family"`` takes the
preset recommended for the model's transformer family (``taylorseer.api.default_config``); ``calibration=FILE``
runs a file of ``taylorseer calibrate --model`` instead (its schedule and fitted weights), checked against the
steps before the pipeline is loaded and against the transformer before anything runs. Images are saved as PNG
(videos as GIF) and never overwrite earlier outputs: every call takes the next free run number ``NNN`` in
``out_dir`` (one above the highest number any file there starts with) and writes ``NNN-baseline-K.png``,
``NNN-taylorseer-K.png`` and the facts as ``NNN.json``, each file created exclusively.

Loading, the call's arguments and reading its output are ``taylorseer.integrations.pipeline_call``'s; which preset
a model's family has, ``taylorseer.integrations.family``'s.

Every failure the user can cause (bad path, unknown hub id, unsupported model, unknown or out-of-range class label,
malformed or unavailable device, an output folder that is an existing file) raises ``FileNotFoundError`` or
``ValueError`` with a one-line message; the arguments are checked before the pipeline is loaded.

Example:
    >>> out = generate("facebook/DiT-XL-2-256", "golden retriever", "family", num_inference_steps=50,
    ...                out_dir="out", baseline=True)                                         # doctest: +SKIP
    >>> out["images"], out["speedup"], out["psnr_db"]                                        # doctest: +SKIP
    (['out/001-taylorseer-0.png'], 2.4, 33.9)
"""


from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__
from ._extras import MissingExtraError
from .adapters.registry import find_adapter
from .api import apply, default_config
from .config import PRESET_NAMES, TaylorSeerConfig, preset
from .devices import resolve_device
from .eval.timing import timed
from .integrations.family import preset_reason
from .integrations.pipeline_call import call_arguments, check_supported, load_pipeline, output_arrays
from .parts import CacheConfig
from .runtime.install import unwrap

if TYPE_CHECKING:
    from .calibration.io import Calibration

FAMILY = "family"  # config="family": the preset recommended for the model's transformer family
WARMUP_STEPS = 2  # steps of the untimed full-compute call before a timed comparison


#################################################################################
#                                 Output folders                                #
#################################################################################

def check_out_dir(out_dir: str | Path, name: str = "out_dir") -> None:
    """Refuse a folder path that cannot be created: an existing file, or one below an existing file."""
    path = Path(out_dir).expanduser()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "is" if part == path else f"is below {str(part)!r}, which is"
                raise ValueError(f"{name} {str(path)!r} {what} an existing file; a folder is expected")
            if not os.access(part, os.W_OK | os.X_OK):
                raise ValueError(f"{name} {str(path)!r}: {str(part)!r} is not writable")
            return



#################################################################################
#                     Running, saving, comparing one call                       #
#################################################################################

_RUN_NUMBER = re.compile(r"(\d+)[-.]")


def next_run_number(out_dir: str | Path) -> int:
    """One above the highest run number a file name in ``out_dir`` starts with (``007-...``, ``007.json``); 1 for
    an empty or missing folder. Earlier outputs (also the ``000.png`` of older versions) are never reused.

    Example:
        >>> next_run_number("/nonexistent/folder")
        1
    """
    folder = Path(out_dir).expanduser()
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    numbers = [int(m.group(1)) for name in names if (m := _RUN_NUMBER.match(name))]
    return max(numbers, default=0) + 1



def _save(kind: str, arrays: np.ndarray, out_dir: Path, stem: str) -> list[str]:
    """Write ``STEM-K.png`` (videos ``STEM-K.gif``) per item; each file is created exclusively (never overwritten)."""
    from diffusers.utils.pil_utils import numpy_to_pil

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, item in enumerate(arrays):
        path = out_dir / f"{stem}-{k}.{'gif' if kind == 'frames' else 'png'}"
        with _exclusive(path, "xb") as file:
            if kind == "frames":
                frames = numpy_to_pil(item)
                frames[0].save(file, format="GIF", save_all=True, append_images=frames[1:], duration=125, loop=0)
            else:
                numpy_to_pil(item)[0].save(file, format="PNG")
        paths.append(str(path))
    return paths


def _exclusive(path: Path, mode: str) -> Any:
    """``open(path, mode)`` with an ``x`` mode; an existing file is left alone and refused in one line."""
    try:
        return open(path, mode)
    except FileExistsError:
        raise ValueError(f"{str(path)!r} appeared while this run was writing (another run writing to the same "
                         f"folder?); it was not overwritten") from None


def _write_record(out_dir: Path, run: int, record: dict[str, Any]) -> str:
    path = out_dir / f"{run:03d}.json"
    with _exclusive(path, "x") as file:
        json.dump(record, file, indent=1, sort_keys=True, allow_nan=False)
        file.write("\n")
    return str(path)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed_call(pipe: Any, call: dict[str, Any], seed: int, device: str, steps: int) -> tuple[Any, float]:
    generator = torch.Generator(device).manual_seed(seed)
    _synchronize(device)

    def run() -> Any:
        result = pipe(num_inference_steps=steps, generator=generator, output_type="np", **call)
        _synchronize(device)
        return result

    result, wall, _ = timed(run)  # the one timing helper (eval.timing)
    return result, wall


def _run(pipe: Any, call: dict[str, Any], config: TaylorSeerConfig | CacheConfig | None, seed: int, device: str,
         steps: int, measure_flops: bool, progress: bool) -> tuple[str, np.ndarray, float, dict[str, Any] | None]:
    """One timed pipeline call, accelerated when ``config`` is given: (kind, arrays, seconds, handle stats)."""
    label = "taylorseer" if config is not None else "baseline (full compute)"
    pipe.set_progress_bar_config(disable=not progress, desc=label)
    if config is None:
        result, seconds = _timed_call(pipe, call, seed, device, steps)
        return (*output_arrays(result), seconds, None)
    with apply(pipe, config) as handle:
        flops = handle.count_flops() if measure_flops else contextlib.nullcontext()
        with flops:
            result, seconds = _timed_call(pipe, call, seed, device, steps)
        return (*output_arrays(result), seconds, handle.stats.to_dict())


def _psnr(accelerated: np.ndarray, baseline: np.ndarray) -> tuple[float | None, str | None]:
    """PSNR in dB of the accelerated images against the baseline's ([0, 1] values, MSE pooled over everything), and
    a note: ``None, "identical images"`` for equal arrays, ``None, <pip hint>`` without the bench extra."""
    try:
        from .eval.metrics import psnr
    except MissingExtraError as error:
        return None, f"PSNR not measured: {error}"

    def batch(x: np.ndarray) -> torch.Tensor:  # [N, H, W, C] or [N, F, H, W, C] -> [N*F, C, H, W]
        return torch.from_numpy(x.reshape(-1, *x.shape[-3:])).permute(0, 3, 1, 2)

    value = psnr(batch(accelerated), batch(baseline), data_range=1.0)
    return (value, None) if math.isfinite(value) else (None, "identical images")


def _resolve_config(pipe: Any, config: TaylorSeerConfig | CacheConfig | str | None,
                    overrides: Mapping[str, Any]) -> tuple[TaylorSeerConfig | CacheConfig | None, str | None]:
    """The config to run and, for the family's preset, why it was chosen (the adapter record's notes)."""
    reason = None
    if config == FAMILY:
        spec = find_adapter(unwrap(pipe.transformer))
        config = default_config(pipe)
        reason = preset_reason(spec) if spec is not None and spec.preset else None
    elif isinstance(config, str):
        config = preset(config)
    if isinstance(config, TaylorSeerConfig) and overrides:
        config = config.replace(**overrides)
    return config, reason


def read_calibration(path: str | os.PathLike, num_steps: int) -> Calibration:
    """The calibration file ``path`` for a ``num_steps``-step generation, read and validated before any model is
    loaded: ``CalibrationError`` (a ``ValueError``) for an unreadable or corrupted file, another step count, or a
    schedule-only file (it holds no weights to run). The model is checked once the pipeline is loaded
    (``_calibrated_config``).

    Example:
        >>> cal = read_calibration("dit-b8.safetensors", num_steps=50)       # doctest: +SKIP
    """
    from .calibration.io import load_calibration

    calibration = load_calibration(path, num_steps=num_steps)
    calibration.table_required()
    return calibration


def _calibrated_config(pipe: Any, calibration: Calibration, guidance_scale: float | None
                       ) -> tuple[CacheConfig, float | None]:
    """The calibration's ``CacheConfig`` for ``pipe`` and the guidance scale to run with: the calibration's own
    when none is given; ``CalibrationError`` for another model or another guidance scale than it was made with."""
    from .calibration.io import CalibrationError

    calibration.check(model=pipe.transformer)
    made_with = (calibration.header.get("calibration_data") or {}).get("guidance_scale")
    if "guidance_scale" in inspect.signature(pipe.__call__).parameters and isinstance(made_with, (int, float)):
        if guidance_scale is None:
            guidance_scale = float(made_with)
        elif float(guidance_scale) != float(made_with):
            raise CalibrationError(f"{calibration.path} was calibrated at guidance scale {made_with:g}, not "
                                   f"{guidance_scale:g}: its weights are per CFG layout and fitted on those "
                                   f"trajectories; generate with --guidance-scale {made_with:g} or calibrate again")
    return calibration.cache_config(), guidance_scale


def _calibration_facts(calibration: Calibration | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    header = calibration.header
    return {"path": calibration.path, "sha256": calibration.sha256, "name": header.get("name"),
            "num_steps": calibration.num_steps, "full_steps": list(calibration.schedule.full_steps),
            "guidance_scale": (header.get("calibration_data") or {}).get("guidance_scale")}


def _check_config(config: Any, overrides: Mapping[str, Any] | None) -> None:
    if config is not None and not isinstance(config, (TaylorSeerConfig, CacheConfig, str)):
        raise TypeError(f"config must be a TaylorSeerConfig, a preset name, {FAMILY!r}, a CacheConfig or None, "
                        f"got {type(config).__name__}")
    if isinstance(config, str) and config != FAMILY and config not in PRESET_NAMES:
        raise ValueError(f"config must be a preset name {list(PRESET_NAMES)} or {FAMILY!r}, got {config!r}")
    if overrides:
        if config is None:
            raise ValueError(f"overrides {sorted(overrides)} need a config: None runs without taylorseer")
        if isinstance(config, CacheConfig):
            raise ValueError(f"overrides {sorted(overrides)} are TaylorSeerConfig fields: change the CacheConfig's "
                             f"parts instead")
        TaylorSeerConfig().replace(**overrides)  # unknown or invalid fields, before the pipeline is loaded


#################################################################################
#                                   generate                                    #
#################################################################################

def generate(
    model: str,
    prompt: str | None,
    config: TaylorSeerConfig | CacheConfig | str | None,
    num_inference_steps: int = 50,
    seed: int = 0,
    out_dir: str | Path = "out",
    *,
    baseline: bool = False,
    overrides: Mapping[str, Any] | None = None,
    num_images: int = 1,
    guidance_scale: float | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    measure_flops: bool = False,
    progress: bool = False,
    calibration: str | os.PathLike | None = None,
    context_parallel: Any = None,
) -> dict[str, Any]:
    """Generate ``num_images`` images with ``model``, save them to ``out_dir`` and return the run's facts.

    ``model``: hub id or local pipeline folder. ``prompt``: the text prompt, or for class-conditional DiT
    pipelines comma-separated class ids or label names (None: class 0). ``config``: a ``TaylorSeerConfig``, a
    ``CacheConfig`` (any registered parts; no overrides), a preset name, ``"family"`` (the preset recommended
    for the model's transformer family), or None (no acceleration: the baseline alone); ``overrides`` changes
    fields of a ``TaylorSeerConfig`` (``{"interval": 5}``).
    ``baseline=True`` (with a config) first runs an untimed ``WARMUP_STEPS``-step call, then the same call at full
    compute and then accelerated, both with ``seed``, and compares them. ``num_inference_steps``: denoising
    steps; ``guidance_scale``: None keeps the pipeline's default; ``device``: one of ``DEVICES`` or ``"auto"``
    (cuda if available, else cpu). ``measure_flops`` (with a config) counts executed and skipped FLOPs (slower;
    the accelerated call's ``seconds`` then include the counting). ``calibration``: a file written by ``taylorseer
    calibrate --model`` for this pipeline's transformer and ``num_inference_steps``; its schedule and fitted
    weights (``load_calibration(...).cache_config()``) are the accelerated run's config (``config`` must then be
    None, without overrides), and its guidance scale the default. Another step count or a schedule-only file is
    refused before the pipeline is loaded, another model (class, config or weights) or guidance scale before
    anything runs (``CalibrationError``, a ``ValueError``, naming the mismatch).

    Returns ``{"model", "pipeline", "transformer", "device", "prompt", "config", "preset_reason",
    "calibration", "num_inference_steps", "seed", "run", "images", "seconds", "stats", "baseline", "speedup",
    "psnr_db", "psnr_note", "record"}``: ``images`` and ``seconds`` are those of the accelerated call (of the only
    call without a config), ``stats`` the handle's stats (None without a config); ``baseline`` is ``{"images",
    "seconds"}`` of the full-compute call or None; ``speedup`` the baseline's wall time over the accelerated one;
    ``psnr_db`` the accelerated images' PSNR against the baseline's (None with a ``psnr_note`` when the images are
    identical or torchmetrics is missing); ``calibration`` the file's ``{"path", "sha256", "name", "num_steps",
    "full_steps", "guidance_scale"}`` or None; ``record`` the path of ``NNN.json``, which holds all of this.

    ``context_parallel`` (a ``taylorseer.distributed.layout.ContextParallel``): run in every process of a
    ``torchrun`` job of exactly K processes, each holding 1/K of every image's tokens (docs/parallel.md); rank 0
    saves the files and returns the facts, the other ranks return ``{"rank", "seconds", "stats"}``.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    _check_config(config, overrides)
    cal = None
    if calibration is not None:
        if config is not None or overrides:
            raise ValueError("calibration= is the accelerated run's config (its schedule and fitted weights): pass "
                             "config=None and no overrides with it")
        cal = read_calibration(calibration, num_inference_steps)  # file and step count, before loading the model
    if baseline and config is None and cal is None:
        raise ValueError("baseline=True compares against an accelerated call: give a config or a calibration (None "
                         "is the baseline)")
    device = resolve_device(device)
    check_out_dir(out_dir)
    pipe = load_pipeline(model, device, dtype)
    layout = None
    if context_parallel is not None:  # joins the torchrun job; refuses what cannot run before any call
        from .distributed.commands import shard_pipeline

        layout = shard_pipeline(pipe, context_parallel, device)
        if layout.replicas != 1:
            raise ValueError(f"generate makes one set of images: run it on exactly {context_parallel.degree} "
                             f"processes (--context-parallel {context_parallel.degree}), got {layout.world_size}")
    run_config: TaylorSeerConfig | CacheConfig | None
    reason: str | None = None
    if cal is not None:  # another model or guidance scale: refused here, before any pipeline call
        run_config, guidance_scale = _calibrated_config(pipe, cal, guidance_scale)
    else:
        run_config, reason = _resolve_config(pipe, config, overrides or {})
    check_supported(pipe, run_config)
    call = call_arguments(pipe, prompt, per_prompt=num_images, guidance_scale=guidance_scale)
    compared = None
    if baseline:  # one-time costs (allocator, kernels, caches) go to an untimed short call, not to either run
        pipe.set_progress_bar_config(disable=not progress, desc="warm-up (untimed)")
        _timed_call(pipe, call, seed, device, min(WARMUP_STEPS, num_inference_steps))
        compared = _run(pipe, call, None, seed, device, num_inference_steps, False, progress)
    kind, arrays, seconds, stats = _run(pipe, call, run_config, seed, device, num_inference_steps, measure_flops,
                                        progress)
    if layout is not None and layout.rank != 0:  # every rank holds the gathered images; rank 0 writes them
        return {"rank": layout.rank, "seconds": seconds, "stats": stats}
    out, run = Path(out_dir).expanduser(), next_run_number(out_dir)
    facts: dict[str, Any] = {
        "model": model, "pipeline": type(pipe).__name__, "transformer": type(pipe.transformer).__name__,
        "device": device, "dtype": dtype, "prompt": prompt, "num_images": num_images, "guidance_scale": guidance_scale,
        "config": run_config.to_dict() if run_config is not None else None, "preset_reason": reason,
        "calibration": _calibration_facts(cal),
        "num_inference_steps": num_inference_steps, "seed": seed, "run": run, "taylorseer_version": __version__,
        "torch_version": torch.__version__, "baseline": None, "speedup": None, "psnr_db": None, "psnr_note": None,
        "context_parallel": None if layout is None else layout.cp.to_dict(),
    }
    if compared is not None:
        facts["baseline"] = {"images": _save(compared[0], compared[1], out, f"{run:03d}-baseline"),
                             "seconds": compared[2]}
        facts["speedup"] = compared[2] / seconds
        facts["psnr_db"], facts["psnr_note"] = _psnr(arrays, compared[1])
    stem = f"{run:03d}-{'taylorseer' if run_config is not None else 'baseline'}"
    facts.update(images=_save(kind, arrays, out, stem), seconds=seconds, stats=stats)
    facts["record"] = _write_record(out, run, facts)
    return facts
