"""Context parallelism (diffusers ``enable_parallelism``) and hybrid data x context layouts, as the commands set
them up.

A job of ``W`` processes with context-parallel degree ``K`` is ``W / K`` *replicas* (data parallel) of ``K``
ranks each (context parallel): ranks ``[r K, (r + 1) K)`` form replica ``r`` and share every sample of its
batches, each holding ``1/K`` of the tokens. ``make_layout`` builds one ``DeviceMesh`` with dimensions
``("dp", "ring", "ulysses")``; ``enable`` hands the replica's ``("ring", "ulysses")`` sub-mesh to diffusers'
``ContextParallelConfig``, so diffusers' all-to-all (Ulysses) or ring exchanges stay inside the replica. Forecast
decisions agree within the replica only (``distributed.vote``).

What is refused before any work, with the reason:
- ``W`` not a multiple of ``K``; ``K`` < 2; a kind other than ``ulysses`` / ``ring``;
- Ulysses with a head count that ``K`` does not divide (the all-to-all splits heads);
- no accelerator: diffusers 0.42.1 computes ``rank % torch.accelerator.device_count()`` and divides by zero on a
  machine without one (``NO_ACCELERATOR``); the tests patch that count to 1 in their own processes only;
- ring attention with diffusers' ``native`` backend, which cannot return the log-sum-exp that ring needs
  (``RING_NEEDS_LSE``); every backend of diffusers 0.42.1 that can is a CUDA (or NPU) kernel.

Example:
    >>> cp = ContextParallel(degree=2, kind="ulysses")
    >>> layout = make_layout(cp)                 # doctest: +SKIP  (inside a 2-process torch.distributed job)
    >>> enable(pipe.transformer, layout)         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

CP_KINDS = ("ulysses", "ring")
TIMEOUT = _dt.timedelta(seconds=60)  # collectives of a generation: a silent rank is an error after this long
NO_ACCELERATOR = ("context parallelism needs an accelerator with diffusers {version}: enable_parallelism computes "
                  "rank % torch.accelerator.device_count(), which is 0 here (ZeroDivisionError); run on GPUs (nccl), "
                  "or see docs/parallel.md for how the CPU tests patch that count")
RING_NEEDS_LSE = ("ring attention needs an attention backend that returns the log-sum-exp of each block; the "
                  "transformer's backend {backend!r} does not (diffusers {version}: the ring-capable backends are "
                  "flash, _flash_3, _native_cudnn, _native_flash, sage (CUDA kernels) and _native_npu); use "
                  "--cp-kind ulysses, or a GPU with one of those backends")


@dataclass(frozen=True)
class ContextParallel:
    """Shard each sample's sequence over ``degree`` ranks with diffusers' ``kind`` of attention exchange:
    ``"ulysses"`` (all-to-all over heads; ``degree`` must divide the head count) or ``"ring"`` (K/V passed
    around; needs an attention backend that returns the log-sum-exp).

    Example:
        >>> ContextParallel(4, "ring").diffusers_degrees()
        {'ulysses_degree': 1, 'ring_degree': 4}
    """

    degree: int
    kind: str = "ulysses"

    def __post_init__(self) -> None:
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 2:
            raise ValueError(f"ContextParallel.degree must be an int >= 2, got {self.degree!r}")
        if self.kind not in CP_KINDS:
            raise ValueError(f"ContextParallel.kind must be one of {list(CP_KINDS)}, got {self.kind!r}")

    def diffusers_degrees(self) -> dict[str, int]:
        """The ``ContextParallelConfig`` keyword arguments."""
        ulysses = self.degree if self.kind == "ulysses" else 1
        return {"ulysses_degree": ulysses, "ring_degree": self.degree // ulysses}

    def to_dict(self) -> dict[str, Any]:
        return {"degree": self.degree, "kind": self.kind}


@dataclass(frozen=True)
class Layout:
    """This process's place in a data x context parallel job (see the module docstring)."""

    cp: ContextParallel
    rank: int
    world_size: int
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, dims ("dp", "ring", "ulysses")

    @property
    def replica(self) -> int:
        """The data-parallel index of this rank's replica (its batches)."""
        return self.rank // self.cp.degree

    @property
    def replicas(self) -> int:
        return self.world_size // self.cp.degree

    @property
    def cp_rank(self) -> int:
        """This rank's place in its replica; 0 writes the replica's outputs."""
        return self.rank % self.cp.degree

    def cp_mesh(self) -> Any:
        """The replica's ``("ring", "ulysses")`` sub-mesh (what diffusers shards over)."""
        return self.mesh["ring", "ulysses"]


def check_world(cp: ContextParallel, world_size: int) -> None:
    """``ValueError`` unless ``world_size`` processes make whole replicas of ``cp.degree`` ranks."""
    if world_size % cp.degree:
        raise ValueError(f"--context-parallel {cp.degree} needs a multiple of {cp.degree} processes "
                         f"(replicas of {cp.degree} ranks), got {world_size}")


def make_layout(cp: ContextParallel, device_type: str = "cpu") -> Layout:
    """The ``Layout`` of this process in the initialized default process group (``ValueError`` if the world size
    is not a multiple of ``cp.degree``, ``RuntimeError`` without a process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism runs in a torch.distributed job: launch with torchrun")
    world = dist.get_world_size()
    check_world(cp, world)
    degrees = cp.diffusers_degrees()
    mesh = init_device_mesh(device_type, (world // cp.degree, degrees["ring_degree"], degrees["ulysses_degree"]),
                            mesh_dim_names=("dp", "ring", "ulysses"))
    return Layout(cp, dist.get_rank(), world, mesh)


def _attention_backend(transformer: torch.nn.Module) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in transformer.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", False)
        if backend is not False:
            return str(getattr(backend, "value", backend) or _AttentionBackendRegistry.get_active_backend()[0].value)
    return str(_AttentionBackendRegistry.get_active_backend()[0].value)


def ring_refusal(transformer: torch.nn.Module) -> str | None:
    """Why ring attention cannot run on ``transformer`` here (None if it can): its attention backend must return
    the log-sum-exp. Probed with diffusers' own forward op for the ``native`` backend on a 1-token input."""
    import diffusers
    from diffusers.models import attention_dispatch

    backend = _attention_backend(transformer)
    if backend != "native":
        return None  # a CUDA/NPU backend: diffusers checks it when it runs
    forward_op = getattr(attention_dispatch, "_native_attention_forward_op", None)
    if forward_op is None:  # another diffusers layout: it checks for itself when it runs
        return None
    q = torch.zeros(1, 1, 1, 8)
    try:
        forward_op(None, q, q, q, return_lse=True, _save_ctx=False)
    except ValueError:
        return RING_NEEDS_LSE.format(backend=backend, version=diffusers.__version__)
    return None


def check_shardable(transformer: torch.nn.Module, cp: ContextParallel) -> None:
    """Refuse (``ValueError``/``RuntimeError``, one line) what diffusers would fail on, before any generation."""
    import diffusers

    if torch.accelerator.device_count() == 0:
        raise RuntimeError(NO_ACCELERATOR.format(version=diffusers.__version__))
    heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None)
    if cp.kind == "ulysses" and isinstance(heads, int) and heads % cp.degree:
        raise ValueError(f"Ulysses context parallelism of degree {cp.degree} splits the attention heads, but "
                         f"{type(transformer).__name__} has {heads}; use a degree that divides {heads}, or "
                         f"--cp-kind ring")
    if cp.kind == "ring":
        reason = ring_refusal(transformer)
        if reason is not None:
            raise ValueError(reason)


def enable(transformer: torch.nn.Module, layout: Layout) -> None:
    """``transformer.enable_parallelism`` over this rank's replica (``layout.cp_mesh()``), after
    ``check_shardable``."""
    from diffusers import ContextParallelConfig

    check_shardable(transformer, layout.cp)
    config = ContextParallelConfig(**layout.cp.diffusers_degrees(), mesh=layout.cp_mesh())
    transformer.enable_parallelism(config=config)  # type: ignore[operator]


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """On an exception inside, tear this rank's process group down before re-raising: its peers' pending
    collectives then fail at once ("connection closed") instead of waiting for the timeout."""
    try:
        yield
    except BaseException:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        raise
