"""The engine: what a wrapper calls. Host-side bookkeeping, decisions taken at step and branch boundaries.

The hot path, per target call on a forecast step (``install.Forward``): read the plain flags, take the target's
forecast from the step's batched pass, return it. The pass runs once per (step, branch), at the first forecast
call: ``forecast.base.predict_batch`` evaluates every target's forecast with one ``torch._foreach_*`` call per
term, so its tensor ops grow with the order, not with the number of targets. Under ``torch.compile`` the wrapper
evaluates the forecast inside the graph instead (``targets.*.traced``) from factors and a weight tensor bound at the
branch's start, so a compiled block takes no graph break on forecast steps and its math is fused with the block's.

Nothing in a generation reads a device tensor on the host except where a decision needs the value: the factors'
finiteness (``state.FiniteChecks``, one batched read per full step, at the next branch's start) and a probe
policy's observation (one read per probe step). ``host_reads`` counts those reads.

Branches are numbered where the targets see the calls: when the slot that opened the branch is called again, the
next model call (CFG branch) has begun. So a model whose CFG wrapper calls ``self.forward`` directly (DiT's
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
from ..devices import torch_dtype
from ..forecast.base import BatchPlan, build_forecaster
from .observers import FlopObserver, StatsObserver, relative_l2
from .probe import Probes
from .state import (
    FactorStore,
    FiniteChecks,
    StaticFactors,
    describe_leaves,
    flatten,
    input_shapes,
    read_host,
    residual_leaves,
)
from .step import StepController
from .targets import KINDS, bind_traced


@dataclass(eq=False)
class Slot:
    """One installed wrapper: its target, kind, block group and the state bound for the open branch."""

    index: int
    target: Target
    block: int = -1  # index of the block group (probes compute the first groups), -1 for none
    enters: bool = False  # opens branches or ends the probe group (set by build_slots)
    probe: bool = False  # in the probe group of an adaptive policy
    names: list[str] = field(default_factory=list)  # forward argument names (residual targets)
    module: nn.Module | None = None  # the block (shortcut targets)
    shortcut: Any = None
    saved_flops: Any = None  # the shortcut's own skipped matmul FLOPs (FLOP counting only)
    kind: Any = None  # targets.KINDS[mode]
    opens: bool = False  # the slot called first in a model call: calling it again starts the next branch
    resolves: bool = False  # the first slot after the probe group: a probe decision resolves before it
    children: list = field(default_factory=list)  # shortcut: the slots of the children it consumes
    seen: int = -1  # the engine's call_id when this slot last ran (a target run twice in one model call)
    entry: Any = None  # the factors of the open branch (bound at its start when it forecasts)
    live: bool = False  # forecast inside a traced graph (bound factors, weights, nothing to check on the host)
    weights: Any = None  # 1-D tensor: the forecast is sum_i weights[i] * factor_i (traced graphs)
    fast: Any = None  # output kind, one tensor out: the recorded input shape its ready forecast is handed out for
    path: str = field(init=False)  # the target's (plain attributes: read on every call)
    mode: str = field(init=False)
    forecast: Any = field(init=False)  # the kind's eager forecast

    def __post_init__(self) -> None:
        self.path, self.mode = self.target.path, self.target.mode
        self.kind = KINDS[self.mode]
        self.forecast = self.kind.forecast


class Engine:
    """State, decisions and observers of one handle, behind the wrappers' entry points."""

    def __init__(self, parts: Any, slots: list[Slot]):
        self.parts = parts
        self.forecaster = build_forecaster(parts.forecaster)
        dtype = parts.store.factor_dtype
        self.store = FactorStore(self.forecaster, torch_dtype(dtype) if dtype else None)
        self.cast = dtype is not None  # forecasts are cast back to the dtypes the targets returned
        self.controller = StepController(parts.policy)
        self.observer = StatsObserver()
        self.flops: FlopObserver | None = None
        self.counting = False  # read by wrappers: start a FLOP count before the original runs
        self.forecasting = False  # THE flag the wrappers read
        self.hot = False  # eager forecasting branch, batched pass done, nothing measured: the wrappers' fast path
        self.active = False  # inside a told step
        self.removed = False  # the handle was removed: any wrapper still called passes straight through
        self.branch_open = False  # the opening slot of the current model call has run
        self.compiled = False  # a wrapper ran inside a traced graph: bind weight tensors for traced forecasts
        self.measure: set[str] = set()  # target paths whose forecast error is measured (handle.probe)
        self.last_forecast: int | None = None  # no factor is read after this step: record nothing, free all
        self.zeros: dict[tuple, tuple] = {}  # skip targets: (spec, shapes) of the last computed output
        self.probes = Probes()
        self.checks = FiniteChecks()
        self.nonfinite: set[tuple] = set()
        self.ready: dict[int, list] = {}  # slot index -> forecast tensors of the open branch (the batched pass)
        self.forecast_hits: list[str] = []  # paths forecast in the open branch (observers fed at its close)
        self.computed_hits: list[str] = []
        self.call_id = 0  # one per (step, branch)
        self.host_reads = 0  # device values read on the host (finiteness, probe observations)
        self._prepared = -1  # the call_id whose batched pass ran
        self._plan: tuple = (None, [], None)
        self._plan_key: tuple | None = None
        self._bound: tuple | None = None  # (store version, branch) of the entries bound to the slots (eager)
        self._probe_policy = self.controller.probe_blocks > 0
        self._bytes_told = -1  # the store version whose bytes the observer was last told
        self.static = StaticFactors()  # factor buffers at fixed addresses for traced forecasts (CUDA graphs)
        self.static_factors: bool | None = None  # use them: None = on CUDA, True / False = always / never
        self.traced_weights = getattr(self.forecaster, "traced_weights", None) or getattr(self.forecaster, "weights",
                                                                                      None)
        self._first: Slot | None = None
        self._fallbacks = 0
        self._warned: set[str] = set()
        self._recorded: dict[tuple, int | None] = {}  # the step of each (branch, target)'s latest record
        self._slots: list[Slot] = []
        self.slots = slots

    @property
    def slots(self) -> list[Slot]:
        return self._slots

    @slots.setter
    def slots(self, slots: list[Slot]) -> None:
        self._slots = slots
        by_path = {s.path: s for s in slots}
        for s in slots:
            s.opens = s is slots[0]
            s.resolves = s.enters and not s.opens
            if s.mode == "shortcut":
                s.children = [by_path[f"{s.path}.{child}"] for child in s.target.inputs
                              if f"{s.path}.{child}" in by_path]
        self.forecast_slots = [s for s in slots if s.kind.forecasts]

    # ---------------------------------------------------------------------------------------------------
    # host: generation and steps
    # ---------------------------------------------------------------------------------------------------
    def begin(self, num_steps: int | None) -> None:
        self.controller.begin(num_steps)
        plan = self.controller.plan(num_steps) if num_steps is not None else None
        forecasts = [i for i, full in enumerate(plan or []) if not full]
        self.last_forecast = forecasts[-1] if forecasts else (-1 if plan is not None else None)
        self.clear(keep_static=True)
        self.store.peak_nbytes = 0  # stats.peak_cache_bytes is this generation's
        self.observer.reset()
        self._bytes_told = -1

    def clear(self, keep_static: bool = False) -> None:
        """Drop every factor; the static buffers too unless ``keep_static`` (between generations)."""
        if not keep_static:
            self.static.release()
        self.store.clear()
        self.checks.clear()
        self._recorded.clear()
        self.zeros.clear()
        self.probes.clear()
        self.ready = {}
        self.hot = False
        self._plan, self._plan_key = (None, [], None), None  # the plan holds factor tensors: let them go
        for slot in self._slots:
            slot.entry, slot.live, slot.weights = None, False, None
        self._bound = None
        self.observer.on_bytes(0, 0)

    def open(self, index: int, point: float, branch: Any) -> None:
        if branch is None and index == self.controller.last_index:
            raise ValueError(f"step {index} was told twice (a second handle.step({index}) context) with automatic "
                             f"branches: put all model calls of a step in one handle.step context, where they are "
                             f"numbered as branches 0, 1, ..., or name each call's branch (handle.step(i, branch=...))")
        if self.removed:  # a removed handle's wrappers pass straight through because it is never active again
            raise RuntimeError("this taylorseer handle was removed; apply() again to get a new one")
        self.active = True
        self._first = None
        self.controller.open(index, point, branch)
        self._start()

    def _start(self) -> None:
        """A branch starts: settle what its decisions need (one host read at most), bind its forecasts."""
        if self._probe_policy:  # only a probing policy fills the probes
            self.probes.reset()
        self._fallbacks = 0
        self.call_id += 1
        self.branch_open = self.hot = False
        self.ready = {}
        self.forecast_hits, self.computed_hits = [], []
        checks, controller = self.checks, self.controller
        if (checks.pending or checks.launched) and checks.needed(controller.branch) and not controller.probing:
            self._settle(checks.read(self)[0])
        decision = controller.decision  # controller.forecasting, inline
        self.forecasting = forecasting = decision is not None and not decision.compute and not controller.probing
        if forecasting and (self.compiled or self._bound != (self.store.version, controller.branch)):
            self._bind()  # (eager, the same store version and branch: bound already)

    def close(self) -> None:
        """The open step ends (its last branch closes)."""
        self._close_branch()
        controller = self.controller
        index, num_steps, branch = controller.index, controller.num_steps, controller.branch
        controller.last_index, controller.index = index, None  # controller.end_step(), inline
        self.active = self.forecasting = self.hot = False
        if self.ready:
            self.ready = {}
        if self.checks.pending:
            self.checks.launch()  # the step's finiteness checks start their way to the host
        if num_steps is not None and index == num_steps - 1:
            if controller.auto_branch:
                self.clear(keep_static=True)  # the generation is over: nothing will read the factors again
            else:
                self.free_branch(branch)  # a named branch's last step: nothing reads its factors again

    def free_branch(self, branch: Any) -> None:
        """Drop the factors, zeros and probe outputs of one branch."""
        self._plan, self._plan_key = (None, [], None), None
        for table in (self.store.entries, self.zeros, self.probes.previous):
            for key in [k for k in table if k[0] == branch]:
                if table is self.store.entries:
                    self.store.drop(key)
                else:
                    del table[key]
        self.observer.on_bytes(self.store.nbytes, self.store.peak_nbytes)

    def _close_branch(self) -> None:
        if self.compiled and self.forecasting:  # forecasts inside a traced graph leave no trace on the host
            self.forecast_hits.extend(s.path for s in self.forecast_slots if s.live and s.seen != self.call_id)
        store = self.store
        if store.version != self._bytes_told:  # the bytes change only with the factors
            self._bytes_told = store.version
            self.observer.on_bytes(store.nbytes, store.peak_nbytes)
        record = self.controller.close(self._fallbacks > 0)
        # Observers fed once per branch (the hit lists are theirs now: _start gives the next branch new ones).
        self.observer.on_branch(self.computed_hits, self.forecast_hits, record)

    def _bind(self) -> None:
        """A forecasting branch: bind each slot's factors (and, for traced graphs, its weight tensor)."""
        if self.compiled:
            self._bound = None
            bind_traced(self, self.controller.branch, self.controller.point)
            return
        bound = (self.store.version, self.controller.branch)  # eager: the factors only (the batched pass reads them)
        if bound != self._bound:  # between two full steps the same entries: bound already
            entries, branch = self.store.entries, self.controller.branch
            for slot in self.forecast_slots:
                slot.entry = entries.get((branch, slot.path))
            self._bound = bound

    # ---------------------------------------------------------------------------------------------------
    # the wrappers' entry points
    # ---------------------------------------------------------------------------------------------------
    def call(self, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        """One target call inside a told step, eager: branch bookkeeping, then forecast or compute."""
        if slot.opens:
            if self.branch_open:
                self._again(slot)
            else:
                self.branch_open = True
                self._first = slot
        elif not self.branch_open:
            self._open_first(slot)
        elif slot.seen == self.call_id and slot.mode != "shortcut":
            self._twice(slot)
        call_id = slot.seen = self.call_id
        if self.forecasting:  # (never while probing)
            if self._prepared != call_id:
                self._prepare(slot)
            return slot.forecast(self, slot, original, args, kwargs)
        if self.controller.probing and not slot.probe:
            self._resolve()
            if self.forecasting:
                if self._prepared != call_id:
                    self._prepare(slot)
                return slot.forecast(self, slot, original, args, kwargs)
        if slot.mode == "shortcut":
            return original(*args, **kwargs)
        if self.flops is not None:
            self.flops.start(slot.path)
        return self._computed(slot, args, kwargs, original(*args, **kwargs))

    @torch.compiler.disable
    def call_eager(self, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        """``call`` from inside a traced graph (a graph break): FLOP counting, fallbacks."""
        return self.call(slot, original, args, kwargs)

    @torch.compiler.disable
    def enter(self, slot: Slot) -> None:
        """From a traced graph, where the opening slot runs again or a slot runs first out of model order."""
        if slot.opens and self.branch_open:
            self._again(slot)
        elif not self.branch_open:
            self._open_first(slot)

    @torch.compiler.disable
    def resolve(self) -> None:
        """From a traced graph: the probe group has run; the policy decides the rest of the step."""
        if self.controller.probing:
            self._resolve()

    @torch.compiler.disable
    def computed(self, slot: Slot, args: tuple, kwargs: dict, output: Any) -> Any:
        """From a traced graph, after a target ran its original forward: record what the forecaster needs."""
        slot.seen = self.call_id
        if slot.mode == "shortcut":
            return output
        return self._computed(slot, args, kwargs, output)

    def forecast_eager(self, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        """A forecast step's target call, eager: the batched pass on the branch's first call, then this slot's."""
        if self._prepared != self.call_id:
            self._prepare(slot)
        return slot.kind.forecast(self, slot, original, args, kwargs)

    forecast_traced_fallback = torch.compiler.disable(forecast_eager)

    def _prepare(self, current: Slot) -> None:
        """The batched pass: every bound target's forecast at the branch's abscissa, one pass for all (targets
        that already ran in this branch, e.g. a probe group, are left out). Its plan (which factors go into which
        foreach call) is kept while the factors stay the same: between two full steps only the weights change."""
        call_id = self._prepared = self.call_id
        key = (self.store.version, self.controller.branch)
        if current is not self._first or self._plan_key != key:  # something ran before: plan for what is left
            slots, states, counts = [], [], []
            dtypes: list | None = [] if self.cast else None
            for s in self.forecast_slots:
                entry = s.entry
                if entry is None or (s.seen == call_id and s is not current):
                    continue
                slots.append(s)
                states.extend(entry.states)
                counts.append(len(entry.states))
                shape = entry.shape
                s.fast = shape[0] if (s.mode == "output" and entry.spec is None and len(shape) == 1
                                      and type(shape[0]) is torch.Size) else None
                if dtypes is not None:
                    dtypes.extend(entry.dtypes)
            targets = None
            if getattr(self.forecaster, "per_target", False):
                targets = [s.path for s, n in zip(slots, counts) for _ in range(n)]
            plan = BatchPlan(self.forecaster, states, dtypes=dtypes, targets=targets) if slots else None
            single = [s.index for s in slots] if all(n == 1 for n in counts) else None  # one tensor per target
            self._plan = (plan, [(s.index, n) for s, n in zip(slots, counts)], single)
            self._plan_key = key if current is self._first else None
        plan, owners, single = self._plan
        if plan is None:
            return
        predicted = plan.run(self.controller.point)
        self.hot = not self.measure and self.flops is None  # install.Forward hands out the ready tensors
        if single is not None:
            self.ready = {index: [tensor] for index, tensor in zip(single, predicted)}
            return
        ready: dict[int, list] = {}
        i = 0
        for index, n in owners:
            ready[index] = predicted[i:i + n]
            i += n
        self.ready = ready

    # ---------------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------------
    def _again(self, slot: Slot) -> None:
        """The opening slot runs again: the next automatically numbered branch (a CFG call)."""
        c = self.controller
        if not c.auto_branch:
            raise ValueError(f"target {slot.path!r} was computed twice in step {c.index} of branch {c.branch!r}: "
                             f"each model call of a step needs its own branch (handle.step(..., branch=...)), or "
                             f"leave branch=None to number the calls automatically")
        self._close_branch()
        c.next_branch()
        self._start()
        self.branch_open = True
        self._first = slot

    def _open_first(self, slot: Slot) -> None:
        """A model that calls another target first: that slot opens the branches from now on."""
        self.branch_open = True
        self._first = slot
        if not slot.opens:
            for s in self._slots:
                s.opens = s is slot

    def _twice(self, slot: Slot) -> None:
        c = self.controller
        raise ValueError(f"target {slot.path!r} ran twice within one model call (step {c.index} of branch "
                         f"{c.branch!r}) before the first target ran again: a module used several times per forward "
                         f"cannot be forecast; leave it out of modules=...")

    def _computed(self, slot: Slot, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.controller.probing and not slot.probe:
            self._resolve()
        key = (self.controller.branch, slot.path)
        if self.flops is not None:
            self.flops.computed(slot.path)
        self.computed_hits.append(slot.path)
        leaves, spec = flatten(output)
        if slot.mode == "skip":
            self.zeros[key] = (spec, [(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x
                                      for x in leaves], input_shapes(args, kwargs))
            return output
        if key not in self.store:
            describe_leaves(slot.path, leaves)
        if slot.mode == "residual":
            leaves = residual_leaves(slot.path, slot.target.inputs, slot.names, args, kwargs, leaves, None)
        shape = input_shapes(args, kwargs)
        if self.controller.probing:
            self.probes.observe(self.store, self.controller.point, slot, key, leaves, spec, shape)
        else:
            self._record(slot, key, leaves, spec, shape)
            if slot.probe:  # the next probe's change is measured from here
                self.probes.remember(key, leaves)
        return output

    def _record(self, slot: Slot, key: tuple, leaves: list, spec: Any, shape: tuple) -> None:
        c = self.controller
        if self.last_forecast is not None and c.index is not None and c.index >= self.last_forecast:
            if self.store.entries:
                self.clear(keep_static=True)
            return
        keep = c.index is None or c.index >= self.forecaster.history_from_step
        try:
            entry = self.store.record(key, leaves, spec, point=c.point, keep_history=keep, shape=shape)
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
        self.checks.add(key, entry, self.store.check_factors(entry))

    def _settle(self, bad: list[tuple]) -> None:
        """Act on a finiteness read: drop the factors found non-finite (their forecast steps are computed)."""
        for key in bad:
            self.store.drop(key)
            self.nonfinite.add(key)
            self._warn_once("non-finite", f"target {key[1]!r} has non-finite factors (a NaN or an overflow, e.g. "
                                          f"features above 65504 with factor_dtype='float16'): its forecast steps "
                                          f"are computed in full (stats.fallbacks['non-finite'])")
        for key in self.checks.settled:
            if key not in bad:
                self.nonfinite.discard(key)

    def fallback(self, slot: Slot, original: Any, args: tuple, kwargs: dict, reason: str) -> Any:
        self.observer.on_fallback(reason)
        self._fallbacks += 1
        if self.flops is not None:
            self.flops.start(slot.path)
        return self._computed(slot, args, kwargs, original(*args, **kwargs))

    def _resolve(self) -> None:
        pending = self.checks.needed(self.controller.branch)
        extra = self.probes.device_sums()
        bad, values = self.checks.read(self, extra) if pending else ([], read_host(self, extra))
        self.probes.sums = values  # on the host now: the observation (pooled across ranks by a subclass) reads them
        error, change = self.probes.observation()
        if pending:
            self._settle(bad)
            if any(key in bad for _, key, *_ in self.probes.pending):
                self.probes.ready = False  # a probe target's factors were not finite: as if it had none
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
        if self.forecasting:
            self._bind()

    def measure_error(self, slot: Slot, predicted: list, true_output: Any) -> None:
        true = [x for x in flatten(true_output)[0] if isinstance(x, torch.Tensor)]
        self.observer.on_probe(slot.path, self.controller.index, relative_l2(predicted, true))

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
