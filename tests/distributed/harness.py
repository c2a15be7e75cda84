"""The CPU harness of the context-parallel tests: gloo process groups in spawned processes, and the two patches
that let diffusers 0.42.1 run context parallelism on a machine without an accelerator. Both live here only;
nothing in ``src/`` patches anything.

1. ``patch_accelerator_count``: diffusers' ``ModelMixin._resolve_parallel_config`` computes
   ``rank % torch.accelerator.device_count()``, a ``ZeroDivisionError`` on a CPU-only machine. The patch makes the
   count 1 in the test's own processes. ``test_cp_model.py::test_diffusers_still_needs_the_accelerator_patch``
   checks that diffusers still needs it: when it fails, diffusers stopped dividing by the count and the patch (and
   this paragraph) can go.
2. ``patch_ring_lse`` (ring tests only): ring attention merges per-block results with their log-sum-exp, and the
   one backend diffusers 0.42.1 can run on a CPU (``native``) refuses ``return_lse=True``; every backend that
   returns it calls a CUDA or NPU kernel. The patch gives diffusers' native forward op the log-sum-exp from torch's
   own CPU kernel (``aten._scaled_dot_product_flash_attention_for_cpu``), so diffusers' ring algorithm
   (``TemplatedRingAttention``, unchanged) runs on CPU. Without it, taylorseer refuses ring on CPU before any
   work, with the reason (``distributed.layout.RING_NEEDS_LSE``); ``test_ring_is_refused_without_a_backend``.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT = datetime.timedelta(seconds=20)  # a silent peer is an error after this long (the fault test)


def patch_accelerator_count() -> None:
    """``torch.accelerator.device_count()`` returns 1 in this process (see the module docstring)."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def patch_ring_lse() -> None:
    """diffusers' native attention forward op returns the log-sum-exp when asked (see the module docstring)."""
    from diffusers.models import attention_dispatch

    original = attention_dispatch._native_attention_forward_op
    if getattr(original, "taylorseer_test_patch", False):
        return

    def forward_op(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, return_lse: bool = False, _save_ctx: bool = True,
                   _parallel_config: Any = None) -> Any:
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # [B, H, S, D]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[:2]
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # [B, S, H, D], [B, S, H]

    forward_op.taylorseer_test_patch = True  # type: ignore[attr-defined]
    attention_dispatch._native_attention_forward_op = forward_op


def _entry(rank: int, fn: Callable, world: int, init_file: str, ring: bool, args: tuple) -> None:
    torch.set_num_threads(1)
    patch_accelerator_count()
    if ring:
        patch_ring_lse()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=GLOO_TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, ring: bool = False) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group (both patches
    applied in each, the ring one with ``ring=True``); raises if any process fails."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "init"), ring, args), nprocs=world, join=True)
