"""Adaptive decisions under torch.distributed: every rank takes the same decision (4 processes, gloo, CPU).

In the session's world (world.py), after the commands, each rank samples the tiny random DiT (not sharded) with
a confidence gate, ranks 0 and 2 with seed 0, ranks 1 and 3 with seed 3, so their own observations differ; the
probe observation is all-reduced (maximum) over the default group before the policy resolves it, so the decision
lists agree. Alone, the two seeds are gated differently, which is what makes the agreement necessary and what
this test would catch if it were lost. This is the default-group vote of ranks that are not sharded; a
transformer sharded by diffusers' context parallelism pools the probe sums over its own ranks instead, which gives
the one-process decision (the pooled vote, docs/parallel.md; test_cp_model.py).
"""

import json

import pytest

pytestmark = pytest.mark.slow


def test_ranks_take_identical_gated_decisions(cp_run):
    folder, alone = cp_run
    assert alone["dit"][0] != alone["dit"][1]  # on their own, the two seeds would be gated differently
    ranks = [json.loads((folder / f"vote{r}.json").read_text()) for r in range(4)]
    assert all(decisions == ranks[0] for decisions in ranks)
    assert not all(ranks[0]) and len(ranks[0]) == 12  # some steps forecast; one decision per step (batched CFG)
