"""The handle: the one owner of a model's forecasting; it is told the steps and removes everything exactly.

The sampling loop *tells* the handle the step (``with handle.step(i, t): model(...)``); nothing counts steps.
Within a step, each call of the model is its own CFG branch (0, 1, ...) unless the caller names the branch;
a doubled CFG batch is one call whose rows stay independent because every forecast is elementwise.

The handle composes the runtime's parts: ``Installation`` (install.py: swap/restore forwards), ``Engine``
(engine.py: the wrappers' entry points), ``FactorStore`` (state.py), ``StepController`` (step.py: the decision
per step and branch) and the observers (observers.py: stats, FLOPs, probes).

Example:
    >>> handle = CacheHandle.install(model, parts_of(TaylorSeerConfig(interval=4)), targets)   # doctest: +SKIP
    >>> for i, t in enumerate(timesteps):                                             # doctest: +SKIP
    ...     with handle.step(i, t):
    ...         eps = model(x, t)
    >>> handle.remove()                                                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..adapters.registry import Target, find_adapter, resolve_targets
from ..adapters.shortcuts import find_shortcut
from ..parts import CacheConfig
from ..policy import build_policy
from .autostep import CallSteps, timestep_argument
from .engine import Engine, Slot
from .install import Installation, unwrap
from .observers import CacheStats, FlopObserver
from .switch import Planner
from .vote import probes_for


def _block_of(path: str) -> str:
    """The block a target belongs to: its path up to the first numeric component (``blocks.3`` of
    ``blocks.3.attn``); the path itself if it has none."""
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", path)
    return match.group(1) if match else path


def build_slots(model: nn.Module, targets: list[Target], probe_blocks: int) -> list[Slot]:
    """Slots in model order, with block groups, the probe group and the slots that call ``engine.enter``."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    targets = sorted(targets, key=lambda t: order[t.path])
    groups: dict[str, int] = {}
    for t in targets:
        groups.setdefault(_block_of(t.path), len(groups))
    if probe_blocks and probe_blocks >= len(groups):
        raise ValueError(f"the policy probes {probe_blocks} block(s) but the targets form {len(groups)} block "
                         f"group(s): an adaptive policy needs module or block granularity and more blocks than "
                         f"probe_blocks")
    slots = []
    for i, t in enumerate(targets):
        block = groups[_block_of(t.path)]
        slot = Slot(i, t, block=block, probe=block < probe_blocks)
        if t.mode == "shortcut":
            slot.module = model.get_submodule(t.path)
            record = find_shortcut(slot.module)
            if record is None:  # as shortcut_for says it
                raise ValueError(f"no block shortcut applies to {type(slot.module).__name__}")
            slot.shortcut, slot.saved_flops = record.function, record.saved_flops
        slots.append(slot)
    if slots:
        slots[0].enters = True
        if probe_blocks:
            next(s for s in slots if not s.probe).enters = True
    return slots


class StepContext:
    """What ``handle.step(...)`` returns: a context manager (a plain class, not a generator: it is entered at every
    step) that opens the step on entering (yielding True if it is computed in full) and closes it on leaving,
    whatever happens inside."""

    __slots__ = ("handle", "engine", "index", "timestep", "sigma", "branch")

    def __init__(self, handle: CacheHandle, index: int, timestep: Any, sigma: Any, branch: Any):
        self.handle, self.engine, self.index = handle, handle.engine, index
        self.timestep, self.sigma, self.branch = timestep, sigma, branch

    def __enter__(self) -> bool:
        return self.handle._open_step(self.index, self.timestep, self.sigma, self.branch)

    def __exit__(self, *exc: object) -> None:
        self.engine.close()


class CacheHandle:
    """Owns the forecasting state of one model; created by ``taylorseer.apply``. Use as a context manager."""

    def __init__(self, model: nn.Module, parts: CacheConfig, targets: list[Target], given: Any = None):
        if not isinstance(parts, CacheConfig):
            raise TypeError(f"CacheHandle takes a CacheConfig (taylorseer.apply converts other configs with "
                            f"parts_of), got {type(parts).__name__}")
        self.model = model
        self.parts = parts  # what the runtime reads
        self._by_step = parts.abscissa == "step"  # the abscissa is the step index (read at every step)
        self.config = parts if given is None else given  # the config as the user gave it (repr, handle.config)
        self.targets = [t for t in targets if t.mode != "shortcut"]  # modules whose outputs are forecast/skipped
        self.shortcuts = [t for t in targets if t.mode == "shortcut"]  # blocks that may take their shortcut
        self.engine = Engine(self.parts, [])
        self._installation = Installation()
        self._num_steps: int | None = None
        self._told_last: int | None = None  # the last told step of a told generation (None: none running)
        self._auto_branches = 1  # branches seen at step 0 of an untold generation
        self.auto = CallSteps(self, None)
        self._modules: list[nn.Module] = []
        self._removed = False
        self.planner = Planner(self.parts.policy)  # the policy per generation (switch-off; speed targets)
        self.diagnose_generations = 0  # generations left whose forecasts are also computed in full (diagnose)
        self._diagnosing: tuple[str, ...] = ()
        self._warned_off: set[str] = set()

    # ---------------------------------------------------------------------------------------------------
    # install / remove
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, model: nn.Module, parts: CacheConfig, targets: list[Target], given: Any = None) -> CacheHandle:
        """Swap the forward of each target module (per instance) and return the handle owning them (``given``:
        the config as the user wrote it, shown by ``repr`` and ``config``; ``parts`` is what runs)."""
        model = unwrap(model)
        handle = cls(model, parts, targets, given)
        calibration = getattr(handle.engine.forecaster, "calibration", None)
        if calibration is not None:  # fitted weights: for this model's class, config and weights only
            calibration.check(model=model)  # before the model is touched
        spec = find_adapter(model)
        # Read before _install: at output granularity the model's own forward is swapped, hiding its signature.
        argument = timestep_argument(model, spec.timestep_arg if spec else None)
        handle._install(targets)
        handle.auto = CallSteps(handle, argument)
        handle.auto.attach(model)
        return handle

    def _install(self, targets: list[Target]) -> None:
        self.targets = [t for t in targets if t.mode != "shortcut"]
        self.shortcuts = [t for t in targets if t.mode == "shortcut"]
        probe_blocks = self.engine.controller.probe_blocks
        self.engine.slots = build_slots(self.model, self.targets + self.shortcuts, probe_blocks)
        self._installation = Installation.install(self.model, self.engine, self)
        self._modules = [self.model.get_submodule(slot.path) for slot in self.engine.slots]

    def _refresh(self) -> None:
        """Re-resolve the targets if a module at a target path was replaced since apply() (PEFT injecting a LoRA
        layer in place of a target ``Linear``, for example): the replacement is what is forecast from now on."""
        calibration = getattr(self.engine.forecaster, "calibration", None)
        if calibration is not None:  # weights changed since apply (a LoRA injected, a fine-tuning step): refused
            calibration.check(model=self.model)
        slots = self.engine.slots
        if all(self.model.get_submodule(slot.path) is module for slot, module in zip(slots, self._modules)):
            return
        attached = self.auto.saved is not None
        self.auto.detach()
        self._installation.remove()
        self.engine.clear()
        self._install(resolve_targets(self.model, self.parts.targets))
        if attached:
            self.auto.attach(self.model)

    @property
    def auto_steps(self) -> bool:
        """Whether untold model calls get their step from their own timestep argument (default True; a pipeline
        handle turns it off because the scheduler tells the steps). False: untold calls run the original model."""
        return self.auto.enabled

    @auto_steps.setter
    def auto_steps(self, value: bool) -> None:
        self.auto.enabled = bool(value)

    def remove(self) -> None:
        """Restore every module's original forward and drop all cached tensors. Idempotent."""
        self.auto.detach()
        self._installation.remove()
        self.engine.clear()
        self.engine.active = self.engine.forecasting = False
        self.engine.removed = True
        self._removed = True

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------------------------
    # telling the step
    # ---------------------------------------------------------------------------------------------------
    def begin(self, num_steps: int | None = None) -> None:
        """Start a new generation of ``num_steps`` steps (None: not known): clears all state and stats."""
        self._check_alive()
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                      or num_steps < 1):
            raise ValueError(f"num_steps must be an int >= 1 or None, got {num_steps!r}")
        self._refresh()
        self._pool_probes()
        self._begin_engine(num_steps)
        self._num_steps = num_steps
        self._told_last = None
        self.auto.restart()

    def cancel(self) -> None:
        """Abandon the generation under way (a front end's cancel): drop its factors and decisions, keep the
        ``num_steps`` given to ``begin``; the next model call, told or read from its timestep, starts a new
        generation at step 0. Call it whenever a generation is cut off: steps read from the call's timestep can only
        infer a new generation from what the inputs show (docs/reliability.md, "Steps read from the call").

        Example:
            >>> handle.cancel()   # doctest: +SKIP
        """
        self.begin(self._num_steps)

    def plan(self, num_steps: int) -> list[bool]:
        """The compute (True) / forecast (False) list for a generation of ``num_steps`` steps (static policies;
        ``ValueError`` for adaptive ones, whose decisions depend on what the model computes)."""
        plan = build_policy(self.planner.choose(num_steps).policy).plan(num_steps)
        if plan is None:
            raise ValueError(f"{type(self.parts.policy).__name__} decides during sampling: it has no plan; "
                             f"see handle.stats.decisions after a generation")
        return plan

    def step(
        self,
        index: int,
        timestep: float | torch.Tensor | None = None,
        sigma: float | torch.Tensor | None = None,
        branch: Any = None,
    ) -> StepContext:
        """Context in which model calls belong to step ``index`` (0-based, in sampling order).

        ``timestep``/``sigma`` are needed when the config's abscissa is ``"timestep"``/``"sigma"`` (finite).
        Step 0 starts a new generation unless ``begin`` was just called. ``branch`` names the CFG branch of the
        calls inside; by default each model call in a step is the next branch. Yields True if the step (its
        first branch) is decided to be computed in full. The arguments are checked on entering the context.

        Example:
            >>> with handle.step(0, timestep=999) as full:   # doctest: +SKIP
            ...     eps = model(x, timestep=999)
        """
        return StepContext(self, index, timestep, sigma, branch)

    def _open_step(self, index: int, timestep: Any, sigma: Any, branch: Any) -> bool:
        """``handle.step``'s entry: check the arguments, open the step in the engine; True if computed in full."""
        if self._removed:
            self._check_alive()
        engine = self.engine
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"step index must be an int >= 0, got {index!r}")
        if self._num_steps is not None and index >= self._num_steps:
            raise ValueError(f"step index must be in [0, {self._num_steps - 1}] (num_steps={self._num_steps}), "
                             f"got {index}")
        if engine.active:
            raise RuntimeError("handle.step() contexts cannot be nested")
        last = engine.controller.last_index
        if last is not None and index < last:
            if index != 0:
                raise ValueError(f"step index must not decrease within a generation ({last} -> {index}); "
                                 f"call handle.begin() to start a new generation")
            self.begin(self._num_steps)
        elif last is None and not engine.controller.policies:
            self.begin(self._num_steps)
        point = float(index) if self._by_step else self._abscissa(index, timestep, sigma)
        auto = self.auto
        if not auto.fresh:
            auto.restart()
        engine.open(index, point, branch)
        self._told_last = index
        decision = engine.controller.decision
        return bool(decision and decision.compute)

    @contextlib.contextmanager
    def count_flops(self) -> Iterator[CacheStats]:
        """Count the FLOPs executed inside (``torch.utils.flop_counter``) into ``stats.flops_executed``, and the
        FLOPs each forecast call skipped (its module's cost counted at its latest full call) into
        ``stats.flops_skipped``; ``stats.flops_speedup`` is then the measured ratio. Measurement only: slower.

        Example:
            >>> with handle.count_flops():                                    # doctest: +SKIP
            ...     images = sample(model, labels, listener=handle)
            >>> handle.stats.flops_speedup                                     # doctest: +SKIP
            3.1
        """
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.engine.flops = FlopObserver(counter, self.engine.observer)
            self.engine.counting = True
            self.engine.hot = False  # the wrappers' fast path counts nothing
            try:
                yield self.stats
            finally:
                self.engine.flops = None
                self.engine.counting = False
        self.stats.flops_executed = int(counter.get_total_flops())

    def probe(self, *paths: str) -> None:
        """Also compute the true output of these target paths on forecast steps and record the relative L2 error
        of the forecast in ``stats.probe_errors`` (the forecast is still what the model receives). Measurement
        only: it costs the full compute of those modules."""
        known = {t.path for t in self.targets}
        unknown = [p for p in paths if p not in known]
        if unknown:
            raise ValueError(f"probe paths {unknown} are not targets; targets are e.g. {sorted(known)[:4]}")
        self.engine.measure.update(paths)
        self.engine.hot = False  # the wrappers' fast path measures nothing

    # ---------------------------------------------------------------------------------------------------
    # facts
    # ---------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        """What happened in the current generation (see ``CacheStats``)."""
        return self.engine.observer.stats

    def cache_bytes(self) -> int:
        """Bytes currently held by the cached factors."""
        return self.engine.store.nbytes

    def cached_keys(self) -> list[tuple[Any, str]]:
        """The (branch, target path) pairs that hold factors now."""
        return list(self.engine.store.entries)

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.targets)} targets"
        chosen = self.planner.describe()
        return f"CacheHandle({type(self.model).__name__}, {state}, {chosen + ', ' if chosen else ''}" \
               f"{self.config.to_json()})"

    # ---------------------------------------------------------------------------------------------------
    # steps read from the calls (autostep.CallSteps calls these)
    # ---------------------------------------------------------------------------------------------------
    def told_generation_open(self) -> bool:
        """A told generation of known length is under way (an untold call now would mix the two)."""
        return self._told_last is not None and self._num_steps is not None and self._told_last < self._num_steps - 1

    def told_num_steps(self) -> int | None:
        """The ``num_steps`` given to ``begin`` (None if not given)."""
        return self._num_steps

    def begin_auto(self, num_steps: int | None) -> None:
        self._check_alive()
        self._refresh()
        self._pool_probes()
        self._begin_engine(num_steps)
        self._told_last = None
        self._auto_branches = 1

    def open_auto(self, index: int, value: float, branch: int) -> None:
        kind = self.parts.abscissa
        if kind == "sigma" and self.auto.argument is not None and "sigma" not in self.auto.argument[0]:
            raise ValueError("abscissa='sigma' needs the sigma: tell the steps with handle.step(i, sigma=...), or "
                             "use abscissa='step' or 'timestep' when the loop tells nothing")
        if index == 0:
            self._auto_branches = max(self._auto_branches, branch + 1)
        self.engine.open(index, float(index) if kind == "step" else value, branch)

    def close_auto(self) -> None:
        engine = self.engine
        index, num_steps, branch = engine.controller.index, engine.controller.num_steps, engine.controller.branch
        engine.close()
        if num_steps is not None and index == num_steps - 1 and branch == self._auto_branches - 1:
            engine.clear(keep_static=True)  # the untold generation is over (its last step's last branch)

    # ---------------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------------
    def _pool_probes(self) -> None:
        """Under diffusers' context parallelism (``enable_parallelism``, before or after ``apply``) the ranks that
        share a sample pool their probe sums, so they take the one-process decision (``runtime/vote.py``)."""
        self.engine.probes = probes_for(self.model, self.engine.probes)

    def _begin_engine(self, num_steps: int | None) -> None:
        """``engine.begin`` with the policy the planner chooses for this generation (runtime/switch.py): full
        compute, one warning and ``stats.switched_off`` where the generation is too short to forecast; and, for
        ``diagnose``, every target's forecast error measured (``stats.probe_errors``) for that many generations."""
        import warnings

        choice = self.planner.choose(num_steps)
        self.engine.controller.policy_config = choice.policy
        self.engine.measure.difference_update(self._diagnosing)
        self._diagnosing = ()
        if self.diagnose_generations > 0:
            self.diagnose_generations -= 1
            self._diagnosing = tuple(t.path for t in self.targets if t.path not in self.engine.measure)
            self.engine.measure.update(self._diagnosing)
        self.engine.begin(num_steps)
        reason = choice.switched_off
        self.stats.switched_off = reason
        if reason is not None and reason not in self._warned_off:
            self._warned_off.add(reason)
            warnings.warn(f"taylorseer: forecasting switched off: {reason} (stats.switched_off)", RuntimeWarning,
                          stacklevel=4)

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("this taylorseer handle was removed; apply() again to get a new one")

    def _abscissa(self, index: int, timestep: Any, sigma: Any) -> float:
        kind = self.parts.abscissa
        if kind == "step":
            return float(index)
        value = timestep if kind == "timestep" else sigma
        if value is None:
            raise ValueError(f"abscissa={kind!r} needs handle.step(index, {kind}=...) to be told the {kind}")
        if isinstance(value, torch.Tensor):
            value = value.flatten()[0].item()
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{kind} of step {index} must be finite, got {value}")
        return value
