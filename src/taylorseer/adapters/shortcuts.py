"""Block shortcuts for forecast steps: quarantined, per-block-class code, parity-tested against the block.

On a forecast step where every forecast module of a block is forecast, the block's own forward still runs the
layer norms and modulations that only feed those modules. A shortcut computes what the block returns from the
forecasts, the gates and the residual adds alone, *in the same floating-point operation order*, so its output
is bit-identical to running the block with the forecast modules (tests/adapters/test_shortcuts.py). It is an
optimisation of wall time only; executed FLOPs are unchanged (the skipped work is elementwise).

Pinned to the block code of diffusers 0.42.1; ``applies`` checks the block's configuration, and any block it
does not recognise runs its own forward.

Example:
    >>> shortcut_for(model.transformer_blocks[0])   # doctest: +SKIP
    <function _dit_block ...>
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..forecast.base import writable

if TYPE_CHECKING:  # matched by class name at run time (find_shortcut), so no import of the block class there
    from diffusers.models.attention import BasicTransformerBlock


@dataclass(frozen=True)
class Shortcut:
    """A block class, the child modules whose forecasts it consumes, when it applies, and the function."""

    block_class: str
    children: tuple[str, ...]  # their forecasts are handed to ``function`` as fresh tensors it may overwrite
    applies: Callable[[nn.Module], bool]
    function: Callable[..., Any]
    saved_flops: Callable[..., int] | None = None  # matmul FLOPs of the block it skips (beyond its forecast modules)


def _dit_block(block: BasicTransformerBlock, forecasts: dict[str, torch.Tensor], hidden_states: torch.Tensor,
               attention_mask: Any = None, encoder_hidden_states: Any = None, encoder_attention_mask: Any = None,
               timestep: Any = None, cross_attention_kwargs: Any = None, class_labels: Any = None,
               added_cond_kwargs: Any = None) -> torch.Tensor:
    # diffusers BasicTransformerBlock, norm_type "ada_norm_zero", self-attention only (DiT), same op order.
    emb = block.norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)  # [B, D]
    emb = block.norm1.silu(emb)  # [B, D]
    # Only the two gate rows of the [6D, D] modulation are needed: rows 2D:3D (gate_msa) and 5D:6D (gate_mlp),
    # as contiguous weight views (no copy). Each output element is the same dot product as in the full matmul.
    linear, d = block.norm1.linear, emb.shape[1]
    if _rows_unavailable(linear):  # weights elsewhere until the module is called (offload hooks): call it
        _, _, gate_msa, _, _, gate_mlp = linear(emb).chunk(6, dim=1)  # each [B, D]
    else:
        bias = linear.bias
        gate_msa = F.linear(emb, linear.weight[2 * d:3 * d], None if bias is None else bias[2 * d:3 * d])  # [B, D]
        gate_mlp = F.linear(emb, linear.weight[5 * d:6 * d], None if bias is None else bias[5 * d:6 * d])  # [B, D]
    attn, ff, gate_msa, gate_mlp = forecasts["attn1"], forecasts["ff"], gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
    # The forecasts are the shortcut's own fresh tensors: written in place where that gives the same bits.
    if writable(attn, gate_msa, hidden_states) and writable(ff, gate_mlp, attn):
        return ff.mul_(gate_mlp).add_(attn.mul_(gate_msa).add_(hidden_states))  # [B, L, D]
    hidden_states = gate_msa * attn + hidden_states  # [B, L, D]
    hidden_states = gate_mlp * ff + hidden_states  # [B, L, D]
    return hidden_states


def _rows_unavailable(linear: nn.Linear) -> bool:
    """The weight is not usable outside the module's own call (accelerate's offload hook, meta tensors)."""
    return hasattr(linear, "_hf_hook") or linear.weight.is_meta


def _dit_saved_flops(block: BasicTransformerBlock, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the 4 non-gate rows of the [6D, D] modulation that ``_dit_block`` does not compute (matmul count,
    as ``torch.utils.flop_counter``: 2 * batch * D * rows)."""
    linear = block.norm1.linear
    if _rows_unavailable(linear):
        return 0
    return 2 * hidden_states.shape[0] * linear.in_features * (linear.out_features - 2 * linear.in_features)


def _is_dit_block(block: nn.Module) -> bool:
    return (getattr(block, "norm_type", None) == "ada_norm_zero" and getattr(block, "attn2", None) is None
            and getattr(block, "pos_embed", None) is None and getattr(block.norm1, "emb", None) is not None
            and getattr(block, "_chunk_size", None) is None
            and type(getattr(block.norm1, "linear", None)) is nn.Linear)  # a LoRA-wrapped linear: no shortcut


SHORTCUTS: tuple[Shortcut, ...] = (
    Shortcut("BasicTransformerBlock", ("attn1", "ff"), _is_dit_block, _dit_block, _dit_saved_flops),
)


def find_shortcut(block: nn.Module) -> Shortcut | None:
    """The shortcut record that applies to this block instance, if any."""
    for record in SHORTCUTS:
        if type(block).__name__ == record.block_class and record.applies(block):
            return record
    return None


def shortcut_for(block: nn.Module) -> Callable[..., Any]:
    """The shortcut function of a block (``ValueError`` if none applies)."""
    record = find_shortcut(block)
    if record is None:
        raise ValueError(f"no block shortcut applies to {type(block).__name__}")
    return record.function
