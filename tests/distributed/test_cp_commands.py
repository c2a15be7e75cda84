"""The commands under context parallelism: `taylorseer sample` on a hybrid data x context layout under torchrun.

- ``taylorseer sample`` on 4 processes as 2 data-parallel replicas of 2 context-parallel ranks (torchrun, through
  launch.py for the harness's patches), a gated method: the merged set is within 1e-5 relative L2 of the same
  command run in one process (not bitwise: sharded matmuls and attention round differently, ~1e-7), and every
  batch took the same number of full steps as in one process (decisions agreed within each replica only).

``taylorseer generate --context-parallel 2`` and a rank failing mid-generation are tested in test_cp_model.py,
inside its 2-rank spawn (no extra processes).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import cases
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GATE = ('{"abscissa": "step", "forecaster": {"max_order": 1, "type": "TaylorForecast"}, "policy": {"max_forecast": 3, '
        '"threshold": 0.2, "type": "ConfidenceGate", "warmup_steps": 1}, "targets": {"granularity": "module"}}')


def _sample_args(out: str, config: str) -> list[str]:
    return ["sample", "--model", cases.MODEL, "--prompt", "3,5", "--num-samples", "8", "--batch-size", "2",
            "--steps", str(cases.STEPS), "--cfg-scale", str(cases.GUIDANCE), "--config", config,
            "--image-dtype", "float32", "--out", out]


def _steps_full(folder: str) -> dict[int, int]:
    shards = glob.glob(os.path.join(folder, "shards", "*.npz"))
    return {int(np.load(f)["indices"][0]): int(np.load(f)["steps_full"]) for f in shards}


def test_hybrid_sample_equals_one_process(tmp_path):
    from taylorseer.cli import main

    config = tmp_path / "gate.json"
    config.write_text(GATE)
    torch.set_num_threads(1)
    assert main(_sample_args(str(tmp_path / "one"), str(config))) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          os.path.join(HERE, "launch.py"), *_sample_args(str(tmp_path / "hybrid"), str(config)),
                          "--context-parallel", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, hybrid = (np.load(tmp_path / d / "samples.npz") for d in ("one", "hybrid"))
    a, b = one["images"].astype(np.float64), hybrid["images"].astype(np.float64)
    assert np.array_equal(one["indices"], hybrid["indices"])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-5
    steps = _steps_full(str(tmp_path / "one"))
    assert steps == _steps_full(str(tmp_path / "hybrid")) and min(steps.values()) < cases.STEPS
    writers = {os.path.basename(f).split("-")[1] for f in glob.glob(str(tmp_path / "hybrid" / "shards" / "*.npz"))}
    assert writers == {"0", "2"}  # the first rank of each replica writes its batches
    manifest = json.loads((tmp_path / "hybrid" / "manifest.json").read_text())
    assert manifest["identity"]["context_parallel"] == {"degree": 2, "kind": "ulysses"}

