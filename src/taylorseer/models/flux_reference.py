"""The flow-matching reference: diffusers' unmodified ``FluxTransformer2DModel``, class-conditional on Fashion-MNIST.

The shipped size is ``Flux-FM-12-16``: 2 double-stream + 10 single-stream blocks, hidden 96 (3 heads x 32), RoPE
axes (8, 12, 12), on Fashion-MNIST area-downsampled to 16x16. The image is the "latent": one channel, packed 2x2
by ``FluxPipeline``'s own layout into 64 tokens of 4 channels, so the model runs through ``FluxPipeline`` at
``height = width = 128`` (the pipeline assumes an 8x VAE; no VAE is needed with ``output_type="latent"``).

Conditioning: a small learned table of "prompt embeddings" per class (``PROMPT_TOKENS`` tokens x
``JOINT_DIM`` channels, plus a pooled vector), trained with the model; class 10 is the null class used as the
negative prompt for true classifier-free guidance. Objective: rectified flow (the model predicts the velocity
``noise - x0`` at ``x_t = (1 - t) x0 + t noise``), timesteps drawn logit-normal and shifted as FLUX's scheduler
shifts them at 64 tokens. This file holds only sizes, packing and the schedule shift: no cache code.

Example:
    >>> model, prompts = build_flux_reference("Flux-FM-T-16"), ClassPrompts("Flux-FM-T-16")
    >>> x = torch.randn(2, 64, 4)
    >>> seq, pooled = prompts(torch.tensor([3, 10]))
    >>> model(hidden_states=x, encoder_hidden_states=seq, pooled_projections=pooled, timestep=torch.rand(2),
    ...       img_ids=image_ids(16), txt_ids=text_ids(), return_dict=False)[0].shape
    torch.Size([2, 64, 4])
"""

from __future__ import annotations

import math

import torch
from diffusers import FluxTransformer2DModel

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 16
PROMPT_TOKENS = 4
JOINT_DIM = 64
POOLED_DIM = 64
# FlowMatchEulerDiscreteScheduler as FLUX.1-dev configures it: the sigma shift depends on the image token count.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


#################################################################################
#                                  Model sizes                                  #
#################################################################################

def _flux_config(hidden: int, double: int, single: int, heads: int) -> dict:
    head_dim = hidden // heads
    rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)  # (8, 12, 12) at 32
    return {
        "patch_size": 1,
        "in_channels": 4,              # one image channel, packed 2x2 by FluxPipeline
        "out_channels": 4,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": JOINT_DIM,
        "pooled_projection_dim": POOLED_DIM,
        "guidance_embeds": False,      # true CFG (two calls per step), as FLUX.1-dev with true_cfg_scale
        "axes_dims_rope": rope,
    }


def Flux_FM_12_16() -> dict:  # noqa: N802 - named like the DiT sizes
    """2 double + 10 single blocks x 96 wide on 16x16 (64 tokens), 2.1M parameters (plus a 3.5k-entry prompt table)."""
    return _flux_config(hidden=96, double=2, single=10, heads=3)


def Flux_FM_T_16() -> dict:  # noqa: N802
    """1 double + 2 single blocks x 32 wide: a sub-second model for tests."""
    return _flux_config(hidden=32, double=1, single=2, heads=1)


FLUX_MODELS = {"Flux-FM-12-16": Flux_FM_12_16, "Flux-FM-T-16": Flux_FM_T_16}


def build_flux_reference(size: str = "Flux-FM-12-16") -> FluxTransformer2DModel:
    """A randomly initialised FLUX-architecture reference of a named size (see ``FLUX_MODELS``), in eval mode."""
    if size not in FLUX_MODELS:
        raise ValueError(f"size must be one of {sorted(FLUX_MODELS)}, got {size!r}")
    return FluxTransformer2DModel(**FLUX_MODELS[size]()).eval()


class ClassPrompts(torch.nn.Module):
    """Learned "prompt embeddings" per class: a token sequence ``[11, PROMPT_TOKENS, JOINT_DIM]`` and a pooled
    vector ``[11, POOLED_DIM]``; row 10 is the null class (the negative prompt of classifier-free guidance)."""

    def __init__(self, size: str = "Flux-FM-12-16") -> None:
        super().__init__()
        config = FLUX_MODELS[size]() if size in FLUX_MODELS else None
        if config is None:
            raise ValueError(f"size must be one of {sorted(FLUX_MODELS)}, got {size!r}")
        self.sequence = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, PROMPT_TOKENS, config["joint_attention_dim"]))
        self.pooled = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, config["pooled_projection_dim"]))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids ``[B]`` (0-10) -> (``prompt_embeds [B, T, D]``, ``pooled_prompt_embeds [B, P]``)."""
        return self.sequence[labels], self.pooled[labels]


#################################################################################
#                         Packing, ids and the time shift                       #
#################################################################################

def pack(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]`` in ``FluxPipeline._pack_latents``' layout."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[B, size/2 * size/2, 4C]`` -> ``[B, C, size, size]`` (inverse of :func:`pack`)."""
    b, _, ch = tokens.shape
    x = tokens.view(b, size // 2, size // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, size, size)


def image_ids(size: int = IMAGE_SIZE) -> torch.Tensor:
    """RoPE positions of the packed image tokens ``[size/2 * size/2, 3]`` (row, column), as FluxPipeline makes them."""
    half = size // 2
    ids = torch.zeros(half, half, 3)
    ids[..., 1] = torch.arange(half)[:, None]
    ids[..., 2] = torch.arange(half)[None, :]
    return ids.reshape(half * half, 3)


def text_ids() -> torch.Tensor:
    """RoPE positions of the prompt tokens: zeros ``[PROMPT_TOKENS, 3]``, as FluxPipeline makes them."""
    return torch.zeros(PROMPT_TOKENS, 3)


def shift_mu(image_tokens: int = (IMAGE_SIZE // 2) ** 2) -> float:
    """FLUX's resolution-dependent shift exponent ``mu`` (linear in the token count); about 0.468 at 64 tokens."""
    cfg = SCHEDULER_CONFIG
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return float(image_tokens * m + cfg["base_shift"] - m * cfg["base_image_seq_len"])


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift ``e^mu / (e^mu + 1/sigma - 1)`` (the scheduler's ``time_shift``)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def initialize_flux_weights(model: FluxTransformer2DModel) -> None:
    """Xavier linears; zeroed adaLN modulations and output projection, so every block starts as the identity."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    zeroed = [model.norm_out.linear, model.proj_out]
    for block in model.transformer_blocks:
        zeroed += [block.norm1.linear, block.norm1_context.linear]
    for block in model.single_transformer_blocks:
        zeroed.append(block.norm.linear)
    for layer in zeroed:
        torch.nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            torch.nn.init.zeros_(layer.bias)
