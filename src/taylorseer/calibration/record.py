"""Record full-compute trajectories of the cached targets as running normal equations (Gram matrices).

A calibration generation runs the model in full at every step. A forward hook on each target module (the same
targets ``apply`` would forecast, from the registered adapter) keeps its output at every step of one batch of
images; at the end of the batch the features of the batch are folded into ``TrajectoryStats`` and dropped, so
memory is one batch of trajectories, never all of them.

What is kept, per group of targets (a target, its kind across blocks, or all targets), row group ``r`` and
channel ``c`` (the feature's last dimension): the Gram matrix of the features at every pair of steps, with a
constant row appended for the bias term, ``G[r, c, i, j] = sum_p X_i[r, p, c] * X_j[r, p, c]`` with ``X_i`` the
feature at step ``i`` (``i < num_steps``) and ``X_{num_steps} = 1``; ``p`` runs over the images and tokens of the
row group. Row groups split the feature's first dimension into ``R`` equal blocks: ``R = 2`` for a CFG batch
``[cond; uncond]`` (the two halves get their own weights), 1 otherwise. Everything a
least-squares fit of any step from any other steps needs (``fit.py``), for any schedule, is in ``G``: searching
schedules costs no further model calls.

Example:
    >>> stats = record_trajectories(model, torch.arange(4), num_steps=50, seed=1)   # doctest: +SKIP
    >>> stats.gram["transformer_blocks.0.attn1"].shape                               # doctest: +SKIP
    torch.Size([128, 51, 51])
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import GRANULARITIES
from ..forecast.linear import GROUPINGS, group_of


@dataclass
class TrajectoryStats:
    """Running normal equations of full-compute trajectories (see the module docstring).

    ``gram[group]``: float64 ``[R, C, num_steps + 1, num_steps + 1]`` (the last index is the constant 1);
    ``row_groups``: ``R``.
    ``targets``: target path -> group. ``rows``: feature rows summed per group and channel (images x CFG rows x
    tokens x targets in the group). ``model_calls``: full model evaluations spent; ``seconds``: wall time.
    ``sampling``: how the trajectories were made (labels, seed, guidance scale, ...), for the file header.
    ``granularity``: what the targets are (``calibration_targets``: module outputs, block residuals, the output).
    ``first_images``: the sampler's output for the first batch (full compute, noise seed ``sampling["seed"]``), which
    a sampled schedule search on the same labels reuses as its reference instead of sampling it again.
    """

    num_steps: int
    grouping: str
    row_groups: int = 1
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    images: int = 0
    model_calls: int = 0
    seconds: float = 0.0
    sampling: dict[str, Any] = field(default_factory=dict)
    granularity: str = "module"
    anchor: str | None = None
    first_images: torch.Tensor | None = None

    def add(self, target: str, features: torch.Tensor, anchor_features: torch.Tensor | None = None) -> None:
        """Fold one target's trajectory ``[num_steps, rows, ..., C]`` into its group's Gram (``rows`` divisible by
        ``row_groups``). With an ``anchor`` (the anchored forecaster's regressor, ``forecast/anchored.py``), the
        anchor target's trajectory of the same shape comes too, and the Gram is over both:
        ``[R, C, 2 num_steps + 1, 2 num_steps + 1]``, index ``num_steps + i`` the anchor's feature at step ``i``."""
        if features.dim() < 3 or features.shape[0] != self.num_steps:
            raise ValueError(f"target {target!r}: expected features [num_steps={self.num_steps}, rows, ..., C], got "
                             f"shape {tuple(features.shape)}")
        if features.shape[1] % self.row_groups:
            raise ValueError(f"target {target!r}: {features.shape[1]} rows do not split into {self.row_groups} row "
                             f"groups")
        if (self.anchor is None) != (anchor_features is None):
            raise ValueError(f"target {target!r}: anchor_features are needed exactly when the stats have an anchor "
                             f"(anchor={self.anchor!r})")
        if anchor_features is not None and anchor_features.shape != features.shape:
            raise ValueError(f"target {target!r}: its features {tuple(features.shape)} and the anchor "
                             f"{self.anchor!r}'s {tuple(anchor_features.shape)} differ in shape: the anchored fit "
                             f"pairs them element by element")
        group = group_of(target, self.grouping)
        self.targets[target] = group
        x = features.reshape(self.num_steps, self.row_groups, -1, features.shape[-1]).double()  # [S, R, P, C]
        if anchor_features is not None:
            x = torch.cat([x, anchor_features.reshape(x.shape).double()], dim=0)  # [2S, R, P, C]
        x = torch.cat([x, torch.ones_like(x[:1])], dim=0)  # [S + 1, R, P, C] (2S + 1 with an anchor)
        gram = torch.einsum("irpc,jrpc->rcij", x, x)
        if group in self.gram:
            if self.gram[group].shape != gram.shape:
                raise ValueError(f"target {target!r} has {gram.shape[1]} channels but its group {group!r} has "
                                 f"{self.gram[group].shape[1]}; use grouping='target'")
            self.gram[group] += gram
        else:
            self.gram[group] = gram
        self.rows[group] = self.rows.get(group, 0) + x.shape[2]

    def merge(self, other: TrajectoryStats) -> TrajectoryStats:
        """The statistics of both recordings together (same steps and grouping)."""
        mine = (self.num_steps, self.grouping, self.row_groups, self.granularity, self.anchor)
        theirs = (other.num_steps, other.grouping, other.row_groups, other.granularity, other.anchor)
        if mine != theirs:
            raise ValueError(f"cannot merge trajectories of (steps, grouping, row groups, granularity, anchor) "
                             f"{theirs} into {mine}")
        out = TrajectoryStats(self.num_steps, self.grouping, self.row_groups,
                              {k: v.clone() for k, v in self.gram.items()}, dict(self.targets), dict(self.rows),
                              self.images, self.model_calls, self.seconds, dict(self.sampling), self.granularity,
                              self.anchor, self.first_images)
        for group, gram in other.gram.items():
            out.gram[group] = out.gram[group] + gram if group in out.gram else gram.clone()
            out.rows[group] = out.rows.get(group, 0) + other.rows[group]
        out.targets.update(other.targets)
        out.images += other.images
        out.model_calls += other.model_calls
        out.seconds += other.seconds
        return out


class StepIndexListener:
    """A sampler listener's ``step`` context: ``index`` is the open step's index inside it, None outside (the hooks
    of a recorder read it to file what they see under its step)."""

    index: int | None = None

    @contextlib.contextmanager
    def step(self, index: int, timestep: Any = None, sigma: Any = None) -> Iterator[None]:
        self.index = index
        try:
            yield
        finally:
            self.index = None


class TrajectoryRecorder(StepIndexListener):
    """A sampler listener (``begin``/``step``) that hooks the target modules and keeps what they return per step.

    ``targets``: paths (their outputs are kept) or ``Target``s from the adapter: ``mode="output"`` keeps the output,
    ``mode="residual"`` keeps output minus the input it is the residual of (block granularity: what ``apply``
    forecasts). A target that returns several tensors (a tuple, a ``ModelOutput``) is kept as one feature, its
    tensors flattened by ``joined_feature`` (tokens of each concatenated: one set of weights for all). Each call's
    feature is kept (detached); several calls in one step (CFG split) are concatenated along the first dimension.
    ``take()`` returns ``{path: [num_steps, rows, ..., C]}`` and forgets it. ``remove()`` (or leaving ``with``) takes
    the hooks off.
    """

    def __init__(self, model: nn.Module, targets: Sequence[Any], steps: Sequence[int] | None = None):
        from ..adapters.registry import Target

        self.targets = [t if isinstance(t, Target) else Target(str(t)) for t in targets]
        self.paths = [t.path for t in self.targets]
        self.steps = None if steps is None else tuple(int(s) for s in steps)
        self.index: int | None = None
        self.num_steps: int | None = None
        self._outputs: dict[str, dict[int, list[torch.Tensor]]] = {p: {} for p in self.paths}
        self._hooks = []
        for t in self.targets:
            if t.mode not in ("output", "residual"):
                raise ValueError(f"target {t.path!r}: calibration records mode 'output' or 'residual' targets, not "
                                 f"{t.mode!r}")
            module = model.get_submodule(t.path)
            self._hooks.append(module.register_forward_hook(self._hook(t, module), with_kwargs=True))

    def _hook(self, target: Any, module: nn.Module) -> Callable[..., None]:
        from ..runtime.state import flatten, residual_leaves

        # The class's forward names the arguments (an installed handle or an offload hook wraps the instance's).
        forward = type(module).forward.__get__(module)
        parameters = list(inspect.signature(forward).parameters) if target.mode == "residual" else []

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.index is None or (self.steps is not None and self.index not in self.steps):
                return
            leaves = flatten(output)[0]  # a tensor, or the leaves of a tuple or ModelOutput, as the runtime sees them
            if target.mode == "residual":
                leaves = residual_leaves(target.path, target.inputs, parameters, args, kwargs, leaves, None)
            tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
            self._outputs[target.path].setdefault(self.index, []).append(
                joined_feature(target.path, type(output).__name__, tensors))

        return hook

    def begin(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self._outputs = {p: {} for p in self.paths}

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs of the generation just sampled, ``[num_steps, ...]`` per target path (``[len(steps), ...]``,
        in the order of ``steps``, when the recorder keeps only some steps)."""
        out = {}
        for path, steps in self._outputs.items():
            want = list(self.steps) if self.steps is not None else list(range(self.num_steps or len(steps)))
            if sorted(steps) != sorted(want):
                raise RuntimeError(f"target {path!r} was not called at every recorded step ({len(steps)} of "
                                   f"{len(want)} recorded)")
            out[path] = torch.stack([torch.cat(steps[i], dim=0) for i in want])
        self._outputs = {p: {} for p in self.paths}
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def joined_feature(target: str, kind: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One regression feature from the tensors a target returns (detached): a single tensor as it is; several (a
    FLUX double-stream block's ``(encoder_hidden_states, hidden_states)``, a joint attention's pair) flattened into
    one, each reshaped to ``[rows, -1, C]`` and concatenated along the middle (token) dimension, so that every
    token of every tensor is one more calibration row of the same channels. The runtime forecasts each tensor of a
    target with that target's weights, so one fit over the joined rows is the fit of those shared weights. The
    tensors must share their first (rows) and last (channels) dimensions: ``TypeError`` naming the target else.

    Example:
        >>> joined_feature("blocks.0", "tuple", [torch.zeros(2, 4, 8), torch.ones(2, 64, 8)]).shape
        torch.Size([2, 68, 8])
    """
    if not tensors:
        raise TypeError(f"target {target!r} returns {kind} with no tensor: calibration records tensor outputs")
    if len(tensors) == 1:
        return tensors[0].detach()
    first = tensors[0]
    shapes = [tuple(t.shape) for t in tensors]
    if any(t.dim() < 2 or t.shape[0] != first.shape[0] or t.shape[-1] != first.shape[-1] for t in tensors):
        raise TypeError(f"target {target!r} returns {kind} with {len(tensors)} tensors of shapes {shapes}: "
                        f"calibration joins the tensors of a target into one feature [rows, tokens, channels], "
                        f"which needs the same first (rows) and last (channels) dimension in each")
    return torch.cat([t.detach().reshape(first.shape[0], -1, first.shape[-1]) for t in tensors], dim=1)


def calibration_targets(model: nn.Module, granularity: str = "module") -> list[Any]:
    """The ``Target``s ``apply`` forecasts on ``model`` at ``granularity`` (registered adapter): ``module`` (the
    attention and MLP outputs, the paper's), ``block`` (each block's residual, output minus input) or ``output``
    (the model's output).

    Example:
        >>> [t.path for t in calibration_targets(load_reference(), "block")][:2]     # doctest: +SKIP
        ['transformer_blocks.0', 'transformer_blocks.1']
    """
    from ..adapters import resolve_targets
    from ..parts import Targets

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    return [t for t in resolve_targets(model, Targets(granularity=granularity)) if t.mode in ("output", "residual")]


def target_paths(model: nn.Module, granularity: str = "module") -> list[str]:
    """The paths of ``calibration_targets(model, granularity)``."""
    return [t.path for t in calibration_targets(model, granularity)]


def record_trajectories(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    num_steps: int = 50,
    seed: int = 1,
    guidance_scale: float = 1.5,
    cfg_mode: str = "batch",
    grouping: str = "target",
    row_groups: int | None = None,
    batch_size: int = 8,
    sampler: Callable[..., torch.Tensor] | None = None,
    progress: bool = True,
    granularity: str = "module",
    anchor: str | None = None,
) -> TrajectoryStats:
    """Sample ``labels`` at full compute (``num_steps`` DDIM steps, noise from ``seed``) and return the running
    normal equations of every target's trajectory.

    Images are sampled ``batch_size`` at a time; batch ``b`` uses noise seed ``seed + b`` (so the images of a
    calibration never share noise with a bench run of another seed unless the seeds collide: use seeds the
    evaluation does not). ``row_groups`` (None: 2 for a guided CFG batch, ``cfg_mode="batch"`` with
    ``guidance_scale != 1``, whose halves are [cond; uncond]; else 1). ``granularity``: which features are
    recorded (``calibration_targets``; the file's forecasts are then made at that granularity). ``sampler``
    defaults to the embedded model's DDIM sampler (``taylorseer.models.sampler.sample``; any function with its
    signature works). ``anchor``: a target path whose trajectory is every other target's extra regressor (the
    anchored forecaster's Grams, ``TrajectoryStats.add``; the anchor itself gets no Gram).
    Memory: one batch of trajectories (``num_steps`` x batch x CFG rows x tokens x channels x targets floats)
    plus the Gram matrices.

    Example:
        >>> stats = record_trajectories(load_reference(), torch.arange(10) % 10, seed=100)   # doctest: +SKIP
    """
    sampler = sampler or _embedded_sampler()
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {list(GROUPINGS)}, got {grouping!r}")
    targets = calibration_targets(model, granularity)
    if anchor is not None and anchor not in [t.path for t in targets]:
        raise ValueError(f"anchor must be one of the {granularity}-granularity targets "
                         f"{[t.path for t in targets][:4]}..., got {anchor!r}")
    labels = torch.as_tensor(labels).long()
    calls_per_step, row_groups = _layout(guidance_scale, cfg_mode, row_groups)
    stats = TrajectoryStats(num_steps, grouping, row_groups, granularity=granularity, anchor=anchor)
    start = time.perf_counter()
    batches = list(torch.split(labels, batch_size))
    with TrajectoryRecorder(model, targets) as recorder:
        for b, chunk in enumerate(tqdm(batches, desc="calibration trajectories", disable=not progress)):
            images = sampler(model, chunk, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed + b,
                             cfg_mode=cfg_mode, listener=recorder)
            if b == 0 and isinstance(images, torch.Tensor):
                stats.first_images = images.detach().clone()
            taken = recorder.take()
            fresh = None if anchor is None else taken.pop(anchor)
            for path, features in taken.items():
                stats.add(path, features, fresh)
            stats.images += len(chunk)
            stats.model_calls += num_steps * calls_per_step
    stats.seconds = time.perf_counter() - start
    stats.sampling = {"labels": labels.tolist(), "seed": seed, "batch_size": batch_size, "num_steps": num_steps,
                      "guidance_scale": guidance_scale, "cfg_mode": cfg_mode, "row_groups": row_groups,
                      "granularity": granularity, **({} if anchor is None else {"anchor": anchor})}
    return stats


@dataclass
class OnPolicyStats:
    """Normal equations of *on-policy* anchors against full-compute targets, for one schedule.

    Teacher-forced fits (``TrajectoryStats``) combine full-compute features; at run time the anchors are what the
    cached run itself computed at its full steps, after its own forecasts have moved its state off the
    full-compute trajectory. Here ``pairs`` is a ``TrajectoryStats`` over ``len(full_steps) + num_steps``
    "steps": first the cached run's features at its full steps (in order), then the full-compute run's features
    at every step (same labels and noise), so a fit of index ``len(full_steps) + s`` from the anchors' indices is a
    forecast that, from what the cached run holds, aims at the full-compute feature of step ``s``: it learns to
    correct the run's own drift (``fit.fit_on_policy``).
    """

    full_steps: tuple[int, ...]
    num_steps: int
    pairs: TrajectoryStats

    def anchor_index(self, step: int) -> int:
        """Index of full step ``step``'s on-policy feature in ``pairs``."""
        return self.full_steps.index(step)

    def target_index(self, step: int) -> int:
        """Index of step ``step``'s full-compute feature in ``pairs``."""
        return len(self.full_steps) + step


def record_on_policy(
    model: nn.Module,
    labels: torch.Tensor,
    config: Any,
    *,
    num_steps: int = 50,
    seed: int = 1,
    guidance_scale: float = 1.5,
    cfg_mode: str = "batch",
    grouping: str = "target",
    row_groups: int | None = None,
    batch_size: int = 8,
    sampler: Callable[..., torch.Tensor] | None = None,
    progress: bool = True,
    granularity: str | None = None,
) -> OnPolicyStats:
    """Sample ``labels`` twice per batch, at full compute and with ``config`` (a ``CacheConfig`` with a
    ``FixedSchedule``: the schedule being fitted) installed, and fold the cached run's features at its full steps
    with the full-compute features at every step into ``OnPolicyStats``.

    Same noise seeds, batching and guidance as ``record_trajectories`` (use the calibration's). ``granularity``
    (None: ``config.targets.granularity``) must be the one ``config`` forecasts at. Cost per image:
    one full-compute generation plus one cached one.

    Example:
        >>> on = record_on_policy(model, labels, cal.cache_config(), seed=1000)   # doctest: +SKIP
    """
    from ..api import apply

    sampler = sampler or _embedded_sampler()
    full = tuple(int(s) for s in config.policy.full_steps)
    if getattr(config.policy, "num_steps", num_steps) != num_steps:
        raise ValueError(f"config's schedule is for {config.policy.num_steps} steps, num_steps is {num_steps}")
    granularity = granularity or config.targets.granularity
    if granularity != config.targets.granularity:
        raise ValueError(f"granularity {granularity!r} differs from the config's ({config.targets.granularity!r}): "
                         f"the cached run's features would not be the ones recorded")
    labels = torch.as_tensor(labels).long()
    calls_per_step, row_groups = _layout(guidance_scale, cfg_mode, row_groups)
    pairs = TrajectoryStats(len(full) + num_steps, grouping, row_groups, granularity=granularity)
    start = time.perf_counter()
    targets = calibration_targets(model, granularity)
    paths = [t.path for t in targets]
    batches = list(torch.split(labels, batch_size))
    for b, chunk in enumerate(tqdm(batches, desc="on-policy trajectories", disable=not progress)):
        kwargs: dict[str, Any] = dict(num_steps=num_steps, guidance_scale=guidance_scale, seed=seed + b,
                                      cfg_mode=cfg_mode)
        with TrajectoryRecorder(model, targets) as recorder:
            sampler(model, chunk, listener=recorder, **kwargs)
            reference = recorder.take()
        # The recorder's hooks go on after apply: they see what the cached run's targets return at its full steps.
        with apply(model, config) as handle, TrajectoryRecorder(model, targets, steps=full) as recorder:
            listener = _Listeners(handle, recorder)
            sampler(model, chunk, listener=listener, **kwargs)
            cached = recorder.take()
        for path in paths:
            pairs.add(path, torch.cat([cached[path], reference[path]]))
        pairs.images += len(chunk)
        pairs.model_calls += (num_steps + len(full)) * calls_per_step
    pairs.seconds = time.perf_counter() - start
    pairs.sampling = {"labels": labels.tolist(), "seed": seed, "batch_size": batch_size, "num_steps": num_steps,
                      "guidance_scale": guidance_scale, "cfg_mode": cfg_mode, "row_groups": row_groups,
                      "full_steps": list(full), "granularity": granularity}
    return OnPolicyStats(full, num_steps, pairs)


class _Listeners:
    """Several sampler listeners told the same steps (begin in order, step contexts nested in order)."""

    def __init__(self, *listeners: Any):
        self.listeners = listeners

    def begin(self, num_steps: int | None = None) -> None:
        for listener in self.listeners:
            listener.begin(num_steps)

    @contextlib.contextmanager
    def step(self, index: int, timestep: Any = None, sigma: Any = None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for listener in self.listeners:
                stack.enter_context(listener.step(index, timestep, sigma))
            yield


def _embedded_sampler() -> Callable[..., torch.Tensor]:
    from ..models.sampler import sample

    return sample


def _layout(guidance_scale: float, cfg_mode: str, row_groups: int | None) -> tuple[int, int]:
    """(model calls per step, row groups): a guided CFG batch is one call whose halves are [cond; uncond] (2 row
    groups unless ``row_groups`` says otherwise); split CFG is two calls of one row group each."""
    batch = guidance_scale == 1.0 or cfg_mode == "batch"
    if row_groups is None:
        row_groups = 2 if guidance_scale != 1.0 and cfg_mode == "batch" else 1
    return (1 if batch else 2), row_groups
