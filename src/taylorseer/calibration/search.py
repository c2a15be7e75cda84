"""Schedule search: the full-step set of a given budget that minimises the error to full compute.

Two objectives, both "lower is better":

* ``ProxyObjective`` (free: no model call): the teacher-forced fit residual of every forecast step, summed over
  the groups of a ``TrajectoryStats`` (each group's residual relative to its mean feature energy). It knows
  nothing of how a forecast error propagates through the later steps, so on the embedded model it ranks schedules
  poorly (docs/results/calibration.md); it seeds the greedy pass.
* ``SampledObjective`` (exact, costs model calls): fit the weights for the candidate schedule (closed form, from the
  same statistics), sample the search images with that schedule and forecaster, and return the mean squared error
  to their full-compute images (pixel units of [-1, 1] images).

``search_schedule`` runs a greedy pass (starting from step 0, add the step that lowers the greedy objective most,
until the budget is reached), then a local refinement with the refine objective, started from the best (by the
refine objective) of the greedy schedule and a few power-law spacings (``power_schedules``: the proxy's greedy
schedule alone led the refinement into poorer local optima on the embedded model): moves that shift one full step
(not step 0) by up to ``radius`` steps, visited in an order drawn from ``seed``; a move that lowers the error is
kept; sweeps repeat until a sweep improves nothing or ``max_evaluations`` is reached. Every candidate is evaluated
once (memoised). The result never holds more than ``budget`` full steps, always holds step 0, and is the same
for the same seed, statistics and objective.

Example:
    >>> result = search_schedule(stats, budget=8, refine=SampledObjective(model, stats, images=8))  # doctest: +SKIP
    >>> result.full_steps, result.model_calls, round(result.seconds)                             # doctest: +SKIP
    ((0, 2, 5, 9, 16, 25, 36, 44), 12400, 310)
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..policy.schedule import FixedSchedule
from .fit import FitOptions, anchors_for, fit_linear, forecast_steps, solve_rows
from .record import TrajectoryStats

Schedule = tuple[int, ...]


def check_budget(budget: int, num_steps: int) -> None:
    """``ValueError`` unless ``1 <= budget <= num_steps`` (an int)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= num_steps:
        raise ValueError(f"budget must be an int in [1, num_steps={num_steps}] (full steps), got {budget!r}")


MOVE_ORDERS = ("random", "nearest")


@dataclass(frozen=True)
class SearchPlan:
    """What a calibration may spend, by name (``calibrate(search=NAME)``, ``taylorseer calibrate --search NAME``).

    ``images``: calibration trajectories recorded (full-compute generations); ``search_images``: images each
    candidate schedule is sampled on (None: the caller's own default, 30 for the embedded model, 10 for a
    pipeline); ``max_evaluations``: candidates the refinement samples at most (beside the greedy schedule and the
    power-law starts); ``radius``: largest shift of one full step per move; ``patience``: early stop after that
    many sampled candidates in a row without improvement (None: run until a whole sweep improves nothing);
    ``moves``: the refinement's move order (``refine_schedule``: ``"random"`` or ``"nearest"``, one-step shifts
    first).

    Example:
        >>> SEARCH_PLANS["fast"].search_images, SEARCH_PLANS["thorough"].max_evaluations
        (8, 200)
    """

    name: str
    images: int
    search_images: int | None
    max_evaluations: int
    radius: int
    patience: int | None
    moves: str = "random"


# "fast" (the default at output granularity, default_search) fits a FLUX.1-dev calibration at 50 steps, budget 8,
# in <= 15 H100 minutes (calibrate.py's projection: 13.7; its 8 search images are the recording's first batch, so
# their reference costs nothing). One-step shifts first and an early stop after 14 candidates without improvement
# (the 14 one-step shifts of an 8-step schedule) found the schedules of the searches run to convergence on both
# references, where random order with patience 12 stopped 0.8 dB lower on the search images
# (scripts/experiments/fast_search_moves.py). "thorough" is the search of 2026-12-06 and before
# (docs/results/calibration_cost.md).
SEARCH_PLANS = {
    "fast": SearchPlan("fast", images=16, search_images=8, max_evaluations=32, radius=3, patience=14,
                       moves="nearest"),
    "thorough": SearchPlan("thorough", images=40, search_images=None, max_evaluations=200, radius=3, patience=None),
}


def default_search(granularity: str) -> str:
    """The plan a calibration uses when none is named: ``"fast"`` at ``output`` granularity (what FLUX-class models
    record: a FLUX.1-dev calibration at 50 steps, budget 8 projects to <= 13.7 H100 minutes; -0.38 dB held out on
    the embedded DiT), ``"thorough"`` at ``module``/``block`` granularity, where the fast search's schedule for
    fitted weights lost 1.3 dB held out (docs/results/calibration_cost.md).

    Example:
        >>> default_search("output"), default_search("module")
        ('fast', 'thorough')
    """
    return "fast" if granularity == "output" else "thorough"


def search_plan(name: str) -> SearchPlan:
    """The ``SearchPlan`` called ``name``; ``ValueError`` naming ``search`` and the plans otherwise.

    Example:
        >>> search_plan("thorough").images
        40
    """
    if not isinstance(name, str) or name not in SEARCH_PLANS:
        raise ValueError(f"search must be one of {sorted(SEARCH_PLANS)}, got {name!r}")
    return SEARCH_PLANS[name]


class Objective:
    """A schedule's error (lower is better) and what evaluating it cost: ``model_calls`` (transformer forward
    calls), ``full_calls`` (of which computed in full), ``seconds``; ``evaluations`` counts candidates."""

    name = "objective"

    def __init__(self) -> None:
        self.model_calls = 0
        self.full_calls = 0
        self.seconds = 0.0
        self.evaluations = 0
        self._memo: dict[Schedule, float] = {}

    def __call__(self, full_steps: Schedule) -> float:
        key = tuple(full_steps)
        if key not in self._memo:
            start = time.perf_counter()
            self._memo[key] = self.evaluate(key)
            self.seconds += time.perf_counter() - start
            self.evaluations += 1
        return self._memo[key]

    def evaluate(self, full_steps: Schedule) -> float:
        raise NotImplementedError


class ProxyObjective(Objective):
    """Sum over forecast steps and groups of the teacher-forced fit residual, each group's divided by its mean
    feature energy per step (dimensionless). No model call."""

    name = "proxy"

    def __init__(self, stats: TrajectoryStats, options: FitOptions | None = None):
        super().__init__()
        self.stats, self.options = stats, options or FitOptions()
        n = stats.num_steps
        rows, weights = [], []
        for gram in stats.gram.values():  # every group's normal equations in one batch, each row weighted
            if not self.options.channelwise:
                gram = gram.sum(1, keepdim=True)
            flat = gram.reshape(-1, *gram.shape[-2:])
            scale = float(flat[:, :n, :n].diagonal(dim1=-2, dim2=-1).sum(0).mean())
            rows.append(flat)
            weights.append(torch.full((len(flat),), 1.0 / max(scale, 1e-300), dtype=flat.dtype))
        self._flat, self._weight = torch.cat(rows), torch.cat(weights)
        self._steps: dict[tuple[int, Schedule], float] = {}

    def step_error(self, step: int, anchors: Schedule) -> float:
        """The proxy's term for forecasting ``step`` from ``anchors`` (memoised)."""
        key = (step, anchors)
        if key not in self._steps:
            _, residual, _ = solve_rows(self._flat, step, anchors, self.options)
            self._steps[key] = float((residual * self._weight).sum())
        return self._steps[key]

    def evaluate(self, full_steps: Schedule) -> float:
        return sum(self.step_error(s, anchors_for(full_steps, s, self.options.history))
                   for s in forecast_steps(full_steps, self.stats.num_steps))


class SampledObjective(Objective):
    """Mean squared pixel error to full compute of ``images`` search images sampled with the candidate schedule and
    weights fitted for it from ``stats`` (``options``); ``forecaster``: another forecaster config to use instead
    of the fitted weights (e.g. ``TaylorForecast``).

    The search images are the classes ``0, 1, ...`` in turn with noise from ``seed`` (the calibration's own seed
    by default, so that no evaluation image is ever searched on); their full-compute images are sampled once
    (counted in the cost), or taken from the recording when its first batch is this very call
    (``TrajectoryStats.first_images``: the same labels, noise seed, guidance scale and CFG mode; a fast plan's 8
    search images are the first recorded batch), free; ``reference_recorded`` says which.
    """

    name = "sampled"

    def __init__(self, model: nn.Module, stats: TrajectoryStats, *, images: int = 8, seed: int | None = None,
                 options: FitOptions | None = None, forecaster: Any = None, guidance_scale: float | None = None,
                 cfg_mode: str | None = None, sampler: Callable[..., torch.Tensor] | None = None):
        super().__init__()
        from ..models.reference import NUM_CLASSES

        if sampler is None:
            from ..models.sampler import sample

            sampler = sample
        self.model, self.stats, self.options, self.forecaster = model, stats, options or FitOptions(), forecaster
        self.sampler = sampler
        sampling = stats.sampling
        self.seed = sampling.get("seed", 0) if seed is None else seed
        self.guidance_scale = sampling.get("guidance_scale", 1.5) if guidance_scale is None else guidance_scale
        self.cfg_mode = sampling.get("cfg_mode", "batch") if cfg_mode is None else cfg_mode
        classes = sorted(set(sampling.get("labels", range(NUM_CLASSES))))
        self.labels = torch.tensor([classes[i % len(classes)] for i in range(images)])
        self._calls_per_step = 1 if self.guidance_scale == 1.0 or self.cfg_mode == "batch" else 2
        self._tmp = tempfile.TemporaryDirectory(prefix="taylorseer-search-")
        recorded = self._recorded_reference()
        self.reference_recorded = recorded is not None
        if recorded is not None:  # the recording's first batch is this very call: no need to sample it again
            self.reference = recorded
        else:
            self.reference = self._sample(None)
            self.model_calls += stats.num_steps * self._calls_per_step
            self.full_calls += stats.num_steps * self._calls_per_step

    def _recorded_reference(self) -> torch.Tensor | None:
        """The recording's first batch (``TrajectoryStats.first_images``) when it was sampled exactly as the search
        images are (same labels, noise seed, guidance scale and CFG mode), else None."""
        first, sampling = self.stats.first_images, self.stats.sampling
        same = (first is not None and first.shape[0] == len(self.labels)
                and sampling.get("labels", [])[:len(self.labels)] == self.labels.tolist()
                and sampling.get("seed") == self.seed and sampling.get("guidance_scale") == self.guidance_scale
                and sampling.get("cfg_mode") == self.cfg_mode)
        return first if same else None

    def _sample(self, listener: Any) -> torch.Tensor:
        return self.sampler(self.model, self.labels, num_steps=self.stats.num_steps,
                            guidance_scale=self.guidance_scale, seed=self.seed, cfg_mode=self.cfg_mode,
                            listener=listener)

    def config_for(self, full_steps: Schedule) -> Any:
        """The ``CacheConfig`` a candidate is sampled with (weights written to a temporary calibration file)."""
        from ..parts import CacheConfig, Targets
        from .io import new_header, save_calibration

        schedule = FixedSchedule(full_steps, self.stats.num_steps, name="candidate")
        if self.forecaster is not None:
            return CacheConfig(schedule, self.forecaster, Targets(granularity=self.stats.granularity),
                               abscissa="step", name="candidate")
        table, _ = fit_linear(self.stats, full_steps, self.options)
        path = Path(self._tmp.name) / "candidate.safetensors"
        header = new_header("linear", "candidate", self.model, schedule, granularity=self.stats.granularity)
        return save_calibration(path, header, table).cache_config()

    def evaluate(self, full_steps: Schedule) -> float:
        from ..api import apply

        with apply(self.model, self.config_for(full_steps)) as handle:
            images = self._sample(handle)
        n = self.stats.num_steps
        self.model_calls += n * self._calls_per_step
        self.full_calls += len(full_steps) * self._calls_per_step
        return float(((images.double() - self.reference.double()) ** 2).mean())


@dataclass(frozen=True)
class SearchResult:
    """A searched schedule and how it was found.

    ``full_steps``: the schedule (``budget`` steps of ``num_steps``, step 0 first). ``error``: its refine
    objective value (``objective``: its name); ``psnr_db``: ``10 log10(4 / error)`` for the sampled objective
    (search images), else None. ``greedy_steps``/``greedy_error``: after the greedy pass (its objective named by
    ``greedy_objective``). ``evaluations``, ``model_calls``, ``full_calls``, ``seconds``: the search's cost over
    both objectives. ``trace``: every accepted (schedule, error) of the refinement, in order.
    """

    full_steps: Schedule
    num_steps: int
    budget: int
    seed: int
    objective: str
    error: float
    psnr_db: float | None
    greedy_objective: str
    greedy_steps: Schedule
    greedy_error: float
    evaluations: int
    model_calls: int
    full_calls: int
    seconds: float
    trace: list[tuple[Schedule, float]] = field(default_factory=list)

    def schedule(self, name: str = "") -> FixedSchedule:
        """The result as a ``FixedSchedule`` policy config."""
        return FixedSchedule(self.full_steps, self.num_steps, name=name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the file header's ``search`` field)."""
        return {"full_steps": list(self.full_steps), "num_steps": self.num_steps, "budget": self.budget,
                "seed": self.seed, "objective": self.objective, "error": self.error, "psnr_db": self.psnr_db,
                "greedy_objective": self.greedy_objective, "greedy_steps": list(self.greedy_steps),
                "greedy_error": self.greedy_error, "evaluations": self.evaluations, "model_calls": self.model_calls,
                "full_calls": self.full_calls, "seconds": self.seconds,
                "trace": [[list(s), e] for s, e in self.trace]}


def greedy_schedule(objective: Callable[[Schedule], float], budget: int, num_steps: int,
                    start: Sequence[int] = (0,), progress: bool = False) -> Schedule:
    """From ``start`` (containing 0), add one step at a time, the one whose schedule has the lowest error (ties:
    the earliest step), until ``budget`` steps are full.

    Example:
        >>> greedy_schedule(lambda s: -sum(s), budget=3, num_steps=10)
        (0, 8, 9)
    """
    check_budget(budget, num_steps)
    full = sorted(set(start) | {0})
    if len(full) > budget:
        raise ValueError(f"start {list(start)} already holds more than budget={budget} steps")
    with tqdm(total=budget - len(full), desc="schedule greedy pass", disable=not progress, leave=False) as bar:
        while len(full) < budget:
            candidates = [tuple(sorted(full + [c])) for c in range(1, num_steps) if c not in full]
            errors = [objective(c) for c in candidates]
            full = list(candidates[min(range(len(candidates)), key=lambda i: (errors[i], i))])
            bar.update(1)
    return tuple(full)


def power_schedules(budget: int, num_steps: int, powers: Sequence[float] = (1.0, 1.25, 1.5, 1.75, 2.0),
                    tail: int = 3) -> list[Schedule]:
    """Start candidates for the refinement: full steps at ``round(last * (i / (budget - 1)) ** p)`` for each power
    ``p`` (1: uniform; above 1: denser early, where the features change fastest), ``last = num_steps - 1 - tail``
    (the last steps matter little: their noise level is low), made strictly increasing.

    Example:
        >>> power_schedules(4, 20, powers=(1.0, 2.0))
        [(0, 5, 11, 16), (0, 2, 7, 16)]
    """
    check_budget(budget, num_steps)
    if budget == 1:
        return [(0,)]
    last = max(num_steps - 1 - tail, budget - 1)
    out: list[Schedule] = []
    for p in powers:
        steps = [0]
        for i in range(1, budget):
            want = round(last * (i / (budget - 1)) ** p)
            steps.append(min(max(want, steps[-1] + 1), num_steps - (budget - i)))
        if tuple(steps) not in out:
            out.append(tuple(steps))
    return out


def refine_schedule(objective: Callable[[Schedule], float], full_steps: Schedule, num_steps: int, *, seed: int = 0,
                    radius: int = 3, max_evaluations: int = 200, progress: bool = False, patience: int | None = None,
                    moves: str = "random") -> tuple[Schedule, float, list[tuple[Schedule, float]]]:
    """Local search from ``full_steps``: shift one full step (never step 0) by ``-radius .. radius`` steps (keeping
    the order), moves in an order drawn from ``random.Random(seed)`` per sweep (``moves="nearest"``: shifts of one
    step first, then two, ..., each size in a drawn order); keep a move that lowers the error;
    stop after a sweep without improvement, ``max_evaluations`` evaluations of new candidates, or (early stop)
    ``patience`` evaluations in a row without improvement (None: no early stop).

    Returns (schedule, error, trace of accepted moves). Deterministic for a seed and objective.

    Example:
        >>> refine_schedule(lambda s: abs(s[1] - 5), (0, 2), num_steps=10, radius=2)[:2]
        ((0, 5), 0)
    """
    if moves not in MOVE_ORDERS:
        raise ValueError(f"moves must be one of {list(MOVE_ORDERS)}, got {moves!r}")
    rng = random.Random(seed)
    current = tuple(full_steps)
    error = objective(current)
    trace = [(current, error)]
    seen = {current}
    evaluated = since_improved = 0
    bar = tqdm(total=max_evaluations, desc="schedule refinement", disable=not progress, leave=False)
    try:
        while evaluated < max_evaluations:
            sweep = [(i, d) for i in range(1, len(current)) for d in range(-radius, radius + 1) if d]
            rng.shuffle(sweep)
            if moves == "nearest":
                sweep.sort(key=lambda move: abs(move[1]))  # stable: the drawn order within each size
            improved = False
            for i, d in sweep:
                low = current[i - 1] if i > 0 else -1
                high = current[i + 1] if i + 1 < len(current) else num_steps
                target = current[i] + d
                if not low < target < high:
                    continue
                candidate = current[:i] + (target,) + current[i + 1:]
                if candidate in seen:
                    continue
                seen.add(candidate)
                value = objective(candidate)
                evaluated += 1
                since_improved += 1
                bar.update(1)
                if value < error:
                    current, error, improved, since_improved = candidate, value, True, 0
                    trace.append((current, error))
                    bar.set_postfix(error=f"{error:.3g}")
                    break  # first improvement: draw new moves around the new schedule
                if evaluated >= max_evaluations or (patience is not None and since_improved >= patience):
                    break
            if not improved:
                break
    finally:
        bar.close()
    return current, error, trace


def search_schedule(stats: TrajectoryStats, budget: int, *, refine: Objective | None = None,
                    greedy: Objective | None = None, seed: int = 0, radius: int = 3, max_evaluations: int = 200,
                    multistart: bool = True, progress: bool = True, patience: int | None = None,
                    moves: str = "random") -> SearchResult:
    """Greedy pass with ``greedy`` (default: ``ProxyObjective(stats)``), then local refinement with ``refine``
    (default: the greedy objective) from the best, by ``refine``, of the greedy schedule and (``multistart``) the
    ``power_schedules`` starts; ``patience`` and ``moves``: the refinement's early stop and move order
    (``refine_schedule``); see the module docstring.

    Example:
        >>> result = search_schedule(stats, 8, refine=SampledObjective(model, stats))   # doctest: +SKIP
    """
    check_budget(budget, stats.num_steps)
    start = time.perf_counter()
    greedy = greedy or ProxyObjective(stats)
    refine = refine or greedy
    first = greedy_schedule(greedy, budget, stats.num_steps, progress=progress)
    starts = [first] + ([s for s in power_schedules(budget, stats.num_steps) if s != first] if multistart else [])
    origin = min(starts, key=lambda s: (refine(s), starts.index(s)))
    best, error, trace = refine_schedule(refine, origin, stats.num_steps, seed=seed, radius=radius,
                                         max_evaluations=max_evaluations, progress=progress, patience=patience,
                                         moves=moves)
    objectives = [greedy] if refine is greedy else [greedy, refine]
    psnr = 10 * torch.log10(torch.tensor(4.0 / error)).item() if refine.name == "sampled" and error > 0 else None
    return SearchResult(best, stats.num_steps, budget, seed, refine.name, error, psnr, greedy.name, first,
                        greedy(first), sum(o.evaluations for o in objectives), sum(o.model_calls for o in objectives),
                        sum(o.full_calls for o in objectives), time.perf_counter() - start, trace)
