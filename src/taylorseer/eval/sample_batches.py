"""Generating one batch of samples with one method: the embedded DiT (``models.sampler.sample`` from each
sample's own noise, ``noise=``) or a diffusers pipeline (one CPU generator per sample). ``eval.sample`` cuts the
job into batches.

Example:
    >>> images, stats = EmbeddedSampler(spec, torch.device("cpu"))(range(4))   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api import apply
from ..integrations.pipeline_call import check_supported, class_labels, load_pipeline, parameters
from ..models.pretrained import load_reference
from ..models.sampler import sample
from .install import installer_for
from .sample_files import sample_labels, sample_noise, sample_seed
from .sample_spec import SampleSpec

#################################################################################
#                              Generating batches                               #
#################################################################################

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
            images = sample(installed.model, labels, num_steps=method.num_steps, guidance_scale=guidance,
                            cfg_mode=self.spec.cfg_mode, listener=installed.listener, noise=noise)
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
