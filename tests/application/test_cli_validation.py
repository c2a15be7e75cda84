"""Bad input is refused before any work: CLI flags (one line, exit 2, the flag and the allowed values named),
config fields, checkpoint digests; and the CLI's polish (--version, python -m, help texts, global flags)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import taylorseer
from taylorseer import TaylorSeerConfig, preset
from taylorseer.cli import build_parser, main
from taylorseer.cli import common as cli_module
from taylorseer.models.checkpoint import CheckpointError, file_sha256, load_tensors, save_tensors
from taylorseer.models.pretrained import load_reference

#################################################################################
#                      CLI: refused before any work starts                      #
#################################################################################


def _reached(*args, **kwargs):
    raise AssertionError("the command started work on refused input")


@pytest.fixture
def no_work(monkeypatch):
    """Every API function a command would call raises if reached (AssertionError is not caught by ``main``)."""
    import taylorseer.demo
    import taylorseer.eval.bench
    import taylorseer.eval.report
    import taylorseer.generate
    import taylorseer.models.pretrained
    import taylorseer.models.train
    import taylorseer.runtime.allocator

    for module, name in [(taylorseer.demo, "run_demo"), (taylorseer.eval.bench, "run_bench"),
                         (taylorseer.eval.bench, "default_grid"), (taylorseer.eval.report, "write_report"),
                         (taylorseer.generate, "generate"), (taylorseer.generate, "load_pipeline"),
                         (taylorseer.models.pretrained, "load_reference"), (taylorseer.models.train, "train_reference"),
                         (taylorseer.runtime.allocator, "tune_cpu_allocator")]:
        monkeypatch.setattr(module, name, _reached)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``taylorseer ARGV`` (argparse exits, checks return)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def _assert_refused(code: int, err: str, *named: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)


# (argv, the flag, the allowed values); OUT is replaced by a fresh path that must not be created
PARSE_REFUSALS = [
    (["bench", "--images", "0"], "--images", ">= 1"),
    (["bench", "--repeats", "0"], "--repeats", ">= 1"),
    (["bench", "--threads", "0"], "--threads", ">= 1"),
    (["bench", "--steps", "0"], "--steps", ">= 1"),
    (["bench", "--images", "-4"], "--images", ">= 1"),
    (["bench", "--seed", "-1"], "--seed", ">= 0"),
    (["demo", "--threads", "0"], "--threads", ">= 1"),
    (["demo", "--per-class", "0"], "--per-class", ">= 1"),
    (["demo", "--per-class", "-2"], "--per-class", ">= 1"),
    (["demo", "--steps", "0"], "--steps", ">= 1"),
    (["demo", "--steps", "ten"], "--steps", ">= 1"),
    (["demo", "--cfg-scale", "nan"], "--cfg-scale", "finite number >= 0"),
    (["demo", "--cfg-scale", "-1"], "--cfg-scale", "finite number >= 0"),
    (["train-reference", "--steps", "0"], "--steps", ">= 1"),
    (["train-reference", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["train-reference", "--threads", "-1"], "--threads", ">= 1"),
    (["train-reference", "--lr", "0"], "--lr", "finite number > 0"),
    (["train-reference", "--seed", "-3"], "--seed", ">= 0"),
    (["generate", "--model", "m", "--steps", "0"], "--steps", ">= 1"),
    (["generate", "--model", "m", "--num-images", "0"], "--num-images", ">= 1"),
    (["generate", "--model", "m", "--device", "nonsense"], "--device", "cpu, cuda, cuda:N, mps"),
    (["generate", "--model", "m", "--device", "cuda:x"], "--device", "cpu, cuda, cuda:N, mps"),
    (["generate", "--model", "m", "--dtype", "int8"], "--dtype", "bfloat16"),
    (["generate", "--model", "m", "--guidance-scale", "-2"], "--guidance-scale", ">= 0"),
]


@pytest.mark.parametrize("argv, flag, allowed", PARSE_REFUSALS)
def test_malformed_flag_values_are_refused_while_parsing(no_work, capsys, tmp_path, argv, flag, allowed):
    out = tmp_path / "out"
    out_flag = "--out-dir" if argv[0] == "train-reference" else "--out"
    code, err = _run([*argv, out_flag, str(out)], capsys)
    _assert_refused(code, err, f"argument {flag}", allowed)
    assert not out.exists()


def test_bench_zero_images_and_repeats_are_not_replaced_by_defaults(no_work, capsys, tmp_path):
    # the old `args.images or 50` turned 0 into 50; now 0 never reaches the command, and given values go through
    for flag in ("--images", "--repeats"):
        _assert_refused(*_run(["bench", "--quick", flag, "0", "--out", str(tmp_path / "r.jsonl")], capsys), flag)


def test_bench_passes_the_given_counts_and_the_documented_defaults(monkeypatch, tmp_path, capsys):
    import taylorseer.eval.bench as bench
    import taylorseer.models.pretrained as pretrained

    seen = []
    monkeypatch.setattr(pretrained, "load_reference", lambda: "model")
    monkeypatch.setattr(bench, "run_bench", lambda model, methods, **kw: seen.append(kw) or [])
    out = str(tmp_path / "r.jsonl")
    for argv in (["--quick"], ["--quick", "--images", "3", "--repeats", "4"], []):
        assert main(["--default-malloc", "bench", "--out", out, *argv]) == 0
    assert [(kw["num_images"], kw["repeats"]) for kw in seen] == [(8, 1), (3, 4), (50, 2)]


def _existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken"
    path.write_text("the user's file\n")
    return path


@pytest.mark.parametrize("command", ["demo", "generate", "report", "train-reference"])
def test_an_existing_file_where_a_folder_is_expected_is_refused(no_work, capsys, tmp_path, command):
    taken = _existing_file(tmp_path)
    records = tmp_path / "records.jsonl"
    records.write_text("{}\n")
    argv = {"demo": ["demo", "--out", str(taken)],
            "generate": ["generate", "--model", "m", "--out", str(taken)],
            "report": ["report", str(records), "--out", str(taken)],
            "train-reference": ["train-reference", "--out-dir", str(taken)]}[command]
    flag = "--out-dir" if command == "train-reference" else "--out"
    _assert_refused(*_run(argv, capsys), f"argument {flag}", "existing file", "a folder is expected")
    assert taken.read_text() == "the user's file\n"


def test_bench_out_must_be_a_file_path(no_work, capsys, tmp_path):
    _assert_refused(*_run(["bench", "--out", str(tmp_path)], capsys), "argument --out", "existing folder",
                    "a file is expected")
    taken = _existing_file(tmp_path)
    _assert_refused(*_run(["bench", "--out", str(taken / "records.jsonl")], capsys), "argument --out",
                    "existing file")
    _assert_refused(*_run(["bench", "--methods", " , ", "--out", str(tmp_path / "r.jsonl")], capsys),
                    "argument --methods", "comma-separated")


def test_report_records_must_be_an_existing_file(no_work, capsys, tmp_path):
    _assert_refused(*_run(["report", str(tmp_path / "missing.jsonl")], capsys), "RECORDS", "no such file")
    _assert_refused(*_run(["report", str(tmp_path)], capsys), "RECORDS", "a file is expected")


def test_unavailable_devices_are_refused_with_what_is_allowed(no_work, capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "mps"):
        code, err = _run(["generate", "--model", "m", "--device", device, "--out", str(out)], capsys)
        _assert_refused(code, err, "argument --device", f"{device!r} is not available", "allowed here: cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = _run(["generate", "--model", "m", "--device", "cuda:2", "--out", str(out)], capsys)
    _assert_refused(code, err, "argument --device", "2 CUDA device(s)", "cuda:0..cuda:1")
    assert not out.exists()


def test_config_flags_name_the_flag_and_the_field(no_work, capsys, tmp_path):
    _assert_refused(*_run(["plan", "--order", "-1"], capsys), "argument --order", "max_order", ">= 0")
    _assert_refused(*_run(["plan", "--warmup", "-1"], capsys), "argument --warmup", "warmup_steps", ">= 0")
    _assert_refused(*_run(["plan", "--modules", ""], capsys), "argument --modules", "non-empty")
    _assert_refused(*_run(["plan", "--steps", "-5"], capsys), "argument --steps", ">= 1")
    out = tmp_path / "out"
    _assert_refused(*_run(["generate", "--model", "m", "--interval", "0", "--out", str(out)], capsys),
                    "argument --interval", ">= 1")
    _assert_refused(*_run(["generate", "--model", "m", "--no-cache", "--preset", "fora", "--out", str(out)], capsys),
                    "argument --no-cache", "--preset")
    assert not out.exists()


def test_class_ids_out_of_range_are_refused():
    from taylorseer.integrations.pipeline_call import class_labels

    pipe = SimpleNamespace(labels={"t-shirt": 0, "boot": 9},
                           transformer=SimpleNamespace(config=SimpleNamespace(num_embeds_ada_norm=10)))
    assert class_labels(pipe, "0, 9, boot") == [0, 9, 9]
    with pytest.raises(ValueError, match="class id 10 is out of range: .* has classes 0-9"):
        class_labels(pipe, "3, 10")


def test_generate_api_checks_device_and_out_dir_before_loading(monkeypatch, tmp_path):
    import taylorseer.generate as gen

    monkeypatch.setattr(gen, "load_pipeline", _reached)
    with pytest.raises(ValueError, match="device must be one of cpu, cuda, cuda:N, mps, got 'gpu'"):
        gen.generate("m", None, None, device="gpu", out_dir=tmp_path / "out")
    taken = _existing_file(tmp_path)
    with pytest.raises(ValueError, match="out_dir .* is an existing file; a folder is expected"):
        gen.generate("m", None, None, out_dir=taken)
    with pytest.raises(ValueError, match="is below .* which is an existing file"):
        gen.generate("m", None, None, out_dir=taken / "sub")
    assert not (tmp_path / "out").exists()


def test_cli_device_syntax_matches_the_api():
    import taylorseer.devices as api  # the one table: the API's checks and the cli's argparse types read it

    assert cli_module.DEVICE_PATTERN.pattern == api.DEVICE_PATTERN.pattern and cli_module.DEVICES == api.DEVICES
    assert cli_module.DTYPES == api.WEIGHT_DTYPES == ("float32", "float16", "bfloat16")
    assert api.torch_dtype("bfloat16") is torch.bfloat16 and api.torch_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        api.torch_dtype("int8")


#################################################################################
#                                    Config                                     #
#################################################################################

def test_a_single_modules_string_is_refused_not_split_into_characters():
    with pytest.raises(TypeError, match=r"modules .* the string 'a\.\*\.b'"):
        TaylorSeerConfig.from_json('{"modules": "a.*.b"}')
    with pytest.raises(TypeError, match="modules"):
        TaylorSeerConfig(modules="a.*.b")
    assert TaylorSeerConfig.from_json('{"modules": ["a.*.b"]}').modules == ("a.*.b",)


@pytest.mark.parametrize("value", [None, 5, {"a": 1}, ("ok", 3), ("",)])
def test_bad_modules_name_the_field(value):
    with pytest.raises(TypeError, match="^modules must be"):
        TaylorSeerConfig(modules=value)


def test_from_dict_needs_a_dict_and_from_json_names_bad_text():
    with pytest.raises(TypeError, match="from_dict needs a dict .*JSON object.* got list"):
        TaylorSeerConfig.from_dict([("interval", 3)])
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        TaylorSeerConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match=r"not valid JSON .* in '\{\"interval\": 3,'"):
        TaylorSeerConfig.from_json('{"interval": 3,')
    with pytest.raises(TypeError, match="from_json needs JSON text"):
        TaylorSeerConfig.from_json({"interval": 3})


def test_preset_names_unknown_fields_and_the_allowed_ones():
    with pytest.raises(TypeError, match=r"unknown TaylorSeerConfig field\(s\) \['unknown'\]; allowed: .*'interval'"):
        preset("paper_dit", unknown=1)
    assert preset("paper_dit", interval=5).interval == 5


WRONG_TYPES = [("interval", "4"), ("warmup_steps", 1.5), ("max_order", None), ("tail_steps", "0"), ("scheme", 3),
               ("abscissa", None), ("modules", None), ("granularity", 1), ("factor_dtype", 16),
               ("block_shortcuts", "yes"), ("name", 3)]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_types_name_the_field(field, value):
    for build in (lambda: TaylorSeerConfig(**{field: value}), lambda: TaylorSeerConfig.from_dict({field: value})):
        with pytest.raises((TypeError, ValueError), match=f"^{field} must be"):
            build()


#################################################################################
#                               Checkpoint digests                              #
#################################################################################

@pytest.fixture
def tiny_file(tmp_path) -> Path:
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": torch.arange(4.0)}, {"k": "v"})
    return path


def test_sha256_match_loads_and_mismatch_names_both_digests(tiny_file):
    digest = file_sha256(tiny_file)
    tensors, meta = load_tensors(tiny_file, sha256=digest.upper())  # hex case does not matter
    assert torch.equal(tensors["a"], torch.arange(4.0)) and meta == {"k": "v"}
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=f"corrupted or truncated.*expected SHA-256 {wrong}, actual {digest}"):
        load_tensors(tiny_file, sha256=wrong)


@pytest.mark.parametrize("bad, error", [("abc", ValueError), ("g" * 64, ValueError), ("0" * 65, ValueError),
                                        (123, TypeError), (b"0" * 64, TypeError)])
def test_malformed_sha256_is_refused_before_the_file_is_read(tmp_path, bad, error):
    with pytest.raises(error, match="sha256 must be a 64-character hex SHA-256 digest") as info:
        load_tensors(tmp_path / "missing.safetensors", sha256=bad)
    assert not isinstance(info.value, CheckpointError)  # the argument, not the (missing) file


def test_load_reference_checks_an_explicit_path_only_when_given_a_digest(tiny_file):
    with pytest.raises(CheckpointError, match="expected SHA-256 " + "f" * 64):
        load_reference(tiny_file, sha256="f" * 64)
    for sha256 in (None, file_sha256(tiny_file)):  # the digest passes (or is not asked): the file is parsed
        with pytest.raises(CheckpointError, match="no model_config"):
            load_reference(tiny_file, sha256=sha256)
    with pytest.raises(ValueError, match="sha256 checks an explicit path"):
        load_reference(sha256=file_sha256(tiny_file))


def test_shipped_weights_are_always_checked_against_the_manifest(monkeypatch):
    import taylorseer.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "manifest_sha256", lambda name: "1" * 64)
    with pytest.raises(CheckpointError, match="expected SHA-256 " + "1" * 64):
        load_reference()


#################################################################################
#                                 CLI polish                                    #
#################################################################################

def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"taylorseer {taylorseer.__version__}\n"


@pytest.mark.slow
def test_python_dash_m_taylorseer_help():
    result = subprocess.run([sys.executable, "-m", "taylorseer", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: taylorseer ")
    assert "faster, without retraining" in result.stdout and "train-reference" in result.stdout


@pytest.mark.parametrize("argv, expected", [(["plan"], False), (["--default-malloc", "plan"], True),
                                            (["plan", "--default-malloc"], True),
                                            (["plan", "--steps", "4", "--default-malloc"], True)])
def test_global_flag_before_or_after_the_subcommand(argv, expected):
    assert build_parser().parse_args(argv).default_malloc is expected


def test_global_flag_after_the_subcommand_reaches_main(monkeypatch, tmp_path, capsys):
    import taylorseer.generate as gen
    import taylorseer.runtime.allocator as allocator

    tuned = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: tuned.append(1))
    monkeypatch.setattr(gen, "generate", lambda **kw: {"images": []})
    argv = ["generate", "--model", "m", "--out", str(tmp_path / "o")]
    assert main([*argv, "--default-malloc"]) == 0 and tuned == []
    assert main(argv) == 0 and tuned == [1]


def _parsers() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *subs[0].choices.values()]


def test_every_flag_has_help_and_shows_its_default():
    formatter = cli_module.HelpFormatter("taylorseer")
    for parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, flag
            if action.option_strings and action.nargs != 0 and not action.required:  # switches: off unless given
                assert "default" in formatter._get_help_string(action), flag


def test_top_level_help_is_written_for_users():
    text = build_parser().format_help()
    assert "faster, without retraining" in text and "taylorseer demo" in text
    assert "nothing else lives here" not in text  # the module docstring is a developer note
