"""The probe vote under context parallelism: the ranks that share a sample pool their probe sums.

A probing policy (``ConfidenceGate``, ``ErrorBudget``) decides from an observation of the first blocks: the
relative L2 forecast error ``sqrt(sum e^2 / sum c^2)`` and the relative L1 change ``sum |d| / sum |p|``, summed
over the probe targets' elements (``runtime.probe.Probes``). Under context parallelism every rank holds a slice
of each sample's tokens, so its sums cover only that slice. ``PooledProbes`` all-reduces the four sums (and
whether every rank had factors to forecast from) over the ranks that share the sample before forming the
ratios: each rank then sees the observation of the *whole* sequence, which is what one process computes, up to
the order of a float64 sum. So every rank of a replica takes the same decision, and that decision is the
one-process decision (unless an observation lies within ~1e-15 relative of the threshold).

The alternative, a maximum of the per-rank ratios (``runtime.step.agree``, what the default group gets without
this), also agrees across ranks, but it is the error of the worst slice, at least the pooled one, so a gated run
would compute more steps than one process and its images would differ from one process's by more than rounding.
The sum costs the same one all-reduce (5 float64) per probed step and branch.

The group is read from the model: diffusers' ``enable_parallelism`` records its mesh in
``model._parallel_config``; the replica's flattened ``("ring", "ulysses")`` mesh is the group. Applying taylorseer
before or after ``enable_parallelism`` gives the same result, since the handle looks at every generation's start.

Example:
    >>> sample_group(torch.nn.Linear(2, 2)) is None
    True
"""

from __future__ import annotations

from typing import Any

import torch

from .probe import Probes


def sample_group(model: torch.nn.Module) -> Any:
    """The process group of the ranks that share ``model``'s samples under diffusers' context parallelism (None
    when the model is not sharded, or the group has one rank)."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() < 2:
        return None
    return mesh.get_group()


class PooledProbes(Probes):
    """``Probes`` whose observation pools the sums of every rank in ``group`` (a ``torch.distributed`` group)."""

    def __init__(self, group: Any) -> None:
        super().__init__()
        self.group = group

    def observation(self) -> tuple[float, float]:
        """The (relative L2 forecast error, relative L1 change) of the whole sequence; sets ``ready`` to whether
        every rank had factors of the right shape."""
        dist = torch.distributed
        backend = dist.get_backend(self.group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        values = [*self.sums, 0.0 if self.ready else 1.0]
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        *sums, not_ready = tensor.tolist()
        self.sums = sums
        self.ready = not_ready == 0.0
        return super().observation()


def probes_for(model: torch.nn.Module, current: Probes) -> Probes:
    """The probes a handle on ``model`` should use for its next generation: pooled over the model's sample group
    when it is sharded, plain otherwise (``current`` is kept when it already fits)."""
    group = sample_group(model)
    if group is None:
        return current if type(current) is Probes else Probes()
    if isinstance(current, PooledProbes) and current.group is group:
        return current
    return PooledProbes(group)
