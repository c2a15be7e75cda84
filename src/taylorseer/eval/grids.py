"""The bench's grids of methods: the default DiT grid (FORA, TaylorSeer over orders, intervals and options, the
paper presets, our other forecasters and policies, the peers), a calibration file's methods and their schedule
companions, and selection by name.

Every method is a ``Method(name, CacheConfig | peer settings | None, num_steps)``; its family comes from its
config's part types (``eval.methods.family_of``), so a method built from any registered parts (``--config``)
joins a grid without an edit here.

Example:
    >>> [m.name for m in default_grid(quick=True, num_steps=10)][:3]
    ['full', 'ddim-4', 'fora-N3']
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..calibration import CalibrationError, load_calibration
from ..config import TaylorSeerConfig, preset
from ..forecast import (
    AdamsForecast,
    CorrectorForecast,
    HermiteForecast,
    SpectrumForecast,
    TaylorForecast,
    registered_forecasters,
)
from ..parts import CacheConfig, Targets, parts_of
from ..policy import (
    AnchorSchedule,
    ConfidenceGate,
    ErrorBudget,
    FixedSchedule,
    IntervalSchedule,
    registered_policies,
)
from ..policy.spectrum import spectrum_for_budget
from .methods import Method, grid_methods
from .peer_grid import cache_dit_methods, peer_methods

GRID_INTERVALS = tuple(range(2, 11))  # N = 10 with warm-up 2: 6 of 50 full steps
GRID_WARMUP = 2  # DiT's reference warm-up (../shared/ALGORITHM.md)


def _taylorseer(order: int, interval: int, num_steps: int, scheme: str = "divided", abscissa: str = "step",
                granularity: str = "module", tail: int = 0) -> Method:
    suffix = ("" if abscissa == "step" else f"-{abscissa}") + ("" if granularity == "module" else f"-{granularity}")
    suffix += f"-tail{tail}" if tail else ""
    config = TaylorSeerConfig(interval=interval, warmup_steps=GRID_WARMUP, max_order=order, scheme=scheme,
                              abscissa=abscissa, granularity=granularity, tail_steps=tail,
                              name=f"ts-O{order}-N{interval}-{scheme}{suffix}")
    return Method(config.name, parts_of(config), num_steps)


def _fora(interval: int, num_steps: int, tail: int = 0) -> Method:
    config = parts_of(preset("fora", interval=interval, warmup_steps=GRID_WARMUP, tail_steps=tail))
    return Method(f"fora-N{interval}" + (f"-tail{tail}" if tail else ""), config, num_steps)


def _peer(ours: Method) -> Method:
    """diffusers' own TaylorSeer on ``ours``' schedule, order and modules (family ``diffusers-peer``)."""
    knobs = ours.knobs()
    return Method(f"diffusers-O{knobs['max_order']}-N{knobs['interval']}", ours.cache_config(), ours.num_steps,
                  family="diffusers-peer", counterpart=ours.name)


def _fewer_steps(cached: list[Method], num_steps: int) -> list[Method]:
    """Plain DDIM at each distinct number of full steps of the cached methods (equal model evaluations)."""
    steps = [m.full_steps() for m in cached]
    counts = sorted({k for k in steps if k is not None and k < num_steps}, reverse=True)
    return [Method(f"ddim-{k}", None, k, family="fewer-steps") for k in counts]


def default_grid(quick: bool = False, num_steps: int = 50) -> list[Method]:
    """The benchmark grid for ``num_steps``-step sampling (the paper's DiT setting is 50).

    Full grid: full compute; FORA (order 0) and TaylorSeer O = 1, 2, 3 (``divided``, step abscissa) at N = 2..10
    with warm-up 2; the ``reference`` scheme at O = 2, 3 (it equals ``divided`` at O <= 1); the timestep abscissa at
    N = 5 (on DDIM's uniform spacing it should match the step abscissa) and the sigma abscissa at N = 5
    (docs/design.md, "Abscissa on the embedded model"); block-residual and model-output ("lite") granularity at N =
    5, 7, 10 (11, 8 and 6 full steps), O = 1, 2; FORA and TaylorSeer O = 1, 2 at N = 5 with the last step computed
    in full (``tail_steps=1``, docs/design.md, "FID-FMNIST at scale"); the paper presets (``paper_wan`` equals
    ``paper_hunyuan_video`` and ``fora`` equals FORA N=4, so they are not repeated); the diffusers peer at two
    schedules; and plain DDIM at every distinct number of full steps of the cached methods. ``quick``: seven methods
    at one interval, for CI.

    Example:
        >>> [m.name for m in default_grid(quick=True, num_steps=10)][:3]
        ['full', 'ddim-4', 'fora-N3']
    """
    if quick:
        return _quick_grid(num_steps)
    cached = [_fora(n, num_steps) for n in GRID_INTERVALS]
    cached += [_taylorseer(o, n, num_steps) for o in (1, 2, 3) for n in GRID_INTERVALS]
    cached += [_taylorseer(o, n, num_steps, scheme="reference") for o in (2, 3) for n in GRID_INTERVALS]
    cached += [_taylorseer(o, 5, num_steps, abscissa=a) for a in ("timestep", "sigma") for o in (1, 2, 3)]
    cached += [_taylorseer(o, n, num_steps, granularity=g) for g in ("block", "output") for o in (1, 2)
               for n in PART_INTERVALS]
    cached += [_fora(5, num_steps, tail=1), *(_taylorseer(o, 5, num_steps, tail=1) for o in (1, 2))]
    cached += [Method(p, parts_of(preset(p)), num_steps, family="preset")
               for p in ("paper_dit", "paper_flux", "paper_hunyuan_video")]
    cached += part_methods(num_steps)
    cached += grid_methods([*registered_policies().values(), *registered_forecasters().values()], num_steps)
    by_name = {m.name: m for m in cached}
    peers = [_peer(by_name["ts-O1-N5-divided"]), _peer(by_name["ts-O2-N4-reference"])]
    return [Method("full", None, num_steps), *_fewer_steps(cached, num_steps), *cached, *peers,
            *peer_methods(num_steps), *cache_dit_methods(num_steps)]


PART_INTERVALS = (5, 7, 10)  # with warm-up 2 at 50 steps: 11, 8 and 6 full steps


def part_methods(num_steps: int = 50) -> list[Method]:
    """Our forecasters beyond Taylor at the fixed intervals of ``PART_INTERVALS`` (warm-up 2), and the adaptive
    policies (Taylor O=2 forecaster) at two thresholds each, chosen on the embedded model to land near 11 and 8
    full steps of 50 (docs/results/parts.md says what they measured).

    Example:
        >>> [m.name for m in part_methods()][:2]
        ['adams-O3-N5', 'hermite-O2-N5']
    """
    out = []
    for n in PART_INTERVALS:
        schedule = IntervalSchedule(interval=n, warmup_steps=GRID_WARMUP)
        for name, forecaster in ((f"adams-O3-N{n}", AdamsForecast(order=3)),
                                 (f"hermite-O2-N{n}", HermiteForecast(max_order=2)),
                                 (f"corrector-N{n}", CorrectorForecast())):
            out.append(Method(name, CacheConfig(schedule, forecaster, name=name), num_steps))
    taylor = TaylorForecast(max_order=2)
    for name, policy in (("gate-t0.08", ConfidenceGate(threshold=0.08, max_forecast=8)),
                         ("gate-t0.2", ConfidenceGate(threshold=0.2, max_forecast=8)),
                         ("budget-b0.15", ErrorBudget(budget=0.15, max_forecast=8)),
                         ("budget-b0.4", ErrorBudget(budget=0.4, max_forecast=8))):
        out.append(Method(name, CacheConfig(policy, taylor, name=name), num_steps))
    return out + spectrum_and_anchor_methods(num_steps)


SPECTRUM_BUDGETS = (6, 8, 11)  # full steps of 50: about 12 %, 16 % and 22 % of full compute


def spectrum_and_anchor_methods(num_steps: int = 50) -> list[Method]:
    """Spectrum (its schedule: windows growing by 1.25 per full step, fitted to 6, 8 and 11 full steps; its
    Chebyshev forecaster, degree 4, ridge 0.1, at module and block granularity) and the hybrid (the first block
    computed on every step, the rest forecast by Taylor O=1 / O=2 at block granularity) on the fixed intervals of
    ``PART_INTERVALS``.

    Example:
        >>> [m.name for m in spectrum_and_anchor_methods()][:2]
        ['spectrum-b6', 'spectrum-b6-block']
    """
    out = []
    for budget in SPECTRUM_BUDGETS:
        try:
            schedule = spectrum_for_budget(budget, num_steps, warmup_steps=GRID_WARMUP)
        except ValueError:  # a short generation cannot hold this budget
            continue
        forecaster = SpectrumForecast(span=float(num_steps))
        for granularity, suffix in (("module", ""), ("block", "-block")):
            name = f"spectrum-b{budget}{suffix}"
            out.append(Method(name, CacheConfig(schedule, forecaster, Targets(granularity), name=name), num_steps))
    for n in PART_INTERVALS:
        anchor = AnchorSchedule.from_interval(n, GRID_WARMUP, num_steps)
        for order in (1, 2):
            name = f"anchor1-ts{order}-N{n}-block"
            out.append(Method(name, CacheConfig(anchor, TaylorForecast(max_order=order), Targets("block"), name=name),
                              num_steps))
    return out


def calibrated_methods(path: str | os.PathLike, model: nn.Module | None = None, num_steps: int = 50,
                       guidance_scale: float = 1.5, cfg_mode: str = "batch") -> list[Method]:
    """The methods of a calibration file (``taylorseer calibrate``), family ``calibrated``: its searched schedule
    with its fitted weights (named as the file, e.g. ``cal-b8-s50``; files with weights only) and the same
    schedule with Taylor O2 (``<name>-taylor2``: what the schedule alone gives with a formula forecaster); for a
    schedule searched for a formula forecaster (``calibrate --forecaster``), that schedule with that forecaster
    (named as the file).

    The file is validated against ``model`` (when given) and ``num_steps``; weights fitted on a guided CFG batch
    (two row groups) are refused for unguided sampling or ``cfg_mode="split"`` (their rows would be misread), and
    the other way round. ``CalibrationError`` names the mismatch.

    Example:
        >>> [m.name for m in calibrated_methods("b8.safetensors")]     # doctest: +SKIP
        ['cal-b8-s50', 'cal-b8-s50-taylor2']
    """
    cal = load_calibration(path, model=model, num_steps=num_steps)
    name = cal.header.get("name") or Path(path).stem
    methods = []
    if cal.table is not None:
        rows = (cal.header.get("forecaster") or {}).get("row_groups", 1)
        batch_cfg = guidance_scale != 1.0 and cfg_mode == "batch"
        if (rows == 2) != batch_cfg:
            raise CalibrationError(f"calibration file {path}: its weights were fitted on "
                                   f"{'a guided CFG batch [cond; uncond]' if rows == 2 else 'one branch per call'}, "
                                   f"but this bench samples with guidance_scale={guidance_scale}, "
                                   f"cfg_mode={cfg_mode!r}; calibrate with the same guidance layout")
        cal.check_sampling(guidance_scale)  # a file made at another guidance scale is refused by name (issue 25)
        methods.append(Method(name, cal.cache_config(name=name), num_steps, family="calibrated"))
    elif cal.searched_with is not None:  # a schedule searched for a formula forecaster: the two belong together
        cal.check_sampling(guidance_scale)
        return [Method(name, cal.cache_config(name=name), num_steps, family="calibrated")]
    cal.check_sampling(guidance_scale)  # a file made at another guidance scale is refused by name (issue 25)
    taylor = f"{name}-taylor2"
    methods.append(Method(taylor, cal.cache_config(forecaster=TaylorForecast(max_order=2), name=taylor), num_steps,
                          family="calibrated"))
    return methods


def schedule_companions(methods: list[Method]) -> list[Method]:
    """Methods derived from the searched schedule of each ``calibrated`` method in ``methods`` (its ``-taylor2``
    twin excluded), named ``<what>@<calibration name>``: the hybrid (``AnchorSchedule``, the first block computed
    on every step) with the method's own forecaster (``anchor1@NAME``) and with Taylor O=1 / O=2 at block
    granularity (``anchor1-ts1-block@NAME``, ``anchor1-ts2-block@NAME``); Spectrum's forecaster on that schedule
    (``spectrum-fc@NAME``); and cache-dit with the schedule as its step mask (``cachedit-...@NAME``, when
    installed). ``select_methods`` offers them by name.

    Example:
        >>> schedule_companions(default_grid(quick=True, num_steps=10))
        []
    """
    out: list[Method] = []
    schedules: dict[str, tuple[int, ...]] = {}
    for method in methods:
        config = method.config
        if method.family != "calibrated" or not isinstance(config, CacheConfig) or method.name.endswith("-taylor2"):
            continue
        policy = config.policy
        if not isinstance(policy, FixedSchedule):
            continue
        name, steps = method.name, policy.full_steps
        schedules[name] = steps
        anchor = AnchorSchedule(steps, policy.num_steps)
        if config.targets.granularity != "output":
            out.append(Method(f"anchor1@{name}", replace(config, policy=anchor, name=f"anchor1@{name}"),
                              method.num_steps))
        for order in (1, 2):
            label = f"anchor1-ts{order}-block@{name}"
            out.append(Method(label, CacheConfig(anchor, TaylorForecast(max_order=order), Targets("block"), name=label),
                              method.num_steps))
        label = f"spectrum-fc@{name}"
        out.append(Method(label, CacheConfig(policy, SpectrumForecast(span=float(policy.num_steps)), name=label),
                          method.num_steps))
    return out + cache_dit_methods(methods[0].num_steps if methods else 50, schedules, own_rule=False)


def select_methods(methods: list[Method], names: list[str]) -> list[Method]:
    """The methods named in ``names`` (in grid order), plus the ``full`` reference that every run needs.

    Example:
        >>> [m.name for m in select_methods(default_grid(quick=True, num_steps=10), ["fora-N3"])]
        ['full', 'fora-N3']
    """
    known = [m.name for m in methods]
    methods = methods + [c for c in schedule_companions(methods) if c.name not in known]
    known = [m.name for m in methods]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"methods: unknown name(s) {unknown}; allowed: {known}")
    return [m for m in methods if m.family == "full" or m.name in names]


def _quick_grid(num_steps: int) -> list[Method]:
    n = 3 if num_steps < 20 else 5  # at 50 steps: N=5, 11 model evaluations, so P1-P3 all get checked
    ours = _taylorseer(1, n, num_steps)
    cached = [_fora(n, num_steps), ours, _taylorseer(2, n, num_steps, scheme="reference"),
              Method("paper_dit", parts_of(preset("paper_dit")), num_steps, family="preset")]
    return [Method("full", None, num_steps), *_fewer_steps(cached, num_steps), *cached, _peer(ours)]
