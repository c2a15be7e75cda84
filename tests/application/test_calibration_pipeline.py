"""Calibrating a diffusers pipeline (``taylorseer calibrate --model``) and generating with the file
(``taylorseer generate --calibration``), on tiny DiT pipelines built from configs (random weights, no downloads).

What must hold: the pipeline sampler tells every step once, with all of a step's transformer calls in its context,
for each guidance layout (a CFG batch [cond; uncond] or [uncond; cond], two calls per step, no CFG batch) and the
file records that layout; a calibrated run follows the file's full steps and is closer to full compute than reuse
on the same schedule; a file for another step count, model or guidance scale is refused before anything runs;
argument errors name their flag.
"""

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput

import taylorseer
from taylorseer.calibration import CalibrationError, PipelineSampler, calibrate_pipeline, load_calibration
from taylorseer.cli import main
from taylorseer.forecast import TaylorForecast
from taylorseer.generate import load_pipeline
from taylorseer.policy import FixedSchedule

torch.set_num_threads(1)

STEPS, BUDGET = 8, 4
PROMPTS = "0|1|2"


def tiny_transformer(seed: int = 0, num_layers: int = 2) -> diffusers.DiTTransformer2DModel:
    torch.manual_seed(seed)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1).eval()
    for p in transformer.parameters():  # zero-initialised gates would hide whole modules
        if p.abs().max() == 0:
            p.data.normal_(0, 0.05)
    return transformer


def save_dit(folder: Path, seed: int = 0, num_layers: int = 2) -> Path:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=2, layers_per_block=1).eval()
    diffusers.DiTPipeline(tiny_transformer(seed, num_layers), vae, DDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"dit": save_dit(root / "dit"), "other-weights": save_dit(root / "other-weights", seed=1),
            "other-config": save_dit(root / "other-config", num_layers=3)}


@pytest.fixture(scope="module")
def calibrated(folders, tmp_path_factory) -> Path:
    """``taylorseer calibrate --model`` on the tiny DiTPipeline: 16 images, 8 steps, 4 full, a short search."""
    out = tmp_path_factory.mktemp("cal") / "dit-b4.safetensors"
    assert main(["calibrate", "--model", str(folders["dit"]), "--prompt", PROMPTS, "--steps", str(STEPS),
                 "--budget", str(BUDGET), "--images", "16", "--search-images", "1", "--max-evals", "5",
                 "--device", "cpu", "--out", str(out)]) == 0
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


#################################################################################
#                      A pipeline per guidance layout                           #
#################################################################################

class LayoutPipeline(DiffusionPipeline):
    """A class-conditional DDIM loop whose guidance layout is chosen: ``uncond-first`` (one batch [uncond; cond], as
    PixArt), ``split`` (two calls per step, cond then uncond), ``distilled`` (a guidance scale, no CFG batch, as
    FLUX)."""

    def __init__(self, transformer, scheduler, layout: str = "uncond-first"):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.layout = layout

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, generator=None, num_inference_steps: int = 50,
                 output_type: str = "np"):
        config = self.transformer.config
        latents = torch.randn(len(class_labels), config.in_channels, config.sample_size, config.sample_size,
                              generator=generator)
        labels = torch.tensor(class_labels)
        null = torch.full_like(labels, 1000)

        def eps(x, y, t):
            return self.transformer(x, timestep=t.expand(len(x)), class_labels=y).sample[:, :config.in_channels]

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            if self.layout == "distilled":
                noise = eps(latents, labels, t)
            else:
                if self.layout == "uncond-first":
                    uncond, cond = eps(torch.cat([latents] * 2), torch.cat([null, labels]), t).chunk(2)
                else:
                    cond, uncond = eps(latents, labels, t), eps(latents, null, t)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return ImagePipelineOutput(images=(latents / 4 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


class Spy:
    """A listener recording what it is told and how many transformer calls each step context holds."""

    def __init__(self, transformer):
        self.begun, self.told, self.calls, self.open = [], [], [], False
        self.hook = transformer.register_forward_pre_hook(self._call)

    def _call(self, module, args):
        assert self.open, "a transformer call outside a told step"
        self.calls[-1] += 1

    def begin(self, num_steps=None):
        self.begun.append(num_steps)

    def step(self, index, timestep=None, sigma=None):
        import contextlib

        @contextlib.contextmanager
        def context():
            self.told.append((index, timestep))
            self.calls.append(0)
            self.open = True
            try:
                yield
            finally:
                self.open = False

        return context()


LAYOUTS = {"uncond-first": (("batch", 2), 1), "split": (("split", 1), 2), "distilled": (("batch", 1), 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_sampler_tells_each_step_once_for_every_guidance_layout(layout):
    pipe = LayoutPipeline(tiny_transformer(), DDIMScheduler(), layout)
    sampler = PipelineSampler(pipe, ["0", "1"])
    expected_layout, calls_per_step = LAYOUTS[layout]
    assert sampler.probe(4.0, seed=0) == expected_layout
    spy = Spy(pipe.transformer)
    images = sampler(pipe.transformer, torch.tensor([0, 1, 1]), num_steps=STEPS, guidance_scale=4.0, seed=3,
                     cfg_mode=expected_layout[0], listener=spy)
    spy.hook.remove()
    pipe.scheduler.set_timesteps(STEPS)
    assert spy.begun == [STEPS]
    assert spy.told == [(i, float(t)) for i, t in enumerate(pipe.scheduler.timesteps)]
    assert spy.calls == [calls_per_step] * STEPS
    assert images.shape == (3, 4, 8, 8) and images.dtype == torch.float32 and -1 <= images.min() < images.max() <= 1
    assert set(vars(pipe.scheduler)) & {"set_timesteps", "step"} == set()  # the scheduler is restored
    assert len(pipe.transformer._forward_pre_hooks) == 0
    with pytest.raises(RuntimeError, match="guidance layout"):  # another scale, another layout: refused
        sampler(pipe.transformer, torch.tensor([0]), num_steps=2, guidance_scale=1.0 if layout != "distilled" else
                4.0, seed=0, cfg_mode="split" if layout != "split" else "batch", listener=None)


def _calibrated_and_reuse_psnr(pipe, cal, schedule, targets=None):
    """PSNR to full compute of two classes generated with the calibration and with its schedule under reuse (FORA);
    each accelerated run must follow the schedule (and forecast exactly ``targets`` when given)."""
    def run(config):
        generator = torch.Generator().manual_seed(0)
        if config is None:
            return pipe(class_labels=[0, 1], num_inference_steps=STEPS, generator=generator).images
        with taylorseer.apply(pipe, config) as handle:
            images = pipe(class_labels=[0, 1], num_inference_steps=STEPS, generator=generator).images
            assert handle.stats.steps_full == len(schedule.full_steps)
            assert targets is None or [t.path for t in handle.targets] == targets
        return images

    full = run(None)
    return (psnr(run(cal.cache_config()), full),
            psnr(run(cal.cache_config(forecaster=TaylorForecast(max_order=0))), full))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_is_recorded_and_beats_reuse_on_the_same_schedule(layout, tmp_path):
    pipe = LayoutPipeline(tiny_transformer(), DDIMScheduler(), layout)
    schedule = FixedSchedule((0, 1, 2, 5), STEPS)
    cal = calibrate_pipeline(pipe, BUDGET, tmp_path / "cal.safetensors", prompts=["0", "1", "2"], num_steps=STEPS,
                             images=16, schedule=schedule, progress=False)
    data = cal.header["calibration_data"]
    (cfg_mode, row_groups), calls_per_step = LAYOUTS[layout]
    assert (data["cfg_mode"], data["row_groups"], data["calls_per_step"]) == (cfg_mode, row_groups, calls_per_step)
    assert cal.header["forecaster"]["row_groups"] == row_groups
    assert data["model_calls"] == (2 * STEPS + 2) * calls_per_step  # two batches of 8 images, and the probe

    calibrated, reuse = _calibrated_and_reuse_psnr(pipe, cal, schedule)
    assert calibrated > reuse + 2.0, (calibrated, reuse)


def test_pipeline_calibration_at_output_granularity_forecasts_the_transformer_output(tmp_path):
    pipe = LayoutPipeline(tiny_transformer(), DDIMScheduler(), "uncond-first")
    schedule = FixedSchedule((0, 1, 2, 5), STEPS)
    cal = calibrate_pipeline(pipe, BUDGET, tmp_path / "cal.safetensors", prompts=["0", "1", "2"], num_steps=STEPS,
                             images=16, schedule=schedule, granularity="output", progress=False)
    assert cal.granularity == "output" and cal.header["forecaster"]["fit"] == "teacher-forced"
    assert list(cal.header["targets"]) == [""]  # the transformer's root

    calibrated, reuse = _calibrated_and_reuse_psnr(pipe, cal, schedule, targets=[""])
    assert calibrated > reuse + 2.0, (calibrated, reuse)
    with pytest.raises(ValueError, match="granularity must be one of"):
        calibrate_pipeline(pipe, BUDGET, tmp_path / "x.safetensors", prompts=["0"], num_steps=STEPS,
                           granularity="blocks", progress=False)
    assert not (tmp_path / "x.safetensors").exists()


#################################################################################
#            taylorseer calibrate --model, taylorseer generate --calibration    #
#################################################################################

@pytest.mark.slow
def test_calibrate_cli_writes_a_file_bound_to_the_pipeline(calibrated, folders, capsys):
    pipe = load_pipeline(str(folders["dit"]))
    cal = load_calibration(calibrated, model=pipe.transformer, num_steps=STEPS)
    assert len(cal.schedule.full_steps) <= BUDGET and cal.schedule.full_steps[0] == 0
    data = cal.header["calibration_data"]
    assert (data["pipeline"], data["prompts"], data["classes"]) == ("DiTPipeline", ["0", "1", "2"], [0, 1, 2])
    # DiTPipeline's own guidance (4.0) as one batch [cond; uncond]: two row groups.
    assert (data["guidance_scale"], data["cfg_mode"], data["row_groups"], data["images"]) == (4.0, "batch", 2, 16)
    search = cal.header["search"]
    assert search["budget"] == BUDGET and search["full_steps"] == list(cal.schedule.full_steps)
    assert cal.header["model"]["class"] == "DiTTransformer2DModel"


@pytest.mark.slow
def test_generate_with_the_calibration_runs_its_schedule_closer_than_reuse(calibrated, folders, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(folders["dit"]), "--prompt", "0", "--steps", str(STEPS), "--device",
                 "cpu", "--calibration", str(calibrated), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibration: " in printed and str(calibrated) in printed
    record = json.loads((out / "001.json").read_text())
    cal = load_calibration(calibrated)
    full_steps = len(cal.schedule.full_steps)
    assert (record["stats"]["steps_full"], record["stats"]["steps_forecast"]) == (full_steps, STEPS - full_steps)
    assert record["calibration"] == {"path": str(calibrated), "sha256": cal.sha256, "name": cal.header["name"],
                                     "num_steps": STEPS, "full_steps": list(cal.schedule.full_steps),
                                     "guidance_scale": 4.0}
    assert record["guidance_scale"] == 4.0 and record["config"]["forecaster"]["type"] == "LinearForecast"
    assert record["preset_reason"] is None
    # The same comparison by hand: the calibrated weights against reuse (FORA) on the file's own schedule.
    pipe = load_pipeline(str(folders["dit"]))
    pipe.set_progress_bar_config(disable=True)

    def run(config):
        call = dict(class_labels=[0], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np",
                    generator=torch.Generator().manual_seed(0))
        if config is None:
            return pipe(**call).images
        with taylorseer.apply(pipe, config):
            return pipe(**call).images

    full = run(None)
    calibrated_db = psnr(run(cal.cache_config()), full)
    reuse_db = psnr(run(cal.cache_config(forecaster=TaylorForecast(max_order=0))), full)
    assert abs(record["psnr_db"] - calibrated_db) < 0.05  # generate ran exactly this
    assert calibrated_db > 25.0 and calibrated_db > reuse_db + 1.0, (calibrated_db, reuse_db)


def _refused(argv, capsys) -> str:
    """The one-line error of a refused command (after diffusers' loading bar, when the pipeline was loaded)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"taylorseer {argv[0]}: error: ")
    return last


def test_another_step_count_is_refused_before_the_pipeline_is_loaded(calibrated, folders, tmp_path, capsys,
                                                                     monkeypatch):
    import taylorseer.generate as gen

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(gen, "load_pipeline", no_loading)
    out = tmp_path / "gen"
    err = _refused(["generate", "--model", str(folders["dit"]), "--steps", "6", "--calibration", str(calibrated),
                    "--out", str(out)], capsys)
    assert "argument --calibration" in err and "8-step generations, not 6" in err
    with pytest.raises(CalibrationError, match="8-step generations, not 6"):
        gen.generate(str(folders["dit"]), "0", None, 6, out_dir=out, calibration=calibrated, baseline=True)
    assert not out.exists()


@pytest.mark.parametrize("case, argv, message", [
    ("other-weights", [], "calibrated for other weights of this DiTTransformer2DModel"),
    ("other-config", [], "calibrated for a DiTTransformer2DModel with another config"),
    ("dit", ["--guidance-scale", "2"], "calibrated at guidance scale 4, not 2"),
])
def test_another_model_or_guidance_is_refused_before_any_generation(case, argv, message, calibrated, folders,
                                                                    tmp_path, capsys, monkeypatch):
    import functools

    @functools.wraps(diffusers.DiTPipeline.__call__)  # its signature stays visible to generate
    def no_generation(*args, **kwargs):
        raise AssertionError("the pipeline was run")

    monkeypatch.setattr(diffusers.DiTPipeline, "__call__", no_generation)
    out = tmp_path / "gen"
    err = _refused(["generate", "--model", str(folders[case]), "--prompt", "0", "--steps", str(STEPS), "--device",
                    "cpu", "--calibration", str(calibrated), "--out", str(out), *argv], capsys)
    assert message in err and str(calibrated) in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--budget", "4", "--prompt", "0"], "argument --prompt: applies to a diffusers pipeline"),
    (["calibrate", "--budget", "4", "--device", "cpu"], "argument --device: applies to a diffusers pipeline"),
    (["calibrate", "--budget", "4", "--model", "{dit}"], "argument --prompt: --model needs the calibration prompts"),
    (["calibrate", "--budget", "4", "--model", "{dit}", "--prompt", "0", "--classes", "0-4"], "argument --classes"),
    (["calibrate", "--budget", "4", "--model", "{missing}", "--prompt", "0"], "argument --model: "),
    (["calibrate", "--budget", "4", "--model", "{dit}/transformer", "--prompt", "0"], "no model_index.json"),
    (["generate", "--model", "{dit}", "--calibration", "{cal}", "--preset", "paper_dit"],
     "argument --calibration: the file is the cache config (its schedule and fitted weights), so the cache flags "
     "['--preset']"),
    (["generate", "--model", "{dit}", "--calibration", "{cal}", "--interval", "3"], "['--interval'] would be"),
    (["generate", "--model", "{dit}", "--calibration", "{cal}", "--no-cache"], "argument --calibration: --no-cache"),
    (["generate", "--model", "{dit}", "--calibration", "{missing}"], "argument --calibration: no such file"),
])
def test_argument_errors_name_the_flag(argv, message, calibrated, folders, tmp_path, capsys):
    names = {"dit": str(folders["dit"]), "cal": str(calibrated), "missing": str(tmp_path / "missing")}
    argv = [a.format(**names) for a in argv]
    if argv[0] == "calibrate":
        argv += ["--out", str(tmp_path / "x.safetensors")]
    else:
        argv += ["--steps", str(STEPS), "--out", str(tmp_path / "gen")]
    err = _refused(argv, capsys)
    assert message in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "gen").exists()
