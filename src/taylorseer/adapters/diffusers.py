"""Adapter records for diffusers transformer classes (data, not code): which module outputs are forecast.

Module granularity follows ../shared/ALGORITHM.md: the raw attention and MLP outputs of each block, before the
block applies its adaLN gate, so the gate still comes from the current timestep on forecast steps.
"""

from __future__ import annotations

from .registry import AdapterSpec, register_adapter

register_adapter(
    "DiTTransformer2DModel",
    AdapterSpec(
        "diffusers-dit",
        modules=("transformer_blocks.*.attn1", "transformer_blocks.*.ff"),
        blocks=("transformer_blocks.*",),
        block_inputs=("hidden_states",),
    ),
)
