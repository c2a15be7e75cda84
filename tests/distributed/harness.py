"""The CPU harness of the context-parallel tests: a world of gloo processes forked from a fork server
(``fork_world``), the two patches that let diffusers 0.42.1 run context parallelism on a machine without an
accelerator, and ``emulate_ulysses``, one process reproducing the sharded kernels bit for bit. All live here
only; nothing in ``src/`` patches anything.

1. ``patch_accelerator_count``: diffusers' ``ModelMixin._resolve_parallel_config`` computes
   ``rank % torch.accelerator.device_count()``, a ``ZeroDivisionError`` on a CPU-only machine. The patch makes the
   count 1 in the test's forked processes. ``test_cp_model.py::test_two_ranks_equal_one_process``
   checks that diffusers still needs it: when it fails, diffusers stopped dividing by the count and the patch (and
   this paragraph) can go.
2. ``patch_ring_lse`` (ring tests only): ring attention merges per-block results with their log-sum-exp, and the
   one backend diffusers 0.42.1 can run on a CPU (``native``) refuses ``return_lse=True``; every backend that
   returns it calls a CUDA or NPU kernel. The patch gives diffusers' native forward op the log-sum-exp from torch's
   own CPU kernel (``aten._scaled_dot_product_flash_attention_for_cpu``), so diffusers' ring algorithm
   (``TemplatedRingAttention``, unchanged) runs on CPU. Without it, taylorseer refuses ring on CPU before any
   work, with the reason (``distributed.layout.RING_NEEDS_LSE``):
   ``test_cp_model.py::test_ring_and_ulysses_limits_are_refused_before_any_work``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def fork_world(fn: Callable, world: int, *args: Any) -> Any:
    """Start ``fn(rank, world, *args)`` in ``world`` processes and return torch's ``ProcessContext`` at once, so
    this process can work while they run; ``join_world`` waits for them. The processes are forked from a fork
    server that imported torch, diffusers and ``fn``'s module once (not spawned: none imports them again, ~5 s of
    CPU each; not forked from this process: its threads, e.g. torch.compile's workers in a full test session,
    cannot leave a lock held in a child). The harness's patches are applied in each child only; ``fn`` joins
    whatever process groups it needs itself, and takes picklable arguments."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "diffusers", "taylorseer.distributed.flux",
                                    "taylorseer.cli", fn.__module__])
    return mp.start_processes(_forked, args=(fn, world, args), nprocs=world, join=False, start_method="forkserver")


def _forked(rank: int, fn: Callable, world: int, args: tuple) -> None:
    torch.set_num_threads(1)
    patch_accelerator_count()
    patch_ring_lse()
    fn(rank, world, *args)


def join_world(context: Any, seconds: float) -> None:
    """Wait for ``fork_world``'s processes; re-raise the first failure; after ``seconds`` kill them all and
    raise (a hung world fails the tests instead of hanging them)."""
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            stop_world(context)
            raise TimeoutError(f"the forked world did not finish within {seconds:.0f} s")


def stop_world(context: Any) -> None:
    """Kill ``fork_world``'s processes that are still running (by their own process objects)."""
    for process in context.processes:
        if process.is_alive():
            process.kill()


def stop_fork_server() -> None:
    """Stop the fork server ``fork_world`` started and wait for it (so it does not outlive the tests, and a CPU
    count of this process's children includes it and the world it forked). Private API of ``multiprocessing``,
    Python >= 3.8; a no-op without it."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


def init_file_group(rank: int, world: int, init_file: str, seconds: float) -> None:
    """Join a gloo group through a shared file (what the model tests use; the commands join through env://)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=seconds))


def torchrun_environment(rank: int, world: int, port: int) -> None:
    """The environment ``torchrun`` gives rank ``rank`` (env:// rendezvous on 127.0.0.1:``port``), so the
    commands join their job exactly as under ``torchrun``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def emulate_ulysses(degree: int, text_tokens: int, image_tokens: int) -> Iterator[None]:
    """Inside the block, this one process computes exactly what ``degree`` Ulysses ranks of a FLUX transformer
    compute (test-only; docs/parallel.md, "Hybrid DP x CP and bitwise equality"): every linear layer over a
    token sequence runs on each rank's rows separately (as a strided view at the two entry layers, where
    diffusers splits the inputs with ``chunk``, contiguous elsewhere), and attention sees its keys in the order
    of Ulysses' all-to-all gather (rank 0's text and image tokens, then rank 1's, ...). On this CPU both
    change the last bits: a linear layer's result for one row depends on how many rows it is given and on their
    memory layout, and attention's softmax sums depend on the key order. Nothing else differs, so the sharded
    run and this one are bitwise equal."""
    functional = torch.nn.functional
    linear, attention = functional.linear, functional.scaled_dot_product_attention
    t, i = text_tokens, image_tokens

    def rows(length: int, r: int) -> torch.Tensor:
        text = torch.arange(r * t // degree, (r + 1) * t // degree)
        image = torch.arange(r * i // degree, (r + 1) * i // degree)
        return text if length == t else image if length == i else torch.cat([text, t + image])

    gathered = {n: torch.cat([rows(n, r) for r in range(degree)]) for n in (t, i, t + i)}
    entry_layers: set[int] = set()
    at_entry = [False]

    def sharded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] not in gathered:
            return linear(x, weight, bias)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for r in range(degree):
            index = rows(x.shape[1], r)
            part = x[:, int(index[0]):int(index[-1]) + 1] if at_entry[0] else x[:, index]
            out[:, index] = linear(part, weight, bias)
        return out

    def gathered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                           **kwargs: Any) -> torch.Tensor:
        order = gathered[key.shape[-2]]
        q, k, v = (x.transpose(1, 2)[:, order].transpose(1, 2) for x in (query, key, value))
        out = attention(q, k, v, *args, **kwargs)
        return out.transpose(1, 2)[:, order.argsort()].transpose(1, 2)

    def before(module: torch.nn.Module, args: Any) -> None:
        if type(module).__name__ == "FluxTransformer2DModel":
            entry_layers.update((id(module.x_embedder), id(module.context_embedder)))
        if id(module) in entry_layers:
            at_entry[0] = True

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        if id(module) in entry_layers:
            at_entry[0] = False

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(before),
             torch.nn.modules.module.register_module_forward_hook(after)]
    functional.linear, functional.scaled_dot_product_attention = sharded_linear, gathered_attention
    try:
        yield
    finally:
        functional.linear, functional.scaled_dot_product_attention = linear, attention
        for hook in hooks:
            hook.remove()
