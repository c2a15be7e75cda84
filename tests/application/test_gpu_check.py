"""scripts/gpu_check.py runs end to end at small widths on the CPU (``--tiny``): every method is measured, our
methods skip FLOPs, and our generations dispatch no host sync."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs scripts/gpu_check.py end to end

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_tiny_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--tiny", "--steps", "16", "--repeats", "1", "--modes", "eager", "--double", "1",
                        "--single", "2"])
    printed = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["full", "ours module", "ours block", "ours output", "diffusers hooks"]
    by = {r["method"]: r for r in rows}
    full_steps = 3 + (16 - 3) // 6  # warm-up 3, interval 6
    for name in ("ours module", "ours block", "ours output"):
        assert by[name]["flops_speedup"] > 1.5, by[name]
        assert by[name]["syncs"] == 0, by[name]
        assert 0 <= by[name]["host_reads"] <= full_steps, by[name]
        assert by[name]["efficiency"] > 0
    assert by["diffusers hooks"]["flops_speedup"] > 1.5
    assert "reduce-overhead" not in printed and "failed" not in printed
