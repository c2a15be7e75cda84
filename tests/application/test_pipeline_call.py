"""The host-side jobs written once (issue 21, item 3): a pipeline call's arguments and output
(``integrations.pipeline_call``), the scheduler step-teller (``integrations.steps.SchedulerSteps``), the sampler
started from given noise (``models.sampler.sample(noise=)``) and the dtype/device table (``taylorseer.devices``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from taylorseer.devices import DTYPES, WEIGHT_DTYPES, check_device, resolve_device, torch_dtype
from taylorseer.integrations.pipeline_call import (
    call_arguments,
    default_guidance,
    is_hub_id,
    output_arrays,
    output_tensor,
    resolve_prompts,
)
from taylorseer.integrations.steps import SchedulerSteps
from taylorseer.models.sampler import initial_noise, sample


class ClassPipe:
    """A class-conditional pipeline's call signature (DiT's)."""

    labels = {"cat": 3, "dog": 5}
    transformer = SimpleNamespace(config=SimpleNamespace(num_embeds_ada_norm=10))

    def __call__(self, class_labels, guidance_scale=4.0, num_inference_steps=50, generator=None, output_type="pil"):
        raise AssertionError("not called")


class TextPipe:
    """A text pipeline's call signature (PixArt's)."""

    def __call__(self, prompt=None, num_images_per_prompt=1, num_inference_steps=20, generator=None,
                 output_type="pil"):
        raise AssertionError("not called")


class VideoPipe:
    def __call__(self, prompt=None, num_videos_per_prompt=1, guidance_scale=5.0, num_inference_steps=20):
        raise AssertionError("not called")


#################################################################################
#                        the call's arguments and output                        #
#################################################################################

def test_class_pipelines_take_ids_or_names_repeated_per_prompt():
    pipe = ClassPipe()
    assert call_arguments(pipe, "cat, 7", per_prompt=2, guidance_scale=1.5) == {
        "class_labels": [3, 7, 3, 7], "guidance_scale": 1.5}
    assert call_arguments(pipe, None) == {"class_labels": [0]}  # no prompt: class 0
    assert call_arguments(pipe, [5, 1]) == {"class_labels": [5, 1]}  # already ids
    assert resolve_prompts(pipe, ["cat, 1", 2]) == [3, 1, 2]
    assert default_guidance(pipe) == 4.0
    with pytest.raises(ValueError, match="class id 12 is out of range"):
        call_arguments(pipe, "12")
    with pytest.raises(ValueError, match="unknown class label 'cow'"):
        call_arguments(pipe, "cow")


def test_text_pipelines_take_the_prompt_and_a_count_per_prompt():
    assert call_arguments(TextPipe(), "a red fox", per_prompt=3) == {"prompt": "a red fox", "num_images_per_prompt": 3}
    assert call_arguments(TextPipe(), ["a", "b"]) == {"prompt": ["a", "b"], "num_images_per_prompt": 1}
    assert call_arguments(VideoPipe(), "waves", per_prompt=2, guidance_scale=6.0) == {
        "prompt": "waves", "num_videos_per_prompt": 2, "guidance_scale": 6.0}
    assert default_guidance(TextPipe()) == 1.0  # no guidance_scale parameter
    with pytest.raises(ValueError, match="TextPipe needs a text prompt"):
        call_arguments(TextPipe(), None)
    with pytest.raises(ValueError, match="TextPipe takes no guidance_scale"):
        call_arguments(TextPipe(), "a fox", guidance_scale=2.0)
    with pytest.raises(ValueError, match="text prompts must be non-empty strings"):
        resolve_prompts(TextPipe(), ["a fox", " "])


def test_outputs_become_float_arrays_in_0_1_and_tensors_in_minus_1_1():
    pixels = np.array([[0, 64, 128, 192, 255]], dtype=np.uint8)  # a 1x5 grayscale PIL image: no channel axis
    kind, arrays = output_arrays(SimpleNamespace(images=[Image.fromarray(pixels)]))
    assert kind == "images" and arrays.shape == (1, 1, 5, 1) and arrays.dtype == np.float32
    assert np.allclose(arrays[0, 0, :, 0], [0.0, 64 / 255, 128 / 255, 192 / 255, 1.0])
    frames = np.full((2, 4, 5, 6, 3), 0.25, dtype=np.float32)  # [N, F, H, W, C]
    kind, arrays = output_arrays(SimpleNamespace(frames=frames))
    assert kind == "frames" and arrays.shape == (2, 4, 5, 6, 3)
    tensor = output_tensor(SimpleNamespace(images=np.ones((2, 5, 6, 3), dtype=np.float32)))
    assert tensor.shape == (2, 3, 5, 6) and bool((tensor == 1).all())
    with pytest.raises(ValueError, match="has neither images nor frames"):
        output_arrays(SimpleNamespace(latents=None))


def test_hub_ids_are_owner_slash_name_not_paths():
    assert is_hub_id("facebook/DiT-XL-2-256") and is_hub_id("owner/name.v2")
    assert not is_hub_id("./owner/name") and not is_hub_id("~/models/x") and not is_hub_id("a/b/c")


#################################################################################
#                        the one scheduler step-teller                          #
#################################################################################

def test_scheduler_steps_count_read_and_restore_the_scheduler_exactly():
    scheduler = DDIMScheduler(num_train_timesteps=100)
    own_step = scheduler.step
    told = []
    steps = SchedulerSteps(torch.nn.Linear(1, 1), lambda: told.append("set"), lambda: told.append("step"))
    steps.attach(scheduler)
    assert "set_timesteps" in scheduler.__dict__ and "step" in scheduler.__dict__
    scheduler.set_timesteps(4)
    assert told == ["set"] and steps.completed == 0 and steps.start() == 4
    x = torch.zeros(1, 1, 2, 2)
    for i, t in enumerate(scheduler.timesteps):
        assert steps.completed == i
        timestep, sigma = steps.where(i, with_sigma=True)
        assert timestep == t and sigma is not None and float(sigma) > 0
        x = scheduler.step(x, t, x).prev_sample
    assert steps.completed == 4 and told == ["set", "step", "step", "step", "step"]
    assert steps.mismatch(scheduler.timesteps[0], (), {"timestep": scheduler.timesteps[0] / 1000}) is None  # learns
    assert steps.mismatch(scheduler.timesteps[1], (), {"timestep": scheduler.timesteps[1] / 1000}) is None
    assert steps.mismatch(scheduler.timesteps[1], (), {"timestep": scheduler.timesteps[2] / 1000}) is not None
    steps.detach()
    assert "set_timesteps" not in scheduler.__dict__ and "step" not in scheduler.__dict__
    assert scheduler.step == own_step and steps.scheduler is None


#################################################################################
#                          the sampler from given noise                         #
#################################################################################

class Told:
    def __init__(self):
        self.steps = []

    def begin(self, num_steps=None):
        self.steps.append(("begin", num_steps))

    def step(self, index, timestep=None, sigma=None):
        self.steps.append((index, timestep, sigma))
        return torch.autograd.grad_mode.no_grad()


@pytest.mark.parametrize("cfg_mode", ["batch", "split"])
def test_sample_from_noise_equals_the_seed_that_drew_it(tiny_dit, cfg_mode):
    labels = torch.tensor([0, 3, 7])
    by_seed, from_noise = Told(), Told()
    expected = sample(tiny_dit, labels, num_steps=4, seed=3, cfg_mode=cfg_mode, listener=by_seed)
    noise = initial_noise(3, 3, tiny_dit.config.sample_size)
    images = sample(tiny_dit, labels, num_steps=4, seed=99, cfg_mode=cfg_mode, listener=from_noise, noise=noise)
    assert torch.equal(images, expected) and from_noise.steps == by_seed.steps
    other = sample(tiny_dit, labels, num_steps=4, cfg_mode=cfg_mode, noise=torch.randn_like(noise))
    assert not torch.equal(other, expected)


def test_sample_refuses_noise_of_another_batch():
    model = SimpleNamespace(config=SimpleNamespace(sample_size=16))
    with pytest.raises(ValueError, match=r"noise must be a tensor \[N, C, S, S\] with N = 2"):
        sample(model, torch.tensor([0, 1]), num_steps=2, noise=torch.zeros(3, 1, 16, 16))  # type: ignore[arg-type]


#################################################################################
#                         the dtype and device table                            #
#################################################################################

def test_one_table_of_dtypes_and_devices():
    from taylorseer.config import FACTOR_DTYPES  # the ground floor validates names only; they are the table's

    assert FACTOR_DTYPES == (None, *DTYPES)
    assert WEIGHT_DTYPES == ("float32", "float16", "bfloat16") and set(WEIGHT_DTYPES) < set(DTYPES)
    assert [torch_dtype(name) for name in DTYPES] == [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'float16', 'bfloat16', 'float64'\]"):
        torch_dtype("half")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be one of cpu, cuda, cuda:N, mps, got 'gpu'"):
        check_device("gpu")
