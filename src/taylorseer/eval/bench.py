"""The measuring instrument: run a grid of methods on one model, write one JSON record per method (JSONL).

Every record is measured, never estimated: FLOPs are counted (``torch.utils.flop_counter``), wall times are
medians of runs of different methods *interleaved* (full, A, B, ..., full, A, B, ...) so that a noisy shared
machine slows every method alike, quality is compared with the full-compute images of the same seeds. A value
that could not be measured is ``null`` and ``reasons[field]`` says why. Reports read these records only.

Methods are benchmarked in groups of about eight. For each method of a group: a probe run on a few images
(per-step forecast error of one module; it costs extra compute, so it is never timed), then a counted run on
all images (FLOPs, step counts, cache bytes, the images for the quality metrics; it is also the method's
warm-up). Then ``repeats`` timed rounds, each running the full-compute reference and the group's methods once,
in order; speedups divide by the reference's median from the same rounds. Records are appended to the JSONL
file group by group, so an interrupted run keeps what it finished.

Every run is identifiable and says whether it finished. A run writes, in order, one line per record:
``{"kind": "run_start", ...header, "methods_planned": [names]}`` before any work; one ``"kind": "method"`` record
per method as its group finishes; and ``{"kind": "run_end", "run_id": ..., "complete": true, "methods": n}`` when,
and only when, every group has finished. A run killed or failed part way has no ``run_end``: ``report`` refuses it
unless asked to show it marked incomplete (``report.read_run``). Each line is written with one write, then flushed
and ``fsync``-ed, so a killed process leaves at most one partial last line (no closing newline, invalid JSON); the
next run first ends such a line with a newline so that its own lines stay whole, and the reader skips the partial
line with a warning.

Method record schema (``SCHEMA`` = "taylorseer.bench/2"; "/1" records, written before the run markers existed,
are the same without ``kind``; times in seconds, sizes in bytes unless named ``_mb``): ``kind`` = "method"; the run
header (``schema``, ``run_id``, ``model``, ``num_images``, ``seed``, ``repeats``, ``guidance_scale``, ``cfg_mode``,
``probe_images_requested``, ``machine``, ``guidance_interval``); the method (``name``, ``family``, ``num_steps``,
``config``, ``counterpart``, ``group``); counts (``steps_full``, ``steps_forecast``, ``flops``, ``flops_speedup``,
``peak_cache_bytes``, ``process_max_rss_mb``: the process's peak so far); timing (``wall_s`` median,
``wall_min_s``, ``wall_max_s``, ``wall_samples_s``, ``cpu_s``, ``wall_full_s``, ``wall_speedup``, ``efficiency`` =
wall / FLOPs speedup); quality (``psnr`` dB and ``ssim`` vs the reference images, ``class_accuracy``,
``fid_fmnist`` vs the real test set, ``fid_to_full``: the same Fréchet distance but to the full-compute images of
the same seeds); the probe (``probe_path``, ``probe_images``, ``probe_errors`` = [{step, rel_l2}]);
``samples_png``, ``error`` (None or "Type: message"), ``reasons`` ({field: why it is null}) and ``bench_elapsed_s``.

Example:
    >>> model = build_reference("DiT-FM-T/4")                                           # doctest: +SKIP
    >>> records = run_bench(model, default_grid(quick=True, num_steps=10), num_images=8, repeats=1,
    ...                     out_path="runs/bench/records.jsonl")                       # doctest: +SKIP
    >>> [(r["name"], r["flops_speedup"]) for r in records][:2]                          # doctest: +SKIP
    [('full', 1.0), ('ddim-4', 2.5)]
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from .._extras import require
from ..adapters import resolve_targets
from ..api import apply
from ..config import TaylorSeerConfig, preset
from ..integrations.cache_dit import cache_dit_version
from ..integrations.cache_dit import install_method as install_cache_dit
from ..models.reference import GUIDANCE_INTERVAL, NUM_CLASSES
from ..models.sampler import StepListener, sample
from ..parts import CacheConfig
from ..runtime.allocator import allocator_setting
from ..runtime.measure import count_flops
from .grid import image_grid

if TYPE_CHECKING:
    from ..integrations.cache_dit import CacheDitSettings
    from ..integrations.diffusers_caches import FirstBlockCacheSettings, MagCacheSettings, SeaCacheSettings
    from .flux import HookSettings

require("torchmetrics")  # the quality metrics (eval.metrics): fail now, not after the first group has run

SCHEMA = "taylorseer.bench/2"
# Our forecasters and policies beyond fixed-interval Taylor (CacheConfig methods), and diffusers' own caches.
PART_FAMILIES = ("adams", "hermite", "corrector", "gate", "budget", "spectrum", "anchor")
CALIBRATED_FAMILIES = ("calibrated",)  # fitted weights and searched schedules from a calibration file
# diffusers-hook: eval.flux (enable_cache); cache-dit: integrations.cache_dit (the peers extra)
PEER_CACHE_FAMILIES = ("firstblockcache", "magcache", "seacache", "diffusers-hook", "cache-dit")
FAMILIES = ("full", "fewer-steps", "fora", "taylorseer", "preset", "diffusers-peer", *PART_FAMILIES,
            *PEER_CACHE_FAMILIES, *CALIBRATED_FAMILIES)
CACHED_FAMILIES = ("fora", "taylorseer", "preset", "diffusers-peer", *PART_FAMILIES, *PEER_CACHE_FAMILIES,
                   *CALIBRATED_FAMILIES)
GRID_INTERVALS = tuple(range(2, 11))  # N = 10 with warm-up 2: 6 of 50 full steps
GRID_WARMUP = 2  # DiT's reference warm-up (../shared/ALGORITHM.md)
SAMPLE_GRID_IMAGES = 16

Sampler = Callable[..., torch.Tensor]


#################################################################################
#                                    Methods                                    #
#################################################################################

@dataclass(frozen=True)
class Method:
    """One benchmarked method: how ``num_steps`` sampler steps are computed.

    ``family`` is one of ``FAMILIES``. ``full`` and ``fewer-steps`` run the plain sampler (``config`` None);
    the cached families carry the ``TaylorSeerConfig`` or ``CacheConfig`` that is applied (for ``diffusers-peer``:
    the schedule and order the peer integration is asked to reproduce; diffusers' own caches: their settings).
    ``counterpart`` names our method that a peer is compared with (same schedule and modules); the bench times
    them in the same group.

    Example:
        >>> Method("ts-O2-N5-divided", "taylorseer", TaylorSeerConfig(interval=5, max_order=2)).full_steps()
        11
    """

    name: str
    family: str
    config: (TaylorSeerConfig | CacheConfig | FirstBlockCacheSettings | MagCacheSettings | SeaCacheSettings
             | CacheDitSettings | HookSettings | None) = None
    num_steps: int = 50
    counterpart: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        if (self.config is None) != (self.family in ("full", "fewer-steps")):
            raise ValueError(f"method {self.name!r}: families full/fewer-steps take no config, the others need one")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")

    def full_steps(self) -> int | None:
        """Sampler steps computed in full (model evaluations that run the cached modules); None for adaptive
        policies and peers that decide during sampling (the record then has the measured ``steps_full``)."""
        if self.config is None:
            return self.num_steps
        if self.family in PEER_CACHE_FAMILIES:
            return None
        return self.cache_config().full_steps(self.num_steps)

    def cache_config(self) -> TaylorSeerConfig | CacheConfig:
        """The config that ``taylorseer.apply`` installs (``TypeError`` for plain sampling or a peer's settings)."""
        if not isinstance(self.config, (TaylorSeerConfig, CacheConfig)):
            raise TypeError(f"method {self.name!r} (family {self.family}) has no taylorseer config: {self.config!r}")
        return self.config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the config as its ``to_dict()``)."""
        return {"name": self.name, "family": self.family, "num_steps": self.num_steps,
                "config": self.config.to_dict() if self.config is not None else None,
                "counterpart": self.counterpart}


def _taylorseer(order: int, interval: int, num_steps: int, scheme: str = "divided", abscissa: str = "step",
                granularity: str = "module", tail: int = 0) -> Method:
    suffix = ("" if abscissa == "step" else f"-{abscissa}") + ("" if granularity == "module" else f"-{granularity}")
    suffix += f"-tail{tail}" if tail else ""
    config = TaylorSeerConfig(interval=interval, warmup_steps=GRID_WARMUP, max_order=order, scheme=scheme,
                              abscissa=abscissa, granularity=granularity, tail_steps=tail,
                              name=f"ts-O{order}-N{interval}-{scheme}{suffix}")
    return Method(config.name, "taylorseer", config, num_steps)


def _fora(interval: int, num_steps: int, tail: int = 0) -> Method:
    config = preset("fora", interval=interval, warmup_steps=GRID_WARMUP, tail_steps=tail)
    return Method(f"fora-N{interval}" + (f"-tail{tail}" if tail else ""), "fora", config, num_steps)


def _peer(ours: Method) -> Method:
    cfg = ours.config
    assert isinstance(cfg, TaylorSeerConfig), f"the peer of {ours.name!r} reproduces a TaylorSeerConfig"
    return Method(f"diffusers-O{cfg.max_order}-N{cfg.interval}", "diffusers-peer", cfg, ours.num_steps, ours.name)


def _fewer_steps(cached: list[Method], num_steps: int) -> list[Method]:
    """Plain DDIM at each distinct number of full steps of the cached methods (equal model evaluations)."""
    steps = [m.full_steps() for m in cached]
    counts = sorted({k for k in steps if k is not None and k < num_steps}, reverse=True)
    return [Method(f"ddim-{k}", "fewer-steps", None, k) for k in counts]


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
    cached += [Method(p, "preset", preset(p), num_steps) for p in ("paper_dit", "paper_flux", "paper_hunyuan_video")]
    cached += part_methods(num_steps)
    by_name = {m.name: m for m in cached}
    peers = [_peer(by_name["ts-O1-N5-divided"]), _peer(by_name["ts-O2-N4-reference"])]
    return [Method("full", "full", None, num_steps), *_fewer_steps(cached, num_steps), *cached, *peers,
            *_peer_caches(num_steps)]


PART_INTERVALS = (5, 7, 10)  # with warm-up 2 at 50 steps: 11, 8 and 6 full steps


def part_methods(num_steps: int = 50) -> list[Method]:
    """Our forecasters beyond Taylor at the fixed intervals of ``PART_INTERVALS`` (warm-up 2), and the adaptive
    policies (Taylor O=2 forecaster) at two thresholds each, chosen on the embedded model to land near 11 and 8
    full steps of 50 (docs/results/parts.md says what they measured).

    Example:
        >>> [m.name for m in part_methods()][:2]
        ['adams-O3-N5', 'hermite-O2-N5']
    """
    from ..forecast import AdamsForecast, CorrectorForecast, HermiteForecast, TaylorForecast
    from ..policy import ConfidenceGate, ErrorBudget, IntervalSchedule

    out = []
    for n in PART_INTERVALS:
        schedule = IntervalSchedule(interval=n, warmup_steps=GRID_WARMUP)
        for family, name, forecaster in (("adams", f"adams-O3-N{n}", AdamsForecast(order=3)),
                                         ("hermite", f"hermite-O2-N{n}", HermiteForecast(max_order=2)),
                                         ("corrector", f"corrector-N{n}", CorrectorForecast())):
            out.append(Method(name, family, CacheConfig(schedule, forecaster, name=name), num_steps))
    taylor = TaylorForecast(max_order=2)
    for family, name, policy in (("gate", "gate-t0.08", ConfidenceGate(threshold=0.08, max_forecast=8)),
                                 ("gate", "gate-t0.2", ConfidenceGate(threshold=0.2, max_forecast=8)),
                                 ("budget", "budget-b0.15", ErrorBudget(budget=0.15, max_forecast=8)),
                                 ("budget", "budget-b0.4", ErrorBudget(budget=0.4, max_forecast=8))):
        out.append(Method(name, family, CacheConfig(policy, taylor, name=name), num_steps))
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
    from ..forecast import SpectrumForecast, TaylorForecast
    from ..parts import Targets
    from ..policy import AnchorSchedule
    from ..policy.spectrum import spectrum_for_budget

    out = []
    for budget in SPECTRUM_BUDGETS:
        try:
            schedule = spectrum_for_budget(budget, num_steps, warmup_steps=GRID_WARMUP)
        except ValueError:  # a short generation cannot hold this budget
            continue
        forecaster = SpectrumForecast(span=float(num_steps))
        for granularity, suffix in (("module", ""), ("block", "-block")):
            name = f"spectrum-b{budget}{suffix}"
            out.append(Method(name, "spectrum", CacheConfig(schedule, forecaster, Targets(granularity), name=name),
                              num_steps))
    for n in PART_INTERVALS:
        anchor = AnchorSchedule.from_interval(n, GRID_WARMUP, num_steps)
        for order in (1, 2):
            name = f"anchor1-ts{order}-N{n}-block"
            out.append(Method(name, "anchor", CacheConfig(anchor, TaylorForecast(max_order=order), Targets("block"),
                                                          name=name), num_steps))
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
    from ..calibration import CalibrationError, load_calibration
    from ..forecast import TaylorForecast

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
        methods.append(Method(name, "calibrated", cal.cache_config(name=name), num_steps))
    elif cal.searched_with is not None:  # a schedule searched for a formula forecaster: the two belong together
        cal.check_sampling(guidance_scale)
        return [Method(name, "calibrated", cal.cache_config(name=name), num_steps)]
    cal.check_sampling(guidance_scale)  # a file made at another guidance scale is refused by name (issue 25)
    taylor = f"{name}-taylor2"
    methods.append(Method(taylor, "calibrated", cal.cache_config(forecaster=TaylorForecast(max_order=2), name=taylor),
                          num_steps))
    return methods


def _peer_caches(num_steps: int) -> list[Method]:
    """diffusers' FirstBlockCache / MagCache methods (integrations.diffusers_caches), when that module exists, and
    cache-dit on its own threshold rule (the ``peers`` extra; without it one line says the methods are skipped)."""
    from ..integrations.cache_dit import cache_dit_methods

    try:
        from ..integrations.diffusers_caches import peer_methods
    except ImportError:
        return list(cache_dit_methods(num_steps))
    return [*peer_methods(num_steps), *cache_dit_methods(num_steps)]


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
    from dataclasses import replace

    from ..forecast import SpectrumForecast, TaylorForecast
    from ..integrations.cache_dit import cache_dit_methods
    from ..parts import Targets
    from ..policy import AnchorSchedule, FixedSchedule

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
            out.append(Method(f"anchor1@{name}", "anchor", replace(config, policy=anchor, name=f"anchor1@{name}"),
                              method.num_steps))
        for order in (1, 2):
            label = f"anchor1-ts{order}-block@{name}"
            out.append(Method(label, "anchor", CacheConfig(anchor, TaylorForecast(max_order=order), Targets("block"),
                                                           name=label), method.num_steps))
        label = f"spectrum-fc@{name}"
        out.append(Method(label, "spectrum", CacheConfig(policy, SpectrumForecast(span=float(policy.num_steps)),
                                                         name=label), method.num_steps))
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
              Method("paper_dit", "preset", preset("paper_dit"), num_steps)]
    return [Method("full", "full", None, num_steps), *_fewer_steps(cached, num_steps), *cached, _peer(ours)]


#################################################################################
#                          Installers (one per family)                          #
#################################################################################

@dataclass
class Installed:
    """A method made ready on a model: what to sample with, what to tell, how to undo it and read its stats."""

    model: nn.Module
    listener: StepListener | None
    remove: Callable[[], None]
    stats: Callable[[], dict[str, Any]]
    targets: list[str] = field(default_factory=list)
    probe: Callable[[str], None] | None = None


Installer = Callable[[nn.Module, Method], Installed]
INSTALLERS: dict[str, Installer] = {}


def register_installer(family: str, installer: Installer) -> None:
    """Register how methods of ``family`` are installed on a model (replaces any previous installer)."""
    INSTALLERS[family] = installer


def _install_plain(model: nn.Module, method: Method) -> Installed:
    stats = {"steps_full": method.num_steps, "steps_forecast": 0, "peak_cache_bytes": 0}
    return Installed(model, None, lambda: None, lambda: dict(stats))


def _install_taylorseer(model: nn.Module, method: Method) -> Installed:
    handle = apply(model, method.cache_config())

    def stats() -> dict[str, Any]:
        return {**handle.stats.to_dict(), "probe_errors": list(handle.stats.probe_errors)}

    return Installed(model, handle, handle.remove, stats, [t.path for t in handle.targets], handle.probe)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def _install_peer(model: nn.Module, method: Method) -> Installed:
    """diffusers' own TaylorSeer hook via ``taylorseer.integrations.peers``, on our adapter's modules and schedule.

    It runs on a deep copy of the model (diffusers' hook removal leaves attributes behind), so the peer never
    touches the model the other methods run on. The peer is told the steps like our handle when it has
    ``begin``/``step``; a ``stats`` attribute (``to_dict()`` or a dict) is recorded if present. Any failure,
    including a missing module, becomes the method's ``error``.
    """
    from ..integrations.peers import adapter_regexes, apply_diffusers_taylorseer

    cfg = method.config
    if not isinstance(cfg, TaylorSeerConfig):
        raise TypeError(f"method {method.name!r}: diffusers' TaylorSeer reproduces a TaylorSeerConfig, "
                        f"got {type(cfg).__name__}")
    clone = copy.deepcopy(model)
    factor_dtype = None if cfg.factor_dtype is None else _TORCH_DTYPES.get(cfg.factor_dtype)
    peer = apply_diffusers_taylorseer(clone, cfg.interval, cfg.warmup_steps, cfg.max_order,
                                      adapter_regexes(clone, cfg), factor_dtype=factor_dtype)
    listener = peer if hasattr(peer, "begin") and hasattr(peer, "step") else None

    def stats() -> dict[str, Any]:
        raw: Any = getattr(peer, "stats", None)
        raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
        return dict(raw) if isinstance(raw, dict) else {}

    return Installed(clone, listener, getattr(peer, "remove", lambda: None), stats)


for _family in ("full", "fewer-steps"):
    register_installer(_family, _install_plain)
for _family in ("fora", "taylorseer", "preset", *PART_FAMILIES, *CALIBRATED_FAMILIES):
    register_installer(_family, _install_taylorseer)
register_installer("diffusers-peer", _install_peer)
register_installer("cache-dit", install_cache_dit)


#################################################################################
#                                    Runs                                       #
#################################################################################

@dataclass
class _Context:
    model: nn.Module
    sampler: Sampler
    labels: torch.Tensor
    seed: int
    guidance_scale: float
    cfg_mode: str


@dataclass
class _Run:
    images: torch.Tensor
    flops: int | None
    stats: dict[str, Any]
    wall_s: float
    cpu_s: float
    block_calls: int | None = None


_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


def block_watchers(model: nn.Module) -> list[nn.Module]:
    """One module per transformer block that runs exactly when the block's own work runs: the first ``nn.Linear``
    of its attention (``attn*``) child, else its first ``nn.Linear`` outside norms. Counting their calls counts
    block calls whatever skips the block (a cache that never calls it, a forecast module or block, a shortcut).

    Example:
        >>> len(block_watchers(load_reference()))    # doctest: +SKIP
        6
    """
    from ..runtime.install import unwrap

    watched: list[nn.Module] = []
    for name, child in unwrap(model).named_children():
        if name not in _BLOCK_LISTS or not isinstance(child, nn.ModuleList):
            continue
        for block in child:
            linears = [(path, m) for path, m in block.named_modules() if isinstance(m, nn.Linear)]
            attention = [m for path, m in linears if path.split(".")[0].startswith("attn")]
            plain = [m for path, m in linears if "norm" not in path]
            pick = attention or plain
            if pick:
                watched.append(pick[0])
    return watched


def _count_block_calls(model: nn.Module, call: Callable[[], Any]) -> tuple[Any, int | None]:
    """``call()`` with a counter on ``block_watchers(model)``: (its result, block calls; None without blocks)."""
    watched = block_watchers(model)
    count = [0]

    def bump(module: nn.Module, args: tuple) -> None:
        count[0] += 1

    handles = [m.register_forward_pre_hook(bump) for m in watched]
    try:
        result = call()
    finally:
        for h in handles:
            h.remove()
    return result, (count[0] if watched else None)


def _run(ctx: _Context, method: Method, labels: torch.Tensor, count: bool = False, probe: str | None = None) -> _Run:
    """Install ``method``, sample ``labels`` once (optionally counting FLOPs or probing a module), uninstall."""
    installed = INSTALLERS[method.family](ctx.model, method)
    try:
        if probe is not None:
            if installed.probe is None:
                raise TypeError(f"method {method.name!r} (family {method.family}) cannot probe a module")
            installed.probe(probe)

        def call() -> torch.Tensor:
            return ctx.sampler(installed.model, labels, num_steps=method.num_steps, guidance_scale=ctx.guidance_scale,
                               seed=ctx.seed, cfg_mode=ctx.cfg_mode, listener=installed.listener)

        wall0, cpu0 = time.perf_counter(), time.process_time()
        blocks = None
        if count:
            (images, flops), blocks = _count_block_calls(installed.model, lambda: count_flops(call))
        else:
            images, flops = call(), None
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        stats = installed.stats()
    finally:
        installed.remove()
    return _Run(images, flops, stats, wall, cpu, blocks)


def _probe_path(model: nn.Module, method: Method) -> str | None:
    """The middle attention target of ``method`` (e.g. ``transformer_blocks.3.attn1``), None if not probeable."""
    if INSTALLERS.get(method.family) is not _install_taylorseer:
        return None
    targets = [t.path for t in resolve_targets(model, method.cache_config())]
    paths = [p for p in targets if "attn" in p] or targets
    return paths[len(paths) // 2] if paths else None


#################################################################################
#                                 Measurements                                  #
#################################################################################

def machine_facts() -> dict[str, Any]:
    """CPU model, core count, library versions, torch threads, UTC date, load average right now and the C
    allocator thresholds set by ``tune_cpu_allocator`` (``None``: the C library's defaults)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import diffusers

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "cache_dit": cache_dit_version(),
            "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "allocator": allocator_setting()}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _quality(images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, is_reference: bool) -> tuple:
    """PSNR/SSIM vs the reference images, class accuracy, FID-FMNIST and the Fréchet distance to the reference
    images' features (``fid_to_full``); (values, reasons for the nulls)."""
    values: dict[str, Any] = {"psnr": None, "ssim": None, "class_accuracy": None, "fid_fmnist": None,
                              "fid_to_full": None}
    reasons: dict[str, str] = {}
    try:
        from . import metrics
    except Exception as err:  # noqa: BLE001 - the metrics module may be missing or broken: record why
        return values, {k: f"eval.metrics unavailable: {type(err).__name__}: {err}" for k in values}
    jobs = {"psnr": lambda: metrics.psnr(images, reference), "ssim": lambda: metrics.ssim(images, reference),
            "class_accuracy": lambda: metrics.class_accuracy(images, labels),
            "fid_fmnist": lambda: metrics.fid_fmnist(images),
            "fid_to_full": lambda: metrics.fid_between(images, reference)}
    for key, job in jobs.items():
        if key == "psnr" and is_reference:
            reasons[key] = "this is the reference: PSNR against itself is infinite by definition"
            continue
        try:
            values[key] = float(job())
        except Exception as err:  # noqa: BLE001 - e.g. classifier assets missing: null with the reason
            reasons[key] = f"{type(err).__name__}: {err}"
            continue
        if values[key] != values[key] or abs(values[key]) == float("inf"):  # JSON has no inf: null + reason
            reasons[key] = f"{key} is {values[key]} (e.g. images identical to the reference)"
            values[key] = None
    return values, reasons


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """Save the first images ([N, 1, S, S] in [-1, 1]) as one PNG, 2 rows, each pixel drawn 2x2."""
    x = images[:SAMPLE_GRID_IMAGES]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(x, ncol=-(-len(x) // (2 if len(x) > 1 else 1)), pad=0, scale=2).save(path)


def _probe(ctx: _Context, method: Method, probe_images: int) -> dict[str, Any]:
    """Per-step relative L2 error of the forecast of one module, from a separate run on a few images."""
    path = _probe_path(ctx.model, method)
    keys = ("probe_path", "probe_images", "probe_errors")
    if path is None:
        why = "no forecast steps" if method.config is None else "the peer integration exposes no probe"
        return {**dict.fromkeys(keys), "reasons": dict.fromkeys(keys, why)}
    labels = ctx.labels[:probe_images]
    run = _run(ctx, method, labels, probe=path)
    errors = [{"step": e["step"], "rel_l2": e["rel_l2"]} for e in run.stats["probe_errors"]]
    return {"probe_path": path, "probe_images": len(labels), "probe_errors": errors, "reasons": {}}


def _measure(ctx: _Context, method: Method, reference: torch.Tensor | None, out_dir: Path | None,
             probe_images: int) -> dict[str, Any]:
    """Everything but timing: probe run, counted run, quality metrics, sample grid. Fills a partial record."""
    rec = _probe(ctx, method, probe_images)
    run = _run(ctx, method, ctx.labels, count=True)
    rec["flops"] = run.flops
    rec["block_calls"] = run.block_calls
    if run.block_calls is None:
        rec["reasons"]["block_calls"] = "the model has no block list to watch"
    rec["peer_version"] = run.stats.get("cache_dit")
    if rec["peer_version"] is None:
        rec["reasons"]["peer_version"] = "not a cache-dit method (diffusers' version: machine.diffusers)"
    rec["process_max_rss_mb"] = _max_rss_mb()
    for key in ("steps_full", "steps_forecast", "peak_cache_bytes"):
        rec[key] = run.stats.get(key)
        if rec[key] is None:
            rec["reasons"][key] = "not reported by this method's integration"
    values, reasons = _quality(run.images, run.images if reference is None else reference, ctx.labels,
                               is_reference=reference is None)
    rec.update(values)
    rec["reasons"].update(reasons)
    rec["samples_png"] = None
    if out_dir is None:
        rec["reasons"]["samples_png"] = "sample grids were not requested"
    else:
        png = Path("samples") / f"{method.name}.png"
        _save_grid(run.images, out_dir / png)
        rec["samples_png"] = png.as_posix()
    rec["_images"] = run.images
    return rec


#################################################################################
#                                Timing + records                               #
#################################################################################

def _groups(methods: list[Method], full: Method, size: int) -> list[list[Method]]:
    """Chunk the non-reference methods into timing groups of about ``size``; a peer joins its counterpart."""
    others = [m for m in methods if m is not full]
    units: list[list[Method]] = [[m] for m in others if m.counterpart is None or m.counterpart not in
                                 {o.name for o in others}]
    for peer in (m for m in others if m not in [u[0] for u in units]):
        next(u for u in units if u[0].name == peer.counterpart).append(peer)
    groups: list[list[Method]] = [[]]
    for unit in units:
        if groups[-1] and len(groups[-1]) + len(unit) > size:
            groups.append([])
        groups[-1].extend(unit)
    return [[full] + g for g in groups] if groups[0] else [[full]]


def _wall_fields(samples: list[float], cpu: list[float], full: list[float]) -> dict[str, Any]:
    median, full_median = statistics.median(samples), statistics.median(full)
    return {"wall_s": median, "wall_min_s": min(samples), "wall_max_s": max(samples), "wall_samples_s": samples,
            "cpu_s": statistics.median(cpu), "wall_full_s": full_median, "wall_speedup": full_median / median}


def _error_record(message: str) -> dict[str, Any]:
    keys = ("flops", "block_calls", "steps_full", "steps_forecast", "peak_cache_bytes", "psnr", "ssim",
            "class_accuracy", "fid_fmnist", "fid_to_full", "probe_path", "probe_images", "probe_errors", "samples_png",
            "process_max_rss_mb")
    return {**dict.fromkeys(keys), "reasons": {k: "the method failed (see error)" for k in keys}, "error": message}


def _finish(rec: dict[str, Any], timing: dict[str, Any] | None, full_flops: int | None,
            full_blocks: int | None = None) -> dict[str, Any]:
    """Add timing and the ratios; nulls (with reasons) for what is missing."""
    rec.pop("_images", None)
    timed = ("wall_s", "wall_min_s", "wall_max_s", "wall_samples_s", "cpu_s", "wall_full_s", "wall_speedup")
    rec.update(timing if timing is not None else dict.fromkeys(timed))
    if timing is None:
        rec["reasons"].update({k: "not timed: the method failed" for k in timed})
    flops = rec.get("flops")
    rec["flops_speedup"] = full_flops / flops if flops and full_flops else None
    rec["flops_fraction"] = flops / full_flops if flops and full_flops else None
    blocks = rec.get("block_calls")
    rec["block_call_fraction"] = blocks / full_blocks if blocks is not None and full_blocks else None
    rec["efficiency"] = (rec["wall_speedup"] / rec["flops_speedup"]
                         if rec["wall_speedup"] and rec["flops_speedup"] else None)
    for key in ("flops_speedup", "efficiency", "flops_fraction", "block_call_fraction"):
        if rec[key] is None:
            rec["reasons"].setdefault(key, "an input of the ratio is missing")
    return rec


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` to the JSONL file ``path`` as one line, durably: one write, flush, ``fsync``.

    A process killed during the write leaves at most a partial last line without its newline (never a shorter
    line that parses), which ``report.read_run`` skips with a warning.
    """
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _end_partial_line(path: Path) -> None:
    """If ``path`` ends inside a line (a killed writer), end that line so the next record starts a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


class _Bench:
    """State of one ``run_bench`` call: context, reference images and FLOPs, progress bar, output file."""

    def __init__(self, ctx: _Context, out_path: Path, header: dict[str, Any], probe_images: int,
                 save_samples: bool, bar: tqdm) -> None:
        self.ctx, self.out_path, self.header, self.bar = ctx, out_path, header, bar
        self.probe_images, self.save_samples = probe_images, save_samples
        self.reference: torch.Tensor | None = None
        self.full_flops: int | None = None
        self.full_blocks: int | None = None
        self.started = time.perf_counter()

    def measure(self, method: Method) -> dict[str, Any]:
        self.bar.set_description(f"measure {method.name}")
        try:
            rec = _measure(self.ctx, method, self.reference, self.out_path.parent if self.save_samples else None,
                           self.probe_images)
            rec["error"] = None
        except Exception as err:  # noqa: BLE001 - a failing method is recorded, the bench goes on
            rec = _error_record(f"{type(err).__name__}: {err}")
        self.bar.update(2)
        if method.family == "full" and self.reference is None:
            self.reference, self.full_flops = rec.get("_images"), rec["flops"]
            self.full_blocks = rec.get("block_calls")
        return rec

    def time_group(self, group: list[Method], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
        samples: dict[str, tuple[list[float], list[float]]] = {m.name: ([], []) for m in group}
        for _ in range(repeats):
            for method in group:  # interleaved: every round runs each method once, in order
                self.bar.set_description(f"time {method.name}")
                run = _run(self.ctx, method, self.ctx.labels)
                samples[method.name][0].append(run.wall_s)
                samples[method.name][1].append(run.cpu_s)
                self.bar.update(1)
        return samples

    def record(self, method: Method, rec: dict[str, Any], group: int, timing: dict[str, Any] | None) -> dict:
        out = {"kind": "method", **self.header, **method.to_dict(), "group": group,
               **_finish(rec, timing, self.full_flops, self.full_blocks)}
        out["bench_elapsed_s"] = time.perf_counter() - self.started
        append_record(self.out_path, out)
        return out


def run_bench(
    model: nn.Module | Callable[[], nn.Module],
    methods: list[Method],
    num_images: int = 100,
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 3,
    out_path: str | os.PathLike = "bench.jsonl",
    progress: bool = True,
    *,
    sampler: Sampler = sample,
    guidance_scale: float = 1.5,
    cfg_mode: str = "batch",
    group_size: int = 8,
    probe_images: int = 16,
    model_name: str | None = None,
    save_samples: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark ``methods`` on ``model`` and append one JSON record per method to ``out_path``; return them.

    ``model`` is a module or a factory returning one; ``sampler(model, labels, num_steps=, guidance_scale=,
    seed=, cfg_mode=, listener=)`` generates images in [-1, 1]. Exactly one method must have family ``full``:
    its images (``num_images`` images of classes 0..9 in turn, noise from ``seed``) are the reference of PSNR
    and SSIM and its FLOPs and wall time the denominators of the speedups. ``threads`` sets torch's thread
    count for the whole process (None: leave it). Wall times are in seconds: median, min, max and all samples
    of ``repeats`` interleaved rounds of groups of ``group_size`` methods plus the reference. Sample grids go
    to ``samples/`` beside ``out_path`` (paths in the records are relative to that directory). Records are
    appended, never truncated, framed by a ``run_start`` record (the header, a fresh ``run_id``, the planned
    method names) and, only once every method is recorded, a ``run_end`` record; ``report.read_run`` picks the
    last run of a file and refuses it if that ``run_end`` is missing.

    Example:
        >>> recs = run_bench(build_reference("DiT-FM-T/4"), default_grid(True, 10), num_images=8,
        ...                  repeats=1, out_path="bench.jsonl", progress=False)         # doctest: +SKIP
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    fulls = [m for m in methods if m.family == "full"]
    if len(fulls) != 1:
        raise ValueError(f"methods must hold exactly one 'full' method (the reference), got {len(fulls)}")
    from ..integrations.cache_dit import cache_dit_version

    if progress and cache_dit_version() is None:
        print("bench: cache-dit is not installed (pip install \"taylorseer[peers]\"): its methods are skipped",
              file=sys.stderr)
    if threads is not None:
        torch.set_num_threads(threads)
    model = model if isinstance(model, nn.Module) else model()
    labels = torch.arange(num_images) % NUM_CLASSES
    ctx = _Context(model, sampler, labels, seed, guidance_scale, cfg_mode)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    groups = _groups(methods, fulls[0], group_size)
    header = _header(model, model_name, num_images, seed, repeats, guidance_scale, cfg_mode, probe_images)
    # our sampler's default ("all": every step); unknown (None) for a custom sampler
    if sampler is sample:
        header["guidance_interval"] = list(GUIDANCE_INTERVAL) if GUIDANCE_INTERVAL else "all"
    else:
        header["guidance_interval"] = None
    total = 2 * len(methods) + repeats * sum(len(g) for g in groups)
    _end_partial_line(out_path)
    append_record(out_path, {"kind": "run_start", **header, "methods_planned": [m.name for m in methods]})
    with tqdm(total=total, disable=not progress, desc="bench") as bar:
        bench = _Bench(ctx, out_path, header, probe_images, save_samples, bar)
        records = [r for index, group in enumerate(groups) for r in _bench_group(bench, group, index, repeats)]
    append_record(out_path, {"kind": "run_end", "run_id": header["run_id"], "complete": True,
                             "methods": len(records)})
    return records


def _bench_group(bench: _Bench, group: list[Method], index: int, repeats: int) -> list[dict[str, Any]]:
    """Measure the group's methods (the reference only in group 0), time them interleaved, append the records."""
    full, members = group[0], group[1:]
    todo = group if index == 0 else members
    partial = {m.name: bench.measure(m) for m in todo}
    if bench.reference is None:
        raise RuntimeError(f"the reference method {full.name!r} failed: {partial[full.name]['error']}")
    ok = [full] + [m for m in members if partial[m.name]["error"] is None]
    bench.bar.update(repeats * (len(group) - len(ok)))
    samples = bench.time_group(ok, repeats)
    full_wall = samples[full.name][0]
    records = []
    for method in todo:
        timing = _wall_fields(*samples[method.name], full_wall) if method.name in samples else None
        records.append(bench.record(method, partial[method.name], index, timing))
    return records


def _header(model: nn.Module, model_name: str | None, num_images: int, seed: int, repeats: int,
            guidance_scale: float, cfg_mode: str, probe_images: int) -> dict[str, Any]:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return {"schema": SCHEMA, "run_id": f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            "model": {"name": model_name or type(model).__name__, "class": type(model).__name__,
                      "params": sum(p.numel() for p in model.parameters())},
            "num_images": num_images, "seed": seed, "repeats": repeats, "guidance_scale": guidance_scale,
            "cfg_mode": cfg_mode, "probe_images_requested": probe_images, "machine": machine_facts()}
