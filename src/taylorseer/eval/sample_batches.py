"""Generating one batch of samples with one method: the embedded DiT (``denoise``: DDIM from given noise) or a
diffusers pipeline (one CPU generator per sample). ``eval.sample`` cuts the job into batches.

Example:
    >>> noise, labels = sample_noise(0, range(4), (1, 16, 16)), sample_labels(range(4))
    >>> denoise(load_reference(), noise, labels, num_steps=6).shape   # doctest: +SKIP
    torch.Size([4, 1, 16, 16])
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from ..api import apply
from ..integrations.pipeline_call import check_supported, class_labels, load_pipeline, parameters
from ..models.pretrained import load_reference
from ..models.reference import GUIDANCE_INTERVAL, NULL_CLASS
from ..models.sampler import CFG_MODES, _check_interval, make_scheduler
from .install import installer_for
from .sample_files import sample_labels, sample_noise, sample_seed
from .sample_spec import SampleSpec

#################################################################################
#                              Generating batches                               #
#################################################################################

@torch.no_grad()
def denoise(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, num_steps: int = 50,
            guidance_scale: float = 1.5, cfg_mode: str = "batch", listener: Any = None) -> torch.Tensor:
    """``models.sampler.sample`` started from the given ``noise`` [N, C, S, S] (on the model's device) instead of
    one seed: the same DDIM steps, guidance and listener calls, bitwise the same images for the same noise on CPU
    (tests/application/test_sample.py), timesteps made on the noise's device. Images in [-1, 1].

    Example:
        >>> noise, labels = sample_noise(0, range(4), (1, 16, 16)), sample_labels(range(4))
        >>> denoise(load_reference(), noise, labels, num_steps=6).shape   # doctest: +SKIP
        torch.Size([4, 1, 16, 16])
    """
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {list(CFG_MODES)}, got {cfg_mode!r}")
    low, high = _check_interval(GUIDANCE_INTERVAL)  # the sampler's default
    scheduler = make_scheduler()
    scheduler.set_timesteps(num_steps)
    labels = labels.long().to(noise.device)
    null = torch.full_like(labels, NULL_CLASS)
    x = noise
    if listener is not None:
        listener.begin(num_steps)
    guided = guidance_scale != 1.0

    def eps(inputs: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        return model(inputs, timestep=torch.full((len(y),), t, device=inputs.device), class_labels=y).sample

    for i, t in enumerate(scheduler.timesteps):
        alpha = scheduler.alphas_cumprod[int(t)]
        sigma = float(((1 - alpha) / alpha).sqrt())
        context = listener.step(i, int(t), sigma) if listener is not None else contextlib.nullcontext()
        with context:
            scale = (guidance_scale if low <= int(t) < high else 1.0) if guided else None
            if scale is None:
                out = eps(x, labels, int(t))
            else:
                if cfg_mode == "batch":
                    cond, uncond = eps(torch.cat([x, x]), torch.cat([labels, null]), int(t)).chunk(2)
                else:
                    cond, uncond = eps(x, labels, int(t)), eps(x, null, int(t))
                out = cond if scale == 1.0 else uncond + scale * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x.clamp(-1, 1)


class EmbeddedSampler:
    """Generates batches of the embedded model with one method."""

    def __init__(self, spec: SampleSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.model = load_reference().to(device)
        config = self.model.config
        self.shape = (config.in_channels, config.sample_size, config.sample_size)

    def __call__(self, indices: range) -> tuple[torch.Tensor, dict[str, Any]]:
        method = self.spec.method
        noise = sample_noise(self.spec.seed, indices, self.shape).to(self.device)
        labels = sample_labels(indices)
        guidance = self.spec.resolved_guidance()
        assert guidance is not None, "the embedded model's guidance scale defaults to 1.5"
        installed = installer_for(method)(self.model, method)
        try:
            images = denoise(installed.model, noise, labels, num_steps=method.num_steps,
                             guidance_scale=guidance, cfg_mode=self.spec.cfg_mode,
                             listener=installed.listener)
            stats = installed.stats()
        finally:
            installed.remove()
        return images, stats


class PipelineSampler:
    """Generates batches of a diffusers pipeline: one CPU generator per sample (``generator=[...]``)."""

    def __init__(self, spec: SampleSpec, device: torch.device):
        self.spec = spec
        assert spec.model is not None, "a pipeline sampler needs spec.model"
        self.pipe = load_pipeline(spec.model, str(device), spec.weights_dtype)
        self.config = None if spec.method.config is None else spec.method.cache_config()
        check_supported(self.pipe, self.config)
        self.pipe.set_progress_bar_config(disable=True)
        call_parameters = parameters(self.pipe)
        self.classes = class_labels(self.pipe, spec.prompt) if "class_labels" in call_parameters else None
        if self.classes is None and not spec.prompt:
            raise ValueError(f"{type(self.pipe).__name__} needs a text prompt (--prompt)")
        self.per_prompt = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt")
                                if n in call_parameters), None)

    def __call__(self, indices: range) -> tuple[torch.Tensor, dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.classes is not None:
            kwargs["class_labels"] = sample_labels(indices, self.classes).tolist()
        else:
            kwargs["prompt"] = self.spec.prompt
            if self.per_prompt:
                kwargs[self.per_prompt] = len(indices)
        if self.spec.guidance_scale is not None:
            kwargs["guidance_scale"] = self.spec.guidance_scale
        generators = [torch.Generator().manual_seed(sample_seed(self.spec.seed, i)) for i in indices]
        handle = apply(self.pipe, self.config) if self.config is not None else None
        try:
            result = self.pipe(num_inference_steps=self.spec.method.num_steps, generator=generators,
                               output_type="np", **kwargs)
            stats = handle.stats.to_dict() if handle is not None else {"steps_full": self.spec.method.num_steps,
                                                                       "steps_forecast": 0}
        finally:
            if handle is not None:
                handle.remove()
        images = getattr(result, "images", None)
        if images is None:
            raise ValueError(f"{type(self.pipe).__name__} returned no images (videos are not supported by sample)")
        return torch.from_numpy(np.asarray(images)), stats
