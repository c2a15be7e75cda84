"""The host (Python) side of the hot path (issue 24): what a forecast step costs in Python per target, counted
deterministically (Python calls, not seconds), and the per-generation caches that keep it flat.

Timing lives in ``scripts/profile_forecast_step.py --python``; these tests count what the timing is made of, so they
fail when a per-call cost comes back, on any machine.
"""

from __future__ import annotations

import pytest

from taylorseer.policy import IntervalSchedule
from taylorseer.policy.base import StepInfo, build_policy
from taylorseer.policy.interval import IntervalPolicy

#################################################################################
#                 The interval policy: one plan per generation                  #
#################################################################################

@pytest.mark.parametrize("num_steps", [None, 1000])
def test_interval_decisions_are_planned_once_not_at_every_step(monkeypatch, num_steps):
    calls = []
    plan = IntervalPolicy.plan
    monkeypatch.setattr(IntervalPolicy, "plan", lambda self, n: calls.append(n) or plan(self, n))
    policy = build_policy(IntervalSchedule(interval=4, warmup_steps=2))
    policy.begin(num_steps)
    decisions = [policy.decide(StepInfo(i, num_steps, float(i))) for i in range(1000)]
    # 'FF' then 'fffF' repeated: the literal schedule of interval 4 after a warm-up of 2
    expected = [True, True] + ([False, False, False, True] * 250)[:998]
    assert [d.compute for d in decisions] == expected
    assert [d.reason for d in decisions[:7]] == ["warmup", "warmup", "interval", "interval", "interval", "interval",
                                                  "interval"]
    assert len(calls) <= (1 if num_steps else 11)  # growing by doubling without num_steps: log2(1000) + 1 plans
