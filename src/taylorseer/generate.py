"""Generate with a diffusers pipeline (hub id or local folder), accelerated by taylorseer: the function behind
``taylorseer generate``.

Loads ``DiffusionPipeline.from_pretrained(model)``, applies the config to the pipeline (the scheduler tells the
steps), runs one call, saves the images (PNG; videos as GIF) and returns the run's facts as a JSON-ready dict.
Every failure the user can cause (bad path, unknown hub id, unsupported model, unknown or out-of-range class label,
malformed or unavailable device, an output folder that is an existing file) raises ``FileNotFoundError`` or
``ValueError`` with a one-line message; the arguments are checked before the pipeline is loaded.

Example:
    >>> stats = generate("facebook/DiT-XL-2-256", "golden retriever", preset("paper_dit"),
    ...                  num_inference_steps=50, seed=0, out_dir="out")                    # doctest: +SKIP
    >>> stats["images"], stats["stats"]["steps_forecast"]                                  # doctest: +SKIP
    (['out/000.png'], 36)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .adapters.registry import find_adapter, registered_adapters
from .api import apply
from .config import TaylorSeerConfig, preset  # noqa: F401  (preset: docstring example)
from .integrations.pipeline import check_pipeline

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d+|mps")
DEVICES = "cpu, cuda, cuda:N, mps"


def check_device(device: str) -> None:
    """Refuse, with one line naming the allowed devices, a ``device`` that is malformed or not available here.

    Allowed: ``cpu``, ``cuda``, ``cuda:N`` (N < the number of visible CUDA devices), ``mps``.

    Example:
        >>> check_device("cpu")
    """
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {device!r} is not available: no CUDA device visible (torch {torch.__version__}, "
                             f"{build}); allowed here: cpu")
        if ":" in device and int(device.split(":")[1]) >= count:
            raise ValueError(f"device {device!r} is not available: {count} CUDA device(s) visible, allowed: cpu, "
                             f"cuda, cuda:0..cuda:{count - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available here (torch.backends.mps.is_available() is False); "
                         "allowed here: cpu" + (", cuda" if torch.cuda.is_available() else ""))


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


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' info/warning logs off while loading (the caller prints what matters)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_pipeline(model: str, device: str = "cpu", dtype: str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained(model)`` on ``device`` with one-line errors.

    ``model`` is a local pipeline folder (with ``model_index.json``) or a Hugging Face Hub id ``owner/name``.
    ``dtype`` is one of ``float32``, ``float16``, ``bfloat16`` (None: as saved); ``device`` one of ``DEVICES``.
    Raises ``FileNotFoundError`` (no such folder / not a pipeline folder / not loadable from the hub) or
    ``ValueError`` (bad dtype or device, or the pipeline cannot be built, e.g. a missing optional dependency).
    """
    from diffusers import DiffusionPipeline

    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)} or None, got {dtype!r}")
    check_device(device)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"model {model!r} is not a diffusers pipeline folder (no model_index.json)")
        source = str(path)
    elif _HUB_ID.fullmatch(model) and not model.startswith((".", "/", "~")):
        source = model
    else:
        raise FileNotFoundError(f"model {model!r} is neither an existing folder nor a Hugging Face Hub id "
                                f"(owner/name)")
    kwargs = {"torch_dtype": _DTYPES[dtype]} if dtype else {}
    try:
        with _quiet_diffusers():
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as error:  # hub: not found, not cached, offline; disk: unreadable files
        raise FileNotFoundError(f"could not load model {model!r}: {_one_line(error)}") from None
    except (ImportError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"could not build the pipeline of {model!r}: {_one_line(error)}") from None
    return pipe.to(device)


def _supported(pipe: Any, config: TaylorSeerConfig | None) -> None:
    try:
        check_pipeline(pipe)
    except ValueError as error:
        raise ValueError(f"unsupported model: {error}") from None
    if find_adapter(pipe.transformer) is None and not (config and (config.modules or config.granularity == "output")):
        raise ValueError(f"unsupported model: no taylorseer adapter for {type(pipe.transformer).__name__}; supported "
                         f"transformers: {sorted(registered_adapters())} (or pass modules=... / granularity='output')")


def _class_labels(pipe: Any, prompt: str | None) -> list[int]:
    """Class ids from a prompt: comma-separated integers or label names (``pipe.labels``); None: class 0."""
    if prompt is None or not prompt.strip():
        return [0]
    labels = []
    num_classes = getattr(getattr(pipe.transformer, "config", None), "num_embeds_ada_norm", None)
    for item in (part.strip() for part in prompt.split(",")):
        if item.isdigit():
            if isinstance(num_classes, int) and int(item) >= num_classes:
                raise ValueError(f"class id {item} is out of range: {type(pipe.transformer).__name__} has classes "
                                 f"0-{num_classes - 1}")
            labels.append(int(item))
        elif item in getattr(pipe, "labels", {}):
            labels.append(pipe.labels[item])
        else:
            known = sorted(getattr(pipe, "labels", {}))
            raise ValueError(f"unknown class label {item!r}: pass a class id or one of {known[:8]}"
                             + (f" (+{len(known) - 8} more)" if len(known) > 8 else ""))
    return labels


def _call_arguments(pipe: Any, prompt: str | None, num_images: int, guidance_scale: float | None) -> dict:
    parameters = inspect.signature(pipe.__call__).parameters
    if "class_labels" in parameters:  # DiT: class-conditional
        kwargs: dict[str, Any] = {"class_labels": _class_labels(pipe, prompt) * num_images}
    elif "prompt" in parameters:
        if not prompt:
            raise ValueError(f"{type(pipe).__name__} needs a text prompt (--prompt)")
        kwargs = {"prompt": prompt}
        if "num_images_per_prompt" in parameters:
            kwargs["num_images_per_prompt"] = num_images
        elif "num_videos_per_prompt" in parameters:
            kwargs["num_videos_per_prompt"] = num_images
    else:
        raise ValueError(f"unsupported model: {type(pipe).__name__}.__call__ takes neither prompt nor class_labels")
    if guidance_scale is not None:
        if "guidance_scale" not in parameters:
            raise ValueError(f"{type(pipe).__name__} takes no guidance_scale")
        kwargs["guidance_scale"] = guidance_scale
    return kwargs


def _save(result: Any, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if getattr(result, "images", None) is not None:
        for i, image in enumerate(result.images):
            paths.append(out_dir / f"{i:03d}.png")
            image.save(paths[-1])
    elif getattr(result, "frames", None) is not None:
        for i, frames in enumerate(result.frames):
            paths.append(out_dir / f"{i:03d}.gif")
            frames[0].save(paths[-1], save_all=True, append_images=list(frames[1:]), duration=125, loop=0)
    else:
        raise ValueError(f"unsupported model: its output {type(result).__name__} has neither images nor frames")
    return [str(p) for p in paths]


def generate(
    model: str,
    prompt: str | None,
    config: TaylorSeerConfig | None,
    num_inference_steps: int = 50,
    seed: int = 0,
    out_dir: str | Path = "out",
    *,
    num_images: int = 1,
    guidance_scale: float | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    measure_flops: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate ``num_images`` images with ``model`` and save them to ``out_dir``; return the run's facts.

    ``model``: hub id or local pipeline folder. ``prompt``: the text prompt, or for class-conditional DiT
    pipelines comma-separated class ids or label names (None: class 0). ``config``: the taylorseer config
    (None: no acceleration, the baseline). ``num_inference_steps``: denoising steps; ``seed``: the generator seed;
    ``guidance_scale``: None keeps the pipeline's default. ``measure_flops`` (with a config) counts executed and
    skipped FLOPs into the stats (slower).
    Returns ``{"model", "pipeline", "transformer", "config", "num_inference_steps", "seed", "images", "seconds",
    "stats"}``: ``images`` the saved paths, ``seconds`` the wall time of the pipeline call, ``stats`` the handle's
    stats (None without a config).
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if config is not None and not isinstance(config, TaylorSeerConfig):
        raise TypeError(f"config must be a TaylorSeerConfig or None, got {type(config).__name__}")
    check_device(device)
    check_out_dir(out_dir)
    pipe = load_pipeline(model, device, dtype)
    _supported(pipe, config)
    kwargs = _call_arguments(pipe, prompt, num_images, guidance_scale)
    pipe.set_progress_bar_config(disable=not progress)
    generator = torch.Generator(device).manual_seed(seed)
    handle = apply(pipe, config) if config is not None else None
    try:
        flops = handle.count_flops() if handle is not None and measure_flops else contextlib.nullcontext()
        start = time.perf_counter()
        with flops:
            result = pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="pil", **kwargs)
        seconds = time.perf_counter() - start
        stats = handle.stats.to_dict() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    return {
        "model": model,
        "pipeline": type(pipe).__name__,
        "transformer": type(pipe.transformer).__name__,
        "config": config.to_dict() if config is not None else None,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "images": _save(result, Path(out_dir)),
        "seconds": seconds,
        "stats": stats,
    }
