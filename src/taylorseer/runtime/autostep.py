"""Steps read from the call itself, for loops that tell nothing (a pipeline given only its transformer, ComfyUI,
k-diffusion, a user's own loop).

A per-instance wrapper of the model's forward (so direct ``self.forward`` calls count too) reads the call's own
timestep argument (declared per family in the adapter
record, else found by name in the forward signature). A call with a new timestep value opens the next step; a
call with the same value as the previous call is the next CFG branch of that step; a value that moves back
towards the start of the schedule (against the direction of the first two steps), or a step past a known
``num_steps``, starts a new generation. This reads what the caller says; it counts no calls. Each call opens
and closes its own (step, branch) in the handle, so the engine's state is never left open between calls.

Told steps keep priority: inside ``handle.step`` (or under a pipeline handle) this hook does nothing, and a call
without a told step in the middle of a told generation is refused.

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


def _value(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        value = value.flatten()[0].item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class CallSteps:
    """Opens and closes the handle's steps from each model call's timestep (see the module docstring)."""

    def __init__(self, handle: Any, argument: tuple[str, int | None] | None):
        self.handle = handle
        self.argument = argument
        self.enabled = True
        self.saved: tuple | None = None
        self._reset()
        self._warned = False

    def _reset(self) -> None:
        self.index = -1
        self.branch = 0
        self.values: list[float] = []  # the timestep of each step of this generation
        self.direction = 0.0
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

    @torch.compiler.disable
    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        handle = self.handle
        if not self.enabled or handle.engine.active:
            return  # told steps (a handle.step context, a pipeline handle) have priority
        if handle.told_generation_open():
            raise RuntimeError("the model was called without a told step in the middle of a generation whose steps "
                               "are told (handle.step): tell every step of a generation, or none")
        t = self._timestep(args, kwargs)
        if t is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"taylorseer cannot read the step from this call of {type(module).__name__}: no "
                              f"timestep argument found; the call runs at full compute. Tell the steps with "
                              f"handle.step(i, t) or pass the timestep as {TIMESTEP_NAMES[0]}=...", stacklevel=3)
            return
        if not math.isfinite(t):
            raise ValueError(f"the call's timestep must be finite, got {t}")
        num_steps = handle.told_num_steps()
        if self.values and t == self.values[-1]:
            self.branch += 1  # the same timestep again: the next CFG branch of this step
        else:
            restart = not self.values or (num_steps is not None and self.index + 1 >= num_steps)
            if len(self.values) >= 2 and self.direction and (t - self.values[-1]) * self.direction < 0:
                restart = True  # back towards the start of the schedule: a new generation
            if restart:
                self._reset()
                handle.begin_auto(num_steps)
            if len(self.values) == 1:
                self.direction = t - self.values[0]
            self.values.append(t)
            self.index += 1
            self.branch = 0
        handle.open_auto(self.index, t, self.branch)
        self.open = True

    @torch.compiler.disable
    def after(self) -> None:
        if self.open:
            self.open = False
            self.handle.close_auto()

    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        if self.argument is None:
            return None
        name, position = self.argument
        if name in kwargs:
            return _value(kwargs[name])
        if position is not None and position < len(args):
            return _value(args[position])
        return None


class RootForward:
    """The model's forward while a handle reads steps from its calls: ``before``, the forward, ``after``."""

    __slots__ = ("steps", "original", "module")

    def __init__(self, steps: CallSteps, original: Any, module: nn.Module):
        self.steps, self.original, self.module = steps, original, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.steps.saved is None:  # detached but left inside another wrapper's chain
            return self.original(*args, **kwargs)
        self.steps.before(self.module, args, kwargs)
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
