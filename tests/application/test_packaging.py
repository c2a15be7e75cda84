"""Packaging: the core install runs ``taylorseer.apply`` on a diffusers DiT without the bench extra, and the
commands that need the extra stop at once with one line naming the pip command.

Each check runs in a fresh interpreter whose prelude makes the extra's packages unimportable
(``sys.modules[name] = None``: ``import name`` then raises ``ModuleNotFoundError``), as on a core install.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXTRA = ("matplotlib", "scipy", "torchmetrics")
PRELUDE = f"import sys\nfor _name in {EXTRA!r}:\n    sys.modules[_name] = None\n"
PIP_HINT = 'pip install "taylorseer[bench]"'


def _python(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_apply_runs_a_diffusers_dit_without_the_bench_extra(tmp_path):
    result = _python("""
        import torch
        import taylorseer
        from diffusers import DiTTransformer2DModel
        from taylorseer.models.reference import DIT_MODELS
        from taylorseer.models.sampler import sample

        torch.manual_seed(0)
        model = DiTTransformer2DModel(**DIT_MODELS["DiT-FM-T/4"]()).eval()  # tiny, from its config
        labels = torch.arange(2)
        reference = sample(model, labels, num_steps=6, seed=0)
        with taylorseer.apply(model, taylorseer.TaylorSeerConfig(interval=3, max_order=1)) as handle:
            cached = sample(model, labels, num_steps=6, seed=0, listener=handle)
            stats = handle.stats.to_dict()
        assert (stats["steps_full"], stats["steps_forecast"]) == (3, 3), stats
        assert cached.shape == reference.shape and torch.isfinite(cached).all()
        assert not torch.equal(cached, reference)  # forecast steps really changed the output
        assert torch.equal(sample(model, labels, num_steps=6, seed=0), reference)  # removed: bit-exact again
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in EXTRA and sys.modules[m] is not None)
        assert not loaded, loaded
        print("ok")
    """.replace("EXTRA", repr(EXTRA)), tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.slow
def test_import_and_apply_load_none_of_the_extra(tmp_path):
    """With everything installed, ``import taylorseer`` and ``apply`` on a plain module import no extra package."""
    code = f"""
        import sys, torch, taylorseer
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        with taylorseer.apply(model, taylorseer.TaylorSeerConfig(interval=2, max_order=1, modules=("0",))) as h:
            h.begin(4)
            for i in range(4):
                with h.step(i, 1000.0 - 250 * i):
                    model(torch.ones(1, 4))
        print(sorted({{m.split(".")[0] for m in sys.modules}} & set({EXTRA!r})))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_commands_that_need_the_extra_say_what_to_install_in_one_line(tmp_path):
    (tmp_path / "records.jsonl").write_text("{}\n")
    result = _python("""
        from taylorseer.cli import main
        for argv in (["report", "records.jsonl", "--out", "report"], ["bench", "--quick", "--out", "b/r.jsonl"],
                     ["demo", "--per-class", "1", "--steps", "4", "--out", "demo"]):
            print(argv[0], main(argv), flush=True)
        print("plan", main(["plan", "--preset", "paper_dit", "--steps", "8"]))
        try:
            import taylorseer.eval.report
        except ImportError as err:
            print(type(err).__name__, "|", err)
    """, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = result.stdout.splitlines(), result.stderr.strip().splitlines()
    assert [line for line in out if line.split()[0] in ("report", "bench", "demo", "plan") and len(line.split()) == 2
            ] == ["report 2", "bench 2", "demo 2", "plan 0"]
    assert len(err) == 3 and all(PIP_HINT in line for line in err), err  # one line per refused command
    assert err[0] == f"taylorseer report: error: matplotlib is not installed; this needs the bench extra: {PIP_HINT}"
    assert err[1].startswith("taylorseer bench: error: torchmetrics is not installed")
    assert out[-1] == f"MissingExtraError | matplotlib is not installed; this needs the bench extra: {PIP_HINT}"
    assert not (tmp_path / "b").exists() and not (tmp_path / "demo").exists()  # stopped before any work


def test_pyproject_splits_core_and_bench_and_ships_py_typed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {req.split(">")[0].split("=")[0].split("<")[0] for req in project["dependencies"]}
    assert core == {"torch", "safetensors", "numpy", "diffusers", "tqdm"}
    assert "torch>=2.4" in project["dependencies"]  # no upper cap
    extras = project["optional-dependencies"]
    assert {r.split(">")[0] for r in extras["bench"]} >= {"matplotlib", "torchmetrics", "pillow"}
    assert "taylorseer[bench]" in extras["test"] and "taylorseer[test]" in extras["dev"]
    assert {r.split(">")[0] for r in extras["test"]} >= {"pytest", "hypothesis", "peft", "accelerate"}
    assert {r.split(">")[0] for r in extras["dev"]} >= {"ruff", "mypy"}
    assert (ROOT / "src" / "taylorseer" / "py.typed").is_file()
    assert "py.typed" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "taylorseer"]
