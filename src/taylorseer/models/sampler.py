"""Class-conditional DDIM sampling with classifier-free guidance, built on diffusers' scheduler.

The sampler *tells* a listener (e.g. a taylorseer handle) the number of steps, then each step's index, timestep
and sigma, around the model call(s) of that step; it knows nothing about caching.

Example:
    >>> model = build_reference("DiT-FM-T/4")
    >>> images = sample(model, torch.tensor([0, 1]), num_steps=4, seed=0)
    >>> images.shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from ..policy.guidance import GuidanceCache, estimate_difference
from .reference import (  # noqa: F401  (build_reference: docstring example)
    GUIDANCE_INTERVAL,
    IMAGE_SIZE,
    NULL_CLASS,
    SCHEDULE,
    build_reference,
)

CFG_MODES = ("batch", "split")


class StepListener(Protocol):
    """What the sampler tells: ``begin(num_steps)`` once, then a ``step(index, timestep, sigma)`` context."""

    def begin(self, num_steps: int | None = None) -> None: ...

    def step(self, index: int, timestep: Any = None, sigma: Any = None) -> contextlib.AbstractContextManager: ...


def make_scheduler() -> DDIMScheduler:
    """DDIM over the reference model's training schedule: eta = 0, and the predicted x0 is *not* clipped, as in
    DiT's sampler (``clip_denoised=False``); ``sample`` clamps only the final images to [-1, 1]. Clipping x0 at high
    noise, where x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies eps by up to ~30x, turns guided predictions into
    saturated images (docs/model_card.md, "Sampler")."""
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")


def initial_noise(num_images: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The starting noise x_T for ``num_images`` images from one seed (float32, [N, 1, size, size])."""
    return torch.randn(num_images, 1, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    class_labels: torch.Tensor,
    *,
    num_steps: int = 50,
    guidance_scale: float = 1.5,
    guidance_interval: tuple[int, int] | None = GUIDANCE_INTERVAL,
    seed: int = 0,
    cfg_mode: str = "batch",
    listener: StepListener | None = None,
    progress: bool = False,
    guidance_cache: GuidanceCache | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate images in [-1, 1] ([N, 1, S, S], S the model's ``sample_size``) for ``class_labels`` [N] with DDIM.

    ``guidance_scale`` > 1 runs classifier-free guidance, as one doubled batch (``cfg_mode="batch"``) or as two
    calls per step, conditional then unconditional (``cfg_mode="split"``). ``guidance_interval=(lo, hi)`` applies
    the guidance only at timesteps ``lo <= t < hi`` (Kynkaanniemi et al. 2024, "guidance in a limited interval");
    elsewhere the conditional prediction is used alone, but both branches are still evaluated, so every step makes
    the same model calls (what a cache handle expects). ``None``: guidance at every step. The default is the
    DiT setting, every step (docs/model_card.md, "Sampler"). ``listener`` is told the steps.

    ``guidance_cache`` (needs ``guidance_scale`` != 1): on the steps its plan marks as half steps the model runs
    on the conditional batch only (N rows instead of 2N, or one call instead of two) and ``eps_uncond = eps_cond -
    d_hat``, ``d_hat`` estimated from the guidance differences of earlier both-branch steps
    (``taylorseer.policy.guidance``). The listener is still told every step. With ``cfg_mode="batch"`` a model
    with a taylorseer handle applied is refused (``ValueError``): its batch would alternate between 2N and N rows,
    and every change re-anchors the cached targets (computed in full, factors restarted: docs/reliability.md,
    #11.2), so the handle would barely forecast. With ``cfg_mode="split"`` each branch is its own call and keeps
    its own factors, so the two combine: a half step simply makes no unconditional call (pass the handle as
    ``listener``: with untold steps a generation that ends on a half step keeps its factors until the next one).

    ``noise``: the starting x_T ``[N, C, S, S]`` (on the model's device; the labels and timesteps follow it)
    instead of ``initial_noise(N, seed)``, e.g. per-sample noise of a data-parallel run (``taylorseer sample``);
    the same noise gives bitwise the same images as the seed that drew it.
    """
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode must be one of {list(CFG_MODES)}, got {cfg_mode!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    low, high = _check_interval(guidance_interval)
    both = _guidance_plan(model, guidance_cache, guidance_scale, num_steps, cfg_mode)
    estimate = guidance_cache.estimate if guidance_cache is not None else ""
    known: list[tuple[int, torch.Tensor]] = []  # the last two computed (step, eps_cond - eps_uncond)
    config: Any = model.config  # diffusers' config of the model (untyped; nn.Module types attributes Tensor | Module)
    x = _check_noise(noise, class_labels) if noise is not None else initial_noise(len(class_labels), seed,
                                                                                   config.sample_size)
    scheduler = make_scheduler()
    scheduler.set_timesteps(num_steps)
    labels = class_labels.long().to(x.device)
    null = torch.full_like(labels, NULL_CLASS)
    if listener is not None:
        listener.begin(num_steps)
    guided = guidance_scale != 1.0
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress)):
        alpha = scheduler.alphas_cumprod[int(t)]
        sigma = float(((1 - alpha) / alpha).sqrt())
        context = listener.step(i, int(t), sigma) if listener is not None else contextlib.nullcontext()
        with context:
            scale = (guidance_scale if low <= int(t) < high else 1.0) if guided else None
            if both is None or scale is None:
                eps = _guided_eps(model, x, int(t), labels, null, scale, cfg_mode)
            else:
                eps = _cached_guided_eps(model, x, int(t), labels, null, scale, cfg_mode, i, both[i], known, estimate)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def _check_noise(noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4 or len(noise) != len(labels):
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor [N, C, S, S] with N = {len(labels)} (one per class label), "
                         f"got {shape}")
    return noise


def _check_interval(interval: tuple[int, int] | None) -> tuple[float, float]:
    if interval is None:
        return -math.inf, math.inf
    ok = (isinstance(interval, (tuple, list)) and len(interval) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in interval) and 0 <= interval[0] < interval[1])
    if not ok:
        raise ValueError(f"guidance_interval must be None or a pair of ints (lo, hi) with 0 <= lo < hi (timesteps), "
                         f"got {interval!r}")
    return interval[0], interval[1]


def _eps(model, x, t: int, y) -> torch.Tensor:
    return model(x, timestep=torch.full((len(y),), t, device=x.device), class_labels=y).sample


def _branches(model, x, t: int, labels, null, cfg_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_cond, eps_uncond) as one doubled batch or two calls, conditional first."""
    if cfg_mode == "batch":
        cond, uncond = _eps(model, torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
        return cond, uncond
    return _eps(model, x, t, labels), _eps(model, x, t, null)


def _guided_eps(model, x, t: int, labels, null, scale: float | None, cfg_mode: str) -> torch.Tensor:
    if scale is None:
        return _eps(model, x, t, labels)
    cond, uncond = _branches(model, x, t, labels, null, cfg_mode)
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


#################################################################################
#                 Guidance cache: half steps compute cond only                  #
#################################################################################

def _guidance_plan(model: torch.nn.Module, cache: GuidanceCache | None, guidance_scale: float, num_steps: int,
                   cfg_mode: str) -> list[bool] | None:
    """The both-branch plan of ``cache`` (None without one), after checking that it can run here."""
    if cache is None:
        return None
    if not isinstance(cache, GuidanceCache):
        raise TypeError(f"guidance_cache must be a GuidanceCache or None, got {type(cache).__name__}")
    if guidance_scale == 1.0:
        raise ValueError("guidance_cache needs classifier-free guidance (guidance_scale != 1): without it there is "
                         "no unconditional branch to save, got guidance_scale=1.0")
    from ..runtime.install import is_applied  # the runtime's own registry of installed handles

    if cfg_mode == "batch" and is_applied(model):
        raise ValueError("guidance_cache with cfg_mode='batch' on a model with a taylorseer handle: the half steps "
                         "call the model on N rows instead of 2N, and each batch change re-anchors every cached "
                         "target (computed in full, factors restarted; docs/reliability.md #11.2), so the handle "
                         "would hardly forecast. Use cfg_mode='split' (each branch keeps its own factors), or "
                         "remove() the handle")
    return cache.plan(num_steps)


def _cached_guided_eps(model, x, t: int, labels, null, scale: float, cfg_mode: str, step: int, both: bool,
                       known: list[tuple[int, torch.Tensor]], estimate: str) -> torch.Tensor:
    """A guided step whose unconditional prediction is computed (``both``, recording ``d`` in ``known``) or
    estimated as ``eps_cond - d_hat``; on both-branch steps exactly ``_guided_eps``."""
    if both:
        cond, uncond = _branches(model, x, t, labels, null, cfg_mode)
        known[:] = [*known[-1:], (step, cond - uncond)]
    else:
        cond = _eps(model, x, t, labels)
        uncond = cond - estimate_difference(estimate, known, step)
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)
