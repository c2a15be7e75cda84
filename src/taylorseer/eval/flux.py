"""The flow-matching reference in the bench: its sampler (diffusers' ``FluxPipeline``), its grid, diffusers' hooks.

``FluxSampler(ref)`` is a bench/calibration sampler (``sampler(model, labels, *, num_steps, guidance_scale, seed,
cfg_mode, listener)``): every call runs diffusers' own ``FluxPipeline`` around ``model`` (true CFG: two transformer
calls per step inside the pipeline's ``cache_context("cond"/"uncond")``), and a listener (a taylorseer handle, a
trajectory recorder) is told the steps from the pipeline's scheduler. ``flux_grid`` holds the methods at the
budgets of the flow-matching issue (5, 6, 8 full steps of 28; 6, 8, 11 of 50): FORA and TaylorSeer O=1, 2 at
module, block and output granularity, the FLUX preset and its FORA, fewer Euler steps, and diffusers' own hooks
enabled as their users enable them, ``pipe.transformer.enable_cache(config)`` (family ``diffusers-hook``).

Example:
    >>> ref = load_flux_reference()                                                   # doctest: +SKIP
    >>> records = run_bench(ref.transformer, flux_grid(28), sampler=FluxSampler(ref), cfg_mode="split",
    ...                     guidance_scale=DEFAULT_GUIDANCE, num_images=64)           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline
from torch import nn

from ..calibration.pipeline import StepTeller
from ..config import TaylorSeerConfig, preset
from ..integrations.diffusers_caches import read_printed_ratios
from ..models.flux_pipeline import DEFAULT_GUIDANCE, FluxReference, flux_pipeline
from ..models.flux_reference import unpack
from ..parts import parts_of
from ..runtime.install import unwrap
from .bench import run_bench
from .install import Installed, register_installer
from .methods import Method

FLUX_BUDGETS = {28: (5, 6, 8), 50: (6, 8, 11)}  # full steps per step count (the budgets)
HOOK_KINDS = ("taylorseer", "firstblock", "mag", "sea")


class FluxSampler:
    """A bench and calibration sampler that runs ``FluxPipeline`` around the given transformer (see module doc)."""

    def __init__(self, ref: FluxReference) -> None:
        self.ref = ref
        self.model_calls = 0

    def pipeline(self, model: nn.Module) -> FluxPipeline:
        """A ``FluxPipeline`` around ``model`` (a copy of the reference's transformer for peers that clone)."""
        if unwrap(model) is unwrap(self.ref.transformer):
            return self.ref.pipe
        return flux_pipeline(model)

    @torch.no_grad()
    def __call__(self, model: nn.Module, labels: torch.Tensor, *, num_steps: int, guidance_scale: float,
                 seed: int, cfg_mode: str = "split", listener: Any = None) -> torch.Tensor:
        if cfg_mode != "split":
            raise ValueError(f"cfg_mode: FluxPipeline runs true CFG as two calls per step ('split'), got {cfg_mode!r}")
        pipe = self.pipeline(model)
        call = self.ref.call_arguments(torch.as_tensor(labels), num_steps=num_steps, guidance_scale=guidance_scale,
                                       seed=seed)
        with StepTeller(pipe, listener, num_steps) as teller:
            tokens = pipe(**call)[0]
        self.model_calls += sum(len(c) for c in teller.calls.values())
        return unpack(tokens.float()).clamp(-1, 1)


#################################################################################
#                      diffusers' hooks, as their users call them               #
#################################################################################

@dataclass(frozen=True)
class HookSettings:
    """One diffusers cache hook: ``kind`` (one of ``HOOK_KINDS``) and its config's keyword arguments.

    Example:
        >>> HookSettings("firstblock", {"threshold": 0.1}).to_dict()
        {'hook': 'firstblock', 'threshold': 0.1}
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    family: ClassVar[str] = "diffusers-hook"  # the bench family (eval.methods.PeerSettings)

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"kind must be one of {list(HOOK_KINDS)}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        plain = {k: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v
                 for k, v in self.params.items() if k != "mag_ratios"}
        return {"hook": self.kind, **plain}

    def build(self) -> Any:
        """The diffusers config object (``TaylorSeerCacheConfig``, ``FirstBlockCacheConfig``, ...)."""
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            MagCacheConfig,
            SeaCacheConfig,
            TaylorSeerCacheConfig,
        )

        kinds = {"taylorseer": TaylorSeerCacheConfig, "firstblock": FirstBlockCacheConfig, "mag": MagCacheConfig,
                 "sea": SeaCacheConfig}
        return kinds[self.kind](**self.params)


def _install_hook(model: nn.Module, method: Method) -> Installed:
    """``model.enable_cache(settings.build())``; ``remove`` is ``disable_cache`` on the model (a deep copy, so that
    hook leftovers never touch the model the other methods run on)."""
    settings = method.config
    if not isinstance(settings, HookSettings):
        raise TypeError(f"method {method.name!r}: a diffusers hook takes HookSettings, got {type(settings).__name__}")
    clone: Any = copy.deepcopy(unwrap(model))  # a diffusers CacheMixin model (enable_cache / disable_cache)
    clone.enable_cache(settings.build())

    def remove() -> None:
        clone.disable_cache()

    return Installed(clone, None, remove, lambda: {})


register_installer("diffusers-hook", _install_hook)


def mag_ratios(sampler: FluxSampler, num_steps: int, guidance_scale: float, images: int = 8,
               seed: int = 1000) -> list[float]:
    """MagCache's per-step magnitude ratios for this model and scheduler, by diffusers' own calibration mode
    (``MagCacheConfig(calibrate=True)``: nothing skipped, the ratios printed at the end of a generation)."""
    from diffusers.hooks import MagCacheConfig

    clone = copy.deepcopy(sampler.ref.transformer)
    clone.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        sampler(clone, torch.arange(images) % 10, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    clone.disable_cache()
    return read_printed_ratios(buffer.getvalue(), num_steps)


#################################################################################
#                                     Grid                                      #
#################################################################################

def interval_for(budget: int, num_steps: int, warmup: int = 2) -> TaylorSeerConfig | None:
    """The fixed-interval schedule with ``warmup`` warm-up steps that computes exactly ``budget`` of ``num_steps``
    steps (the smallest such interval), or None.

    Example:
        >>> cfg = interval_for(6, 28); (cfg.interval, cfg.full_steps(28))
        (6, 6)
    """
    for n in range(2, num_steps + 1):
        cfg = TaylorSeerConfig(interval=n, warmup_steps=warmup, max_order=2)
        if cfg.full_steps(num_steps) == budget:
            return cfg
    return None


def flux_grid(num_steps: int = 28, ratios: list[float] | None = None) -> list[Method]:
    """Full compute, fewer Euler steps, FORA and TaylorSeer O=1, 2 at module / block / output granularity at the
    budgets of ``FLUX_BUDGETS[num_steps]``, ``paper_flux`` and its FORA, and diffusers' hooks (TaylorSeer at the
    paper_flux schedule, FirstBlockCache, SeaCache, and MagCache when ``ratios`` are given).

    Example:
        >>> [m.name for m in flux_grid(28)][:3]
        ['full', 'euler-8', 'euler-6']
    """
    budgets = FLUX_BUDGETS.get(num_steps, (max(2, num_steps // 6),))
    methods = [Method("full", None, num_steps)]
    methods += [Method(f"euler-{b}", None, b, family="fewer-steps") for b in sorted(budgets, reverse=True)]
    for b in budgets:
        base = interval_for(b, num_steps)
        if base is None:
            continue
        n = base.interval
        methods.append(Method(f"fora-N{n}", parts_of(base.replace(max_order=0, name=f"fora-N{n}")), num_steps))
        for granularity in ("module", "block", "output"):
            for order in (1, 2):
                suffix = "" if granularity == "module" else f"-{granularity}"
                name = f"ts-O{order}-N{n}{suffix}"
                cfg = base.replace(max_order=order, granularity=granularity, name=name)
                methods.append(Method(name, parts_of(cfg), num_steps))
    flux = preset("paper_flux")
    methods.append(Method("paper_flux", parts_of(flux), num_steps, family="preset"))
    methods.append(Method("fora-paper_flux", parts_of(flux.replace(max_order=0, name="fora-paper_flux")), num_steps))
    hooks = [HookSettings("taylorseer", {"cache_interval": flux.interval, "disable_cache_before_step":
                                         flux.warmup_steps, "max_order": flux.max_order,
                                         "taylor_factors_dtype": torch.float32}),
             HookSettings("firstblock", {"threshold": 0.05}), HookSettings("firstblock", {"threshold": 0.1}),
             HookSettings("firstblock", {"threshold": 0.2}),
             HookSettings("sea", {"threshold": 0.25}), HookSettings("sea", {"threshold": 0.5})]
    if ratios is not None:
        hooks += [HookSettings("mag", {"threshold": t, "max_skip_steps": 4, "num_inference_steps": num_steps,
                                       "mag_ratios": ratios}) for t in (0.06, 0.24)]
    for hook in hooks:
        tag = "-".join(f"{v}" for k, v in hook.params.items()
                       if k in ("threshold", "cache_interval"))
        methods.append(Method(f"diffusers-{hook.kind}-{tag}", hook, num_steps))
    return methods


def register_cache_dit_pipeline() -> None:
    """cache-dit runs on the FLUX reference as its users run it on a FLUX model: ``cache_dit.enable_cache(pipe,
    ...)`` on a ``FluxPipeline`` around the transformer (cache-dit's registered Flux adapter), with
    ``enable_separate_cfg=True`` because the reference samples true CFG as two transformer calls per step (cond,
    then uncond; cache-dit keeps a cache per branch)."""
    from ..integrations.cache_dit import register_pipeline

    register_pipeline("FluxTransformer2DModel", flux_pipeline, separate_cfg=True)


register_cache_dit_pipeline()


def cache_dit_flux_methods(num_steps: int = 50, schedules: dict[str, tuple[int, ...]] | None = None
                           ) -> list[Method]:
    """cache-dit on the FLUX reference (pipeline path): its own threshold rule at Fn=1 (thresholds 0.08, its
    default, to 0.8: reuse, TaylorSeer O=1, O=2), fixed-interval step masks (warm-up 2) at the full steps that fit
    the issue's budgets with Fn=1 (about 1/12 of a step on every step: 4 full steps at 16 %, 7 at 22 % of 50;
    ``FLUX_CACHE_DIT_MASKS``), and each schedule of ``schedules`` (name -> full steps) as a static step mask with
    Fn/Bn and every calibrator. Empty without cache-dit.

    Example:
        >>> [m.name for m in cache_dit_flux_methods(50)][:1]   # doctest: +SKIP
        ['cachedit-F1B0-reuse-t0.08']
    """
    from ..integrations.cache_dit import CacheDitSettings, cache_dit_version
    from ..policy.interval import IntervalPolicy

    if cache_dit_version() is None:
        return []
    methods = [Method(f"cachedit-{s.label()}", s, num_steps) for s in
               (CacheDitSettings(1, 0, threshold=t, calibrator=c, taylorseer_order=o, warmup_steps=2)
                for t in (0.08, 0.2, 0.4, 0.8) for c, o in (("none", 1), ("taylorseer", 1), ("taylorseer", 2)))]
    masks: dict[str, tuple[int, ...]] = {}
    for full in FLUX_CACHE_DIT_MASKS.get(num_steps, ()):
        n = next(n for n in range(2, num_steps + 1) if sum(IntervalPolicy(n, 2).plan(num_steps)) <= full)
        masks[f"N{n}"] = tuple(i for i, f in enumerate(IntervalPolicy(n, 2).plan(num_steps)) if f)
    choices = ((1, 0, "none", 1), (1, 0, "taylorseer", 1), (1, 0, "taylorseer", 2), (1, 0, "foca", 1),
               (1, 0, "dmd", 1), (1, 1, "taylorseer", 1), (2, 0, "taylorseer", 1))
    for name, steps in {**masks, **(schedules or {})}.items():
        for fn, bn, calibrator, order in (choices if name in (schedules or {}) else choices[:3]):
            s = CacheDitSettings(fn, bn, full_steps=steps, calibrator=calibrator, taylorseer_order=order,
                                 warmup_steps=0)
            methods.append(Method(f"cachedit-{s.label()}@{name}", s, num_steps))
    return methods


FLUX_CACHE_DIT_MASKS = {50: (4, 7), 28: (3, 5)}  # full steps of cache-dit's interval masks on the FLUX bench


def run_flux_bench(ref: FluxReference, methods: list[Method], *, num_images: int = 64, seed: int = 0,
                   repeats: int = 2, guidance_scale: float = DEFAULT_GUIDANCE, out_path: str = "bench.jsonl",
                   threads: int | None = 1, progress: bool = True) -> list[dict[str, Any]]:
    """``run_bench`` on the flow-matching reference through ``FluxPipeline`` (records say ``model: flux``)."""
    return run_bench(ref.transformer, methods, num_images=num_images, seed=seed, threads=threads, repeats=repeats,
                     out_path=out_path, progress=progress, sampler=FluxSampler(ref), guidance_scale=guidance_scale,
                     cfg_mode="split", model_name="flux")
