"""scripts/compare_diffusers_peer.py on the tiny DiT, one schedule, few steps, one repeat: rows, finite errors,
ours (reference scheme) bitwise equal to diffusers' TaylorSeer. No timing is asserted."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # runs scripts/compare_diffusers_peer.py end to end

pytest.importorskip("diffusers.hooks.taylorseer_cache")
torch.set_num_threads(1)
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_diffusers_peer.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_diffusers_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_dit_side_by_side(script, tmp_path, capsys):
    out = tmp_path / "peer.md"
    rows = script.main(["--models", "dit", "--intervals", "3", "--orders", "1", "2", "--steps", "12",
                        "--repeats", "1", "--batch", "1", "--out", str(out)])
    assert [(r.max_order, r.method) for r in rows] == [(o, m) for o in (1, 2) for m in script.METHODS]
    for r in rows:
        assert r.model == "dit" and (r.interval, r.warmup_steps) == (3, 2)
        assert math.isfinite(r.rel_l2) and r.wall_s > 0 and math.isfinite(r.wall_vs_full)
        assert r.full_steps == (12 if r.method == "full" else 5)  # steps 0, 1, 4, 7, 10
    by = {(r.max_order, r.method): r for r in rows}
    for order in (1, 2):
        assert by[order, "full"].rel_l2 == 0.0
        assert by[order, "diffusers"].rel_l2 > 0.0  # forecasting happened
        ours = by[order, "ours reference"]
        assert ours.equal_peer is True and ours.rel_l2_vs_peer == 0.0
        assert ours.rel_l2 == by[order, "diffusers"].rel_l2
        assert by[order, "ours divided"].equal_peer is not None and by[order, "diffusers"].equal_peer is None
    printed = capsys.readouterr().out
    assert printed.count("\n| dit | 3 |") == 8 and "| ours reference |" in printed
    report = out.read_text()
    assert "python scripts/compare_diffusers_peer.py --models dit" in report and "torch thread(s)" in report
    assert "| dit | 3 | 2 | 2 | diffusers |" in report
