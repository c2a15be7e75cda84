"""Speed targets: ``apply(model_or_pipe, speedup=X)`` runs the best method it knows that reaches X (FLOPs).

What it knows, best first:

1. **Calibrations of this model** (``taylorseer calibrate`` files): those in the per-user cache
   (``cache_dir()``: ``$XDG_CACHE_HOME/taylorseer/calibrations``, default ``~/.cache/taylorseer/calibrations``, where
   ``taylorseer calibrate`` writes by default), then those shipped in the package (``assets/calibrations``, SHA-256
   checked against the assets manifest). A file is used only if it was made for this model's class, config and
   weights (``calibration.io.model_identity``), for the generation's step count and, where the guidance scale is
   known, at that scale; anything else is skipped with the reason in the log (``logging``, logger ``taylorseer``:
   a file of another model class at INFO, a stale one of this class, other weights or another scale at WARNING).
2. **The family preset adapted to X**: the preset of the model's family (``default_config``) with its warm-up, on
   the model output (the FLOPs speedup is then the step ratio: no work of the model runs on a forecast step), with
   TaylorSeer of order ``min(preset order, 2)`` in divided differences, and the smallest fixed interval whose
   full-step count reaches X at the generation's step count.

The step count is known only when a generation begins, so ``apply`` chooses the *family* (what is forecast, and
with which forecaster: that of the best calibration reaching X, else the preset's) and the handle's planner chooses
the schedule at every ``begin(num_steps)`` (for a pipeline, the scheduler tells it): the calibrated schedule for that
step count with the most full steps that still reaches X, else the adapted interval. A generation too short for X
(the warm-up alone exceeds its full-step budget, or ``runtime.switch.too_few_steps``) runs at full compute with
one warning and ``stats.switched_off``; so does one whose step count has no calibration when the family's
forecaster is fitted weights (``LinearForecast``: bound to the steps it was fitted for). ``apply`` logs one line
saying what it chose; a step count chosen for the first time logs its schedule; ``repr(handle)`` says both.

Example:
    >>> handle = taylorseer.apply(load_reference(), speedup=6)   # doctest: +SKIP
    >>> handle                                                     # doctest: +SKIP
    CacheHandle(DiTTransformer2DModel, 1 targets, speedup>=6: calibrated ts2-output-b8-s50 (shipped) ...)
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .adapters import default_config, unwrap
from .forecast import TaylorForecast
from .forecast.linear_file import CalibrationError, CalibrationFile, read_calibration
from .models.checkpoint import ASSETS_DIR, CheckpointError, manifest_sha256
from .parts import CacheConfig, Targets, calibrated_config, searched_forecaster
from .policy.interval import IntervalPolicy, IntervalSchedule
from .runtime.switch import FULL_COMPUTE, Choice, Planner, too_few_steps

log = logging.getLogger("taylorseer")

SHIPPED_DIR = ASSETS_DIR / "calibrations"
ASSUMED_STEPS = 50  # the step count an untold generation (num_steps unknown) is planned for


def cache_dir() -> Path:
    """The per-user calibration store: ``$XDG_CACHE_HOME/taylorseer/calibrations`` (``~/.cache/...`` by default).

    Example:
        >>> cache_dir().parts[-2:]
        ('taylorseer', 'calibrations')
    """
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: a relative value is ignored
    return root / "taylorseer" / "calibrations"


def default_calibration_path(name: str) -> Path:
    """Where ``taylorseer calibrate`` writes without ``--out``: ``cache_dir() / NAME-UTCSTAMP.safetensors`` (files
    are found by their header's model fingerprint, not their name, so names only need to be unique).

    Example:
        >>> default_calibration_path("cal-b8-s50").name.startswith("cal-b8-s50-")
        True
    """
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return cache_dir() / f"{name}-{stamp}.safetensors"


#################################################################################
#                               Finding calibrations                            #
#################################################################################

@dataclass(frozen=True)
class Known:
    """A calibration usable on this model: where it came from (``"user"`` cache or ``"shipped"``) and the file."""

    calibration: CalibrationFile
    source: str

    @property
    def name(self) -> str:
        return str(self.calibration.header.get("name") or Path(self.calibration.path or "?").stem)

    @property
    def num_steps(self) -> int:
        return self.calibration.num_steps

    @property
    def full(self) -> int:
        return len(self.calibration.schedule.full_steps)

    @property
    def speedup(self) -> float:
        """Steps / full steps: the FLOPs speedup at output granularity (an upper bound at module granularity,
        where the work outside the targets runs on every step)."""
        return self.num_steps / self.full

    @property
    def guidance_scale(self) -> float | None:
        made = (self.calibration.header.get("calibration_data") or {}).get("guidance_scale")
        return None if made is None else float(made)

    def family(self) -> tuple[str, Any]:
        """(granularity, forecaster config): what a handle installs for it."""
        config = calibrated_config(self.calibration)
        return config.targets.granularity, config.forecaster


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors")) if directory.is_dir() else []


def find_calibrations(model: nn.Module, guidance_scale: float | None = None,
                      directories: tuple[Path, ...] | None = None) -> tuple[list[Known], list[tuple[str, str]]]:
    """The calibrations usable on ``model`` (user cache first, then shipped) and the skipped files with the reason
    (also logged, see the module docstring). ``guidance_scale``: refuse files recorded at another scale (None: not
    checked). ``directories``: (user, shipped) folders instead of ``cache_dir()`` and the package's.

    Example:
        >>> usable, skipped = find_calibrations(load_reference())   # doctest: +SKIP
        >>> [k.name for k in usable]                                 # doctest: +SKIP
        ['ts2-output-b6-s50', 'ts2-output-b8-s50']
    """
    user, shipped = directories if directories is not None else (cache_dir(), SHIPPED_DIR)
    found: list[Known] = []
    skipped: list[tuple[str, str]] = []
    for source, directory in (("user", user), ("shipped", shipped)):
        for path in _files(directory):
            try:
                sha = manifest_sha256(f"calibrations/{path.name}") if source == "shipped" else None
                cal = read_calibration(path, sha256=sha, model=model)
                if guidance_scale is not None:
                    cal.check_sampling(guidance_scale)
                if cal.kind == "schedule" and searched_forecaster(cal) is None:
                    raise CalibrationError(f"{path} holds a schedule without the forecaster it was searched for")
            except (CalibrationError, CheckpointError) as err:
                skipped.append((str(path), str(err)))
                other_class = "calibrated for model class" in str(err)  # io.py's wording for another class
                levels = (logging.DEBUG, logging.INFO) if source == "shipped" else (logging.INFO, logging.WARNING)
                level = levels[0] if other_class else levels[1]
                log.log(level, "taylorseer: skipped %s calibration %s: %s", source, path.name, err)
                continue
            found.append(Known(cal, source))
    return found, skipped


#################################################################################
#                                 Choosing                                      #
#################################################################################

def adapted_interval(speedup: float, num_steps: int, warmup_steps: int) -> IntervalSchedule | None:
    """The fixed-interval schedule with the most full steps whose step ratio reaches ``speedup`` at ``num_steps``
    steps after ``warmup_steps`` full ones (None if the warm-up alone is too many).

    Example:
        >>> adapted_interval(6, 50, 2)
        IntervalSchedule(interval=7, warmup_steps=2, tail_steps=0)
    """
    for interval in range(2, num_steps + 1):
        if num_steps / sum(IntervalPolicy(interval, warmup_steps).plan(num_steps)) >= speedup:
            return IntervalSchedule(interval, warmup_steps)
    return None


def _ratio(policy: IntervalSchedule, num_steps: int) -> tuple[int, float]:
    full = sum(IntervalPolicy(policy.interval, policy.warmup_steps).plan(num_steps))
    return full, num_steps / full


class SpeedTarget(Planner):
    """The planner of a speed target: per generation, the calibrated schedule for its step count with the most
    full steps that reaches ``speedup``, else the adapted interval (see the module docstring)."""

    def __init__(self, speedup: float, family: tuple[str, Any], calibrated: list[Known], warmup_steps: int,
                 preset: str, guidance: Callable[[], float | None] | None = None):
        super().__init__(FULL_COMPUTE)
        self.speedup = speedup
        self.granularity, self.forecaster = family
        self.calibrated = [k for k in calibrated if k.family() == family and k.speedup >= speedup]
        self.warmup_steps = warmup_steps
        self.preset = preset
        self.guidance = guidance  # read at each begin (a pipeline's guidance scale of the running call)
        self.last: str = ""
        self._said: set[str] = set()

    @property
    def fitted(self) -> bool:
        """The family's forecaster is fitted weights, bound to the steps they were fitted for."""
        return type(self.forecaster).__name__ == "LinearForecast"

    def choose(self, num_steps: int | None) -> Choice:
        choice = self._choose(num_steps)
        self.last = choice.note or ""
        if choice.note and choice.note not in self._said:
            self._said.add(choice.note)
            log.info("taylorseer: %s", choice.note)
        return choice

    def _choose(self, num_steps: int | None) -> Choice:
        x = f"speedup>={self.speedup:g}"
        candidates = [k for k in self.calibrated if k.num_steps == num_steps]
        scale = self.guidance() if self.guidance is not None else None
        if scale is not None:
            kept = [k for k in candidates if k.guidance_scale in (None, float(scale))]
            for k in candidates:
                if k not in kept:
                    log.warning("taylorseer: skipped calibration %s: made at guidance_scale %g, this generation "
                                "samples at %g", k.name, k.guidance_scale, scale)
            candidates = kept
        if candidates:
            best = max(candidates, key=lambda k: (k.full, k.source == "user", k.calibration.header.get("created", "")))
            return Choice(best.calibration.schedule,
                          note=f"{x}, {num_steps} steps: calibrated {best.name} ({best.source}; {best.full} full "
                               f"steps, {best.speedup:.2f}x)")
        if self.fitted:
            steps = sorted({k.num_steps for k in self.calibrated})
            return Choice(FULL_COMPUTE, switched_off=f"{x}: the fitted weights are for {steps} steps only, not "
                          f"{num_steps}; calibrate for {num_steps} steps (taylorseer calibrate --steps {num_steps})",
                          note=f"{x}, {num_steps} steps: no calibration, full compute")
        n = num_steps if num_steps is not None else ASSUMED_STEPS
        policy = adapted_interval(self.speedup, n, self.warmup_steps)
        if policy is None:
            return Choice(FULL_COMPUTE, switched_off=f"{x} needs at most {n / self.speedup:.1f} full steps of {n}, "
                          f"fewer than the warm-up's {self.warmup_steps} + 1",
                          note=f"{x}, {n} steps: out of reach, full compute")
        reason = too_few_steps(policy, num_steps)
        full, ratio = _ratio(policy, n)
        what = f"no calibration for {num_steps} steps" if self.calibrated else "uncalibrated"
        note = (f"{x}, {num_steps if num_steps is not None else f'unknown (planned for {n})'} steps: {what}: preset "
                f"{self.preset} adapted, fixed interval {policy.interval} after {policy.warmup_steps} warm-up steps "
                f"({full} full, {ratio:.2f}x)")
        return Choice(FULL_COMPUTE, switched_off=reason, note=note) if reason else Choice(policy, note=note)

    def describe(self) -> str:
        forecaster = type(self.forecaster).__name__
        order = getattr(self.forecaster, "max_order", None)
        what = f"{forecaster}{'' if order is None else f' O={order}'} on {self.granularity}"
        cals = ", ".join(f"{k.name} ({k.source}, {k.num_steps} steps)" for k in self.calibrated)
        known = f"calibrated: {cals}" if cals else f"uncalibrated: preset {self.preset} adapted"
        last = f"; last: {self.last}" if self.last else ""
        return f"speedup>={self.speedup:g} ({what}; {known}){last}"


def _pipeline_guidance(pipe: Any) -> float | None:
    """The running call's classifier-free guidance scale of a diffusers pipeline, None when it cannot be read.

    Most pipelines keep it in ``_guidance_scale``. FLUX-style pipelines whose transformer has no guidance embedding
    (``guidance_embeds=False``) run true CFG at ``true_cfg_scale``, which they do not keep; their
    ``_guidance_scale`` is the (unused) distilled-guidance value, so the scale is unknown there.
    """
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", None)
    if config is not None and getattr(config, "guidance_embeds", None) is False:
        return None
    value = getattr(pipe, "_guidance_scale", None)
    return None if value is None else float(value)


def check_speedup(speedup: Any) -> float:
    """``speedup`` as a float, or ``ValueError`` naming it: a finite number > 1 (FLOPs speedup)."""
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) \
            or speedup <= 1:
        raise ValueError(f"speedup must be a finite number > 1 (the FLOPs speedup to reach, e.g. 6), got {speedup!r}")
    return float(speedup)


def plan_speedup(model_or_pipe: Any, speedup: float, guidance_scale: float | None = None
                 ) -> tuple[Any, SpeedTarget, str]:
    """The config to install, its planner and the one log line, for ``apply(model_or_pipe, speedup=...)``.

    Example:
        >>> config, planner, line = plan_speedup(load_reference(), 6)   # doctest: +SKIP
    """
    speedup = check_speedup(speedup)
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale must be a finite number or None, got {guidance_scale!r}")
    pipeline = not isinstance(model_or_pipe, nn.Module)
    transformer = getattr(model_or_pipe, "transformer", None) if pipeline else model_or_pipe
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline with .transformer and .scheduler, "
                        f"got {type(model_or_pipe).__name__}")
    transformer = unwrap(transformer)
    preset = default_config(transformer)
    found, _ = find_calibrations(transformer, guidance_scale)
    reaching = [k for k in found if k.speedup >= speedup]
    if reaching:  # the family of the best one: the user's first, then the most full steps
        best = max(reaching, key=lambda k: (k.source == "user", k.full, k.calibration.header.get("created", "")))
        family = best.family()
    else:
        family = ("output", TaylorForecast(min(preset.max_order, 2), "divided"))
    guidance: Callable[[], float | None] | None = None
    if guidance_scale is not None:
        guidance = (lambda: float(guidance_scale))  # noqa: E731 - a constant
    elif pipeline:  # diffusers pipelines keep the running call's scale in _guidance_scale
        guidance = (lambda: _pipeline_guidance(model_or_pipe))  # noqa: E731
    planner = SpeedTarget(speedup, family, found, max(preset.warmup_steps, 1), preset.name, guidance)  # step 0 full
    first = planner._choose(ASSUMED_STEPS).policy  # what a 50-step generation runs: the config repr shows
    label = f"speedup>={speedup:g} " + (f"calibrated {', '.join(k.name for k in planner.calibrated)}"
                                        if planner.calibrated else f"uncalibrated, preset {preset.name} adapted")
    config = CacheConfig(first, family[1], Targets(granularity=family[0]), abscissa="step", name=label)
    assumed = ""
    if guidance_scale is None and not pipeline and any(k.guidance_scale is not None for k in planner.calibrated):
        scales = sorted({k.guidance_scale for k in planner.calibrated if k.guidance_scale is not None})
        assumed = f"; assumes guidance_scale {', '.join(f'{s:g}' for s in scales)} as calibrated (pass " \
                  f"guidance_scale= to apply to have it checked)"
    line = f"taylorseer: {type(transformer).__name__}: {planner.describe()}{assumed}"
    return config, planner, line
