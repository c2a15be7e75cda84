"""The shipped flow-matching reference, driven by diffusers' own ``FluxPipeline`` (no text encoders, no VAE).

``load_flux_reference()`` builds a ``FluxReference``: diffusers' unmodified ``FluxPipeline`` around the trained
``FluxTransformer2DModel`` and FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` configuration, plus the learned
class-prompt table. Generating passes the class rows as ``prompt_embeds`` / ``pooled_prompt_embeds`` and the null
class as the negative prompt with ``true_cfg_scale``, so classifier-free guidance is two transformer calls per step
inside the pipeline's own ``cache_context("cond"/"uncond")``; ``output_type="latent"`` returns the packed tokens,
which unpack to ``[N, 1, 16, 16]`` images in [-1, 1]. Caching reaches it as users do: ``taylorseer.apply(ref.pipe)``
or ``taylorseer.apply(ref.pipe.transformer)``.

Example:
    >>> ref = load_flux_reference()                                    # doctest: +SKIP
    >>> images = ref.generate(torch.arange(10), num_steps=28, seed=0)  # doctest: +SKIP
    >>> images.shape                                                   # doctest: +SKIP
    torch.Size([10, 1, 16, 16])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from .checkpoint import ASSETS_DIR, CheckpointError, file_sha256, load_tensors, manifest_sha256, save_tensors
from .checkpoint import update_manifest as _update_manifest
from .flux_reference import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, SCHEDULER_CONFIG, ClassPrompts, pack, unpack

FLUX_FILE = "flux_fmnist.safetensors"
FLUX_PATH = ASSETS_DIR / FLUX_FILE
PIPELINE_SIZE = IMAGE_SIZE * 8   # FluxPipeline assumes an 8x VAE: height = width = 128 -> a 16x16 "latent"
DEFAULT_STEPS = 28               # FLUX.1-dev's default
DEFAULT_GUIDANCE = 2.0           # true CFG scale chosen on the trained model (docs/model_card_flux.md)


def export_flux_reference(state_path: str | os.PathLike, out_path: str | os.PathLike = FLUX_PATH,
                          dtype: torch.dtype = torch.float16, notes: dict | None = None,
                          update_manifest: bool = True) -> Path:
    """Write the EMA weights (transformer + class prompts) of a training state as ``dtype`` safetensors, the config
    in the header, and record the file's SHA-256 in the assets manifest. Returns the written path."""
    tensors, meta = load_tensors(state_path)
    if meta.get("kind") != "flux":
        raise CheckpointError(f"{state_path} is not a flow-matching reference training state (kind={meta.get('kind')})")
    ema = {k[4:]: v.to(dtype) for k, v in tensors.items() if k.startswith("ema.")}
    header = {"model_config": meta["model_config"], "train_step": meta["step"], "train_config": meta["train_config"],
              "source": "EMA weights", "dtype": str(dtype).replace("torch.", ""), "kind": "flux"}
    save_tensors(out_path, ema, header)
    if update_manifest:
        entry = {"sha256": file_sha256(out_path), "train_step": int(meta["step"]),
                 "train_elapsed_s": float(meta.get("elapsed_s", 0.0)), "dtype": header["dtype"], **(notes or {})}
        _update_manifest(Path(out_path).name, entry)
    return Path(out_path)


def make_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler configuration (Euler, resolution-dependent shift; ``mu`` ~ 0.468 at 64 tokens)."""
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def flux_pipeline(transformer: FluxTransformer2DModel) -> FluxPipeline:
    """diffusers' ``FluxPipeline`` around ``transformer`` with FLUX.1-dev's scheduler, no VAE or text encoders
    (prompts come as embeddings), progress bar off."""
    pipe = FluxPipeline(scheduler=make_flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FluxReference:
    """The trained flow-matching reference: ``pipe`` (a diffusers ``FluxPipeline``), ``prompts`` (class table)."""

    def __init__(self, transformer: FluxTransformer2DModel, prompts: ClassPrompts) -> None:
        self.pipe = flux_pipeline(transformer)
        self.prompts = prompts

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.pipe.transformer

    def call_arguments(self, class_labels: torch.Tensor, *, num_steps: int = DEFAULT_STEPS,
                       guidance_scale: float = DEFAULT_GUIDANCE, noise: torch.Tensor | None = None,
                       seed: int = 0) -> dict[str, Any]:
        """The keyword arguments of one ``FluxPipeline`` call for class ids ``[N]`` (0-9): class prompts, the null
        class as the negative prompt when ``guidance_scale > 1``, the starting noise packed to tokens (``noise``
        ``[N, 1, 16, 16]``, else drawn from ``seed``), 128x128 "pixels" (a 16x16 latent), latent output."""
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.ndim != 1 or labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
            raise ValueError(f"class_labels must be a non-empty 1-D tensor of class ids in 0..{NUM_CLASSES - 1}, "
                             f"got {labels.tolist()}")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")
        if noise is None:
            noise = flux_noise(len(labels), seed)
        if tuple(noise.shape) != (len(labels), 1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"noise must have shape {(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE)}, "
                             f"got {tuple(noise.shape)}")
        return class_call(self.prompts, labels, noise, num_steps=num_steps, guidance_scale=guidance_scale)

    @torch.no_grad()
    def generate(self, class_labels: torch.Tensor, *, num_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[N, 1, 16, 16]`` in [-1, 1] for class ids ``[N]``: one ``FluxPipeline`` call (``num_steps``
        Euler steps; true CFG at ``guidance_scale`` > 1, two transformer calls per step)."""
        call = self.call_arguments(class_labels, num_steps=num_steps, guidance_scale=guidance_scale, noise=noise,
                                   seed=seed)
        tokens = self.pipe(**call)[0]
        return unpack(tokens.float()).clamp(-1, 1)


def class_call(prompts: ClassPrompts, labels: torch.Tensor, noise: torch.Tensor, *, num_steps: int,
               guidance_scale: float, device: torch.device | str | None = None) -> dict[str, Any]:
    """The keyword arguments of one ``FluxPipeline`` call for class ids ``labels`` ``[N]`` (checked by the caller)
    from the starting ``noise`` ``[N, 1, 16, 16]``: the class rows of ``prompts`` as ``prompt_embeds`` /
    ``pooled_prompt_embeds``, the null class as the negative prompt with ``true_cfg_scale`` when
    ``guidance_scale > 1`` (two transformer calls per step), the noise packed to tokens, 128x128 "pixels" (a 16x16
    latent), ``num_steps`` steps, latent output as a tuple. Tensors go to ``device`` (None: where they are).
    Used by ``FluxReference`` and the commands' ``ClassFluxPipeline``.

    Example:
        >>> call = class_call(ref.prompts, torch.tensor([3]), flux_noise(1, 0), num_steps=28, guidance_scale=2.0)
        >>> sorted(call)[:3]                                                   # doctest: +SKIP
        ['height', 'latents', 'negative_pooled_prompt_embeds']
    """
    def on(x: torch.Tensor) -> torch.Tensor:
        return x if device is None else x.to(device)

    with torch.no_grad():
        seq, pooled = prompts(labels)
        call: dict[str, Any] = {"prompt_embeds": on(seq), "pooled_prompt_embeds": on(pooled)}
        if guidance_scale > 1.0:
            null_seq, null_pooled = prompts(torch.full_like(labels, NULL_CLASS))
            call.update(negative_prompt_embeds=on(null_seq), negative_pooled_prompt_embeds=on(null_pooled),
                        true_cfg_scale=float(guidance_scale))
    call.update(latents=on(pack(noise.float())), height=PIPELINE_SIZE, width=PIPELINE_SIZE,
                num_inference_steps=int(num_steps), output_type="latent", return_dict=False)
    return call


def flux_noise(num_images: int, seed: int) -> torch.Tensor:
    """The starting noise ``[N, 1, 16, 16]`` of ``num_images`` images from one seed (float32)."""
    return torch.randn(num_images, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def load_flux_reference(path: str | os.PathLike | None = None, sha256: str | None = None) -> FluxReference:
    """The trained flow-matching reference in float32 (parameters frozen) inside a ``FluxPipeline``.

    With no ``path`` the shipped weights are loaded and checked against the SHA-256 in the assets manifest (a
    corrupted file raises ``CheckpointError``); an explicit ``path`` is checked only when ``sha256`` is given.

    Example:
        >>> ref = load_flux_reference()                 # doctest: +SKIP
        >>> type(ref.pipe).__name__                     # doctest: +SKIP
        'FluxPipeline'
    """
    if path is None:
        if sha256 is not None:
            raise ValueError("sha256 checks an explicit path; the shipped weights are always checked against the "
                             "manifest's SHA-256")
        path, sha256 = FLUX_PATH, manifest_sha256(FLUX_FILE)
    tensors, meta = load_tensors(path, sha256=sha256)
    if meta.get("kind") != "flux" or "model_config" not in meta:
        raise CheckpointError(f"{path} is not a taylorseer flow-matching reference (no kind=flux and model_config)")
    transformer = FluxTransformer2DModel(**json.loads(meta["model_config"]))
    size = json.loads(meta["train_config"]).get("size", "Flux-FM-12-16")
    prompts = ClassPrompts(size)
    state = {k: v.float() for k, v in tensors.items()}
    for module, prefix in ((transformer, "transformer."), (prompts, "prompts.")):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path} does not match its config: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
    for module in (transformer, prompts):
        module.requires_grad_(False)
        module.eval()
    return FluxReference(transformer, prompts)
