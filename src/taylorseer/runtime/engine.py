"""The engine: what a wrapper calls. Host-side bookkeeping, kept out of compiled graphs.

A wrapper's hot path (``install.Forward``) reads one plain boolean, ``engine.forecasting``, and calls one of the
entry points below. Each entry point is ``torch.compiler.disable``d: under ``torch.compile`` (regional or whole
model) the graph breaks around it, the module's own computation stays compiled, and dynamo guards only on that
boolean, so a compiled block has at most two variants (compute, forecast) whatever the step, branch or state.

Branches are numbered where the targets see the calls: when the first target called in a step is called again,
the next model call (CFG branch) has begun. So a model whose CFG wrapper calls ``self.forward`` directly (DiT's
``forward_with_cfg``) still gets one branch per call.

Example:
    >>> engine = Engine(parts_of(TaylorSeerConfig(interval=2)), slots=[])   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.registry import Target
from ..forecast.base import build_forecaster
from .observers import FlopObserver, StatsObserver, relative_l2
from .probe import Probes
from .state import FactorStore, describe_leaves, flatten, input_shapes, residual_leaves, unflatten
from .step import StepController

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(eq=False)
class Slot:
    """One installed wrapper: its target, its block group, and whether it calls ``engine.enter`` first."""

    index: int
    target: Target
    block: int = -1  # index of the block group (probes compute the first groups), -1 for none
    enters: bool = False  # calls engine.enter before reading the flag (first target, end of the probe group)
    probe: bool = False  # in the probe group of an adaptive policy
    names: list[str] = field(default_factory=list)  # forward argument names (residual targets)
    module: nn.Module | None = None  # the block (shortcut targets)
    shortcut: Any = None
    saved_flops: Any = None  # the shortcut's own skipped matmul FLOPs (FLOP counting only)

    @property
    def path(self) -> str:
        return self.target.path

    @property
    def mode(self) -> str:
        return self.target.mode


class Engine:
    """State, decisions and observers of one handle, behind the wrappers' entry points."""

    def __init__(self, parts: Any, slots: list[Slot]):
        self.parts = parts
        self.slots = slots
        self.forecaster = build_forecaster(parts.forecaster)
        dtype = parts.store.factor_dtype
        self.store = FactorStore(self.forecaster, _DTYPES[dtype] if dtype else None)
        self.controller = StepController(parts.policy)
        self.observer = StatsObserver()
        self.flops: FlopObserver | None = None
        self.counting = False  # read by wrappers: start a FLOP count before the original runs
        self.forecasting = False  # THE flag the wrappers read
        self.active = False  # inside a told step
        self.removed = False  # the handle was removed: any wrapper still called passes straight through
        self.measure: set[str] = set()  # target paths whose forecast error is measured (handle.probe)
        self.last_forecast: int | None = None  # no factor is read after this step: record nothing, free all
        self._zeros: dict[tuple, tuple] = {}  # skip targets: (spec, shapes) of the last computed output
        self.probes = Probes()
        self._seen: set[int] = set()
        self._first: Slot | None = None
        self._entered: Slot | None = None
        self._fallbacks = 0
        self._warned: set[str] = set()
        self._nonfinite: set[tuple] = set()
        self._recorded: dict[tuple, int | None] = {}  # the step of each (branch, target)'s latest record

    # ---------------------------------------------------------------------------------------------------
    # host: generation and steps
    # ---------------------------------------------------------------------------------------------------
    def begin(self, num_steps: int | None) -> None:
        self.controller.begin(num_steps)
        plan = self.controller.plan(num_steps) if num_steps is not None else None
        forecasts = [i for i, full in enumerate(plan or []) if not full]
        self.last_forecast = forecasts[-1] if forecasts else (-1 if plan is not None else None)
        self.clear()
        self.store.peak_nbytes = 0  # stats.peak_cache_bytes is this generation's
        self.observer.reset()

    def clear(self) -> None:
        self.store.clear()
        self._recorded.clear()
        self._zeros.clear()
        self.probes.clear()
        self.observer.on_bytes(0, 0)

    def open(self, index: int, point: float, branch: Any) -> None:
        if branch is None and index == self.controller.last_index:
            raise ValueError(f"step {index} was told twice (a second handle.step({index}) context) with automatic "
                             f"branches: put all model calls of a step in one handle.step context, where they are "
                             f"numbered as branches 0, 1, ..., or name each call's branch (handle.step(i, branch=...))")
        self.active = True
        self._seen, self._first, self._entered = set(), None, None
        self.controller.open(index, point, branch)
        self._start()

    def _start(self) -> None:
        self.probes.reset()
        self._fallbacks = 0
        self.forecasting = self.controller.forecasting

    def close(self) -> None:
        """The open step ends (its last branch closes)."""
        self._close_branch()
        index, num_steps, branch = self.controller.index, self.controller.num_steps, self.controller.branch
        self.controller.end_step()
        self.active = self.forecasting = False
        if num_steps is not None and index == num_steps - 1:
            if self.controller.auto_branch:
                self.clear()  # the generation is over: nothing will read the factors again
            else:
                self.free_branch(branch)  # a named branch's last step: nothing reads its factors again

    def free_branch(self, branch: Any) -> None:
        """Drop the factors, zeros and probe outputs of one branch."""
        for table in (self.store.entries, self._zeros, self.probes.previous):
            for key in [k for k in table if k[0] == branch]:
                if table is self.store.entries:
                    self.store.drop(key)
                else:
                    del table[key]
        self.observer.on_bytes(self.store.nbytes, self.store.peak_nbytes)

    def _close_branch(self) -> None:
        record = self.controller.close(self._fallbacks > 0)
        if record is not None:
            first = not any(d["step"] == record["step"] for d in self.observer.stats.decisions)
            self.observer.on_decision(record, first_branch=first)

    # ---------------------------------------------------------------------------------------------------
    # entry points (eager even under torch.compile)
    # ---------------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def enter(self, slot: Slot) -> None:
        """Called by a slot with ``enters`` before it reads the flag: a new branch, or the end of the probe."""
        if not self.active:
            return
        self._touch(slot, entering=True)
        if self.controller.probing and not slot.probe:
            self._resolve()

    @torch.compiler.disable
    def computed(self, slot: Slot, args: tuple, kwargs: dict, output: Any) -> Any:
        """After a target ran its original forward: record what the forecaster needs. Returns ``output``."""
        if not self.active or slot.mode == "shortcut":
            return output
        self._touch(slot)
        return self._computed(slot, args, kwargs, output)

    def _computed(self, slot: Slot, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.controller.probing and not slot.probe:
            self._resolve()
        key = (self.controller.branch, slot.path)
        if self.flops is not None:
            self.flops.computed(slot.path)
        self.observer.on_computed(slot.path)
        leaves, spec = flatten(output)
        if slot.mode == "skip":
            self._zeros[key] = (spec, [(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x
                                       for x in leaves], input_shapes(args, kwargs))
            return output
        if key not in self.store:
            describe_leaves(slot.path, leaves)
        if slot.mode == "residual":
            leaves = self._residuals(slot, args, kwargs, leaves, subtract=True)
        shape = input_shapes(args, kwargs)
        if self.controller.probing:
            self.probes.observe(self.store, self.controller.point, slot, key, leaves, spec, shape)
        else:
            self._record(slot, key, leaves, spec, shape)
            if slot.probe:  # the next probe's change is measured from here
                self.probes.remember(key, leaves)
        return output

    @torch.compiler.disable
    def forecast(self, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        """Instead of a target's forward on a forecast step (falls back to it where a forecast would be wrong)."""
        if slot.mode == "shortcut":
            return self._shortcut(slot, original, args, kwargs)
        self._touch(slot)
        key = (self.controller.branch, slot.path)
        if slot.mode == "skip":
            if key not in self._zeros or self.measure:
                return self._fallback(slot, original, args, kwargs, "no-factors")
            spec, shapes, inputs = self._zeros[key]
            if inputs != input_shapes(args, kwargs):  # zeros shaped for other inputs: compute in full
                return self._fallback(slot, original, args, kwargs, "shape")
            self.observer.on_forecast(slot.path)
            self._skipped(slot.path)
            return unflatten([torch.zeros(x[0], dtype=x[1], device=x[2]) if isinstance(x, tuple) else x
                              for x in shapes], spec)
        entry = self.store.entries.get(key)
        if entry is None:
            reason = "non-finite" if key in self._nonfinite else "no-factors"
            return self._fallback(slot, original, args, kwargs, reason)
        if entry.shape != input_shapes(args, kwargs):
            self.store.drop(key)  # re-anchor: compute in full and start the factors again
            return self._fallback(slot, original, args, kwargs, "shape")
        predicted = self.store.predict(key, self.controller.point)
        if slot.mode == "residual":
            predicted = self._residuals(slot, args, kwargs, predicted, subtract=False)
        if slot.path in self.measure:
            self._measure(slot, predicted, original(*args, **kwargs))
        self.observer.on_forecast(slot.path)
        self._skipped(slot.path)
        return self.store.assemble(key, predicted)

    @torch.compiler.disable
    def flop_start(self, slot: Slot) -> None:
        if self.flops is not None and self.active:
            self.flops.start(slot.path)

    # ---------------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------------
    def _touch(self, slot: Slot, entering: bool = False) -> None:
        """Number branches where the targets see the calls; refuse a target run twice within one call."""
        if not entering and self._entered is slot:  # the call that just entered: already counted
            self._entered = None
            return
        self._entered = slot if entering else None
        if slot.index in self._seen:
            c = self.controller
            if slot is not self._first or not c.auto_branch:
                where = f"step {c.index} of branch {c.branch!r}"
                if slot is self._first:
                    raise ValueError(f"target {slot.path!r} was computed twice in {where}: each model call of a step "
                                     f"needs its own branch (handle.step(..., branch=...)), or leave branch=None to "
                                     f"number the calls automatically")
                raise ValueError(f"target {slot.path!r} ran twice within one model call ({where}) before the first "
                                 f"target ran again: a module used several times per forward cannot be forecast; "
                                 f"leave it out of modules=...")
            self._close_branch()
            c.next_branch()
            self._start()
            self._seen = set()
        if not self._seen:
            # The slot called first opens every later branch: it must ask before reading the flag. The statically
            # chosen one (first in model order) is right for every registered adapter; a model that calls its
            # targets in another order gets this slot added (once; under compile, one recompile of it).
            slot.enters = True
            self._first = slot
        self._seen.add(slot.index)

    def _record(self, slot: Slot, key: tuple, leaves: list, spec: Any, shape: tuple) -> None:
        c = self.controller
        if self.last_forecast is not None and c.index is not None and c.index >= self.last_forecast:
            if self.store.entries:
                self.clear()
            return
        keep = c.index is None or c.index >= self.forecaster.history_from_step
        try:
            self.store.record(key, leaves, spec, point=c.point, keep_history=keep, shape=shape)
        except ValueError as error:
            if "repeats the latest computed abscissa" not in str(error):
                raise
            if self._recorded.get(key) == c.index:
                raise ValueError(f"target {slot.path!r} was computed twice in step {c.index} of branch {c.branch!r} "
                                 f"(two handle.step contexts for one step and branch): each model call of a step "
                                 f"needs its own branch (handle.step(..., branch=...))") from None
            kind = self.parts.abscissa
            raise ValueError(f"target {slot.path!r}: step {c.index} has the same {kind} ({c.point}) as the previous "
                             f"computed step of branch {c.branch!r}; the sampler evaluates the model twice at one "
                             f"{kind} (Heun or DPM2-type schedulers repeat timesteps): use abscissa='step'") from None
        self._recorded[key] = c.index
        if not self.store.finite(key):
            self.store.drop(key)
            self._nonfinite.add(key)
            self._warn_once("non-finite", f"target {slot.path!r} has non-finite factors at step {c.index} (a NaN or an "
                                          f"overflow, e.g. features above 65504 with factor_dtype='float16'): its "
                                          f"forecast steps are computed in full (stats.fallbacks['non-finite'])")
        else:
            self._nonfinite.discard(key)
        self.observer.on_bytes(self.store.nbytes, self.store.peak_nbytes)

    def _fallback(self, slot: Slot, original: Any, args: tuple, kwargs: dict, reason: str) -> Any:
        self.observer.on_fallback(reason)
        self._fallbacks += 1
        if self.flops is not None:
            self.flops.start(slot.path)
        return self._computed(slot, args, kwargs, original(*args, **kwargs))

    def _skipped(self, path: str) -> None:
        if self.flops is not None:
            self.flops.skipped(path)

    def _residuals(self, slot: Slot, args: tuple, kwargs: dict, leaves: list, subtract: bool) -> list:
        constants = None if subtract else self.store.entries[(self.controller.branch, slot.path)].constants
        return residual_leaves(slot.path, slot.target.inputs, slot.names, args, kwargs, leaves, constants)

    def _shortcut(self, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        branch = self.controller.branch
        keys = [(branch, f"{slot.path}.{child}") for child in slot.target.inputs]
        entries = [self.store.entries.get(k) for k in keys]
        first = input_shapes(args, kwargs)[:1]  # the block's hidden states: what its children take (see shortcuts)
        if self.measure or any(e is None or e.shape[:1] != first for e in entries):
            return original(*args, **kwargs)  # the children decide for themselves (fallbacks included)
        forecasts = {}
        for child, key in zip(slot.target.inputs, keys):
            forecasts[child] = self.store.assemble(key, self.store.predict(key, self.controller.point))
            self.observer.on_forecast(key[1])
            self._skipped(key[1])
        if self.flops is not None and slot.saved_flops is not None:
            stats = self.observer.stats
            stats.flops_skipped = (stats.flops_skipped or 0) + slot.saved_flops(slot.module, *args, **kwargs)
        return slot.shortcut(slot.module, forecasts, *args, **kwargs)

    def _resolve(self) -> None:
        error, change = self.probes.observation()
        if not self.probes.ready:
            decision = self.controller.decision
            assert decision is not None, "a probing step resolves after its branch opened with a decision"
            self.controller.probing = False
            self.controller.decision = type(decision)(True, reason="no-factors")
            compute = True
        else:
            compute = self.controller.resolve(error, change)
        if compute:
            for slot, key, leaves, spec, shape in self.probes.pending:
                self._record(slot, key, leaves, spec, shape)
        self.probes.pending = []
        self.forecasting = self.controller.forecasting

    def _measure(self, slot: Slot, predicted: list, true_output: Any) -> None:
        true = [x for x in flatten(true_output)[0] if isinstance(x, torch.Tensor)]
        self.observer.on_probe(slot.path, self.controller.index, relative_l2(predicted, true))

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
