"""Adapter records for diffusers transformer classes (data, not code): which module outputs are forecast.

Module granularity follows ../shared/ALGORITHM.md: the raw attention and MLP outputs of each block (per stream,
cross-attention where present), taken *before* the block applies its adaLN gate, so the gate still comes from the
current timestep on forecast steps. Single-stream blocks forecast their fused output ``proj_out(cat(attn, mlp))``
and declare the attention and MLP input projections as ``skip`` (their outputs feed only ``proj_out``).
Block granularity forecasts each block's residual ``out - in`` against the named forward arguments, in the order
the block returns its outputs. Output granularity ("lite") forecasts the transformer output and needs no record.

Every record was read off the diffusers 0.42.1 block ``forward`` and is checked against a tiny model built from
config in tests/adapters/test_diffusers.py.

Example:
    >>> from taylorseer.adapters.registry import registered_adapters
    >>> registered_adapters()["FluxTransformer2DModel"].skip
    ('single_transformer_blocks.*.attn', 'single_transformer_blocks.*.proj_mlp')
"""

from __future__ import annotations

from .registry import AdapterSpec, register_adapter

_DUAL = ("encoder_hidden_states", "hidden_states")  # blocks returning (encoder_hidden_states, hidden_states)
_DUAL_REVERSED = ("hidden_states", "encoder_hidden_states")  # blocks returning (hidden_states, encoder_...)
_SINGLE = ("hidden_states",)

DIFFUSERS_ADAPTERS: dict[str, AdapterSpec] = {
    # BasicTransformerBlock, norm_type="ada_norm_zero": h += gate_msa * attn1(.); h += gate_mlp * ff(.)
    "DiTTransformer2DModel": AdapterSpec(
        "diffusers-dit",
        preset="paper_dit",
        notes="preset: the paper's DiT-XL/2 setting (W=2, N=4, O=4)",
        modules=("transformer_blocks.*.attn1", "transformer_blocks.*.ff"),
        blocks=("transformer_blocks.*",),
        block_inputs=_SINGLE,
    ),
    # BasicTransformerBlock, norm_type="ada_norm_single": gated attn1 and ff, ungated cross-attention attn2.
    "PixArtTransformer2DModel": AdapterSpec(
        "diffusers-pixart",
        preset="paper_dit",
        notes="preset: a DiT-style adaLN model at 20-50 steps: the DiT setting",
        modules=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2", "transformer_blocks.*.ff"),
        blocks=("transformer_blocks.*",),
        block_inputs=_SINGLE,
    ),
    # JointTransformerBlock: joint attention returns (img, txt); ff and ff_context per stream; attn2 only in the
    # SD3.5 dual-attention layers; the last block is context_pre_only (no ff_context, returns (None, img)).
    "SD3Transformer2DModel": AdapterSpec(
        "diffusers-sd3",
        preset="paper_flux",
        notes="preset: a flow-matching MMDiT like FLUX: FLUX's setting (W=3, N=6, O=1)",
        modules=("transformer_blocks.*.attn", "transformer_blocks.*.attn2", "transformer_blocks.*.ff",
                 "transformer_blocks.*.ff_context"),
        blocks=("transformer_blocks.*",),
        block_inputs=_DUAL,
    ),
    # FluxTransformerBlock (double stream): attn returns (img, txt[, ip]); ff and ff_context.
    # FluxSingleTransformerBlock: h = residual + gate * proj_out(cat(attn(x), act(proj_mlp(x)))); proj_out is
    # exactly the fused linear2 of the reference, so attn and proj_mlp are skipped on forecast steps.
    "FluxTransformer2DModel": AdapterSpec(
        "diffusers-flux",
        preset="paper_flux",
        notes="preset: the paper's FLUX.1-dev setting (W=3, N=6, O=1)",
        modules=("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context",
                 "single_transformer_blocks.*.proj_out"),
        skip=("single_transformer_blocks.*.attn", "single_transformer_blocks.*.proj_mlp"),
        blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
        block_inputs=_DUAL,
    ),
    # Same layout as Flux; both block types return (hidden_states, encoder_hidden_states). The token refiner in
    # context_embedder runs every step (text only, cheap).
    "HunyuanVideoTransformer3DModel": AdapterSpec(
        "diffusers-hunyuan-video",
        preset="paper_hunyuan_video",
        notes="preset: the paper's HunyuanVideo setting (W=1, N=5, O=1)",
        modules=("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context",
                 "single_transformer_blocks.*.proj_out"),
        skip=("single_transformer_blocks.*.attn", "single_transformer_blocks.*.proj_mlp"),
        blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
        block_inputs=_DUAL_REVERSED,
    ),
    # WanTransformerBlock: gated self-attention attn1, ungated cross-attention attn2, gated ffn.
    "WanTransformer3DModel": AdapterSpec(
        "diffusers-wan",
        preset="paper_wan",
        notes="preset: the official Wan2.1 setting (W=1, N=5, O=1)",
        modules=("blocks.*.attn1", "blocks.*.attn2", "blocks.*.ffn"),
        blocks=("blocks.*",),
        block_inputs=_SINGLE,
    ),
    # QwenImageTransformerBlock: joint attention returns (img, txt); img_mlp and txt_mlp per stream.
    "QwenImageTransformer2DModel": AdapterSpec(
        "diffusers-qwen-image",
        preset="paper_flux",
        notes="preset: a flow-matching MMDiT like FLUX: FLUX's setting",
        modules=("transformer_blocks.*.attn", "transformer_blocks.*.img_mlp", "transformer_blocks.*.txt_mlp"),
        blocks=("transformer_blocks.*",),
        block_inputs=_DUAL,
    ),
    # SanaTransformerBlock: gated linear attention attn1, ungated cross-attention attn2, gated GLUMBConv ff.
    "SanaTransformer2DModel": AdapterSpec(
        "diffusers-sana",
        preset="paper_flux",
        notes="preset: flow matching at few steps: FLUX's conservative first-order setting",
        modules=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2", "transformer_blocks.*.ff"),
        blocks=("transformer_blocks.*",),
        block_inputs=_SINGLE,
    ),
    # LTXVideoTransformerBlock: gated attn1, ungated cross-attention attn2, gated ff.
    "LTXVideoTransformer3DModel": AdapterSpec(
        "diffusers-ltx-video",
        preset="paper_hunyuan_video",
        notes="preset: a video DiT: HunyuanVideo's setting",
        modules=("transformer_blocks.*.attn1", "transformer_blocks.*.attn2", "transformer_blocks.*.ff"),
        blocks=("transformer_blocks.*",),
        block_inputs=_SINGLE,
    ),
    # Flux layout with pruned modulation; single-stream blocks take and return the concatenated stream only.
    "ChromaTransformer2DModel": AdapterSpec(
        "diffusers-chroma",
        preset="paper_flux",
        notes="preset: FLUX's architecture: FLUX's setting",
        modules=("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context",
                 "single_transformer_blocks.*.proj_out"),
        skip=("single_transformer_blocks.*.attn", "single_transformer_blocks.*.proj_mlp"),
        blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
        block_inputs=(("transformer_blocks.*", _DUAL), ("single_transformer_blocks.*", _SINGLE)),
    ),
    # FLUX.2: single-stream blocks use a parallel attention whose to_out projects cat(attn, mlp): the module
    # ``attn`` itself returns the fused output, so it is the forecast target (nothing to skip).
    "Flux2Transformer2DModel": AdapterSpec(
        "diffusers-flux2",
        preset="paper_flux",
        notes="preset: FLUX's successor: FLUX's setting",
        modules=("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context",
                 "single_transformer_blocks.*.attn"),
        blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
        block_inputs=(("transformer_blocks.*", _DUAL), ("single_transformer_blocks.*", _SINGLE)),
    ),
    # CogVideoXBlock: attn1 returns (video, text); one ff runs on cat(text, video) and is split afterwards.
    "CogVideoXTransformer3DModel": AdapterSpec(
        "diffusers-cogvideox",
        preset="paper_hunyuan_video",
        notes="preset: a video DiT: HunyuanVideo's setting",
        modules=("transformer_blocks.*.attn1", "transformer_blocks.*.ff"),
        blocks=("transformer_blocks.*",),
        block_inputs=_DUAL_REVERSED,
    ),
}

for _class_name, _spec in DIFFUSERS_ADAPTERS.items():
    register_adapter(_class_name, _spec)
