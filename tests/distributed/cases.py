"""The methods and the generation the context-parallel tests run, in one process and under context parallelism
(and the DiT case of the default-group vote).

One generation: the random-weight tiny FLUX (``flux-tiny-random``: 4 heads, 64 image + 4 prompt tokens), classes
3 and 5, 8 Euler steps, true classifier-free guidance at 2.0 (two transformer calls per step: two branches), one
CPU generator per sample. Every policy and forecaster of the library at one or more granularities, a calibrated
(``LinearForecast``) file, and the two probing policies at module and block granularity.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from taylorseer.forecast import AdamsForecast, CorrectorForecast, HermiteForecast, TaylorForecast
from taylorseer.parts import CacheConfig, Targets
from taylorseer.policy import ConfidenceGate, ErrorBudget, FixedSchedule, IntervalSchedule

MODEL = "flux-tiny-random"
STEPS = 8
GUIDANCE = 2.0
LABELS = (3, 5)
CALIBRATED_FULL_STEPS = (0, 1, 3, 6)


def methods(calibration: Any) -> dict[str, CacheConfig]:
    """name -> config; ``calibration`` is a ``taylorseer.calibration`` file object of this model and generation
    (None: a placeholder config in its place, for counting)."""
    interval = IntervalSchedule(interval=3, warmup_steps=1)
    return {
        "taylor-module": CacheConfig(interval, TaylorForecast(max_order=2), Targets("module")),
        "taylor-block": CacheConfig(interval, TaylorForecast(max_order=2), Targets("block")),
        "taylor-output": CacheConfig(interval, TaylorForecast(max_order=2), Targets("output")),
        "fora-module": CacheConfig(interval, TaylorForecast(max_order=0), Targets("module")),
        "adams-module": CacheConfig(interval, AdamsForecast(order=2), Targets("module")),
        "hermite-block": CacheConfig(interval, HermiteForecast(max_order=2), Targets("block")),
        "corrector-module": CacheConfig(interval, CorrectorForecast(), Targets("module")),
        "fixed-block": CacheConfig(FixedSchedule(CALIBRATED_FULL_STEPS, STEPS), TaylorForecast(max_order=1),
                                   Targets("block")),
        "calibrated-output": (calibration.cache_config() if calibration is not None
                              else CacheConfig(interval, TaylorForecast(), Targets("output"))),
        "gate-module": CacheConfig(ConfidenceGate(threshold=0.2, warmup_steps=1, max_forecast=3),
                                   TaylorForecast(max_order=1), Targets("module")),
        "gate-block": CacheConfig(ConfidenceGate(threshold=0.6, warmup_steps=1, max_forecast=3),
                                  TaylorForecast(max_order=1), Targets("block")),
        "budget-module": CacheConfig(ErrorBudget(budget=0.2, warmup_steps=1, max_forecast=3),
                                     TaylorForecast(max_order=1), Targets("module")),
    }


GATED = ("gate-module", "gate-block", "budget-module")


def calibrate(path: str) -> Any:
    """A calibration file of the tiny FLUX at output granularity (module granularity records single-tensor
    targets only, and FLUX's attention returns two), fitted on 4 full-compute images."""
    from taylorseer.calibration.pipeline import calibrate_pipeline
    from taylorseer.distributed.flux import build_model

    return calibrate_pipeline(build_model(MODEL), len(CALIBRATED_FULL_STEPS), path, prompts=["0", "1"],
                              num_steps=STEPS, images=4, schedule=FixedSchedule(CALIBRATED_FULL_STEPS, STEPS),
                              search_images=0, progress=False, guidance_scale=GUIDANCE, batch_size=4,
                              granularity="output")


def generate(pipe: Any, config: CacheConfig | None, handle: Any = None) -> dict[str, Any]:
    """One generation with ``config`` applied (None: full compute; or through ``handle``, already applied and left
    applied): images [2, 1, 16, 16] in [-1, 1], the decisions ``[(step, branch, compute)]`` and the handle's peak
    cache bytes."""
    import taylorseer

    generators = [torch.Generator().manual_seed(i) for i in range(len(LABELS))]
    call = {"class_labels": list(LABELS), "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
            "generator": generators, "output_type": "pt"}
    if config is None:
        return {"images": pipe(**call).images, "decisions": [], "peak_cache_bytes": 0}
    with taylorseer.apply(pipe, config) if handle is None else contextlib.nullcontext(handle) as handle:
        images = pipe(**call).images
        return {"images": images, "decisions": [(d["step"], d["branch"], d["compute"])
                                                for d in handle.stats.decisions],
                "peak_cache_bytes": handle.stats.peak_cache_bytes}


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# the default-group probe vote of unsharded ranks (test_distributed.py): a tiny random DiT, a confidence gate
DIT_POLICY = ConfidenceGate(threshold=0.4, warmup_steps=1, max_forecast=4)
DIT_SEEDS = (0, 3)  # on the tiny random DiT these two are gated differently when alone


def dit_decisions(seed: int) -> list[bool]:
    """The per-step compute decisions of a gated TaylorSeer sample of classes ``[seed % 10, 3]`` (12 steps) on the
    tiny random DiT (``DiT-FM-T/4``, weights from seed 0), in whatever process group is current."""
    import taylorseer
    from taylorseer.models.reference import build_reference
    from taylorseer.models.sampler import sample

    torch.manual_seed(0)
    model = build_reference("DiT-FM-T/4").requires_grad_(False)
    with taylorseer.apply(model, CacheConfig(DIT_POLICY, TaylorForecast(max_order=1))) as handle:
        sample(model, torch.tensor([seed % 10, 3]), num_steps=12, seed=seed, listener=handle)
        return [d["compute"] for d in handle.stats.decisions]
