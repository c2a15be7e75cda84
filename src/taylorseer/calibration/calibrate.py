"""One call from a model to a calibration file: record trajectories, search the schedule, fit the weights, save.

Example:
    >>> cal = calibrate(load_reference(), budget=8, out="dit-b8.safetensors")      # doctest: +SKIP
    >>> handle = taylorseer.apply(model, cal.cache_config())                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import GRANULARITIES
from ..forecast.linear import LinearForecast
from ..policy.schedule import FixedSchedule
from .fit import FitOptions, fit_linear, fit_on_policy
from .io import Calibration, new_header, save_calibration
from .record import TrajectoryStats, record_on_policy, record_trajectories
from .search import (
    ProxyObjective,
    SampledObjective,
    SearchPlan,
    SearchResult,
    check_budget,
    default_search,
    search_plan,
    search_schedule,
)

DEFAULT_SEED = 1000  # calibration noise seeds start here: far from the bench's and the evaluations' seeds 0..99

# Projection of a calibration's cost to FLUX.1-dev at 1024x1024 on one H100 (guidance-distilled: one transformer
# call per image and step, so a model that runs CFG as two calls per step is counted per step, not per call).
# Published figure: 7.11 s for a 28-step 1024x1024 image in BF16 with diffusers, batch 1, end to end (text
# encoding and VAE decode included, so an upper bound per call): github.com/varadrane1707/BenchmarkFlux, README,
# "H100 GPU Performance (1024x1024, 28 steps)", row BF16. No GPU measured it here.
FLUX_H100_SECONDS_PER_IMAGE_CALL = 7.11 / 28


def calls_per_step(sampling: dict[str, Any]) -> int:
    """Model calls per sampler step of a recording's ``sampling`` record: 2 for CFG as two calls (``cfg_mode``
    ``"split"`` with guidance), else 1 (a CFG batch ``[x; x]`` is one call)."""
    if "calls_per_step" in sampling:
        return int(sampling["calls_per_step"])
    split = sampling.get("cfg_mode") == "split" and sampling.get("guidance_scale", 1.0) != 1.0
    return 2 if split else 1


def calibration_cost(stats: TrajectoryStats, search: dict[str, Any] | None, search_images: int,
                     on_policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """A calibration's cost as model calls x batch ("image calls": one image through the model once; a CFG batch
    ``[x; x]`` counts its images once, CFG as two calls twice), per stage, and projected to FLUX.1-dev at 1024x1024
    on one H100: ``full_image_steps`` (full image calls / calls per step: FLUX.1-dev is guidance-distilled, one
    call per step) x ``FLUX_H100_SECONDS_PER_IMAGE_CALL``. Full calls only: a forecast call of the model output
    runs nothing; at module granularity it runs the work outside the targets, which the projection leaves out.

    Example:
        >>> calibration_cost(TrajectoryStats(50, "target", 1), None, 0)["image_calls"]
        0
    """
    batch = int(stats.sampling.get("batch_size") or max(stats.images, 1))

    def image_calls(calls: int, images: int) -> int:  # calls of ceil(images / batch) batches, each image once
        batches = -(-images // batch) if images else 1
        return calls // batches * images

    recording = image_calls(stats.model_calls, stats.images)
    cost: dict[str, Any] = {"recording": {"model_calls": stats.model_calls, "batch": batch, "image_calls": recording}}
    full = total = recording
    if search is not None:
        calls, full_calls = int(search.get("model_calls", 0)), int(search.get("full_calls", 0))
        cost["search"] = {"model_calls": calls, "full_calls": full_calls, "batch": search_images,
                          "image_calls": calls * search_images, "full_image_calls": full_calls * search_images}
        total += calls * search_images
        full += full_calls * search_images
    if on_policy is not None:
        calls = int(on_policy["model_calls"])
        images = image_calls(calls, int(on_policy["images"]))
        cost["on_policy"] = {"model_calls": calls, "batch": batch, "image_calls": images}
        total += images
        full += images
    per_step = calls_per_step(stats.sampling)
    steps = full // per_step
    minutes = steps * FLUX_H100_SECONDS_PER_IMAGE_CALL / 60
    cost.update(image_calls=total, full_image_calls=full, calls_per_step=per_step, full_image_steps=steps,
                flux_dev_1024_h100_minutes=round(minutes, 1),
                projection=f"{steps} full image steps x {FLUX_H100_SECONDS_PER_IMAGE_CALL:.3f} s (FLUX.1-dev "
                           f"1024x1024 BF16 on one H100, one call per step, published 7.11 s / 28 steps) = "
                           f"{minutes:.1f} GPU-minutes")
    return cost


def planned_cost(budget: int, num_steps: int, images: int, search_images: int, max_evaluations: int,
                 on_policy: bool = False, batch_size: int = 8) -> dict[str, Any]:
    """The most a calibration can cost, before it runs, in full image steps (one image through the model at one
    sampler step, CFG counted once) and projected to FLUX.1-dev 1024x1024 on one H100 (``calibration_cost``):
    recording ``images x num_steps``; the search's reference ``search_images x num_steps``, free when the search
    images are the recording's first batch of ``batch_size`` (``SampledObjective``: ``search_images ==
    min(batch_size, images)``); its candidates, at most the greedy schedule, the power-law starts and
    ``max_evaluations`` refinements, each ``search_images x budget`` (forecast steps of the model output run
    nothing); ``on_policy``: ``images x (num_steps + budget)`` more.

    Example:
        >>> planned_cost(8, 50, images=16, search_images=8, max_evaluations=32)["flux_dev_1024_h100_minutes"]
        13.7
    """
    from .search import power_schedules

    candidates = (1 + len(power_schedules(budget, num_steps)) + max_evaluations) if search_images else 0
    reference = 0 if search_images == min(batch_size, images) else search_images * num_steps
    steps = images * num_steps + (reference + search_images * candidates * budget if search_images else 0)
    steps += images * (num_steps + budget) if on_policy else 0
    minutes = steps * FLUX_H100_SECONDS_PER_IMAGE_CALL / 60
    return {"full_image_steps": steps, "candidates": candidates, "flux_dev_1024_h100_minutes": round(minutes, 1)}


def calibration_labels(images: int, classes: Sequence[int] | None = None, num_classes: int = 10) -> torch.Tensor:
    """``images`` class labels cycling through ``classes`` (default: all ``num_classes``).

    Example:
        >>> calibration_labels(5, classes=(5, 6)).tolist()
        [5, 6, 5, 6, 5]
    """
    pool = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not pool:
        raise ValueError("classes must name at least one class")
    return torch.tensor([pool[i % len(pool)] for i in range(images)])


def resolve_plan(search: str, images: int | None, search_images: int | None, max_evaluations: int | None,
                  radius: int | None, default_search_images: int) -> SearchPlan:
    """``search_plan(search)`` with the arguments given (not None) in place of its values, each checked by name;
    ``default_search_images`` where the plan leaves it to the caller.

    Example:
        >>> resolve_plan("fast", None, 4, None, None, 30).search_images
        4
    """
    plan = search_plan(search)
    for field, value, low in (("images", images, 1), ("search_images", search_images, 0),
                              ("max_evaluations", max_evaluations, 1), ("radius", radius, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{field} must be an int >= {low}, got {value!r}")
    return dataclasses.replace(
        plan, images=plan.images if images is None else images,
        search_images=(search_images if search_images is not None
                       else plan.search_images if plan.search_images is not None else default_search_images),
        max_evaluations=plan.max_evaluations if max_evaluations is None else max_evaluations,
        radius=plan.radius if radius is None else radius)


def calibrate(
    model: nn.Module,
    budget: int,
    out: str | os.PathLike,
    *,
    num_steps: int = 50,
    images: int | None = None,
    classes: Sequence[int] | None = None,
    seed: int = DEFAULT_SEED,
    guidance_scale: float = 1.5,
    cfg_mode: str = "batch",
    options: FitOptions | None = None,
    grouping: str = "target",
    schedule: FixedSchedule | None = None,
    search_images: int | None = None,
    max_evaluations: int | None = None,
    radius: int | None = None,
    search_seed: int = 0,
    name: str | None = None,
    sampler: Callable[..., torch.Tensor] | None = None,
    progress: bool = True,
    stats: TrajectoryStats | None = None,
    on_policy: bool | None = None,
    granularity: str | None = None,
    forecaster: Any = None,
    search: str | None = None,
) -> Calibration:
    """Calibrate ``model`` for ``num_steps``-step generations with ``budget`` full steps; write ``out``.

    1. Record full-compute trajectories of ``images`` calibration images (labels cycling through ``classes``,
       noise seeds ``seed``, ``seed + 1``, ... per batch; ``guidance_scale``/``cfg_mode`` as the generations
       will use them) as running normal equations (``record_trajectories``).
    2. Unless ``schedule`` is given: search the full steps (``search_schedule``): a greedy pass on the fit proxy
       (one weight per anchor and row group, for speed), then local refinement on ``search_images`` sampled
       calibration images (``max_evaluations`` candidates, moves of up to ``radius`` steps, order from
       ``search_seed``); ``search_images=0`` refines on the proxy.
    3. Fit the weights for that schedule (``options``: history K, bias, per channel, ridge) in closed form.
    4. ``on_policy`` (None: on for module and block granularity, off for ``output``): sample the calibration
       images again with those weights and refit the weights from the cached run's own features at its full steps
       to the full-compute features (``fit_on_policy``): the forecasts then correct the drift they cause (+1.7 dB
       on 200 held-out images at 8 of 50 full steps at module granularity; at output granularity it costs 5.4 dB,
       docs/design.md "Calibrated forecasting").
    5. Save the file (``io.py`` format) with the search and fit records and return it loaded.

    ``forecaster``: a formula forecaster config (e.g. ``TaylorForecast(max_order=2)``) to search the schedule for
    instead of fitting weights: steps 3-4 are skipped and ``out`` holds the schedule only (kind ``"schedule"``, the
    forecaster named in its header), used with ``cache_config(forecaster=...)`` or by ``bench --calibration``.

    ``granularity``: what is forecast (``module`` outputs by default, ``block`` residuals or the model ``output``;
    ``calibration_targets``); with ``stats``, theirs. ``stats``: reuse trajectories recorded before (step 1 is
    skipped). ``sampler``: the embedded DDIM sampler by default. Cost: step 1 is ``images`` full-compute
    generations; step 2 about ``max_evaluations`` cached generations of ``search_images`` images; step 3 well under
    a second per schedule on the embedded model; step 4 ``images`` full-compute and ``images`` cached generations.

    ``search``: how much steps 1-2 may spend (``SEARCH_PLANS``): ``"fast"`` (16 recorded images, 8 search
    images: the first recorded batch, at most 32 refinement candidates, one-step shifts first, early stop after 14
    without improvement; a FLUX.1-dev calibration at 50 steps, budget 8 projects to <= 13.7 H100 minutes,
    ``planned_cost``) or ``"thorough"`` (the search of 2026-12-06: 40 images, 30 search images, 200 candidates,
    until a sweep improves nothing); None (default): ``default_search(granularity)``, fast at ``output``
    granularity, thorough at ``module``/``block``. ``images``, ``search_images``, ``max_evaluations`` and
    ``radius`` given override the plan's. The header records the plan
    (``calibration_data.search_plan``) and the cost (``calibration_data.cost``).

    Example:
        >>> cal = calibrate(load_reference(), budget=8, out="b8.safetensors", images=16)   # doctest: +SKIP
        >>> cal.header["search"]["model_calls"], cal.header["fit"]["rel_error"]            # doctest: +SKIP
    """
    check_budget(budget, num_steps)
    if search is None:
        search = default_search(granularity or (stats.granularity if stats is not None else "module"))
    plan = resolve_plan(search, images, search_images, max_evaluations, radius, 30)
    images, search_images, max_evaluations, radius = (plan.images, int(plan.search_images or 0),
                                                      plan.max_evaluations, plan.radius)
    options = options or FitOptions()
    searched_with = None
    if forecaster is not None:
        from ..parts import CacheConfig

        if isinstance(forecaster, LinearForecast):
            raise ValueError("forecaster: give a formula forecaster config (e.g. TaylorForecast(max_order=2)) to "
                             "search a schedule for; fitted weights are calibrate's default (forecaster=None)")
        searched_with = CacheConfig(FixedSchedule((0,), 1), forecaster).to_dict()["forecaster"]  # validates it
        if schedule is not None:
            raise ValueError("forecaster: a schedule search for a formula forecaster needs schedule=None")
        if search_images <= 0:
            raise ValueError("forecaster: the schedule is searched on sampled images: search_images must be > 0")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    if stats is None:
        stats = record_trajectories(model, calibration_labels(images, classes), num_steps=num_steps, seed=seed,
                                    guidance_scale=guidance_scale, cfg_mode=cfg_mode, grouping=grouping,
                                    sampler=sampler, progress=progress, granularity=granularity or "module")
    elif stats.num_steps != num_steps:
        raise ValueError(f"stats hold {stats.num_steps}-step trajectories, num_steps is {num_steps}")
    elif granularity is not None and granularity != stats.granularity:
        raise ValueError(f"stats hold {stats.granularity!r}-granularity trajectories, granularity is {granularity!r}")
    if on_policy is None:
        on_policy = stats.granularity != "output"
    if on_policy and not {"labels", "seed", "guidance_scale", "cfg_mode", "row_groups", "batch_size"} <= set(
            stats.sampling):
        raise ValueError("on_policy=True samples the calibration images again: stats must come from "
                         "record_trajectories (its sampling record), or pass on_policy=False")
    result: SearchResult | None = None
    if schedule is None:
        refine = (SampledObjective(model, stats, images=search_images, options=options, sampler=sampler,
                                   forecaster=forecaster)
                  if search_images > 0 else None)
        # The greedy proxy with one weight per anchor: the same greedy schedule here, ten times faster.
        greedy = ProxyObjective(stats, dataclasses.replace(options, channelwise=False))
        result = search_schedule(stats, budget, refine=refine, greedy=greedy, seed=search_seed, radius=radius,
                                 max_evaluations=max_evaluations, progress=progress, patience=plan.patience,
                                 moves=plan.moves)
        full_steps = result.full_steps
    else:
        if schedule.num_steps != num_steps or len(schedule.full_steps) > budget:
            raise ValueError(f"schedule {list(schedule.full_steps)} of {schedule.num_steps} steps does not fit "
                             f"budget={budget} of num_steps={num_steps}")
        full_steps = schedule.full_steps
    label = name or f"cal-b{len(full_steps)}-s{num_steps}"
    schedule_cfg = FixedSchedule(full_steps, num_steps, name=label)
    data: dict[str, Any] = {**stats.sampling, "images": stats.images, "model_calls": stats.model_calls,
                            "seconds": stats.seconds, "classes": sorted(set(stats.sampling.get("labels", [])))}
    data.pop("labels", None)
    data["search_plan"] = dataclasses.asdict(plan)
    search_record = None if result is None else result.to_dict()
    data["cost"] = calibration_cost(stats, search_record, search_images)
    if searched_with is not None:
        header = new_header("schedule", label, model, schedule_cfg, granularity=stats.granularity,
                            forecaster={"searched_with": searched_with},
                            search=None if result is None else result.to_dict(), calibration_data=data)
        return save_calibration(out, header)
    fit_record = {"history": options.history, "bias": options.bias, "channelwise": options.channelwise,
                  "match_variance": options.match_variance, "ridge": options.ridge,
                  "fit": "on-policy" if on_policy else "teacher-forced"}
    start = time.perf_counter()
    table, error = fit_linear(stats, full_steps, options)
    fit: dict[str, Any] = {**error, "seconds": time.perf_counter() - start}
    if on_policy:
        with tempfile.TemporaryDirectory(prefix="taylorseer-calibrate-") as tmp:
            first = save_calibration(Path(tmp) / "teacher-forced.safetensors",
                                     new_header("linear", label, model, schedule_cfg,
                                                granularity=stats.granularity), table)
            sampling = stats.sampling
            on = record_on_policy(model, torch.tensor(sampling["labels"]), first.cache_config(),
                                  num_steps=num_steps, seed=sampling["seed"], guidance_scale=sampling["guidance_scale"],
                                  cfg_mode=sampling["cfg_mode"], grouping=stats.grouping,
                                  row_groups=sampling["row_groups"], batch_size=sampling["batch_size"],
                                  sampler=sampler, progress=progress, granularity=stats.granularity)
        start = time.perf_counter()
        table, on_error = fit_on_policy(on, options)
        fit = {"teacher_forced": fit, **on_error, "seconds": time.perf_counter() - start}
        data["on_policy"] = {"images": on.pairs.images, "model_calls": on.pairs.model_calls,
                             "seconds": on.pairs.seconds}
        data["cost"] = calibration_cost(stats, search_record, search_images, data["on_policy"])
    header = new_header("linear", label, model, schedule_cfg, granularity=stats.granularity, forecaster=fit_record,
                        fit=fit, search=None if result is None else result.to_dict(), calibration_data=data,
                        targets=dict(sorted(stats.targets.items())))
    return save_calibration(out, header, table)
