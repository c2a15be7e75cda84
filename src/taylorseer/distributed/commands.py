"""What ``taylorseer generate`` and ``taylorseer sample`` do with ``--context-parallel K``: join the ``torchrun``
job, build the data x context layout and shard the pipeline's transformer.

Example:
    >>> layout = shard_pipeline(pipe, ContextParallel(2), "cpu")   # doctest: +SKIP  (under torchrun)
    >>> layout.replica, layout.cp_rank                              # doctest: +SKIP
    (0, 1)
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch

from .layout import ContextParallel, Layout, enable, make_layout

JOB_TIMEOUT = _dt.timedelta(minutes=10)  # a rank silent this long inside a collective is an error


def join_job(device: str = "cpu") -> tuple[int, int]:
    """Join the ``torchrun`` job's default process group if this process is not in one yet (gloo on CPU, nccl on
    CUDA, env://; left for the process's lifetime); returns (rank, world size). ``RuntimeError`` outside
    ``torchrun``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("--context-parallel runs in a torchrun job (RANK and WORLD_SIZE are not set): "
                               "torchrun --nproc-per-node K -m taylorseer ...")
        cuda = device.startswith("cuda")
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
        if where is not None:
            torch.cuda.set_device(where)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=JOB_TIMEOUT, device_id=where)
    return dist.get_rank(), dist.get_world_size()


def shard_pipeline(pipe: Any, cp: ContextParallel, device: str = "cpu") -> Layout:
    """Join the job, build this rank's ``Layout`` and ``enable`` context parallelism on ``pipe.transformer``
    (refused before any generation when it cannot run: ``layout.check_shardable``)."""
    join_job(device)
    layout = make_layout(cp, torch.device(device).type)
    enable(pipe.transformer, layout)
    return layout
