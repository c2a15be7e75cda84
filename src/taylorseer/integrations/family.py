"""Which family a model is, from its config files alone (no weights loaded): its transformer class, where that name
was read, and the adapter record (and so the preset) registered for it.

``family_of`` takes a registered transformer class name, a local model or pipeline folder, or a hub id (needs
internet); ``taylorseer plan --model`` prints it, ``taylorseer generate`` runs its preset.

Example:
    >>> family_of("FluxTransformer2DModel").preset
    'paper_flux'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.registry import AdapterSpec, registered_adapters
from .pipeline_call import is_hub_id, one_line


@dataclass(frozen=True)
class ModelFamily:
    """A model's transformer class, where that name was read, and the adapter record registered for it.

    Example:
        >>> family = family_of("FluxTransformer2DModel")
        >>> family.preset, family.reason
        ('paper_flux', "the paper's FLUX.1-dev setting (W=3, N=6, O=1)")
    """

    class_name: str
    source: str  # "class name", a config file's path, or "hub owner/name: model_index.json"
    adapter: AdapterSpec

    @property
    def preset(self) -> str:
        """The preset recommended for the family ('' if the record names none)."""
        return self.adapter.preset

    @property
    def reason(self) -> str:
        """Why that preset (see ``preset_reason``)."""
        return preset_reason(self.adapter)


def preset_reason(spec: AdapterSpec) -> str:
    """Why a family has its preset: the adapter record's notes without their ``preset:`` label.

    Example:
        >>> preset_reason(registered_adapters()["DiTTransformer2DModel"])
        "the paper's DiT-XL/2 setting (W=2, N=4, O=4)"
    """
    notes = spec.notes.strip()
    return notes[len("preset:"):].strip() if notes.startswith("preset:") else notes


def _adapter_named(class_name: str) -> AdapterSpec | None:
    """The record registered for a class name, or for the nearest registered base of the diffusers class so named."""
    registry = registered_adapters()
    if class_name in registry:
        return registry[class_name]
    try:
        import diffusers

        cls = getattr(diffusers, class_name, None)
    except Exception:  # a lazily imported diffusers class with a missing optional dependency
        cls = None
    if isinstance(cls, type):
        return next((registry[base.__name__] for base in cls.__mro__ if base.__name__ in registry), None)
    return None


def _class_from_config(data: Any, source: str) -> str:
    """The transformer class named by a parsed ``model_index.json`` (a pipeline) or ``config.json`` (a model)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} holds no JSON object")
    if source.endswith("model_index.json"):
        entry = data.get("transformer")
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str)):
            kind = "a UNet pipeline (taylorseer targets diffusion transformers)" if "unet" in data else \
                "a pipeline without a transformer"
            raise ValueError(f"{source} describes {data.get('_class_name', 'a pipeline')}, {kind}")
        return entry[1]
    if not isinstance(data.get("_class_name"), str):
        raise ValueError(f"{source} names no _class_name: not a diffusers model config")
    return data["_class_name"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {str(path)!r}: {one_line(error)}") from None


def _local_class(folder: Path) -> tuple[str, str]:
    for name in ("model_index.json", "config.json", "transformer/config.json"):
        if (folder / name).is_file():
            source = str(folder / name)
            return _class_from_config(_read_json(folder / name), source), source
    raise FileNotFoundError(f"model {str(folder)!r} is not a diffusers model or pipeline folder (no model_index.json, "
                            f"config.json or transformer/config.json)")


def _hub_class(repo: str) -> tuple[str, str]:
    """The class read from a hub repo's ``model_index.json`` or ``config.json``: the local cache first, then the
    hub (needs internet; offline this fails after huggingface_hub's retries, or at once with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    error: BaseException | None = None
    for local_only in (True, False):
        for name in ("model_index.json", "config.json"):
            try:
                path = hf_hub_download(repo, name, local_files_only=local_only)
            except LocalEntryNotFoundError as missing:  # not cached (or offline): try the next way
                error = missing
                continue
            except EntryNotFoundError:  # the repo has no such file: try the next file
                continue
            except Exception as failed:  # repo not found, gated, network: nothing more to try
                error = failed
                break
            return _class_from_config(_read_json(Path(path)), f"hub {repo}: {name}"), f"hub {repo}: {name}"
    why = one_line(error) if error is not None else "it has neither model_index.json nor config.json"
    raise FileNotFoundError(f"could not read the config of hub model {repo!r} ({why}); offline, a local path is "
                            f"needed: the folder of the saved pipeline or model, or its transformer class name")


def family_of(model: str) -> ModelFamily:
    """The family of ``model``: a registered transformer class name (``FluxTransformer2DModel``), a local diffusers
    pipeline or model folder (its ``model_index.json``, ``config.json`` or ``transformer/config.json`` is read for
    the class; no weights are loaded), or a Hugging Face Hub id (its config is downloaded: needs internet).

    Raises ``FileNotFoundError`` (no such folder, no config there, hub config unreadable) or ``ValueError`` (a
    model without a transformer, or a transformer class with no taylorseer adapter), each one line.

    Example:
        >>> family_of("WanTransformer3DModel").preset
        'paper_wan'
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a class name, a folder or a hub id, got {model!r}")
    path = Path(model).expanduser()
    if model.isidentifier() and not path.exists():
        class_name, source = model, "class name"
    elif path.is_dir():
        class_name, source = _local_class(path)
    elif path.exists():
        raise ValueError(f"model {model!r} is a file; a model or pipeline folder (or a class name) is expected")
    elif is_hub_id(model):
        class_name, source = _hub_class(model)
    else:
        raise FileNotFoundError(f"model {model!r} is neither a transformer class name, an existing folder nor a "
                                f"Hugging Face Hub id (owner/name)")
    spec = _adapter_named(class_name)
    if spec is None and source == "class name":
        raise ValueError(f"model {model!r} is neither a registered transformer class name nor an existing folder "
                         f"nor a Hugging Face Hub id (owner/name); registered classes: {sorted(registered_adapters())}")
    if spec is None:
        raise ValueError(f"{class_name} (read from {source}) has no taylorseer adapter; registered transformer "
                         f"classes: {sorted(registered_adapters())}")
    return ModelFamily(class_name, source, spec)

