"""Steps read from the call itself, for loops that tell nothing (a pipeline given only its transformer, ComfyUI,
k-diffusion, a user's own loop).

A per-instance wrapper of the model's forward (so direct ``self.forward`` calls count too) reads the call's own
timestep argument (declared per family in the adapter record, else found by name in the forward signature). This
reads what the caller says; it counts no calls. Each call opens and closes its own (step, branch) in the handle, so
the engine's state is never left open between calls. The rule:

* A call whose timestep equals the previous call's (all rows of a per-sample timestep) is the next CFG branch of
  that step; at most ``MAX_BRANCHES`` (8) per step: further calls with the same timestep run in full and keep no
  factors (one warning), so a timestep that never moves cannot grow the cache.
* A call with another timestep opens the next step, unless it starts a new generation: a step past a known
  ``num_steps``; a timestep that moves back towards the start of the schedule (against the direction of the first
  two steps); a timestep jump more than ``JUMP`` (4) times the largest spacing of the generation so far (a
  scheduler's spacing grows at most 2.5x per step, measured on diffusers' DDIM, Euler, DPM++ (Karras) and
  flow-matching schedules at 4 to 50 steps); latents (the first tensor argument) of another shape or device; or,
  from the third step on, latents that changed more than ``CHANGE`` (3) times the relative change between the
  previous two steps (another noise or another image: on the embedded model a continuation's per-step change grows
  at most 1.75x from one step to the next, measured at 3 to 100 steps and guidance 1 to 8; a new generation's
  change is 12x to 37x the per-step change at 50 steps).
* What the inputs cannot show is not guessed: after a generation cut off at its first or second step (no per-step
  change to compare with yet), a new one within the timestep rule reads as its continuation, and a new one whose
  first timestep equals the last one seen reads as a CFG branch. A front end that cancels says so with
  ``handle.cancel()`` (or ``handle.begin()``): the next call then starts a new generation.

Told steps keep priority: inside ``handle.step`` (or under a pipeline handle) this hook reads no step, and a call
without a told step in the middle of a told generation is refused. On every path the calls of step 0 are shown to a
calibrated forecaster (``Calibration.check_call``: its row layout), before any forecast.

Example:
    >>> handle = taylorseer.apply(model, config)        # doctest: +SKIP
    >>> for t in timesteps:                              # doctest: +SKIP
    ...     eps = model(x, timestep=t)                   # steps read from timestep
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn

_is_dynamo_compiling = torch.compiler.is_dynamo_compiling  # what install.Forward reads: see there
_compiler = torch.compiler
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time")


def timestep_argument(model: nn.Module, declared: str | None) -> tuple[str, int | None] | None:
    """(name, positional index or None) of the forward argument that carries the timestep, None if not found."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in parameters]
    for name in ((declared,) if declared else TIMESTEP_NAMES):
        if name in names:
            position = names.index(name)
            positional = parameters[position].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)
            return name, position if positional else None
    return None


def _value(value: Any) -> tuple[float, tuple[float, ...]] | None:
    """(the step's timestep, the whole timestep as a key) of a call's timestep argument; None if it holds none.

    A per-sample timestep (one value per batch row) is the step's timestep when all rows agree; rows that differ
    (a clean context sample beside a noisy one, diffusion-forcing style) give their mean, and the key is all of
    them, so a call whose rows moved on is a new step even when its first row did not."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        if value.is_complex():
            return None
        flat = value.detach().flatten()
        values = tuple(float(v) for v in (flat.tolist() if flat.numel() <= MAX_KEY else flat[:MAX_KEY].tolist()))
        if flat.numel() > MAX_KEY:  # a long per-token timestep: its first rows and its sum identify it
            values += (float(flat.double().sum()),)
        first = values[0]
        if all(v == first for v in values):
            return first, (first,)
        return math.fsum(values) / len(values), values
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), (float(value),)
    return None


MAX_KEY = 4096  # timestep values kept per call to tell steps apart
MAX_BRANCHES = 8  # calls with one timestep that count as CFG branches of one step; more are computed in full
JUMP = 4.0  # a timestep step this many times the largest spacing of the generation so far: a new generation
CHANGE = 3.0  # a latent change this many times the previous step's: a new generation


def first_tensor(args: tuple, kwargs: dict, skip: Any = None) -> torch.Tensor | None:
    """The call's first tensor argument (positional first, then keyword in call order), other than ``skip``
    (the timestep): the latents, for every registered family."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value is not skip:
            return value
    return None


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new - old|| / ||old|| in float32 (inf when ``old`` is zero and ``new`` is not)."""
    a, b = new.detach().float(), old.float()
    denominator = float(b.norm())
    difference = float((a - b).norm())
    return difference / denominator if denominator > 0 else (math.inf if difference > 0 else 0.0)


class CallSteps:
    """Opens and closes the handle's steps from each model call's timestep (see the module docstring)."""

    def __init__(self, handle: Any, argument: tuple[str, int | None] | None):
        self.handle = handle
        self.argument = argument
        self.enabled = True
        self.saved: tuple | None = None
        self._reset()
        self._warned = False
        self._warned_branches = False
        self._calls_at_first = 0  # model calls seen at step 0 of the generation (the layout check)
        self.fresh = True  # nothing seen since the last restart: a restart changes nothing (told steps skip it)

    def _reset(self) -> None:
        self.index = -1
        self.branch = 0
        self.values: list[float] = []  # the timestep of each step of this generation
        self.key: tuple[float, ...] | None = None  # the whole timestep of the latest step
        self.direction = 0.0
        self.spacing = 0.0  # the largest |timestep change| between two steps of this generation
        self.latent: torch.Tensor | None = None  # the first call's latents at the latest step
        self.change = 0.0  # the relative latent change between the last two steps of this generation
        self.changes = 0  # how many such changes were measured
        self.open = False

    def attach(self, model: nn.Module) -> None:
        """Wrap the model's forward (per instance): direct ``self.forward`` calls are seen too."""
        # Under accelerate's offload hook (diffusers' enable_model_cpu_offload) the hook's forward calls
        # module._old_forward, and diffusers re-attaches the hook after every pipeline call: wrap _old_forward.
        slot = "_old_forward" if hasattr(model, "_hf_hook") and "_old_forward" in model.__dict__ else "forward"
        self.saved = (model, slot, slot in model.__dict__, model.__dict__.get(slot))
        setattr(model, slot, RootForward(self, getattr(model, slot), model))

    def detach(self) -> None:
        if self.saved is None:
            return
        model, slot, had_own, value = self.saved
        for name in (slot, "forward", "_old_forward"):  # a hook attached or re-attached since: find ours
            mine = model.__dict__.get(name)
            if isinstance(mine, RootForward) and mine.steps is self:
                if name == slot and had_own or name != slot:
                    setattr(model, name, value if name == slot else mine.original)
                else:
                    model.__dict__.pop(name, None)
        self.saved = None

    def restart(self) -> None:
        """Told steps (``handle.begin`` / ``handle.step``) took over: the next untold call starts afresh."""
        self._reset()
        self._calls_at_first = 0
        self.fresh = True

    @torch.compiler.disable
    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        handle = self.handle
        self.fresh = False
        if handle.engine.active:  # told steps (a handle.step context, a pipeline handle) have priority
            if handle.engine.controller.index == 0:
                self._check_layout(args, kwargs)
            return
        if not self.enabled:
            return
        if handle.told_generation_open():
            raise RuntimeError("the model was called without a told step in the middle of a generation whose steps "
                               "are told (handle.step): tell every step of a generation, or none")
        read = self._timestep(args, kwargs)
        if read is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"taylorseer cannot read the step from this call of {type(module).__name__}: no "
                              f"timestep argument found; the call runs at full compute. Tell the steps with "
                              f"handle.step(i, t) or pass the timestep as {TIMESTEP_NAMES[0]}=...", stacklevel=3)
            return
        t, key = read
        if not math.isfinite(t):
            raise ValueError(f"the call's timestep must be finite, got {t}")
        num_steps = handle.told_num_steps()
        latent = first_tensor(args, kwargs, skip=self._argument_value(args, kwargs))
        if self.values and key == self.key:
            self.branch += 1  # the same timestep again: the next CFG branch of this step
            if self.branch >= MAX_BRANCHES:  # never opened: runs in full, records nothing
                self._too_many_branches(t)
                return
        else:
            restart = not self.values or (num_steps is not None and self.index + 1 >= num_steps)
            if not restart and self._new_generation(t, latent):
                restart = True
            if restart:
                self._reset()
                self._calls_at_first = 0
                handle.begin_auto(num_steps)
            if self.values:
                self.spacing = max(self.spacing, abs(t - self.values[-1]))
            if len(self.values) == 1:
                self.direction = t - self.values[0]
            self.values.append(t)
            self.key = key
            self.latent = None if latent is None else latent.detach().clone()
            self.index += 1
            self.branch = 0
        if self.index == 0:
            self._check_layout(args, kwargs)
        handle.open_auto(self.index, t, self.branch)
        self.open = True

    def _new_generation(self, t: float, latent: torch.Tensor | None) -> bool:
        """Whether a call at a new timestep ``t`` with ``latent`` starts a new generation instead of continuing
        this one (docs/reliability.md, "Steps read from the call"): its timestep moves back towards the start (against
        the direction of the first two steps); it jumps more than ``JUMP`` times the largest spacing of the
        generation so far; its latents change shape; or, after two steps, they change more than ``CHANGE`` times
        the relative change between the previous two steps (another noise, another image)."""
        previous = self.values[-1]
        if len(self.values) >= 2 and self.direction and (t - previous) * self.direction < 0:
            return True
        if self.spacing > 0 and abs(t - previous) > JUMP * self.spacing:
            return True
        if latent is None or self.latent is None:
            return False
        if latent.shape != self.latent.shape or latent.device != self.latent.device:
            return True
        change = relative_change(latent, self.latent)
        if self.changes >= 1 and change > CHANGE * self.change:
            return True
        self.change, self.changes = change, self.changes + 1
        return False

    def _too_many_branches(self, t: float) -> None:
        if not self._warned_branches:
            self._warned_branches = True
            warnings.warn(f"taylorseer: more than {MAX_BRANCHES} model calls at timestep {t:g} in a row, each read as "
                          f"one more CFG branch of one step (a timestep that does not move, e.g. a per-sample "
                          f"timestep whose rows all stay): the calls beyond {MAX_BRANCHES} run in full and keep no "
                          f"factors. Tell the steps with handle.step(i, t), or pass a timestep that moves",
                          RuntimeWarning, stacklevel=4)

    def _check_layout(self, args: tuple, kwargs: dict) -> None:
        """Step 0 of a generation, before any forecast: a calibrated forecaster checks the call's row layout."""
        calibration = getattr(self.handle.engine.forecaster, "calibration", None)
        call, self._calls_at_first = self._calls_at_first, self._calls_at_first + 1
        if calibration is None or calibration.row_groups == 1:
            return
        x = first_tensor(args, kwargs, skip=self._argument_value(args, kwargs))
        rows = None if x is None or x.dim() == 0 else int(x.shape[0])
        equal = None
        if x is not None and rows is not None and rows % 2 == 0:
            equal = bool(torch.equal(x[: rows // 2], x[rows // 2:]))
        calibration.check_call(rows, equal, call)

    @torch.compiler.disable
    def after(self) -> None:
        if self.open:
            self.open = False
            self.handle.close_auto()

    def _argument_value(self, args: tuple, kwargs: dict) -> Any:
        if self.argument is None:
            return None
        name, position = self.argument
        if name in kwargs:
            return kwargs[name]
        if position is not None and position < len(args):
            return args[position]
        return None

    def _timestep(self, args: tuple, kwargs: dict) -> tuple[float, tuple[float, ...]] | None:
        value = self._argument_value(args, kwargs)
        return None if value is None else _value(value)


class RootForward:
    """The model's forward while a handle reads steps from its calls: ``before``, the forward, ``after``."""

    __slots__ = ("steps", "original", "module")

    def __init__(self, steps: CallSteps, original: Any, module: nn.Module):
        self.steps, self.original, self.module = steps, original, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        steps = self.steps
        if steps.saved is None:  # detached but left inside another wrapper's chain
            return self.original(*args, **kwargs)
        if not (_is_dynamo_compiling() or _compiler._is_compiling_flag):  # eager (nothing read while traced)
            engine = steps.handle.engine
            if engine.active and not steps.open and engine.controller.index != 0:
                # Inside a told step past step 0 (no layout to check) that no call of ours opened: ``before`` and
                # ``after`` would do nothing; skipped, as two ``torch.compiler.disable``d calls cost ~1 us.
                return self.original(*args, **kwargs)
        steps.before(self.module, args, kwargs)
        try:
            return self.original(*args, **kwargs)
        finally:
            self.steps.after()

    def __deepcopy__(self, memo: dict) -> Any:
        import copy

        return copy.deepcopy(self.original, memo)  # a copy of the model is a plain model (see install.Forward)

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle a model with taylorseer applied: call handle.remove() first, or save "
                        "model.state_dict()")
