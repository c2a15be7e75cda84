"""The one world of the distributed tests: 4 processes started once (harness.fork_world, forked from a fork server
that imported torch and diffusers) run every case in turn and write what each rank saw; the test process computes
the one-process references meanwhile (conftest.py), and the tests compare. One world instead of a spawn per case:
no process imports torch and diffusers again, and the 4 processes keep both cores busy while the test process
works.

The phases, in order (every rank runs ``run``):

1. Model cases in a gloo group joined through a file. K = 2 as two replicas working at once, each
   ``agreement_group(None)`` so that only the replica's pooled vote decides: replica 0 runs every method of
   cases.py with taylorseer applied after ``enable_parallelism`` (Ulysses), replica 1 runs ``SUBSET`` applied
   before it (on a fresh model) and after it with ring. Then K = 4 (all ranks, default group): ``SUBSET`` with
   Ulysses, two methods with ring. Every rank first records what diffusers raises without the accelerator patch.
2. The commands, joining their job through env:// exactly as under ``torchrun`` (harness.torchrun_environment;
   the agent itself is not started): ``taylorseer sample`` on 2 data-parallel replicas x 2 Ulysses ranks (the
   command starts and leaves its own group), then ``taylorseer generate --context-parallel 4`` (its group stays).
3. In that group: the default-group probe vote of unsharded ranks sampling different images (the DiT cases of
   test_distributed.py), then rank 1 raises inside its 5th transformer call of a K = 4 generation and every rank
   records what it ended with, and after how long.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import cases
import torch
import torch.distributed as dist
from harness import init_file_group, torchrun_environment

WORLD = 4
SUBSET = ("taylor-module", "taylor-block", "taylor-output", "calibrated-output", "gate-module", "budget-module")
K2_BY_REPLICA = {0: (("ulysses", "after", None),), 1: (("ulysses", "before", SUBSET), ("ring", "after", SUBSET))}
K4 = (("ulysses", "after", SUBSET), ("ring", "after", ("taylor-block", "gate-module")))
GENERATE = ["generate", "--model", cases.MODEL, "--prompt", "3,5", "--steps", "12", "--guidance-scale", "2.0",
            "--device", "cpu", "--interval", "3"]
GATE = ('{"abscissa": "step", "forecaster": {"max_order": 1, "type": "TaylorForecast"}, "policy": {"max_forecast": 3, '
        '"threshold": 0.2, "type": "ConfidenceGate", "warmup_steps": 1}, "targets": {"granularity": "module"}}')
EMULATED = (("full", 2), ("full", 4), ("gate-module", 4), ("taylor-block", 4))  # (method, K) also emulated alone
GROUP_SECONDS = 300  # phase 1's group: a silent peer is an error after this long (replicas may finish apart)


def sample_args(out: str, config: str) -> list[str]:
    """``taylorseer sample`` of the hybrid case: 8 samples of classes 3 and 5 in batches of 2, the gate config."""
    return ["sample", "--model", cases.MODEL, "--prompt", "3,5", "--num-samples", "8", "--batch-size", "2",
            "--steps", str(cases.STEPS), "--cfg-scale", str(cases.GUIDANCE), "--config", config,
            "--image-dtype", "float32", "--out", out]


def rank_records(folder: Any) -> list[dict]:
    """Phase 1's records of every rank."""
    return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(WORLD)]


def run(rank: int, world: int, folder: str, ports: tuple[int, int]) -> None:
    """Every phase of the module docstring on this rank; records land in ``folder``."""
    from taylorseer.cli import main

    init_file_group(rank, world, os.path.join(folder, "init"), GROUP_SECONDS)
    try:
        results = _model_cases(rank, world, os.path.join(folder, "cal.safetensors"))
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    torchrun_environment(rank, world, ports[0])
    assert main([*sample_args(os.path.join(folder, "hybrid"), os.path.join(folder, "gate.json")),
                 "--context-parallel", "2"]) == 0
    torchrun_environment(rank, world, ports[1])
    assert main([*GENERATE, "--out", os.path.join(folder, "generate"), "--context-parallel", str(world)]) == 0
    with open(os.path.join(folder, f"vote{rank}.json"), "w") as f:
        json.dump(cases.dit_decisions(cases.DIT_SEEDS[rank % 2]), f)
    _fail_one_rank(rank, world, folder)


def _model_cases(rank: int, world: int, calibration_path: str) -> dict[str, Any]:
    from taylorseer.calibration.io import load_calibration
    from taylorseer.distributed.layout import CP_KINDS, ContextParallel, make_layout
    from taylorseer.runtime.step import agreement_group

    configs = cases.methods(load_calibration(calibration_path))
    results: dict[str, Any] = {"unpatched": {"error": _unpatched_error()}}  # every rank: collective if it worked
    # every rank builds every mesh, in one order (new process groups are collective)
    layouts = {(kind, k): make_layout(ContextParallel(k, kind)) for k in (2, world) for kind in CP_KINDS}
    with agreement_group(None):  # the two replicas run different cases at the same time
        for kind, order, names in K2_BY_REPLICA[layouts["ulysses", 2].replica]:
            results.update(_plan(layouts[kind, 2], order, names, configs))
    dist.barrier()
    for kind, order, names in K4:
        results.update(_plan(layouts[kind, world], order, names, configs))
    return results


def _plan(layout: Any, order: str, names: tuple[str, ...] | None, configs: dict) -> dict[str, Any]:
    """Results keyed ``name/kind/K/order`` (``full/kind/K`` for full compute)."""
    import taylorseer
    from taylorseer.distributed.flux import build_model
    from taylorseer.distributed.layout import enable

    kind, k = layout.cp.kind, layout.cp.degree
    chosen = {n: c for n, c in configs.items() if names is None or n in names}
    out: dict[str, Any] = {}
    if order == "after":
        pipe = build_model(cases.MODEL)
        enable(pipe.transformer, layout)
        out[f"full/{kind}/{k}"] = cases.generate(pipe, None)
        for name, config in chosen.items():
            out[f"{name}/{kind}/{k}/after"] = cases.generate(pipe, config)
        return out
    for name, config in chosen.items():  # apply first, then shard (a fresh model: sharding is for good)
        fresh = build_model(cases.MODEL)
        with taylorseer.apply(fresh, config) as handle:
            enable(fresh.transformer, layout)
            out[f"{name}/{kind}/{k}/before"] = cases.generate(fresh, config, handle)
    return out


def _fail_one_rank(rank: int, world: int, folder: str) -> None:
    """Rank 1 raises inside its 5th transformer call of a TaylorSeer generation (step 2 of 8, CFG branch 0) on
    ``world`` context-parallel ranks; each rank records what it ended with and after how long."""
    from diffusers import FluxTransformer2DModel

    import taylorseer
    from taylorseer.distributed.flux import build_model
    from taylorseer.distributed.layout import ContextParallel, enable, fail_fast, make_layout

    if rank == 1:  # before the model is sharded: diffusers' hooks keep the forward they find
        original, calls = FluxTransformer2DModel.forward, [0]

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("injected fault")
            return original(self, *args, **kwargs)

        FluxTransformer2DModel.forward = forward  # type: ignore[method-assign]
    pipe = build_model(cases.MODEL)
    enable(pipe.transformer, make_layout(ContextParallel(world)))
    start = time.monotonic()
    try:
        with fail_fast(), taylorseer.apply(pipe, cases.methods(None)["taylor-module"]):
            cases.generate(pipe, None)
        outcome = "finished"
    except Exception as error:  # noqa: BLE001 - recorded for the test process
        outcome = type(error).__name__
    with open(os.path.join(folder, f"fault{rank}.json"), "w") as f:
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
