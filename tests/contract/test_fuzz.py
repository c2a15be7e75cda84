"""Bounded fuzz/soak test: a few hundred random configs x tiny models x random call patterns, checking invariants.

Deterministic: case ``k`` is drawn from ``random.Random(k)``, so a failure names its seed and reproduces alone
(``pytest tests/contract/test_fuzz.py -k "case[17]"``). Models: the analytic toy and the tiny reference DiT from
conftest (steps told by the loop), and a tiny FLUX behind a diffusers pipeline (steps told by its scheduler).
Configs: any registered forecaster (Taylor reference/divided, Adams, Hermite, corrector), any of the interval,
confidence-gate and error-budget policies, any granularity, abscissa and factor dtype. Call patterns: no CFG, CFG as
one doubled batch or as two calls, named branches, the batch size changing between generations and within one,
generations abandoned halfway, num_steps told or not.

Invariants checked on every case:
* ``interval=1`` is bit-identical to no handle; ``remove()`` restores the model exactly (bitwise, no traces);
* every model output is finite and shaped as without the handle;
* stats are consistent: steps_full + steps_forecast == the steps told, one decision per (step, branch), each
  target's full + forecast calls == its calls, only known fallback reasons, a static plan's forecasts are forecast
  unless a fallback says why not, and no factor is held after a generation whose num_steps was told;
* a config the runtime cannot serve (an adaptive policy at output granularity) is refused before the model is
  touched.
Runs in about a minute on one CPU thread (well under the 3-minute bound).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_diffusers import FAMILY, loop_pipeline
from torch import nn

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.forecast import AdamsForecast, CorrectorForecast, HermiteForecast, TaylorForecast
from taylorseer.models.reference import NULL_CLASS, build_reference
from taylorseer.models.sampler import make_scheduler
from taylorseer.parts import CacheConfig, Store, Targets, parts_of
from taylorseer.policy import ConfidenceGate, ErrorBudget, IntervalSchedule, build_policy
from toy_models import Toy

CASES = 300
FALLBACKS = {"no-factors", "shape", "non-finite"}


#################################################################################
#                                Random cases                                    #
#################################################################################

@dataclass
class Generation:
    steps: int
    batch: int
    cfg: str  # "none", "batch" (one doubled call), "split" (two calls), "named" (two named branches; toy only)
    told: bool = True  # num_steps told (handle.begin) or left unknown
    change_at: int | None = None  # the batch changes (to ``batch2``) from this step on
    batch2: int = 1
    stop_at: int | None = None  # abandoned after this many steps (then the handle is removed)

    @property
    def calls(self) -> int:
        return 1 if self.cfg in ("none", "batch") else 2


@dataclass
class Case:
    seed: int
    model: str
    config: Any
    generations: list[Generation] = field(default_factory=list)

    @property
    def parts(self) -> CacheConfig:
        return parts_of(self.config)


def draw_forecaster(rng: random.Random) -> Any:
    kind = rng.choice(["taylor", "taylor", "adams", "hermite", "corrector"])
    if kind == "taylor":
        return TaylorForecast(rng.randint(0, 4), rng.choice(["divided", "reference"]), rng.choice([0, 0, 1]))
    if kind == "adams":
        return AdamsForecast(rng.randint(1, 4), rng.choice(["midpoint", "newer"]))
    if kind == "hermite":
        return HermiteForecast(rng.randint(0, 3), rng.choice([0.3, 0.5, 2**-0.5, 0.9]), rng.choice(["divided",
                                                                                                   "reference"]))
    return CorrectorForecast(rng.random() < 0.5)


def draw_policy(rng: random.Random, interval_one: bool) -> Any:
    warmup, tail = rng.choice([0, 1, 1, 2, 2, 3]), rng.choice([0, 0, 0, 1, 2])
    kind = "interval" if interval_one else rng.choice(["interval", "interval", "gate", "budget"])
    if kind == "interval":
        return IntervalSchedule(1 if interval_one else rng.randint(2, 6), warmup, tail)
    probe = dict(warmup_steps=warmup, tail_steps=tail, max_forecast=rng.randint(1, 5), probe_blocks=1)
    if kind == "gate":
        return ConfidenceGate(rng.choice([0.01, 0.1, 0.5, 10.0]), **probe)
    return ErrorBudget(rng.choice([0.01, 0.1, 1.0, 10.0]), **probe)


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    model = rng.choice(["toy", "toy", "toy", "dit", "dit", "flux"])
    interval_one = rng.random() < 0.2
    granularity = rng.choice(["module", "block", "output"])
    modules: tuple[str, ...] = ()
    if model == "toy" and granularity != "output":
        modules = ("blocks.*.poly", "blocks.*.pair") if granularity == "module" else ("blocks.*",)
    abscissa = rng.choice(["step", "timestep", "sigma"])
    factor_dtype = rng.choice([None, None, "float32", "float16", "bfloat16", "float64"])
    policy, forecaster = draw_policy(rng, interval_one), draw_forecaster(rng)
    if isinstance(policy, IntervalSchedule) and isinstance(forecaster, TaylorForecast) and rng.random() < 0.4:
        config: Any = TaylorSeerConfig(policy.interval, policy.warmup_steps, forecaster.max_order, policy.tail_steps,
                                       forecaster.scheme, abscissa, modules, granularity, factor_dtype,
                                       block_shortcuts=rng.random() < 0.7)
    else:
        config = CacheConfig(policy, forecaster, Targets(granularity, modules, rng.random() < 0.7),
                             Store(factor_dtype), abscissa)
    case = Case(seed, model, config)
    has_tail = getattr(case.parts.policy, "tail_steps", 0) > 0
    told = model == "flux" or has_tail or rng.random() > 0.15  # num_steps told to every generation, or to none
    for g in range(rng.choice([1, 2, 2, 3])):
        steps = rng.randint(2, 10) if model == "toy" else rng.randint(3, 7)
        cfgs = ["none", "batch", "split"] + (["named"] if model == "toy" else [])
        generation = Generation(steps, rng.randint(1, 3 if model != "flux" else 2), rng.choice(cfgs), told)
        if model != "flux" and rng.random() < 0.3:
            generation.change_at, generation.batch2 = rng.randint(1, steps - 1), rng.randint(1, 3)
        if model != "flux" and g == 0 and rng.random() < 0.1:
            generation.stop_at = rng.randint(1, steps - 1)
        case.generations.append(generation)
        if generation.stop_at is not None:
            break
    return case


#################################################################################
#                                 Drivers                                        #
#################################################################################

_MODELS: dict[str, nn.Module] = {}


def model_of(name: str) -> nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        if name == "toy":
            _MODELS[name] = Toy().requires_grad_(False)
        elif name == "dit":
            _MODELS[name] = build_reference("DiT-FM-T/4").requires_grad_(False)
        else:
            _MODELS[name] = loop_pipeline("flux")
    return _MODELS[name]


def schedule(name: str, steps: int) -> list[tuple[float, float]]:
    """(timestep, sigma) of each step."""
    if name == "toy":
        return [(1.0 - i / steps, 2.0 * (1.0 - i / steps) + 0.1) for i in range(steps)]
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    out = []
    for t in scheduler.timesteps:
        alpha = scheduler.alphas_cumprod[int(t)]
        out.append((float(t), float(((1 - alpha) / alpha).sqrt())))
    return out


def run(case: Case, generation: Generation, handle: Any) -> list[torch.Tensor]:
    """One generation: every model call's output (flux: the pipeline's latents), in call order."""
    name = case.model
    if name == "flux":
        pipe = model_of("flux")
        cfg = generation.cfg
        return [pipe(FAMILY["flux"], num_inference_steps=generation.steps, batch_size=generation.batch,
                     guidance_scale=1.0 if cfg == "none" else 3.0, cfg_mode="batch" if cfg == "none" else cfg)]
    outputs: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(1000 * case.seed + generation.steps)
    if name == "toy":
        states = torch.randn(3, 8, dtype=torch.float64, generator=generator)
    else:
        states = torch.randn(3, 1, 28, 28, generator=generator)
    labels = torch.tensor([1, 5, 9])
    if handle is not None and generation.told:
        handle.begin(generation.steps)
    x = states[:generation.batch]
    stop = generation.stop_at if generation.stop_at is not None else generation.steps
    for i, (t, sigma) in enumerate(schedule(name, generation.steps)[:stop]):
        if generation.change_at is not None and i == generation.change_at:
            x = states[:generation.batch2] + 0.01 * x[:1]
        calls = call_list(name, x, t, labels[:x.shape[0]], generation.cfg)
        if handle is None:
            eps = [call() for _, call in calls]
        elif generation.cfg == "named":  # one context per named branch
            eps = []
            for branch, call in calls:
                with handle.step(i, timestep=t, sigma=sigma, branch=branch):
                    eps.append(call())
        else:  # one context per step: its calls are branches 0, 1, ...
            with handle.step(i, timestep=t, sigma=sigma):
                eps = [call() for _, call in calls]
        outputs.extend(eps)
        x = x - 0.1 * combine(eps, x.shape[0], generation.cfg)
    return outputs


def call_list(name: str, x: torch.Tensor, t: float, labels: torch.Tensor, cfg: str) -> list[tuple[Any, Any]]:
    model = model_of(name)
    if name == "toy":
        def toy(h: torch.Tensor) -> Any:
            return lambda: model(h, t)

        if cfg in ("none", "batch"):
            return [(None, toy(torch.cat([x, x]) if cfg == "batch" else x))]
        names = ("cond", "uncond") if cfg == "named" else (None, None)
        return [(names[0], toy(x)), (names[1], toy(-x))]

    def dit(inputs: torch.Tensor, y: torch.Tensor) -> Any:
        return lambda: model(inputs, timestep=torch.full((len(y),), int(t)), class_labels=y).sample

    null = torch.full_like(labels, NULL_CLASS)
    if cfg == "none":
        return [(None, dit(x, labels))]
    if cfg == "batch":
        return [(None, dit(torch.cat([x, x]), torch.cat([labels, null])))]
    return [(None, dit(x, labels)), (None, dit(x, null))]


def combine(eps: list[torch.Tensor], batch: int, cfg: str) -> torch.Tensor:
    if cfg == "none":
        return eps[0]
    cond, uncond = eps[0][:batch], (eps[0][batch:] if cfg == "batch" else eps[1])
    return uncond + 1.5 * (cond - uncond)


def traces(case: Case) -> tuple:
    model = model_of(case.model)
    module = model.transformer if case.model == "flux" else model
    modules = list(module.modules())
    scheduler = sorted({"set_timesteps", "step"} & set(vars(model.scheduler))) if case.model == "flux" else []
    return ([("forward" in m.__dict__) for m in modules], [(len(m._forward_pre_hooks), len(m._forward_hooks))
                                                          for m in modules], scheduler)


#################################################################################
#                                 The invariants                                 #
#################################################################################

def check_stats(case: Case, generation: Generation, handle: Any) -> None:
    stats = handle.stats
    steps = generation.stop_at if generation.stop_at is not None else generation.steps
    assert stats.steps_full + stats.steps_forecast == steps
    decisions = Counter(d["step"] for d in stats.decisions)
    assert decisions == {i: generation.calls for i in range(steps)}
    assert set(stats.fallbacks) <= FALLBACKS
    assert stats.probe_errors == []
    for target in handle.targets:
        assert stats.module_full[target.path] + stats.module_forecast[target.path] == steps * generation.calls
    first = [d for d in stats.decisions if d["branch"] in (0, None, "cond")]
    assert stats.steps_forecast == sum(not d["compute"] for d in first)
    policy = case.parts.policy
    if isinstance(policy, IntervalSchedule) and generation.told:
        plan = build_policy(policy).plan(generation.steps)
        if policy.interval > 1 and generation.steps < policy.warmup_steps + policy.tail_steps + policy.interval:
            plan = [True] * generation.steps  # too short to forecast: switched off (runtime/switch.py)
            assert stats.switched_off is not None
        computed = [d["step"] for d in first if d["compute"]]
        assert all(i in computed for i in range(steps) if plan[i])  # planned full steps are full
        if not stats.fallbacks:
            assert stats.steps_forecast == sum(not full for full in plan[:steps])
    if generation.told and generation.stop_at is None:
        keys = getattr(handle, "cache", handle).cached_keys()
        assert handle.cache_bytes() == 0 and stats.cache_bytes == 0 and keys == []


_REFERENCES: dict[tuple, list[torch.Tensor]] = {}


def reference(case: Case, generation: Generation) -> list[torch.Tensor]:
    key = (case.model, case.seed if case.model != "flux" else None, generation.steps, generation.batch,
           generation.cfg, generation.change_at, generation.batch2, generation.stop_at)
    if key not in _REFERENCES:
        _REFERENCES[key] = run(case, generation, None)
    return _REFERENCES[key]


def test_cases_are_varied():
    """The drawn cases cover every model, forecaster, policy, granularity, abscissa and call pattern."""
    cases = [draw_case(seed) for seed in range(CASES)]
    seen: dict[str, set] = {"model": set(), "forecaster": set(), "policy": set(), "granularity": set(),
                            "abscissa": set(), "dtype": set(), "cfg": set(), "config": set()}
    for case in cases:
        parts = case.parts
        for key, value in (("model", case.model), ("forecaster", type(parts.forecaster).__name__),
                           ("policy", type(parts.policy).__name__), ("granularity", parts.targets.granularity),
                           ("abscissa", parts.abscissa), ("dtype", parts.store.factor_dtype),
                           ("config", type(case.config).__name__)):
            seen[key].add(value)
        seen["cfg"].update(g.cfg for g in case.generations)
    assert {k: len(v) for k, v in seen.items()} == {"model": 3, "forecaster": 4, "policy": 3, "granularity": 3,
                                                    "abscissa": 3, "dtype": 5, "cfg": 4, "config": 2}
    generations = [g for case in cases for g in case.generations]
    assert sum(g.change_at is not None for g in generations) > 30
    assert sum(g.stop_at is not None for g in generations) > 5
    assert sum(not g.told for g in generations) > 10
    assert sum(getattr(case.parts.policy, "interval", 0) == 1 for case in cases) > 30


@pytest.mark.parametrize("seed", range(CASES))
def test_case(seed: int) -> None:
    case = draw_case(seed)
    target = model_of(case.model)
    before = traces(case)
    adaptive = not isinstance(case.parts.policy, IntervalSchedule)
    if adaptive and case.parts.targets.granularity == "output":
        with pytest.raises(ValueError, match="adaptive policy needs module or block granularity"):
            taylorseer.apply(target, case.config)
        assert traces(case) == before
        return
    references = [reference(case, g) for g in case.generations]
    exact = getattr(case.parts.policy, "interval", None) == 1
    handle = taylorseer.apply(target, case.config)
    try:
        for generation, expected in zip(case.generations, references):
            outputs = run(case, generation, handle)
            assert [o.shape for o in outputs] == [e.shape for e in expected]
            assert all(torch.isfinite(o).all() for o in outputs), case
            if exact:
                assert all(torch.equal(o, e) for o, e in zip(outputs, expected)), case
            check_stats(case, generation, handle)
    finally:
        handle.remove()
    assert traces(case) == before
    first = case.generations[0]
    assert all(torch.equal(o, e) for o, e in zip(run(case, first, None), references[0]))


#################################################################################
#                  Calibrated configs (fitted weights from a file)               #
#################################################################################

CAL_CASES = 60


@dataclass
class CalCase:
    """A calibration of the tiny DiT (its weights fitted on a guided CFG batch, two row groups, or on unguided
    sampling, one) applied to the same or to other weights, told a guidance scale or not, and run with any call
    pattern: no CFG, one doubled batch or two calls per step, steps told or read from the calls."""

    seed: int
    steps: int
    full: tuple[int, ...]
    guided: bool  # calibrated at guidance 1.5 on a CFG batch (R = 2), else at 1.0 (R = 1)
    granularity: str
    other_weights: bool
    told_guidance: float | None  # given to apply(..., guidance_scale=) (with the run's cfg_mode), or not
    cfg: str  # "none", "batch", "split"
    batch: int
    told: bool  # steps told (handle.step), else read from each call's timestep

    def refusal(self) -> tuple[str, str] | None:
        """(where, message pattern) of the refusal this case must meet, None if it must run: ``apply`` refuses
        other weights and a told guidance scale or layout the weights cannot serve; step 0 refuses a call layout
        that CFG-batch weights would misread."""
        made = 1.5 if self.guided else 1.0
        if self.told_guidance is not None and self.told_guidance != made:
            return "apply", f"calibrated at guidance_scale {made:g}, not {self.told_guidance:g}"
        if self.guided and self.told_guidance is not None and self.cfg == "split":
            return "apply", "cfg_mode=split"
        if self.other_weights:
            return "apply", "other weights"
        if self.guided and self.cfg != "batch":
            return "step 0", "not a CFG batch|an odd count"
        return None


def draw_cal_case(seed: int) -> CalCase:
    rng = random.Random(10_000 + seed)
    steps = rng.randint(4, 8)
    full = (0, *sorted(rng.sample(range(1, steps), rng.randint(1, steps - 2))))
    guided = rng.random() < 0.6
    told_guidance = rng.choice([None, None, 1.5 if guided else 1.0, 4.0, 1.0 if guided else 1.5])
    cfg = rng.choice(["none", "batch", "batch", "split"] if guided else ["none", "none", "batch", "split"])
    return CalCase(seed, steps, full, guided, rng.choice(["module", "module", "output"]), rng.random() < 0.15,
                   told_guidance, cfg, rng.randint(1, 3), rng.random() < 0.6)


_CALIBRATIONS: dict[tuple, Any] = {}


def calibration_for(case: CalCase, folder: Any) -> Any:
    from taylorseer.calibration import FitOptions, fit_linear, new_header, record_trajectories, save_calibration
    from taylorseer.policy import FixedSchedule

    key = (case.steps, case.full, case.guided, case.granularity)
    if key not in _CALIBRATIONS:
        model = model_of("dit")
        stats = record_trajectories(model, torch.tensor([1]), num_steps=case.steps, seed=9, batch_size=1,
                                    guidance_scale=1.5 if case.guided else 1.0, granularity=case.granularity,
                                    progress=False)
        table, error = fit_linear(stats, case.full, FitOptions(history=2))
        schedule = FixedSchedule(case.full, case.steps, name="fuzz")
        header = new_header("linear", "fuzz", model, schedule, granularity=stats.granularity, fit=error,
                            calibration_data=stats.sampling)
        _CALIBRATIONS[key] = save_calibration(folder / f"cal-{len(_CALIBRATIONS)}.safetensors", header, table)
    return _CALIBRATIONS[key]


def other_dit() -> nn.Module:
    if "dit-other" not in _MODELS:
        other = build_reference("DiT-FM-T/4").requires_grad_(False)
        other.load_state_dict({k: v * 1.02 for k, v in model_of("dit").state_dict().items()})
        _MODELS["dit-other"] = other
    return _MODELS["dit-other"]


def run_calibrated(case: CalCase, model: nn.Module, handle: Any) -> list[torch.Tensor]:
    """One generation of the tiny DiT with the case's call pattern (handle None: no handle)."""
    generator = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.batch, 1, 28, 28, generator=generator)
    labels = torch.tensor([1, 5, 9])[:case.batch]
    if handle is not None:
        handle.begin(case.steps)  # a fixed schedule needs num_steps; the steps themselves may still be read
    outputs: list[torch.Tensor] = []
    for i, (t, sigma) in enumerate(schedule("dit", case.steps)):
        calls = call_list("dit", x, t, labels, case.cfg)
        if handle is not None and case.told:
            with handle.step(i, timestep=t, sigma=sigma):
                eps = [call() for _, call in calls]
        else:
            eps = [call() for _, call in calls]
        outputs.extend(eps)
        x = x - 0.1 * combine(eps, case.batch, case.cfg)
    return outputs


def test_calibrated_cases_are_varied():
    cases = [draw_cal_case(seed) for seed in range(CAL_CASES)]
    kinds = Counter((c.refusal() or ("runs", ""))[0] for c in cases)
    assert kinds["apply"] >= 10 and kinds["step 0"] >= 5 and kinds["runs"] >= 15, kinds
    assert {c.cfg for c in cases} == {"none", "batch", "split"} and {c.granularity for c in cases} == {"module",
                                                                                                       "output"}
    assert sum(c.told for c in cases) >= 20 and sum(not c.told for c in cases) >= 15


@pytest.mark.parametrize("seed", range(CAL_CASES))
def test_calibrated_case(seed: int, tmp_path_factory: Any) -> None:
    from taylorseer.calibration import CalibrationError

    case = draw_cal_case(seed)
    folder = tmp_path_factory.getbasetemp() / "fuzz-calibrations"
    folder.mkdir(exist_ok=True)
    calibration = calibration_for(case, folder)
    model = other_dit() if case.other_weights else model_of("dit")
    before = [("forward" in m.__dict__) for m in model.modules()]
    cfg_mode = None if case.told_guidance is None or case.cfg == "none" else case.cfg
    refusal = case.refusal()
    config = calibration.cache_config()
    if refusal is not None and refusal[0] == "apply":
        with pytest.raises(CalibrationError, match=refusal[1]):
            taylorseer.apply(model, config, guidance_scale=case.told_guidance, cfg_mode=cfg_mode)
        assert [("forward" in m.__dict__) for m in model.modules()] == before  # nothing touched
        return
    expected = run_calibrated(case, model, None)
    handle = taylorseer.apply(model, config, guidance_scale=case.told_guidance, cfg_mode=cfg_mode)
    try:
        if refusal is not None:  # at step 0, before any forecast
            with pytest.raises(CalibrationError, match=refusal[1]):
                run_calibrated(case, model, handle)
            assert handle.stats.steps_forecast == 0
            return
        outputs = run_calibrated(case, model, handle)
        assert [o.shape for o in outputs] == [e.shape for e in expected]
        assert all(torch.isfinite(o).all() for o in outputs), case
        stats = handle.stats
        assert stats.steps_full + stats.steps_forecast == case.steps, case
        assert stats.steps_forecast == case.steps - len(case.full), case
        assert not stats.fallbacks, case
    finally:
        handle.remove()
    assert [("forward" in m.__dict__) for m in model.modules()] == before
