"""The commands under context parallelism, in the session's world (world.py), joining their job through env://
as under ``torchrun``:

- ``taylorseer sample`` on 4 processes as 2 data-parallel replicas x 2 Ulysses ranks, a gated method: the merged
  set is bitwise the set of the same command in one process that emulates the sharded kernels
  (harness.emulate_ulysses), within 1e-5 relative L2 of the plain one-process set (not bitwise: the kernels of a
  sharded run round differently, docs/parallel.md), and every batch took the same number of full steps;
- ``taylorseer generate --context-parallel 4``: the one-process PNGs (within one grey level) and stats, a quarter
  of the cache bytes per rank;
- a rank failing mid-generation (K = 4): every rank ends with an error, not a hang, within 60 s.
"""

from __future__ import annotations

import glob
import json
import os

import cases
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _steps_full(folder) -> dict[int, int]:
    shards = glob.glob(os.path.join(folder, "shards", "*.npz"))
    return {int(np.load(f)["indices"][0]): int(np.load(f)["steps_full"]) for f in shards}


def test_hybrid_sample_equals_one_process(cp_run):
    folder, _ = cp_run
    one, emulated, hybrid = (np.load(folder / d / "samples.npz") for d in ("one-sample", "one-sample-emulated",
                                                                            "hybrid"))
    assert np.array_equal(one["indices"], hybrid["indices"]) and np.array_equal(emulated["indices"], hybrid["indices"])
    assert np.array_equal(emulated["images"], hybrid["images"])  # bitwise, the sharded kernels emulated
    a, b = one["images"].astype(np.float64), hybrid["images"].astype(np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-5
    steps = _steps_full(folder / "one-sample")
    assert steps == _steps_full(folder / "hybrid") == _steps_full(folder / "one-sample-emulated")
    assert min(steps.values()) < cases.STEPS  # the gate forecast: its decisions were tested
    writers = {os.path.basename(f).split("-")[1] for f in glob.glob(str(folder / "hybrid" / "shards" / "*.npz"))}
    assert writers == {"0", "2"}  # the first rank of each replica writes its batches
    manifest = json.loads((folder / "hybrid" / "manifest.json").read_text())
    assert manifest["identity"]["context_parallel"] == {"degree": 2, "kind": "ulysses"}


def test_generate_on_four_context_parallel_ranks_gives_the_one_process_images(cp_run):
    from PIL import Image

    folder, _ = cp_run
    names = sorted(os.listdir(folder / "one-generate"))
    assert names == sorted(os.listdir(folder / "generate")) and len([n for n in names if n.endswith(".png")]) == 4
    for name in (n for n in names if n.endswith(".png")):
        one, cp = (np.asarray(Image.open(folder / d / name)) for d in ("one-generate", "generate"))
        assert np.abs(one.astype(int) - cp.astype(int)).max() <= 1, name
    record = json.loads((folder / "generate" / "001.json").read_text())
    stats = json.loads((folder / "one-generate" / "001.json").read_text())["stats"]
    assert record["context_parallel"] == {"degree": 4, "kind": "ulysses"} and 0 < record["stats"]["steps_forecast"]
    assert record["stats"]["peak_cache_bytes"] * 4 == stats["peak_cache_bytes"]
    assert {k: v for k, v in record["stats"].items() if "bytes" not in k} == {
        k: v for k, v in stats.items() if "bytes" not in k}


def test_a_failing_rank_ends_every_rank_with_an_error_within_60_s(cp_run):
    """Rank 1 raised mid-generation: every rank ended with an error (no hang) within 60 s."""
    folder, _ = cp_run
    faults = [json.loads((folder / f"fault{r}.json").read_text()) for r in range(4)]
    assert faults[1]["outcome"] == "RuntimeError", faults
    assert all(f["outcome"] != "finished" for f in faults), faults
    assert all(f["seconds"] < 60 for f in faults), faults
