"""The policy contract and its registry: when a step (of one CFG branch) is computed in full.

The runtime asks a policy exactly once per (step, branch), on the host, before the transformer's targets run:
``decide(info) -> Decision``. A static policy (fixed interval, a searched schedule) answers from the step index.
An adaptive policy may answer ``Decision(compute=False, probe=True)``: the runtime then computes the *probe*
targets (the first ``probe_blocks`` blocks) for real, measures an ``Observation`` (how far their forecast is from
what they computed, how much they changed since the previous step), agrees it across ranks under
``torch.distributed``, and asks ``resolve(info, observation) -> bool`` (True: compute the rest of the step in
full). Finally ``notify(info, computed)`` tells the policy what really happened (the runtime may compute a step
the policy meant to forecast: no factors yet, a shape change, a non-finite forecast).

One policy object serves one CFG branch of one generation; ``begin(num_steps)`` resets it. Policies are plain
Python over floats and ints: no tensors, no hooks.

Adding a policy is one file: a frozen config dataclass, a ``Policy`` subclass, one ``register_policy`` line.

Example:
    >>> from taylorseer.policy import IntervalSchedule, build_policy
    >>> policy = build_policy(IntervalSchedule(interval=3, warmup_steps=1))
    >>> policy.begin(7)
    >>> "".join("F" if policy.decide(StepInfo(i, 7, float(i))).compute else "f" for i in range(7))
    'FffFffF'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar


@dataclass(frozen=True)
class StepInfo:
    """What the runtime knows when it asks: step ``index`` (0-based, sampling order) of ``num_steps`` (None when
    not told), the abscissa ``point`` (step index, timestep or sigma), the CFG ``branch`` key."""

    index: int
    num_steps: int | None
    point: float
    branch: Any = 0


@dataclass(frozen=True)
class Decision:
    """The runtime's plain instruction for one (step, branch).

    ``compute``: run every target in full (True) or forecast them (False). ``probe`` (only with
    ``compute=False``): compute the probe targets first and ask ``resolve``. ``reason``: a short word for records
    ("warmup", "interval", "tail", "gate", "budget", "cap", ...).
    """

    compute: bool
    probe: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if self.probe and self.compute:
            raise ValueError("Decision(probe=True) needs compute=False: a computed step has nothing to probe")


@dataclass(frozen=True)
class Observation:
    """What the probe targets showed on this step (relative errors, dimensionless, >= 0).

    ``forecast_error``: ||computed - forecast|| / ||computed|| (L2 over the probe targets' tensors).
    ``change``: ||computed - previous|| / ||previous|| (L1), against the probe targets' outputs at the previous
    step of this branch (``inf`` when there is none).
    """

    forecast_error: float
    change: float


class Policy:
    """Base class: ``decide`` must be overridden; ``resolve`` by policies that probe; ``plan`` by static ones.

    ``probe_blocks``: how many leading blocks a probe computes (0: the policy never probes).
    """

    probe_blocks: int = 0

    def begin(self, num_steps: int | None) -> None:
        """A new generation of ``num_steps`` steps (None: not told): forget everything."""

    def decide(self, info: StepInfo) -> Decision:
        raise NotImplementedError

    def resolve(self, info: StepInfo, observation: Observation) -> bool:
        """After a probe: True to compute the rest of the step in full."""
        raise NotImplementedError(f"{type(self).__name__} returned a probe decision but does not resolve it")

    def notify(self, info: StepInfo, computed: bool) -> None:
        """What happened at this (step, branch): computed in full or forecast."""

    def plan(self, num_steps: int) -> list[bool] | None:
        """The whole compute (True) / forecast (False) list, for static policies; None for adaptive ones."""
        return None


C = TypeVar("C")
_POLICIES: dict[type, Callable[[Any], Policy]] = {}


def register_policy(config_type: type[C]) -> Callable[[Callable[[C], Policy]], Callable[[C], Policy]]:
    """Decorator: ``builder(config) -> Policy`` handles configs of exactly ``config_type``."""

    def decorate(builder: Callable[[C], Policy]) -> Callable[[C], Policy]:
        _POLICIES[config_type] = builder
        return builder

    return decorate


def build_policy(config: Any) -> Policy:
    """A fresh policy object for a policy config (``TypeError`` naming the registered types otherwise)."""
    builder = _POLICIES.get(type(config))
    if builder is None:
        names = sorted(t.__name__ for t in _POLICIES)
        raise TypeError(f"policy must be one of the registered policy configs {names}, got {type(config).__name__}")
    return builder(config)


def registered_policies() -> dict[str, type]:
    """Name -> config type of every registered policy."""
    return {t.__name__: t for t in _POLICIES}


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    """``ValueError`` naming ``owner.name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def check_steps(owner: str, name: str, steps: Any, why_zero: str) -> tuple[int, ...]:
    """``steps`` as a tuple of 0-based step indices, sorted, unique and starting with 0; else ``ValueError``
    naming ``owner.name`` (``why_zero``: why step 0 must be in it, for the message).

    Example:
        >>> check_steps("FixedSchedule", "full_steps", [0, 3, 9], "the first step is always full")
        (0, 3, 9)
    """
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise ValueError(f"{owner}.{name} must be a tuple of ints, got {steps!r}")
    steps = tuple(steps)
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"{owner}.{name} must hold ints, got {step!r} in {steps!r}")
    if not steps or steps[0] != 0:
        raise ValueError(f"{owner}.{name} must start with step 0 ({why_zero}), got {steps!r}")
    for before, after in zip(steps, steps[1:]):
        if after <= before:
            raise ValueError(f"{owner}.{name} must be sorted and unique, got {steps!r} ({after} after {before})")
    return steps
