"""Adaptive decisions under torch.distributed: every rank takes the same decision (2 processes, gloo, CPU).

Each rank samples different images with a confidence gate, so their own observations differ; the probe
observation is all-reduced (maximum) before the policy resolves it, so the decision lists agree. Without the
process group the same two runs decide differently, which is what makes the agreement necessary and what this test
would catch if it were lost. This is the default-group vote of ranks that are not sharded; a transformer sharded by
diffusers' context parallelism pools the probe sums over its own ranks instead, which gives the one-process
decision (taylorseer.distributed.vote; tests/distributed/test_cp_model.py).
"""

import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import taylorseer
from taylorseer.forecast import TaylorForecast
from taylorseer.parts import CacheConfig
from taylorseer.policy import ConfidenceGate

POLICY = ConfidenceGate(threshold=0.4, warmup_steps=1, max_forecast=4)
SEEDS = (0, 3)  # on the tiny random DiT these two are gated differently when alone


def _decisions(model, seed: int) -> list[bool]:
    from taylorseer.models.sampler import sample

    with taylorseer.apply(model, CacheConfig(POLICY, TaylorForecast(max_order=1))) as handle:
        sample(model, torch.tensor([seed % 10, 3]), num_steps=12, seed=seed, listener=handle)
        return [d["compute"] for d in handle.stats.decisions]


def _tiny_model():
    from taylorseer.models.reference import build_reference

    torch.manual_seed(0)
    return build_reference("DiT-FM-T/4").requires_grad_(False)


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        decisions = _decisions(_tiny_model(), SEEDS[rank])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(decisions, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_take_identical_gated_decisions():
    alone = [_decisions(_tiny_model(), seed) for seed in SEEDS]
    assert alone[0] != alone[1]  # on their own, the two ranks' images would be gated differently
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank, args=(2, init_file, tmp), nprocs=2, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert not all(ranks[0]) and len(ranks[0]) == 12  # some steps forecast; one decision per step (batched CFG)
