"""Calibrate a diffusers pipeline: a sampler that runs the pipeline and tells its steps, and one call to a file.

``PipelineSampler(pipe, prompts)`` has the signature of the embedded model's sampler
(``sampler(model, labels, *, num_steps, guidance_scale, seed, cfg_mode, listener)``, ``model`` being
``pipe.transformer``), so ``record_trajectories``, ``SampledObjective`` and ``calibrate`` use it unchanged: the
labels are indices into the prompt list (text prompts, or class ids for class-conditional pipelines such as DiT),
the generator is seeded with ``seed``, and the images come back as a float tensor in [-1, 1], channels first.

How the steps are told (nothing counts transformer calls): for the duration of one pipeline call the sampler
wraps, on the scheduler *instance*, ``set_timesteps`` (the generation starts: ``listener.begin(num_steps)``) and
``step`` (step ``i`` ends); a forward pre-hook on the transformer opens ``listener.step(i, t, sigma)`` at the
first transformer call of step ``i``, where ``i`` is the number of ``scheduler.step`` calls completed and ``t`` /
``sigma`` are the scheduler's at that position, and checks the call's own ``timestep`` argument against it (up to
the constant factor the pipeline applies, ``t`` or ``t / 1000``). Every further call of that step (a pipeline that
runs CFG as two calls) falls in the same context, as the embedded sampler's two calls do; the context closes when
the scheduler steps. A call whose timestep is not the scheduler's, a generation of another length than
``num_steps`` or a step never told raises ``RuntimeError``.

The guidance layout: ``PipelineSampler.probe`` runs the pipeline once on one image (``PROBE_STEPS`` steps) and
reads how it calls the transformer: one call per step with ``R`` rows per image (``R = 2``: a CFG batch, ``[cond;
uncond]`` as DiT or ``[uncond; cond]`` as PixArt, each half then gets its own weights; ``R = 1``: no CFG batch,
e.g. FLUX's distilled guidance), or two calls per step of one row per image (CFG split: one set of weights for both
calls). ``calibrate_pipeline`` records the trajectories with that layout (``cfg_mode`` ``"batch"``/``"split"`` and
``R`` row groups in the file header) and every later run of the sampler is checked against it.

Example:
    >>> pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256")                             # doctest: +SKIP
    >>> cal = calibrate_pipeline(pipe, 10, "dit-b10.safetensors", prompts=["207", "360", "387"],
    ...                          num_steps=50, images=12)                                        # doctest: +SKIP
    >>> with taylorseer.apply(pipe, cal.cache_config()):                                         # doctest: +SKIP
    ...     image = pipe(class_labels=[207], num_inference_steps=50).images[0]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..integrations.pipeline import check_pipeline
from ..integrations.pipeline_call import call_arguments, default_guidance, output_tensor, parameters, resolve_prompts
from ..integrations.steps import SchedulerSteps
from ..policy.schedule import FixedSchedule
from .calibrate import DEFAULT_SEED, calibrate, calibration_labels, resolve_plan
from .fit import FitOptions
from .io import Calibration
from .record import calibration_targets, record_trajectories
from .search import check_budget, default_search

PROBE_STEPS = 2  # steps of the one-image pipeline call that reads the guidance layout


#################################################################################
#                 Telling a listener the steps of one pipeline call             #
#################################################################################

def _rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a transformer call: its first tensor argument's first dimension."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        first = kwargs.get("hidden_states")
    if not isinstance(first, torch.Tensor):
        first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


class StepTeller:
    """For one pipeline call: tells ``listener`` the steps from ``pipe.scheduler`` (see the module docstring) and
    records each step's transformer calls (``calls[i]``: the batch size of each call of step ``i``). A context
    manager; leaving it restores the scheduler and removes the hook exactly."""

    def __init__(self, pipe: Any, listener: Any, num_steps: int):
        self.pipe, self.num_steps = pipe, num_steps
        self.listener = listener if listener is not None else SilentListener()
        self.scheduler = pipe.scheduler
        self.transformer: nn.Module = pipe.transformer
        self.calls: dict[int, list[int | None]] = {}
        self._steps = SchedulerSteps(self.transformer, self._on_set_timesteps, self._close)
        self._started = False
        self._open: contextlib.ExitStack | None = None
        self._hook: Any = None

    def __enter__(self) -> StepTeller:
        self._steps.attach(self.scheduler)
        self._hook = self.transformer.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._steps.detach()

    def _on_set_timesteps(self) -> None:
        self._close()
        steps = self._steps.start()
        if steps != self.num_steps:
            raise RuntimeError(f"{type(self.pipe).__name__} set {steps} scheduler timesteps for "
                               f"num_inference_steps={self.num_steps}: a calibration is per step index, so the "
                               f"pipeline must take one scheduler step per inference step")
        self._started, self.calls = True, {}
        self.listener.begin(self.num_steps)

    def _where(self, index: int) -> tuple[float, float | None]:
        timestep, sigma = self._steps.where(index, with_sigma=True)
        return float(timestep), None if sigma is None else float(sigma)

    def _check_timestep(self, index: int, expected: float, args: tuple, kwargs: dict) -> None:
        mismatch = self._steps.mismatch(expected, args, kwargs)
        if mismatch is not None:
            raise RuntimeError(f"{type(self.pipe).__name__} called its transformer with timestep {mismatch[0]:g} "
                               f"where step {index} of its scheduler has {mismatch[1]:g}: the step cannot be told")

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._started:
            raise RuntimeError(f"{type(self.pipe).__name__} called its transformer before setting the scheduler's "
                               f"timesteps: the step cannot be told")
        index = self._steps.completed
        if index >= self.num_steps:
            raise RuntimeError(f"{type(self.pipe).__name__} called its transformer after the last of "
                               f"{self.num_steps} scheduler steps")
        timestep, sigma = self._where(index)
        self._check_timestep(index, timestep, args, kwargs)
        if self._open is None:  # the step's first call opens its context; a second call (CFG split) joins it
            stack = contextlib.ExitStack()
            stack.enter_context(self.listener.step(index, timestep, sigma))
            self._open = stack
        self.calls.setdefault(index, []).append(_rows(args, kwargs))

    def _close(self) -> None:
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()

    def layout(self, images: int) -> tuple[str, int]:
        """(cfg_mode, row groups) of the call just made for ``images`` images; ``RuntimeError`` if a step was
        never told or the steps called the transformer differently."""
        missing = [i for i in range(self.num_steps) if i not in self.calls]
        if missing:
            raise RuntimeError(f"{type(self.pipe).__name__} did not call its transformer at steps {missing} of "
                               f"{self.num_steps}")
        patterns = {tuple(rows) for rows in self.calls.values()}
        if len(patterns) != 1:
            raise RuntimeError(f"{type(self.pipe).__name__} called its transformer differently from step to step "
                               f"({sorted(patterns, key=str)} batch sizes): one guidance layout is needed")
        rows = next(iter(patterns))
        if len(rows) == 1 and rows[0] is not None and rows[0] % images == 0:
            return "batch", rows[0] // images
        if len(rows) == 2 and rows == (images, images):
            return "split", 1
        raise RuntimeError(f"{type(self.pipe).__name__} calls its transformer {len(rows)} time(s) per step with "
                           f"batch sizes {list(rows)} for {images} image(s): a guidance layout calibration does not "
                           f"know (one call of R x images rows, or two calls of images rows)")


#################################################################################
#                                 The sampler                                   #
#################################################################################

class PipelineSampler:
    """Runs ``pipe`` as a calibration sampler: ``sampler(pipe.transformer, labels, *, num_steps, guidance_scale,
    seed, cfg_mode, listener)`` generates the prompts ``labels`` index (``resolve_prompts``) with a generator
    seeded with ``seed`` and returns ``[N, C, H, W]`` float images in [-1, 1]. ``layout``: the guidance layout
    (cfg_mode, row groups) every call must have, set by ``probe`` (None: not checked). ``model_calls``:
    transformer calls made so far.

    Example:
        >>> sampler = PipelineSampler(pipe, ["a red fox", "a blue car"])                      # doctest: +SKIP
        >>> images = sampler(pipe.transformer, torch.tensor([0, 1]), num_steps=20, guidance_scale=4.5, seed=0,
        ...                  cfg_mode="batch", listener=None)                                   # doctest: +SKIP
    """

    def __init__(self, pipe: Any, prompts: Sequence[str | int]):
        check_pipeline(pipe)
        self.pipe = pipe
        self.prompts = [str(p) for p in prompts]
        self.items = resolve_prompts(pipe, prompts)
        self.takes_guidance = "guidance_scale" in parameters(pipe)
        self.layout: tuple[str, int] | None = None
        self.model_calls = 0

    def arguments(self, labels: Sequence[int], guidance_scale: float) -> dict[str, Any]:
        """The pipeline's keyword arguments for ``labels`` (indices into the prompts) at ``guidance_scale``."""
        bad = [int(i) for i in labels if not 0 <= int(i) < len(self.items)]
        if bad:
            raise ValueError(f"labels {bad} are not indices into the {len(self.items)} calibration prompts")
        if not self.takes_guidance and guidance_scale != 1.0:
            raise ValueError(f"{type(self.pipe).__name__} takes no guidance_scale; calibrate with guidance 1.0")
        chosen = [self.items[int(i)] for i in labels]
        return call_arguments(self.pipe, chosen, guidance_scale=float(guidance_scale) if self.takes_guidance else None)

    def run(self, labels: Sequence[int], *, num_steps: int, guidance_scale: float, seed: int,
            listener: Any) -> tuple[torch.Tensor, tuple[str, int]]:
        """One pipeline call telling ``listener`` (None: a listener that records nothing): (images, layout)."""
        kwargs = self.arguments(labels, guidance_scale)
        device = getattr(self.pipe, "device", torch.device("cpu"))
        generator = torch.Generator(device).manual_seed(int(seed))
        saved = dict(getattr(self.pipe, "_progress_bar_config", {}))
        self.pipe.set_progress_bar_config(disable=True)
        try:
            with StepTeller(self.pipe, listener, num_steps) as teller:
                result = self.pipe(num_inference_steps=num_steps, generator=generator, output_type="np", **kwargs)
        finally:
            self.pipe._progress_bar_config = saved
        self.model_calls += sum(len(c) for c in teller.calls.values())
        return output_tensor(result), teller.layout(len(labels))  # [N, (F,) C, H, W] in [-1, 1]

    def probe(self, guidance_scale: float, seed: int) -> tuple[str, int]:
        """Read (and from now on require) the guidance layout: one image, ``PROBE_STEPS`` steps."""
        self.layout = None
        _, layout = self.run([0], num_steps=PROBE_STEPS, guidance_scale=guidance_scale, seed=seed, listener=None)
        self.layout = layout
        return layout

    def __call__(self, model: nn.Module, labels: torch.Tensor, *, num_steps: int, guidance_scale: float, seed: int,
                 cfg_mode: str = "batch", listener: Any = None) -> torch.Tensor:
        from ..runtime.install import unwrap

        if unwrap(model) is not unwrap(self.pipe.transformer):
            raise ValueError(f"this sampler runs {type(self.pipe).__name__}: model must be its transformer, got "
                             f"a {type(model).__name__}")
        images, layout = self.run(torch.as_tensor(labels).tolist(), num_steps=num_steps,
                                  guidance_scale=guidance_scale, seed=seed, listener=listener)
        if self.layout is not None and (layout != self.layout or cfg_mode != self.layout[0]):
            raise RuntimeError(f"{type(self.pipe).__name__} ran with guidance layout {layout} (cfg_mode, row "
                               f"groups), the calibration was recorded with {self.layout} and cfg_mode "
                               f"{cfg_mode!r} was asked for: sample with the calibration's guidance scale")
        return images


class SilentListener:
    """A listener that is told the steps and does nothing (``StepTeller``'s when given none)."""

    def begin(self, num_steps: int | None = None) -> None:
        pass

    def step(self, index: int, timestep: Any = None, sigma: Any = None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


#################################################################################
#                              One call to a file                               #
#################################################################################

def calibrate_pipeline(
    pipe: Any,
    budget: int,
    out: str | os.PathLike,
    *,
    prompts: Sequence[str | int],
    num_steps: int = 50,
    images: int | None = None,
    seed: int = DEFAULT_SEED,
    guidance_scale: float | None = None,
    options: FitOptions | None = None,
    grouping: str = "target",
    schedule: FixedSchedule | None = None,
    search_images: int | None = None,
    max_evaluations: int | None = None,
    radius: int | None = None,
    search_seed: int = 0,
    name: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_policy: bool | None = None,
    granularity: str = "module",
    forecaster: Any = None,
    search: str | None = None,
) -> Calibration:
    """Calibrate ``pipe.transformer`` for ``num_steps``-step generations of ``pipe`` with ``budget`` full steps;
    write ``out`` (the ``taylorseer.calibration.calibrate`` steps, with ``PipelineSampler`` as the sampler).

    ``prompts``: the calibration prompts (class ids or label names for class-conditional pipelines); image ``k``
    takes prompt ``k mod len(prompts)``, ``batch_size`` images per pipeline call, noise seeds ``seed, seed + 1,
    ...`` per call. ``search``: ``calibrate``'s plans (a thorough search samples 10 search images here, not
    30). ``guidance_scale``: None takes the pipeline's default; generate with the same scale (the
    guidance layout, read once by ``PipelineSampler.probe``, is recorded in the file: ``cfg_mode`` and
    ``row_groups`` of its ``calibration_data``). The other arguments are ``calibrate``'s. Cost: one probe call (one
    image, ``PROBE_STEPS`` steps), ``images`` full-compute images, the search's ``max_evaluations`` cached runs of
    ``search_images`` images (none with ``schedule`` given or ``search_images=0``), and with ``on_policy`` one more
    full-compute and one cached pass over the images.

    Example:
        >>> cal = calibrate_pipeline(pipe, 8, "b8.safetensors", prompts=["a red fox"], num_steps=28)   # doctest: +SKIP
        >>> taylorseer.generate.generate(folder, "a red fox", None, 28, calibration="b8.safetensors")  # doctest: +SKIP
    """
    check_budget(budget, num_steps)
    search = default_search(granularity) if search is None else search
    plan = resolve_plan(search, images, search_images, max_evaluations, radius, 10)
    images, search_images = plan.images, plan.search_images
    calibration_targets(pipe.transformer, granularity)  # a wrong granularity is refused before the probe call
    sampler = PipelineSampler(pipe, prompts)
    if not sampler.takes_guidance and guidance_scale not in (None, 1.0):
        raise ValueError(f"{type(pipe).__name__} takes no guidance_scale, got {guidance_scale!r}")
    guidance = default_guidance(pipe) if guidance_scale is None else float(guidance_scale)
    cfg_mode, row_groups = sampler.probe(guidance, seed)
    probe_calls = sampler.model_calls
    labels = calibration_labels(images, range(len(sampler.items)), num_classes=len(sampler.items))
    # calibrate() would assume 2 row groups for any guidance != 1 with cfg_mode "batch" (the embedded sampler's
    # layout); a pipeline's own layout (FLUX: no CFG batch) is what the probe read, so the trajectories are
    # recorded here with it and handed to calibrate().
    stats = record_trajectories(pipe.transformer, labels, num_steps=num_steps, seed=seed, guidance_scale=guidance,
                                cfg_mode=cfg_mode, grouping=grouping, row_groups=row_groups, batch_size=batch_size,
                                sampler=sampler, progress=progress, granularity=granularity)
    stats.model_calls += probe_calls
    stats.sampling.update(pipeline=type(pipe).__name__, prompts=list(sampler.prompts),
                          items=[i if isinstance(i, int) else str(i) for i in sampler.items],
                          calls_per_step=2 if cfg_mode == "split" else 1)
    return calibrate(pipe.transformer, budget, out, num_steps=num_steps, images=images,
                     classes=range(len(sampler.items)), seed=seed, guidance_scale=guidance, cfg_mode=cfg_mode,
                     options=options, grouping=grouping, schedule=schedule, search_images=search_images,
                     max_evaluations=max_evaluations, radius=radius, search_seed=search_seed, name=name,
                     sampler=sampler, progress=progress, stats=stats, on_policy=on_policy, forecaster=forecaster,
                     search=search)
