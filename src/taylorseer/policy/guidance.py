"""Guidance caching: on some steps compute only the conditional CFG branch and estimate the guidance difference.

Classifier-free guidance evaluates the model twice per step, ``eps = eps_u + s (eps_c - eps_u)``. The guidance
difference ``d = eps_c - eps_u`` changes slowly over the steps (FasterCache's CFG cache, Lv et al. 2024,
arXiv 2410.19355), so a *half* step may compute ``eps_c`` alone and use ``eps_u = eps_c - d_hat``, where
``d_hat`` is estimated from the differences of the last *both-branch* steps. ``GuidanceCache`` says which steps
compute both branches and how ``d_hat`` is estimated; ``taylorseer.models.sampler.sample(..., guidance_cache=)``
runs it. FasterCache's frequency split of ``d`` (low and high frequencies weighted separately) is not done here.

The estimates are pure tensor functions of the computed ``(step, d)`` pairs, the abscissa being the step index:

- ``"reuse"``: the last computed ``d``.
- ``"linear"``: the line through the last two computed ``d``, evaluated at the step (``"reuse"`` while only one
  is known).

Example:
    >>> cache = GuidanceCache(interval=3, warmup_steps=2, estimate="linear")
    >>> cache.pattern(10)
    'BBhhBhhBhh'
    >>> GuidanceCache(both_steps=(0, 1, 4)).pattern(6)
    'BBhhBh'
    >>> GuidanceCache.from_dict(cache.to_dict()) == cache
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import check_int, check_steps
from .interval import IntervalPolicy, config_from_dict, config_to_dict

ESTIMATES = ("reuse", "linear")


@dataclass(frozen=True)
class GuidanceCache:
    """Which steps compute both CFG branches (the others compute the conditional one only) and how the guidance
    difference of the others is estimated (``estimate``: one of ``ESTIMATES``).

    Give exactly one of:

    - ``interval``: both branches every ``interval`` steps after the first ``warmup_steps`` steps, and on the
      last ``tail_steps`` steps (``IntervalPolicy``'s schedule; ``interval=1`` computes both everywhere);
    - ``both_steps``: the explicit both-branch steps (0-based, sorted, unique, containing 0; a list is stored
      as a tuple), checked against the generation's ``num_steps`` when it runs.

    ``warmup_steps`` >= 1: step 0 has no earlier difference to estimate from. ``name``: a free label for records.

    Example:
        >>> GuidanceCache(interval=2).plan(5)
        [True, False, True, False, True]
    """

    interval: int | None = None
    warmup_steps: int = 1
    tail_steps: int = 0
    both_steps: tuple[int, ...] | None = None
    estimate: str = "reuse"
    name: str = ""

    def __post_init__(self) -> None:
        if self.estimate not in ESTIMATES:
            raise ValueError(f"GuidanceCache.estimate must be one of {list(ESTIMATES)}, got {self.estimate!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"GuidanceCache.name must be a str, got {self.name!r}")
        check_int("GuidanceCache", "warmup_steps", self.warmup_steps, 1)
        check_int("GuidanceCache", "tail_steps", self.tail_steps, 0)
        if (self.interval is None) == (self.both_steps is None):
            raise ValueError(f"GuidanceCache needs exactly one of interval (both branches every N steps) and "
                             f"both_steps (an explicit list), got interval={self.interval!r}, "
                             f"both_steps={self.both_steps!r}")
        if self.interval is not None:
            check_int("GuidanceCache", "interval", self.interval, 1)
            return
        if (self.warmup_steps, self.tail_steps) != (1, 0):
            raise ValueError(f"GuidanceCache.warmup_steps and tail_steps belong to interval; with both_steps list "
                             f"every both-branch step, got warmup_steps={self.warmup_steps!r}, "
                             f"tail_steps={self.tail_steps!r}")
        object.__setattr__(self, "both_steps", check_steps("GuidanceCache", "both_steps", self.both_steps,
                                                           "nothing to estimate the guidance difference from "
                                                           "before it"))

    def plan(self, num_steps: int) -> list[bool]:
        """For each step ``0 .. num_steps - 1``: True to compute both branches, False for the conditional one only.
        ``ValueError`` naming ``both_steps`` if one of them is not below ``num_steps``."""
        check_int("GuidanceCache.plan", "num_steps", num_steps, 1)
        if self.interval is not None:
            return IntervalPolicy(self.interval, self.warmup_steps, self.tail_steps).plan(num_steps)
        steps = self.both_steps or ()
        if steps[-1] >= num_steps:
            raise ValueError(f"GuidanceCache.both_steps must lie in [0, num_steps - 1] = [0, {num_steps - 1}], "
                             f"got step {steps[-1]}")
        return [step in steps for step in range(num_steps)]

    def pattern(self, num_steps: int) -> str:
        """The plan as a string: ``B`` for both branches, ``h`` for a half (conditional-only) step."""
        return "".join("B" if both else "h" for both in self.plan(num_steps))

    def cost(self, num_steps: int) -> float:
        """Model evaluations of the generation in full-step units (a half step counts 0.5), e.g. 37.5 of 50."""
        plan = self.plan(num_steps)
        return sum(1.0 if both else 0.5 for both in plan)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON types; ``both_steps`` as a list or None)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuidanceCache:
        """The config from ``to_dict``'s output; unknown or missing keys are an error."""
        return config_from_dict(cls, data)


#################################################################################
#                     Estimates of the guidance difference                      #
#################################################################################

def linear_difference(step_a: int, d_a: torch.Tensor, step_b: int, d_b: torch.Tensor, step: int) -> torch.Tensor:
    """The line through ``(step_a, d_a)`` and ``(step_b, d_b)`` (``step_a < step_b``) evaluated at ``step``.

    Example:
        >>> linear_difference(0, torch.tensor([1.0]), 2, torch.tensor([3.0]), 3)
        tensor([4.])
    """
    if not step_a < step_b:
        raise ValueError(f"linear_difference needs step_a < step_b, got {step_a} and {step_b}")
    return d_b + (d_b - d_a) * ((step - step_b) / (step_b - step_a))


def estimate_difference(estimate: str, known: Sequence[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    """The guidance difference ``d_hat`` at ``step`` from the computed ``(step, d)`` pairs ``known`` (oldest
    first, steps increasing, all before ``step``): ``"reuse"`` returns the last ``d`` (the same tensor, not a
    copy); ``"linear"`` extrapolates from the last two (``"reuse"`` while only one is known).

    Example:
        >>> known = [(0, torch.tensor([1.0])), (2, torch.tensor([2.0]))]
        >>> estimate_difference("reuse", known, 3), estimate_difference("linear", known, 3)
        (tensor([2.]), tensor([2.5000]))
    """
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {list(ESTIMATES)}, got {estimate!r}")
    if not known:
        raise ValueError(f"no computed guidance difference before step {step}: a both-branch step must come first")
    if known[-1][0] >= step:
        raise ValueError(f"the guidance difference at step {step} is estimated from earlier steps only, got the "
                         f"computed step {known[-1][0]}")
    if estimate == "reuse" or len(known) == 1:
        return known[-1][1]
    (step_a, d_a), (step_b, d_b) = known[-2], known[-1]
    return linear_difference(step_a, d_a, step_b, d_b, step)
