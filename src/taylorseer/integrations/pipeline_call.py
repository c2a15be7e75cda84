"""Calling a diffusers pipeline, once for every command: load it, build a call's arguments from prompts or class
labels, read its output.

``taylorseer generate``, ``calibrate --model`` and ``sample --model`` run pipelines the same way:

- ``load_pipeline(model, device, dtype)``: ``DiffusionPipeline.from_pretrained`` of a local folder or a hub id
  (or a built-in model by name, ``taylorseer.distributed.flux.BUILTIN_MODELS``) with one-line errors;
- ``check_supported(pipe, config)``: a pipeline taylorseer can accelerate (a transformer with an adapter, or a
  config that names its modules or works on the output);
- ``call_arguments(pipe, prompts, per_prompt=, guidance_scale=)``: the keyword arguments of one call, for a text
  pipeline (``prompt``, ``num_images_per_prompt``) or a class-conditional one (``class_labels``, from ids or the
  pipeline's label names, ``class_labels(pipe, "cat, 207")``);
- ``output_arrays(result)``: the images (``[N, H, W, C]``) or video frames (``[N, F, H, W, C]``) of a call as float
  arrays in [0, 1].

The shipped flow-matching reference builds its own call (prompt embeddings of its class table):
``taylorseer.models.flux_pipeline.class_call``.

Example:
    >>> pipe = load_pipeline("facebook/DiT-XL-2-256", "cuda", "float16")                  # doctest: +SKIP
    >>> call = call_arguments(pipe, "golden retriever, 207", per_prompt=2, guidance_scale=4.0)  # doctest: +SKIP
    >>> call                                                                                  # doctest: +SKIP
    {'class_labels': [207, 207, 207, 207], 'guidance_scale': 4.0}
    >>> kind, images = output_arrays(pipe(num_inference_steps=50, output_type="np", **call))   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters.registry import find_adapter, registered_adapters
from ..devices import WEIGHT_DTYPES, check_device, torch_dtype
from ..parts import parts_of
from .pipeline import check_pipeline

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face Hub id, owner/name
PER_PROMPT = ("num_images_per_prompt", "num_videos_per_prompt")  # how pipelines take a count per prompt


def is_hub_id(model: str) -> bool:
    """Whether ``model`` reads as a Hugging Face Hub id (``owner/name``), not a path.

    Example:
        >>> is_hub_id("facebook/DiT-XL-2-256"), is_hub_id("./folder/model")
        (True, False)
    """
    return bool(HUB_ID.fullmatch(model)) and not model.startswith((".", "/", "~"))


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type name if it has none)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' info/warning logs off while loading (the caller prints what matters)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


#################################################################################
#                                    Loading                                    #
#################################################################################

def load_pipeline(model: str, device: str = "cpu", dtype: str | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained(model)`` on ``device`` with one-line errors.

    ``model`` is a local pipeline folder (with ``model_index.json``), a Hugging Face Hub id ``owner/name`` or a
    built-in model's name. ``dtype`` is one of ``float32``, ``float16``, ``bfloat16`` (None: as saved); ``device``
    one of ``DEVICES``. Raises ``FileNotFoundError`` (no such folder / not a pipeline folder / not loadable from
    the hub) or ``ValueError`` (bad dtype or device, or the pipeline cannot be built, e.g. a missing optional
    dependency).

    Example:
        >>> pipe = load_pipeline("flux-tiny-random")
        >>> type(pipe).__name__
        'ClassFluxPipeline'
    """
    from diffusers import DiffusionPipeline

    from ..distributed.flux import build_model, is_builtin  # the built-in models, built only when named

    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {list(WEIGHT_DTYPES)} or None, got {dtype!r}")
    check_device(device)
    if is_builtin(model):  # a model built from a config by name (taylorseer.distributed.flux.BUILTIN_MODELS)
        if dtype not in (None, "float32"):
            raise ValueError(f"model {model!r} runs in float32, got dtype {dtype!r}")
        return build_model(model).to(device)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"model {model!r} is not a diffusers pipeline folder (no model_index.json)")
        source = str(path)
    elif is_hub_id(model):
        source = model
    else:
        raise FileNotFoundError(f"model {model!r} is neither an existing folder nor a Hugging Face Hub id "
                                f"(owner/name)")
    kwargs = {"torch_dtype": torch_dtype(dtype)} if dtype else {}
    try:
        with quiet_diffusers():
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as error:  # hub: not found, not cached, offline; disk: unreadable files
        raise FileNotFoundError(f"could not load model {model!r}: {one_line(error)}") from None
    except (ImportError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"could not build the pipeline of {model!r}: {one_line(error)}") from None
    return pipe.to(device)


def check_supported(pipe: Any, config: Any = None) -> None:
    """Refuse (``ValueError``, one line) a pipeline taylorseer cannot accelerate with ``config`` (a
    ``TaylorSeerConfig``, a ``CacheConfig`` or None): no transformer or scheduler, or a transformer without an
    adapter while the config names no modules and does not work on the model output."""
    try:
        check_pipeline(pipe)
    except ValueError as error:
        raise ValueError(f"unsupported model: {error}") from None
    if find_adapter(pipe.transformer) is not None:
        return
    where = None if config is None else parts_of(config).targets  # the config's Targets part
    if not (where and (where.modules or where.granularity == "output")):
        raise ValueError(f"unsupported model: no taylorseer adapter for {type(pipe.transformer).__name__}; supported "
                         f"transformers: {sorted(registered_adapters())} (or pass modules=... / granularity='output')")


#################################################################################
#                       What a pipeline is called with                          #
#################################################################################

def parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    """The parameters of ``pipe.__call__`` by name."""
    return dict(inspect.signature(pipe.__call__).parameters)


def is_class_conditional(pipe: Any) -> bool:
    """True for a pipeline called with ``class_labels`` (DiT) rather than a text ``prompt``."""
    return "class_labels" in parameters(pipe)


def default_guidance(pipe: Any) -> float:
    """The guidance scale the pipeline uses when given none (its ``guidance_scale`` default; 1.0 without one)."""
    parameter = parameters(pipe).get("guidance_scale")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else 1.0


def class_labels(pipe: Any, prompt: str | None) -> list[int]:
    """Class ids from a prompt of a class-conditional pipeline: comma-separated integers or label names
    (``pipe.labels``); None or blank: class 0. ``ValueError`` for an id out of range or an unknown name.

    Example:
        >>> class_labels(dit_pipe, "207, golden retriever")         # doctest: +SKIP
        [207, 207]
    """
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


def resolve_prompts(pipe: Any, prompts: Sequence[str | int]) -> list[Any]:
    """A list of prompts as the pipeline takes them: text prompts as they are, or for a class-conditional
    pipeline class ids (each entry an id, a label name of ``pipe.labels``, or several of them comma-separated, as
    ``taylorseer generate --prompt`` reads them). ``ValueError`` for an empty list or an unknown class.

    Example:
        >>> resolve_prompts(dit_pipe, ["0, 1", "cat"])      # doctest: +SKIP
        [0, 1, 3]
    """
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of prompts (class ids for class-conditional "
                         f"pipelines), got {prompts!r}")
    if is_class_conditional(pipe):
        items: list[Any] = []
        for prompt in prompts:
            items += [int(prompt)] if isinstance(prompt, int) else class_labels(pipe, str(prompt))
        return items
    if "prompt" not in parameters(pipe):
        raise ValueError(f"{type(pipe).__name__}.__call__ takes neither prompt nor class_labels")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"text prompts must be non-empty strings, got {bad!r}")
    return [str(p) for p in prompts]


def call_arguments(pipe: Any, prompts: str | Sequence[str] | Sequence[int] | None, *, per_prompt: int = 1,
                   guidance_scale: float | None = None) -> dict[str, Any]:
    """The keyword arguments of one call of ``pipe`` (all but the steps, generator and output type).

    A class-conditional pipeline (``class_labels``) takes ``prompts`` as class ids, or as one string of ids and
    label names (``class_labels``): ``class_labels`` is that list repeated ``per_prompt`` times. A text pipeline
    takes ``prompts`` (a string or a list of strings; required) as ``prompt`` and ``per_prompt`` as its
    ``num_images_per_prompt`` (or ``num_videos_per_prompt``). ``guidance_scale``: None leaves the pipeline's
    default; a pipeline without one refuses a scale. ``ValueError`` (one line) for what the pipeline cannot take.

    Example:
        >>> call_arguments(pixart_pipe, "a red fox", per_prompt=2)       # doctest: +SKIP
        {'prompt': 'a red fox', 'num_images_per_prompt': 2}
    """
    params = parameters(pipe)
    if "class_labels" in params:  # DiT: class-conditional
        ids: list[Any] = class_labels(pipe, prompts) if prompts is None or isinstance(prompts, str) else list(prompts)
        kwargs: dict[str, Any] = {"class_labels": ids * per_prompt}
    elif "prompt" in params:
        if not prompts:
            raise ValueError(f"{type(pipe).__name__} needs a text prompt (--prompt)")
        kwargs = {"prompt": prompts}
        per = next((name for name in PER_PROMPT if name in params), None)
        if per is not None:
            kwargs[per] = per_prompt
    else:
        raise ValueError(f"unsupported model: {type(pipe).__name__}.__call__ takes neither prompt nor class_labels")
    if guidance_scale is not None:
        if "guidance_scale" not in params:
            raise ValueError(f"{type(pipe).__name__} takes no guidance_scale")
        kwargs["guidance_scale"] = guidance_scale
    return kwargs


#################################################################################
#                               What a call returns                             #
#################################################################################

def output_arrays(result: Any) -> tuple[str, np.ndarray]:
    """``("images", [N, H, W, C])`` or ``("frames", [N, F, H, W, C])`` float32 arrays in [0, 1] of a pipeline
    output (numpy, tensors, PIL images or lists of frames); ``ValueError`` for an output with neither.

    Example:
        >>> output_arrays(pipe(class_labels=[0], output_type="np"))[1].shape      # doctest: +SKIP
        (1, 256, 256, 3)
    """
    for kind in ("images", "frames"):
        value = getattr(result, kind, None)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.float().cpu().numpy()
        elif not isinstance(value, np.ndarray):  # PIL images, or lists of frames
            value = np.stack([np.stack([np.asarray(f) for f in v]) if kind == "frames" else np.asarray(v)
                              for v in value]).astype(np.float32) / 255.0
        if value.ndim == (5 if kind == "frames" else 4) - 1 and value.shape[-1] not in (1, 3, 4):
            value = value[..., None]  # grayscale without a channel axis
        return kind, np.clip(value.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"unsupported model: its output {type(result).__name__} has neither images nor frames")


def output_tensor(result: Any) -> torch.Tensor:
    """The images (or frames) of a pipeline output as a float tensor in [-1, 1], channels first: ``[N, C, H, W]``
    (videos ``[N, F, C, H, W]``).

    Example:
        >>> output_tensor(pipe(class_labels=[0], output_type="np")).shape        # doctest: +SKIP
        torch.Size([1, 3, 256, 256])
    """
    _, arrays = output_arrays(result)
    return torch.from_numpy(arrays).movedim(-1, -3) * 2 - 1
