"""A class-conditional FLUX pipeline for the commands: diffusers' unmodified ``FluxPipeline`` around a
``FluxTransformer2DModel`` of the flow-matching reference's architecture, called like ``DiTPipeline``.

``ClassFluxPipeline(transformer, prompts)`` takes ``class_labels`` (ids 0-9) instead of a text prompt: each id is
a row of a learned "prompt embedding" table (``models.flux_reference.ClassPrompts``), the null class 10 is the
negative prompt of true classifier-free guidance (``guidance_scale`` > 1: two transformer calls per step), the
noise is drawn per sample from the caller's generators (one CPU ``torch.Generator`` per sample, as ``taylorseer
sample`` gives them) and packed into FLUX's 2x2 token layout, and the output is ``[N, 16, 16, 1]`` images in
[0, 1] (``output_type="np"``) or ``[N, 1, 16, 16]`` tensors in [-1, 1] (``"pt"``). No VAE, no text encoder.

The model is a parameter: ``BUILTIN_MODELS`` maps a name to a builder, and ``taylorseer generate --model NAME`` /
``taylorseer sample --model NAME`` accept these names next to pipeline folders and hub ids. Today they are
the trained reference and random-weight models built from configs (seeded, so every process builds the same
weights):

- ``flux-tiny-random``: 1 double + 2 single blocks, hidden 64 = 4 heads x 16 (Ulysses degrees 2 and 4 divide
  the heads; the reference's ``Flux-FM-T-16`` has 1 head and ``Flux-FM-12-16`` 3, so Ulysses cannot shard them
  at degree 2 or 4);
- ``flux-fm-12-16-random``: the reference's ``Flux-FM-12-16`` size (2 double + 10 single, 3 heads).

- ``flux``: the shipped, trained reference (``Flux-FM-12-16``, docs/model_card_flux.md).

Example:
    >>> pipe = build_model("flux-tiny-random")
    >>> out = pipe(class_labels=[3, 5], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    >>> out.images.shape
    (2, 16, 16, 1)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..models.flux_pipeline import class_call, flux_pipeline
from ..models.flux_reference import (
    FLUX_MODELS,
    IMAGE_SIZE,
    NUM_CLASSES,
    ClassPrompts,
    unpack,
)

PIPELINE_SIZE = IMAGE_SIZE * 8  # FluxPipeline assumes an 8x VAE: 128 "pixels" are a 16x16 latent
WEIGHT_SEED = 0  # random-weight models: every process builds the same weights from this seed


class ClassFluxPipeline:
    """A ``FluxPipeline`` (``self.flux``) driven by class ids (DiT-style call); see the module docstring.
    ``transformer`` and ``scheduler`` are the ``FluxPipeline``'s own, so ``taylorseer.apply(pipe)`` hooks them."""

    def __init__(self, transformer: FluxTransformer2DModel, prompts: ClassPrompts, name: str = "") -> None:
        self.flux = flux_pipeline(transformer)
        self.prompts = prompts
        self.model_name = name

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.flux.transformer

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.flux.scheduler

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.flux.set_progress_bar_config(**kwargs)

    def to(self, device: str | torch.device) -> ClassFluxPipeline:
        """Move the transformer and the prompt table to ``device``; returns ``self``."""
        self.flux.to(device)
        self.prompts.to(device)
        return self

    def weights_sha256(self) -> str:
        """One SHA-256 over the transformer's and the prompt table's tensors (names, shapes, float32 bytes)."""
        digest = hashlib.sha256()
        for prefix, module in (("transformer.", self.transformer), ("prompts.", self.prompts)):
            for key, value in sorted(module.state_dict().items()):
                digest.update(f"{prefix}{key}{tuple(value.shape)}".encode())
                digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 28,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> Any:
        """Images for class ids ``[N]`` (0-9) after ``num_inference_steps`` Euler steps; true CFG at
        ``guidance_scale`` > 1 (1: one call per step). ``generator``: one per sample or one for all (None: the
        global RNG). ``output_type``: ``"np"`` ([N, 16, 16, 1] in [0, 1]) or ``"pt"`` ([N, 1, 16, 16] in [-1, 1])."""
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
            raise ValueError(f"class_labels must be class ids in 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        shape = (1, IMAGE_SIZE, IMAGE_SIZE)
        if isinstance(generator, list):
            if len(generator) != len(labels):
                raise ValueError(f"{len(generator)} generators for {len(labels)} class labels: give one per sample")
            noise = torch.stack([torch.randn(shape, generator=g) for g in generator])
        else:
            noise = torch.randn((len(labels), *shape), generator=generator)
        call = class_call(self.prompts, labels, noise, num_steps=num_inference_steps, guidance_scale=guidance_scale,
                          device=self.transformer.device)
        tokens = self.flux(**call)[0]
        images = unpack(tokens.float().cpu()).clamp(-1, 1)  # [N, 1, 16, 16]
        result: Any = images if output_type == "pt" else ((images.permute(0, 2, 3, 1) + 1) / 2).numpy()
        if output_type == "np":
            result = np.clip(result, 0.0, 1.0).astype(np.float32)
        return ImagePipelineOutput(images=result) if return_dict else (result,)


#################################################################################
#                         Models by name (random weights today)                 #
#################################################################################

def tiny_cp_config() -> dict:
    """``Flux-FM-T-16`` widened to 4 heads x 16 (hidden 64; RoPE axes 4, 6, 6) so that Ulysses degrees 2 and 4
    divide its heads; 1 double + 2 single blocks."""
    return {**FLUX_MODELS["Flux-FM-T-16"](), "num_attention_heads": 4, "attention_head_dim": 16,
            "axes_dims_rope": (4, 6, 6)}


def _random(config: Callable[[], dict], prompt_size: str, name: str) -> Callable[[], ClassFluxPipeline]:
    def build() -> ClassFluxPipeline:
        torch.manual_seed(WEIGHT_SEED)
        transformer = FluxTransformer2DModel(**config()).eval().requires_grad_(False)
        prompts = ClassPrompts(prompt_size).eval().requires_grad_(False)
        return ClassFluxPipeline(transformer, prompts, name)

    return build


def _trained() -> ClassFluxPipeline:
    """The shipped, trained flow-matching reference (``models.flux_pipeline.load_flux_reference``, checksummed)."""
    from ..models.flux_pipeline import load_flux_reference

    ref = load_flux_reference()
    return ClassFluxPipeline(ref.transformer, ref.prompts, "flux")


BUILTIN_MODELS: dict[str, Callable[[], ClassFluxPipeline]] = {
    "flux": _trained,
    "flux-tiny-random": _random(tiny_cp_config, "Flux-FM-T-16", "flux-tiny-random"),
    "flux-fm-12-16-random": _random(FLUX_MODELS["Flux-FM-12-16"], "Flux-FM-12-16", "flux-fm-12-16-random"),
}


def is_builtin(model: Any) -> bool:
    """Whether ``model`` names a model of ``BUILTIN_MODELS`` (rather than a pipeline folder or hub id)."""
    return isinstance(model, str) and model in BUILTIN_MODELS


def build_model(name: str) -> ClassFluxPipeline:
    """The pipeline of a ``BUILTIN_MODELS`` name, on CPU in float32; ``ValueError`` naming the known names."""
    if not is_builtin(name):
        raise ValueError(f"model must be one of {sorted(BUILTIN_MODELS)}, got {name!r}")
    return BUILTIN_MODELS[name]()
