"""taylorseer on a transformer that diffusers' ``enable_parallelism`` shards (context parallelism), on CPU with gloo.

The session's world (world.py, conftest.py) records, per method of cases.py and per rank, the images, the
decisions per (step, branch) and the peak cache bytes; these tests compare them with the same method run in one
process:
- images within 1e-5 relative L2 of one process's, for every method (schedule-based and gated);
- identical decisions on every rank, and equal to one process's (the pooled probe vote, docs/parallel.md);
- cache bytes per rank = one process's / K at module and block granularity (every cached tensor is a token slice),
  = one process's at output granularity (diffusers gathers the output before it is cached: replicated);
- bitwise equal to one process that emulates the sharded kernels (harness.emulate_ulysses): what differs from a
  plain process is the rounding of the kernels alone.

K = 2: every method with taylorseer applied after ``enable_parallelism`` (Ulysses) on one replica, ``SUBSET``
applied before it and after it with ring on the other; K = 4: ``SUBSET`` (Ulysses) and two methods (ring).
"""

from __future__ import annotations

import cases
import pytest
import torch
import world

pytestmark = pytest.mark.slow
BOUND = 1e-5


def _compare(alone: dict, ranks: list[dict], k: int) -> int:
    """Assert the module docstring's first three claims for every method run at degree ``k`` by ``ranks`` (the
    ranks that shared the samples); returns how many ran."""
    keys = [key for key in ranks[0] if key != "unpatched" and key.split("/")[2] == str(k)]
    for key in keys:
        name = key.split("/")[0]
        mine = alone[name]
        for r, result in enumerate(ranks):
            error = cases.relative_l2(result[key]["images"], mine["images"])
            assert error <= BOUND, f"{key} rank {r}: images {error:.2e} from one process's"
            assert result[key]["decisions"] == ranks[0][key]["decisions"], f"{key}: rank {r} decided otherwise"
            granularity = name.split("-")[-1]
            expected = mine["peak_cache_bytes"] // (1 if granularity == "output" else k)
            assert result[key]["peak_cache_bytes"] == expected, (key, r, result[key]["peak_cache_bytes"], expected)
        assert ranks[0][key]["decisions"] == mine["decisions"], f"{key}: decisions differ from one process's"
        if name != "full":
            assert not all(c for _, _, c in mine["decisions"]), f"{name} forecast nothing: nothing was tested"
    return len(keys)


def test_two_ranks_equal_one_process(cp_run):
    folder, alone = cp_run
    ranks = world.rank_records(folder)
    # diffusers 0.42.1 divides by the accelerator count; when this fails it no longer does, and
    # harness.patch_accelerator_count can go
    assert {r["unpatched"]["error"] for r in ranks} == {"ZeroDivisionError"}
    counts = [_compare(alone, ranks[2 * replica:2 * replica + 2], 2) for replica in (0, 1)]
    assert counts == [1 + len(cases.methods(None)), 2 * len(world.SUBSET) + 1]


def test_four_ranks_equal_one_process(cp_run):
    folder, alone = cp_run
    assert _compare(alone, world.rank_records(folder), 4) == 1 + len(world.SUBSET) + 1 + 2


def test_sharded_ranks_equal_one_process_emulating_their_kernels_bitwise(cp_run):
    """Each rank's images are bitwise those of one process computing the sharded kernels' way (linear layers over
    each rank's rows, attention keys in the all-to-all's order): the distance to a plain process (~1e-7 here,
    docs/parallel.md) is the kernels' rounding, nothing that taylorseer or the layout does. Whether a plain process
    differs at all depends on the CPU's kernels (it does on the machine the docs were measured on,
    tests/distributed/cp_kernels.py), so it is not asserted."""
    folder, alone = cp_run
    ranks = world.rank_records(folder)
    for name, k in world.EMULATED:
        key = f"{name}/ulysses/{k}" if name == "full" else f"{name}/ulysses/{k}/after"
        emulated = alone[f"{name}/emulated/{k}"]["images"]
        for r, result in enumerate(ranks[:k]):
            assert torch.equal(result[key]["images"], emulated), (key, r)


def test_ring_and_ulysses_limits_are_refused_before_any_work(monkeypatch):
    """Without the harness's patch ring attention cannot run on CPU; Ulysses needs a degree dividing the heads."""
    from taylorseer.distributed.flux import build_model
    from taylorseer.distributed.layout import ContextParallel, check_shardable

    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="log-sum-exp.*'native'"):
        check_shardable(build_model(cases.MODEL).transformer, ContextParallel(2, "ring"))
    with pytest.raises(ValueError, match="splits the attention heads.*has 3"):
        check_shardable(build_model("flux-fm-12-16-random").transformer, ContextParallel(2, "ulysses"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="device_count"):
        check_shardable(build_model(cases.MODEL).transformer, ContextParallel(2, "ulysses"))
