"""The one decision point per (step, branch), on the host; agreed across ranks under ``torch.distributed``.

The step controller asks the branch's policy once when the branch opens (``open`` / ``next_branch``), keeps
the answer as a plain boolean the wrappers read (``forecasting``), resolves probe decisions from an observation
that every rank agrees on (all-reduced maximum), and tells the policy and the observers what happened when the
branch closes. Nothing here touches tensors except the agreement's one small all-reduce.

Example:
    >>> from taylorseer.policy import IntervalSchedule
    >>> controller = StepController(IntervalSchedule(interval=2, warmup_steps=1))
    >>> controller.begin(4)
    >>> decisions = []
    >>> for i in range(4):
    ...     decisions.append(controller.open(i, float(i), None).compute)
    ...     _ = controller.close(decisions[-1]); controller.end_step()
    >>> decisions
    [True, False, True, False]
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

from ..policy.base import Decision, Observation, Policy, StepInfo, build_policy

COMPUTED = Decision(True, reason="computed")


_AGREEMENT: contextvars.ContextVar[tuple[Any] | None] = contextvars.ContextVar("taylorseer_agreement", default=None)


@contextlib.contextmanager
def agreement_group(group: Any) -> Iterator[None]:
    """Inside the block, ``agree`` reduces over ``group`` only: a ``torch.distributed`` process group (e.g. the
    ranks that share one sample under context parallelism), or ``None`` for this rank alone (data parallelism:
    each rank holds different samples, so its own observations decide its own steps). Outside: the default group.

    Example:
        >>> with agreement_group(None):
        ...     agree([0.5])
        [0.5]
    """
    token = _AGREEMENT.set((group,))
    try:
        yield
    finally:
        _AGREEMENT.reset(token)


def agree(values: list[float]) -> list[float]:
    """The elementwise maximum of ``values`` over all ranks of the default process group (unchanged without one),
    or of the group set by ``agreement_group``.

    Every rank must call it at the same points: it is only called on probe decisions, which the policy takes
    from the step index and the (agreed) history alone, so all ranks probe together.
    """
    dist = torch.distributed
    chosen = _AGREEMENT.get()
    group = None if chosen is None else chosen[0]
    if chosen is not None and group is None:
        return values
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return values
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor([v if v == v else float("inf") for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


class StepController:
    """Decisions of one generation: a policy per branch, the open step and branch, the plain flag for wrappers."""

    def __init__(self, policy_config: Any):
        self.policy_config = policy_config
        self.probe_blocks = build_policy(policy_config).probe_blocks
        self.policies: dict[Any, Policy] = {}
        self.num_steps: int | None = None
        self.index: int | None = None  # the open step (None between steps)
        self.last_index: int | None = None
        self.point = 0.0
        self.branch: Any = 0
        self.auto_branch = True
        self.decision: Decision | None = None
        self.probing = False
        self.observation: Observation | None = None
        self.forced = False  # the runtime computed a target of a forecast branch in full (fallback)
        self._info: StepInfo | None = None
        self._current: Any = None  # the open branch's policy
        self._infos: dict[tuple, StepInfo] = {}  # (index, num_steps, point, branch) -> its frozen StepInfo
        self._notify = True  # the policies have a notify of their own (the base class's does nothing)

    # -- generation ------------------------------------------------------------------------------------
    def begin(self, num_steps: int | None) -> None:
        """A new generation: fresh policies (the first is built now so that its errors come early)."""
        self.num_steps = num_steps
        self.policies = {}
        self.index = self.last_index = None
        self._policy(0)

    def plan(self, num_steps: int) -> list[bool] | None:
        """The static plan of the policy (None for adaptive policies)."""
        return build_policy(self.policy_config).plan(num_steps)

    def _policy(self, branch: Any) -> Policy:
        if branch not in self.policies:
            policy = build_policy(self.policy_config)
            policy.begin(self.num_steps)
            self.policies[branch] = policy
            self._notify = type(policy).notify is not Policy.notify
        return self.policies[branch]

    # -- steps and branches ----------------------------------------------------------------------------
    def open(self, index: int, point: float, branch: Any) -> Decision:
        """Step ``index`` at abscissa ``point`` opens with ``branch`` (None: numbered automatically from 0)."""
        self.index, self.point = index, point
        self.auto_branch = branch is None
        self.branch = branch = 0 if branch is None else branch
        key = (index, self.num_steps, point, branch)
        info = self._infos.get(key)  # frozen, so shared: the same steps come back in every generation
        if info is None:
            if len(self._infos) >= 65536:  # a sampler whose abscissae never repeat: keep memory flat
                self._infos.clear()
            info = self._infos[key] = StepInfo(*key)
        self._info = info
        policy = self.policies.get(branch)
        self._current = policy = policy if policy is not None else self._policy(branch)
        self.decision = policy.decide(self._info)
        self.probing = self.decision.probe
        self.observation = None
        self.forced = False
        return self.decision

    def next_branch(self) -> Decision:
        """The next automatically numbered branch of the open step (another model call of the same step)."""
        assert self.index is not None
        decision = self.open(self.index, self.point, self.branch + 1)
        self.auto_branch = True
        return decision

    def info(self) -> StepInfo:
        """The open (step, branch) as the policy was told it when the branch opened."""
        assert self.index is not None and self._info is not None
        return self._info

    @property
    def forecasting(self) -> bool:
        """What the wrappers read: forecast the targets now (False while probing or computing)."""
        return self.decision is not None and not self.decision.compute and not self.probing

    def resolve(self, forecast_error: float, change: float) -> bool:
        """End of the probe: agree on the observation across ranks, ask the policy; True = compute in full."""
        forecast_error, change = agree([forecast_error, change])
        self.observation = Observation(forecast_error, change)
        compute = bool(self._policy(self.branch).resolve(self.info(), self.observation))
        self.probing = False
        if compute:
            self.decision = Decision(True, reason=self.decision.reason if self.decision else "probe")
        return compute

    def close(self, computed: bool) -> dict[str, Any] | None:
        """The open branch ends: tell the policy what happened; returns the decision record (None if none)."""
        if self.index is None or self.decision is None:
            return None
        computed = computed or self.decision.compute
        if self._notify:
            self._current.notify(self._info, computed)
        record: dict[str, Any] = {"step": self.index, "branch": self.branch, "compute": computed,
                                  "reason": self.decision.reason if not (computed and not self.decision.compute)
                                  else "fallback"}
        if self.observation is not None:
            record.update(forecast_error=self.observation.forecast_error, change=self.observation.change)
        self.decision = None
        self.probing = False
        return record

    def end_step(self) -> None:
        self.last_index = self.index
        self.index = None
