"""``taylorseer generate`` (baseline vs accelerated, measured, never overwriting), ``taylorseer plan --model`` (the
family's preset from config files alone) and ``apply`` on models wrapped by accelerate's offload hooks.

Offload on this CPU-only machine: ``pipe.enable_model_cpu_offload(device="cpu")`` runs as on a GPU (one
``CpuOffload`` hook on the transformer, re-attached by diffusers after every pipeline call). The sequential offload
is exercised through ``accelerate.cpu_offload(model, execution_device=cpu)``, the very call
``pipe.enable_sequential_cpu_offload`` makes per component: that method itself cannot run on CPU here because it
builds the execution device ``cpu:0``, and accelerate 1.15 then rebuilds the offloaded parameters as plain tensors
(``TypeError`` in ``set_module_tensor_to_device``), with or without taylorseer. Between calls the weights of hooked
modules are on the meta device, so any weight read outside a hooked module call fails loudly.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from diffusers import DDIMScheduler
from PIL import Image
from test_diffusers import (
    FAMILIES,
    FAMILY,
    LoopPipeline,
    full_run,
    loop_pipeline,
    tiny,
    tiny_dit_pipeline,
)

import taylorseer
import taylorseer.generate as gen
from taylorseer.adapters.registry import registered_adapters
from taylorseer.api import default_config
from taylorseer.cli import main
from taylorseer.integrations.family import family_of
from taylorseer.policy.interval import IntervalPolicy
from taylorseer.runtime.autostep import RootForward
from taylorseer.runtime.install import Forward

STEPS = 8


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``taylorseer ARGV`` (argparse exits included)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _refused(code: int, err: str, *named: str) -> None:
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)


def _cli_refuses(argv: list[str], capsys, *named: str) -> None:
    """``taylorseer ARGV`` exits 2 with one line on stderr naming each of ``named``, and prints nothing."""
    code, printed, err = _cli(argv, capsys)
    _refused(code, err, *named)
    assert printed == "", printed


def _reason(class_name: str) -> str:
    return registered_adapters()[class_name].notes.removeprefix("preset:").strip()


#################################################################################
#                     generate: baseline vs accelerated                         #
#################################################################################

@pytest.fixture(scope="module")
def saved_dit(tmp_path_factory) -> Path:
    """test_diffusers' tiny DiTPipeline saved to a folder, its labels in model_index.json as on the hub."""
    folder = tmp_path_factory.mktemp("tiny-dit")
    pipe = tiny_dit_pipeline()
    pipe.register_to_config(id2label={0: "cat", 1: "dog, puppy"})
    pipe.save_pretrained(folder)
    return folder


def _pipeline_arrays(folder: Path, config, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """What generate should have run: the saved pipeline, class 'cat', ``seed``, numpy output."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(class_labels=[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images

    if config is None:
        return call()
    with taylorseer.apply(pipe, config):
        return call()


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_cli_runs_both_prints_the_numbers_and_saves_both(saved_dit, tmp_path, capsys):
    from diffusers.utils.pil_utils import numpy_to_pil

    from taylorseer.eval.metrics import psnr

    out = tmp_path / "gen"
    code, printed, err = _cli(["generate", "--model", str(saved_dit), "--prompt", "cat", "--steps", str(STEPS),
                               "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "001.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["001-baseline-0.png", "001-taylorseer-0.png", "001.json"]
    # the family's preset, with the adapter record's reason
    assert record["config"]["name"] == "paper_dit" == registered_adapters()["DiTTransformer2DModel"].preset
    assert record["preset_reason"] == _reason("DiTTransformer2DModel")
    full = taylorseer.preset("paper_dit").full_steps(STEPS)
    assert (record["stats"]["steps_full"], record["stats"]["steps_forecast"]) == (full, STEPS - full)
    # the numbers: speedup is the ratio of the two wall times, PSNR that of the two image sets
    assert record["speedup"] == record["baseline"]["seconds"] / record["seconds"]
    baseline = _pipeline_arrays(saved_dit, None)
    accelerated = _pipeline_arrays(saved_dit, taylorseer.preset("paper_dit"))
    expected_psnr = psnr(torch.from_numpy(accelerated).permute(0, 3, 1, 2),
                         torch.from_numpy(baseline).permute(0, 3, 1, 2), data_range=1.0)
    assert np.isfinite(expected_psnr) and record["psnr_db"] == pytest.approx(expected_psnr, abs=1e-9)
    # each image is the run its name says (same seed): full compute, then accelerated
    assert np.array_equal(_pixels(record["baseline"]["images"][0]), np.asarray(numpy_to_pil(baseline)[0]))
    assert np.array_equal(_pixels(record["images"][0]), np.asarray(numpy_to_pil(accelerated)[0]))
    assert not np.array_equal(_pixels(record["baseline"]["images"][0]), _pixels(record["images"][0]))
    for text in (f"baseline:   {record['baseline']['seconds']:.3f} s", f"taylorseer: {record['seconds']:.3f} s",
                 f"speedup:    {record['speedup']:.2f}x", f"PSNR:       {record['psnr_db']:.2f} dB",
                 "paper_dit (the family's preset:", str(out / "001-baseline-0.png"), str(out / "001.json"),
                 "steps_forecast"):
        assert text in printed, (text, printed)


def test_generate_never_overwrites_earlier_outputs(saved_dit, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "000.png").write_bytes(b"an image of an older version")
    (out / "006-notes.txt").write_bytes(b"the user's notes")
    first = gen.generate(str(saved_dit), "cat", "family", num_inference_steps=2, out_dir=out)
    second = gen.generate(str(saved_dit), "cat", None, num_inference_steps=2, out_dir=out)
    assert (first["run"], second["run"]) == (7, 8)
    assert [Path(p).name for p in first["images"] + second["images"]] == ["007-taylorseer-0.png",
                                                                           "008-baseline-0.png"]
    assert (out / "000.png").read_bytes() == b"an image of an older version"
    assert (out / "006-notes.txt").read_bytes() == b"the user's notes"
    assert json.loads((out / "007.json").read_text())["images"] == first["images"]
    # a file that appears under the chosen name meanwhile (another run) is refused, not overwritten
    taken = (out / "007-taylorseer-0.png").read_bytes()
    monkeypatch.setattr(gen, "next_run_number", lambda folder: 7)
    with pytest.raises(ValueError, match="007-taylorseer-0.png' appeared while this run was writing") as caught:
        gen.generate(str(saved_dit), "cat", "family", num_inference_steps=2, out_dir=out)
    assert "\n" not in str(caught.value) and (out / "007-taylorseer-0.png").read_bytes() == taken


def test_next_run_number_counts_past_every_numbered_name(tmp_path):
    assert gen.next_run_number(tmp_path / "missing") == 1
    for name in ("notes.txt", "12abc.png", "003-baseline-0.png", "041.json", "009-taylorseer-3.gif"):
        (tmp_path / name).write_text("x")
    assert gen.next_run_number(tmp_path) == 42


def test_generate_field_flags_change_the_family_preset_and_a_given_preset_wins(saved_dit, tmp_path,
                                                                               capsys):
    out = tmp_path / "gen"
    code, _, err = _cli(["generate", "--model", str(saved_dit), "--steps", str(STEPS), "--interval", "2",
                         "--no-baseline", "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "001.json").read_text())
    expected = taylorseer.preset("paper_dit", interval=2)
    assert taylorseer.TaylorSeerConfig.from_dict(record["config"]) == expected
    assert record["stats"]["steps_full"] == expected.full_steps(STEPS)
    assert record["baseline"] is None and record["speedup"] is None and record["psnr_db"] is None
    code, printed, err = _cli(["generate", "--model", str(saved_dit), "--steps", str(STEPS), "--preset", "fora",
                               "--no-baseline", "--measure-flops", "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "002.json").read_text())
    assert record["config"]["name"] == "fora" and record["preset_reason"] is None
    assert record["stats"]["flops_speedup"] > 1.0 and "timed while counting FLOPs" in printed
    assert f"FLOPs:      {record['stats']['flops_speedup']:.2f}x (full-compute FLOPs / executed FLOPs)" in printed
    assert "speedup:" not in printed and "PSNR:" not in printed and not list(out.glob("*baseline*"))


def test_without_torchmetrics_psnr_names_the_extra_and_times_still_print(saved_dit, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.delitem(sys.modules, "taylorseer.eval.metrics", raising=False)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics now raises ImportError
    out = tmp_path / "gen"
    code, printed, err = _cli(["generate", "--model", str(saved_dit), "--steps", "4", "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "001.json").read_text())
    assert record["psnr_db"] is None and 'pip install "taylorseer[bench]"' in record["psnr_note"]
    assert record["speedup"] == record["baseline"]["seconds"] / record["seconds"]
    assert 'PSNR:       PSNR not measured: torchmetrics is not installed' in printed
    assert "baseline:   " in printed and "taylorseer: " in printed and "speedup:    " in printed


def test_device_auto_picks_cuda_when_available(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(gen, "generate", lambda **kw: seen.append(kw["device"]) or {"images": []})
    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda available=available: int(available))
        assert gen.resolve_device("auto") == expected
        code, _, err = _cli(["--default-malloc", "generate", "--model", "m", "--out", str(tmp_path / "o")], capsys)
        assert code == 0, err
    assert seen == ["cuda", "cpu"]


def test_an_unavailable_device_is_one_line_and_nothing_is_written(saved_dit, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gen"
    _cli_refuses(["generate", "--model", str(saved_dit), "--device", "cuda", "--out", str(out)], capsys,
                 "argument --device", "'cuda' is not available", "allowed here: cpu")
    assert not out.exists()
    with pytest.raises(ValueError, match="'cuda' is not available"):
        gen.generate(str(saved_dit), "cat", "family", device="cuda", out_dir=out)
    _cli_refuses(["generate", "--model", "m", "--device", "gpu", "--out", str(out)], capsys, "argument --device",
                 "auto, cpu, cuda, cuda:N, mps")


def test_generate_refuses_contradictions_before_loading(monkeypatch, tmp_path, capsys):
    def reached(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(gen, "load_pipeline", reached)
    out = tmp_path / "gen"
    cases = [(dict(config=None, baseline=True), ValueError, "baseline=True compares against an accelerated call"),
             (dict(config="paper_nope"), ValueError, "config must be a preset name"),
             (dict(config=3), TypeError, "config must be a TaylorSeerConfig, a preset name"),
             (dict(config=None, overrides={"interval": 2}), ValueError, "need a config"),
             (dict(config="family", overrides={"interval": 0}), ValueError, "interval must be an int >= 1"),
             (dict(config="family", overrides={"intervl": 2}), TypeError, "intervl")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            gen.generate("m", None, num_inference_steps=2, out_dir=out, **kwargs)
    _cli_refuses(["generate", "--model", "m", "--no-cache", "--no-baseline", "--out", str(out)], capsys,
                 "--no-baseline", "--no-cache runs only the baseline")
    assert not out.exists()


#################################################################################
#                 plan --model: the family's preset, no weights                 #
#################################################################################

@pytest.mark.parametrize("class_name", sorted(registered_adapters()))
def test_plan_model_class_prints_the_family_preset_its_reason_and_pattern(class_name, capsys):
    spec = registered_adapters()[class_name]
    code, printed, err = _cli(["plan", "--model", class_name, "--steps", "12"], capsys)
    assert code == 0, err
    config = taylorseer.preset(spec.preset)
    lines = printed.splitlines()
    assert lines[0] == f"model: {class_name} (from class name), adapter {spec.name}"
    assert lines[1] == f"recommended preset: {spec.preset}: {_reason(class_name)}"
    assert json.loads(lines[2]) == config.to_dict()
    assert lines[3] == IntervalPolicy.from_config(config).pattern(12)
    assert lines[4].startswith(f"{config.full_steps(12)} full / 12 steps")


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_plan_model_reads_local_folders_without_loading_weights(saved_dit, tmp_path, capsys,
                                                                monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_weights)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_weights)
    flux = _write_json(tmp_path / "flux" / "model_index.json",
                       {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
                        "vae": ["diffusers", "AutoencoderKL"]})
    wan = _write_json(tmp_path / "wan" / "config.json", {"_class_name": "WanTransformer3DModel", "num_layers": 2})
    sd3 = _write_json(tmp_path / "sd3" / "transformer" / "config.json", {"_class_name": "SD3Transformer2DModel"})
    cases = [(flux.parent, flux, "FluxTransformer2DModel"), (wan.parent, wan, "WanTransformer3DModel"),
             (tmp_path / "sd3", sd3, "SD3Transformer2DModel"),
             (saved_dit, saved_dit / "model_index.json", "DiTTransformer2DModel"),
             (saved_dit / "transformer", saved_dit / "transformer" / "config.json", "DiTTransformer2DModel")]
    for folder, source, class_name in cases:
        code, printed, err = _cli(["plan", "--model", str(folder), "--steps", "10"], capsys)
        assert code == 0, err
        spec = registered_adapters()[class_name]
        assert printed.splitlines()[0] == f"model: {class_name} (from {source}), adapter {spec.name}"
        assert f'"name": "{spec.preset}"' in printed
        assert IntervalPolicy.from_config(taylorseer.preset(spec.preset)).pattern(10) in printed.splitlines()


def test_plan_model_refuses_what_it_cannot_plan(tmp_path, capsys):
    unet = _write_json(tmp_path / "unet" / "model_index.json",
                       {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    other = _write_json(tmp_path / "other" / "config.json", {"_class_name": "UNet2DConditionModel"})
    nameless = _write_json(tmp_path / "nameless" / "config.json", {"hidden_size": 8})
    broken = tmp_path / "broken" / "config.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    (tmp_path / "empty").mkdir()
    cases = [
        (unet.parent, "a UNet pipeline (taylorseer targets diffusion transformers)"),
        (other.parent, "UNet2DConditionModel (read from"),
        (other.parent, "has no taylorseer adapter; registered transformer classes: ['ChromaTransformer2DModel'"),
        (nameless.parent, "names no _class_name"),
        (broken.parent, "cannot read"),
        (tmp_path / "empty", "is not a diffusers model or pipeline folder"),
        (unet, "is a file; a model or pipeline folder (or a class name) is expected"),
        ("FluxTransformer", "neither a registered transformer class name nor an existing folder"),
        ("./no/such/folder", "neither a transformer class name, an existing folder nor a Hugging Face Hub id"),
    ]
    for model, message in cases:
        _cli_refuses(["plan", "--model", str(model)], capsys, "argument --model", message)


def test_plan_model_field_flags_and_a_given_preset(capsys):
    code, printed, _ = _cli(["plan", "--model", "FluxTransformer2DModel", "--interval", "3", "--steps", "10"], capsys)
    config = taylorseer.preset("paper_flux", interval=3)
    assert code == 0 and json.loads(printed.splitlines()[2]) == config.to_dict()
    assert IntervalPolicy.from_config(config).pattern(10) in printed.splitlines()
    code, printed, _ = _cli(["plan", "--model", "FluxTransformer2DModel", "--preset", "fora", "--steps", "10"], capsys)
    assert code == 0 and "recommended preset: paper_flux:" in printed and "preset used: fora (given)" in printed
    assert json.loads(printed.splitlines()[3])["name"] == "fora"
    code, printed, _ = _cli(["plan", "--steps", "10"], capsys)  # without --model: paper_dit, as before
    assert code == 0 and printed.splitlines()[0].startswith("{") and '"name": "paper_dit"' in printed


def test_family_of_a_hub_id_reads_its_downloaded_config(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    files = {"model_index.json": _write_json(tmp_path / "model_index.json", {
        "_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]})}
    calls = []

    def download(repo_id, filename, local_files_only=False, **kwargs):
        calls.append((repo_id, filename, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not in the local cache")
        if filename not in files:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    family = family_of("Qwen/Qwen-Image")
    assert (family.class_name, family.preset) == ("QwenImageTransformer2DModel", "paper_flux")
    assert family.source == "hub Qwen/Qwen-Image: model_index.json"
    assert calls == [("Qwen/Qwen-Image", "model_index.json", True), ("Qwen/Qwen-Image", "config.json", True),
                     ("Qwen/Qwen-Image", "model_index.json", False)]
    files.clear()  # a bare transformer repo: no model_index.json, a config.json
    files["config.json"] = _write_json(tmp_path / "config.json", {"_class_name": "ChromaTransformer2DModel"})
    assert family_of("someone/chroma-transformer").source == "hub someone/chroma-transformer: config.json"


def test_family_of_a_hub_id_offline_says_a_local_path_is_needed(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, local_files_only=False, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="offline, a local path is needed") as caught:
        family_of("black-forest-labs/FLUX.1-dev")
    assert "\n" not in str(caught.value)
    _cli_refuses(["plan", "--model", "black-forest-labs/FLUX.1-dev"], capsys, "argument --model",
                 "could not read the config of hub model 'black-forest-labs/FLUX.1-dev'", "the folder of the saved")


def test_family_of_a_subclass_of_a_registered_class(monkeypatch):
    subclass = type("MyFluxTransformer2DModel", (diffusers.FluxTransformer2DModel,), {})
    monkeypatch.setattr(diffusers, "MyFluxTransformer2DModel", subclass, raising=False)
    family = family_of("MyFluxTransformer2DModel")
    assert family.adapter is registered_adapters()["FluxTransformer2DModel"] and family.preset == "paper_flux"


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_handle_repr_names_the_family_preset(name):
    model = tiny(name)
    expected = registered_adapters()[type(model).__name__].preset
    with taylorseer.apply(model) as handle:
        assert f'"name": "{expected}"' in repr(handle) and default_config(model).name == expected
    with taylorseer.apply(loop_pipeline(name)) as handle:
        assert f'"name": "{expected}"' in repr(handle)


#################################################################################
#                  apply on modules wrapped by offload hooks                    #
#################################################################################

def _ours(model: torch.nn.Module) -> list[str]:
    """Paths whose forward (or accelerate's saved ``_old_forward``) is still a taylorseer wrapper."""
    wrappers = (Forward, RootForward)
    return [name for name, module in model.named_modules()
            if any(isinstance(module.__dict__.get(attr), wrappers) for attr in ("forward", "_old_forward"))]


def _forwards(model: torch.nn.Module) -> dict[str, object]:
    return {name: module.__dict__.get("forward") for name, module in model.named_modules()}


def _own_dit_pipeline() -> diffusers.DiTPipeline:
    """A tiny DiTPipeline with its own tiny transformer, built as test_diffusers.tiny builds the shared one (offload
    hooks must not leak into the shared model, and other tests' peers may leave attributes on it)."""
    pipe = tiny_dit_pipeline()
    torch.manual_seed(0)
    transformer = FAMILY["dit"].build().eval().requires_grad_(False)
    for p in transformer.parameters():
        if p.abs().max() == 0:
            p.normal_(0, 0.05)
    pipe = diffusers.DiTPipeline(transformer, pipe.vae, DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_call(pipe, steps: int = 10) -> torch.Tensor:
    return pipe(class_labels=[0, 1], num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@functools.cache
def _dit_references() -> tuple[torch.Tensor, torch.Tensor]:
    """(full compute, paper_dit) images of the plain, non-offloaded tiny DiTPipeline."""
    pipe = _own_dit_pipeline()
    with taylorseer.apply(pipe, taylorseer.preset("paper_dit")):
        accelerated = _dit_call(pipe)
    return _dit_call(pipe), accelerated


def test_apply_after_model_cpu_offload_equals_the_plain_accelerated_run():
    full, accelerated = _dit_references()
    pipe = _own_dit_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    transformer = pipe.transformer
    assert type(transformer._hf_hook).__name__ == "CpuOffload" and torch.equal(_dit_call(pipe), full)
    torch_hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in transformer.modules()]
    with taylorseer.apply(pipe, taylorseer.preset("paper_dit")) as handle:
        for _ in range(2):  # diffusers re-attaches the offload hook after each call: both calls are accelerated
            assert torch.equal(_dit_call(pipe), accelerated)
            assert handle.stats.steps_forecast == 10 - taylorseer.preset("paper_dit").full_steps(10)
        inside = _forwards(transformer)
    assert _ours(transformer) == []
    after = _forwards(transformer)
    hook_wrapper = after.pop("")  # the hook's own per-instance forward, bound to the hook attached now
    assert isinstance(hook_wrapper, functools.partial) and hook_wrapper.args == (transformer,)
    assert hook_wrapper.func.__name__ == "new_forward" and hasattr(transformer, "_hf_hook")
    assert all(value is None for value in after.values()), [k for k, v in after.items() if v is not None]
    assert sum(isinstance(v, Forward) for v in inside.values()) == len(handle.targets) + len(handle.cache.shortcuts)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in transformer.modules()] == torch_hooks
    assert torch.equal(_dit_call(pipe), full)


SEQUENTIAL = [("dit", "module", False), ("flux", "module", True), ("pixart", "block", True),
              pytest.param("dit", "module", True)]


@pytest.mark.parametrize("name, granularity, shortcuts", SEQUENTIAL)
def test_sequential_offload_hooks_are_wrapped_and_restored_exactly(name, granularity, shortcuts):
    family = FAMILY[name]
    config = default_config(tiny(name)).replace(granularity=granularity, block_shortcuts=shortcuts)
    # a full step after the warm-up within the pipeline's 8 steps, else forecasting is switched off (runtime/switch.py)
    config = config.replace(interval=min(config.interval, 8 - config.warmup_steps))
    plain = loop_pipeline(name)
    with taylorseer.apply(plain, config):
        accelerated = plain(family)
    model = copy.deepcopy(tiny(name))
    cpu_offload(model, execution_device=torch.device("cpu"))  # as pipe.enable_sequential_cpu_offload does
    hooked = {path for path, module in model.named_modules() if hasattr(module, "_hf_hook")}
    assert any(p.device.type == "meta" for p in model.parameters())  # the weights really are offloaded
    pipe = LoopPipeline(model, family.scheduler())
    pipe.set_progress_bar_config(disable=True)
    before = _forwards(model)
    with taylorseer.apply(pipe, config) as handle:
        wrapped = [t.path for t in handle.targets if t.path in hooked]
        for path in wrapped:  # our wrapper calls the hook's wrapper, which loads the weights
            forward = model.get_submodule(path).__dict__["forward"]
            assert isinstance(forward, Forward) and forward.original is before[path]
        assert torch.equal(pipe(family), accelerated)
        assert handle.stats.steps_forecast > 0
    if name != "dit":
        assert wrapped, "no target carries its own offload hook: the test would not exercise wrapping one"
    after = _forwards(model)
    assert all(after[path] is before[path] for path in before), [p for p in before if after[p] is not before[p]]
    assert _ours(model) == []
    assert torch.equal(pipe(family), full_run(name))


def test_transformer_handle_survives_the_model_offload_hook_being_reattached():
    _, accelerated = _dit_references()
    pipe = _own_dit_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    with taylorseer.apply(pipe.transformer, taylorseer.preset("paper_dit")):
        assert torch.equal(_dit_call(pipe), accelerated)
        assert torch.equal(_dit_call(pipe), accelerated)


def test_offload_attached_after_apply_then_remove_leaves_a_working_model():
    full, _ = _dit_references()
    pipe = _own_dit_pipeline()
    handle = taylorseer.apply(pipe.transformer, taylorseer.preset("paper_dit"))
    pipe.enable_model_cpu_offload(device="cpu")
    _dit_call(pipe)
    handle.remove()
    assert torch.equal(_dit_call(pipe), full) and _ours(pipe.transformer) == []
