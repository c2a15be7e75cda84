"""taylorseer on a transformer that diffusers' ``enable_parallelism`` shards (context parallelism), on CPU with gloo.

Each rank records, per method of cases.py, its images, its decisions per (step, branch) and its peak cache bytes;
the test process compares them with the same method run in one process:
- images within 1e-5 relative L2 of one process's, for every method (schedule-based and gated);
- identical decisions on every rank, and equal to one process's (the pooled vote, distributed/vote.py);
- cache bytes per rank = one process's / K at module and block granularity (every cached tensor is a token slice),
  = one process's at output granularity (diffusers gathers the output before it is cached: replicated).

Two spawns keep the folder inside its time budget (collectives of 4 processes on one free core are slow):
2 ranks run every method with taylorseer applied after ``enable_parallelism`` and ``SUBSET`` applied before it
(on a fresh model), Ulysses and ring; 4 ranks run ``SUBSET`` after it with Ulysses, two methods with ring. Ring
runs through the harness's log-sum-exp patch (harness.py). The 2-rank spawn then runs ``taylorseer generate
--context-parallel 2`` (compared with the command in one process), and finally rank 1 raises mid-generation:
both ranks must end with an error, not a hang, within 60 s.
"""

from __future__ import annotations

import json
import os

import cases
import numpy as np
import pytest
import torch
from harness import spawn

BOUND = 1e-5
GENERATE = ["generate", "--model", cases.MODEL, "--prompt", "3,5", "--steps", "12", "--guidance-scale", "2.0",
            "--device", "cpu", "--interval", "3"]
SUBSET = ("taylor-module", "taylor-block", "taylor-output", "calibrated-output", "gate-module", "budget-module")
TWO = (("ulysses", "after", None), ("ulysses", "before", SUBSET), ("ring", "after", SUBSET))
FOUR = (("ulysses", "after", SUBSET), ("ring", "after", ("taylor-block", "gate-module")))


def _worker(rank: int, world: int, plan: tuple, calibration_path: str, out_dir: str) -> None:
    import taylorseer
    from taylorseer.calibration.io import load_calibration
    from taylorseer.distributed.flux import build_model
    from taylorseer.distributed.layout import ContextParallel, enable, make_layout

    configs = cases.methods(load_calibration(calibration_path))
    results: dict[str, dict] = {}
    if rank == 0 and world == 2:
        results["unpatched"] = {"error": _unpatched_error()}
    for kind, order, names in plan:
        layout = make_layout(ContextParallel(world, kind))
        chosen = {n: c for n, c in configs.items() if names is None or n in names}
        if order == "after":
            pipe = build_model(cases.MODEL)
            enable(pipe.transformer, layout)
            results[f"full/{kind}"] = cases.generate(pipe, None)
            for name, config in chosen.items():
                results[f"{name}/{kind}/after"] = cases.generate(pipe, config)
        else:
            for name, config in chosen.items():  # apply first, then shard (a fresh model: sharding is for good)
                fresh = build_model(cases.MODEL)
                with taylorseer.apply(fresh, config) as handle:
                    enable(fresh.transformer, layout)
                    results[f"{name}/{kind}/before"] = cases.generate(fresh, config, handle)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if world == 2:
        from taylorseer.cli import main

        # the command in this job's process group (torchrun only adds the environment; the hybrid sample test in
        # test_cp_commands.py runs under torchrun itself)
        assert main([*GENERATE, "--out", os.path.join(out_dir, "generate"), "--context-parallel", "2"]) == 0
        _fail_one_rank(rank, world, out_dir)


def _fail_one_rank(rank: int, world: int, out_dir: str) -> None:
    """Rank 1 raises inside its 5th transformer call of a TaylorSeer generation (step 2 of 8, CFG branch 0);
    each rank records what it ended with and after how long."""
    import json
    import time

    from diffusers import FluxTransformer2DModel

    import taylorseer
    from taylorseer.distributed.flux import build_model
    from taylorseer.distributed.layout import ContextParallel, enable, fail_fast, make_layout

    if rank == 1:  # before the model is sharded: diffusers' hooks keep the forward they find
        original, calls = FluxTransformer2DModel.forward, [0]

        def forward(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("injected fault")
            return original(self, *args, **kwargs)

        FluxTransformer2DModel.forward = forward
    pipe = build_model(cases.MODEL)
    enable(pipe.transformer, make_layout(ContextParallel(world)))
    start = time.monotonic()
    try:
        with fail_fast(), taylorseer.apply(pipe, cases.methods(None)["taylor-module"]):
            cases.generate(pipe, None)
        outcome = "finished"
    except Exception as error:  # noqa: BLE001 - recorded for the test process
        outcome = type(error).__name__
    with open(os.path.join(out_dir, f"fault{rank}.json"), "w") as f:
        json.dump({"outcome": outcome, "seconds": time.monotonic() - start}, f)


def _unpatched_error() -> str:
    """What diffusers' enable_parallelism raises with the accelerator count it sees on this CPU (harness.py)."""
    from diffusers import ContextParallelConfig

    from taylorseer.distributed.flux import build_model

    patched = torch.accelerator.device_count
    torch.accelerator.device_count = _zero
    try:
        build_model(cases.MODEL).transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    except Exception as error:  # noqa: BLE001 - the test asserts which one
        return type(error).__name__
    finally:
        torch.accelerator.device_count = patched
    return "none"


def _zero() -> int:
    return 0


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    torch.set_num_threads(1)
    from taylorseer.distributed.flux import build_model

    folder = tmp_path_factory.mktemp("cp")
    calibration = cases.calibrate(str(folder / "cal.safetensors"))
    pipe = build_model(cases.MODEL)
    results = {"full": cases.generate(pipe, None)}
    results.update({name: cases.generate(pipe, config) for name, config in cases.methods(calibration).items()})
    return folder, results


def _compare(alone: dict, ranks: list[dict], world: int) -> int:
    """Assert the module docstring's three claims for every method the ranks ran; returns how many ran."""
    keys = [k for k in ranks[0] if k != "unpatched"]
    for key in keys:
        name = key.split("/")[0]
        mine = alone[name]
        for r, result in enumerate(ranks):
            error = cases.relative_l2(result[key]["images"], mine["images"])
            assert error <= BOUND, f"{key} rank {r}: images {error:.2e} from one process's"
            assert result[key]["decisions"] == ranks[0][key]["decisions"], f"{key}: rank {r} decided otherwise"
            granularity = name.split("-")[-1]
            expected = mine["peak_cache_bytes"] // (1 if granularity == "output" else world)
            assert result[key]["peak_cache_bytes"] == expected, (key, r, result[key]["peak_cache_bytes"], expected)
        assert ranks[0][key]["decisions"] == mine["decisions"], f"{key}: decisions differ from one process's"
        if name != "full":
            assert not all(c for _, _, c in mine["decisions"]), f"{name} forecast nothing: nothing was tested"
    return len(keys)


@pytest.fixture(scope="module")
def two_ranks(one_process, tmp_path_factory):
    """The 2-rank spawn: the methods, then ``taylorseer generate --context-parallel 2``, then the failing rank."""
    folder, _ = one_process
    out = tmp_path_factory.mktemp("two")
    spawn(_worker, 2, TWO, str(folder / "cal.safetensors"), str(out), ring=True)
    return out


def test_two_ranks_equal_one_process(one_process, two_ranks):
    _, alone = one_process
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(2)]
    # diffusers 0.42.1 divides by the accelerator count; when this fails it no longer does, and
    # harness.patch_accelerator_count can go
    assert ranks[0]["unpatched"]["error"] == "ZeroDivisionError"
    assert _compare(alone, ranks, 2) == 2 + len(cases.methods(None)) + 2 * len(SUBSET)


def test_a_failing_rank_ends_every_rank_with_an_error_within_60_s(two_ranks):
    """Rank 1 raised mid-generation: both ranks ended with an error (no hang) within 60 s."""
    faults = [json.loads((two_ranks / f"fault{r}.json").read_text()) for r in range(2)]
    assert faults[1]["outcome"] == "RuntimeError" and faults[0]["outcome"] != "finished", faults
    assert all(f["seconds"] < 60 for f in faults), faults


def test_generate_on_two_context_parallel_ranks_gives_the_one_process_images(two_ranks, tmp_path):
    from PIL import Image

    from taylorseer.cli import main

    torch.set_num_threads(1)
    assert main([*GENERATE, "--out", str(tmp_path / "one")]) == 0
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(two_ranks / "generate")) and len([n for n in names if n.endswith(".png")]) == 4
    for name in (n for n in names if n.endswith(".png")):
        one, cp = (np.asarray(Image.open(d / name)) for d in (tmp_path / "one", two_ranks / "generate"))
        assert np.abs(one.astype(int) - cp.astype(int)).max() <= 1, name
    record = json.loads((two_ranks / "generate" / "001.json").read_text())
    stats = json.loads((tmp_path / "one" / "001.json").read_text())["stats"]
    assert record["context_parallel"] == {"degree": 2, "kind": "ulysses"} and 0 < record["stats"]["steps_forecast"]
    assert record["stats"]["peak_cache_bytes"] * 2 == stats["peak_cache_bytes"]
    assert {k: v for k, v in record["stats"].items() if "bytes" not in k} == {
        k: v for k, v in stats.items() if "bytes" not in k}


def test_four_ranks_equal_one_process(one_process, tmp_path):
    folder, alone = one_process
    spawn(_worker, 4, FOUR, str(folder / "cal.safetensors"), str(tmp_path), ring=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    assert _compare(alone, ranks, 4) == 2 + len(SUBSET) + 2


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
