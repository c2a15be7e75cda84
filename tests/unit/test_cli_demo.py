"""CLI: one-line errors and exit codes; demo rows and picture on a tiny model."""

import pytest

from taylorseer import TaylorSeerConfig
from taylorseer.cli import main
from taylorseer.demo import DemoMethod, format_table, run_demo


def test_plan_prints_pattern(capsys):
    assert main(["plan", "--preset", "paper_dit", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "FFfffFfffF" in out and "4 full / 10 steps" in out


@pytest.mark.parametrize(
    "argv, field",
    [(["plan", "--interval", "0"], "interval"), (["plan", "--order", "-1"], "max_order"),
     (["plan", "--steps", "0"], "num_steps")],
)
def test_bad_values_exit_2_with_one_line(capsys, argv, field):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err


def test_unknown_choice_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--scheme", "newton"])
    assert info.value.code == 2 and "divided" in capsys.readouterr().err


def test_demo_rows_and_picture(tmp_path, tiny_dit):
    methods = [DemoMethod("full", None, 6),
               DemoMethod("ts", TaylorSeerConfig(interval=2, warmup_steps=1, max_order=1), 6),
               DemoMethod("ddim-4", None, 4)]
    rows = run_demo(out_dir=tmp_path, per_class=1, model=tiny_dit, methods=methods, progress=False)
    assert [r["method"] for r in rows] == ["full", "ts", "ddim-4"]
    full, ts, ddim = rows
    assert full["psnr"] == float("inf") and full["flops_speedup"] == 1.0
    assert ts["full_steps"] == methods[1].config.full_steps(6) == 3 and ts["flops_speedup"] > 1.0 and ts["cache_mb"] > 0
    assert ddim["full_steps"] == 4 and ddim["flops_speedup"] == pytest.approx(1.5)
    assert all(0 <= r["class_acc"] <= 1 and r["fid_fmnist"] >= 0 for r in rows)
    assert full["fid_to_full"] == 0.0 and ts["fid_to_full"] > 0 and ddim["fid_to_full"] > 0
    assert (tmp_path / "demo.png").stat().st_size > 1000
    table = format_table(rows)
    assert table.count("\n") == 4 and "| ts | 3 |" in table


def test_train_reference_flags_override_the_shipped_recipe():
    import json
    from dataclasses import asdict

    from taylorseer.cli import build_parser, train_config_from_args
    from taylorseer.models.checkpoint import load_tensors
    from taylorseer.models.pretrained import REFERENCE_PATH
    from taylorseer.models.train import TrainConfig

    default = train_config_from_args(build_parser().parse_args(["train-reference"]))
    assert default == TrainConfig()
    _, header = load_tensors(REFERENCE_PATH)
    shipped = json.loads(header["train_config"])
    ours = asdict(default)
    shipped.pop("out_dir"), ours.pop("out_dir")
    assert ours == shipped  # `taylorseer train-reference` with no flags retrains the shipped model
    given = train_config_from_args(build_parser().parse_args(
        ["train-reference", "--steps", "12", "--lr", "0.002", "--batch-size", "16", "--out-dir", "x"]))
    assert (given.steps, given.lr, given.batch_size, given.out_dir) == (12, 0.002, 16, "x")
    assert given.seed == default.seed


def test_train_reference_export_records_the_recipe(tmp_path, monkeypatch):
    import taylorseer.models.pretrained as pretrained

    seen = {}
    monkeypatch.setattr(pretrained, "export_reference",
                        lambda path, notes=None: seen.update(path=path, notes=notes) or path)  # never the package
    assert main(["train-reference", "--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "4", "--export"]) == 0
    assert seen["path"] == tmp_path / "train_state.safetensors"
    assert seen["notes"]["batch_size"] == 4 and seen["notes"]["size"] == "DiT-FM-B/2-16"
    assert "lr" in seen["notes"] and "model_label_dropout" in seen["notes"]
