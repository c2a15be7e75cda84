"""The handle: installs forecasting on a model's target modules, owns all cache state, removes it exactly.

The sampling loop *tells* the handle the step (``with handle.step(i, t): model(...)``); nothing counts steps.
Within a step, each call of the model is its own CFG branch (0, 1, ...) unless the caller names the branch;
a doubled CFG batch is one call whose rows stay independent because every forecast is elementwise.

Example:
    >>> handle = CacheHandle.install(model, TaylorSeerConfig(interval=4), targets)   # doctest: +SKIP
    >>> for i, t in enumerate(timesteps):                                             # doctest: +SKIP
    ...     with handle.step(i, t):
    ...         eps = model(x, t)
    >>> handle.remove()                                                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..adapters.registry import Target
from ..config import TaylorSeerConfig
from ..forecast.taylor import TaylorState, forecast, update
from ..policy.interval import IntervalPolicy

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_TENSOR = object()  # placeholder for a tensor leaf in a stored output structure
_INSTALLED: dict[int, CacheHandle] = {}  # id(module) -> handle, to refuse applying twice


def _flatten(output: Any) -> tuple[list, Any]:
    """Leaves and structure of a module output; a bare tensor (the common case) skips pytree (spec None)."""
    if isinstance(output, torch.Tensor):
        return [output], None
    return pytree.tree_flatten(output)


@dataclass
class CacheStats:
    """What happened in the current generation (reset by ``begin``). Counts are per model call and module."""

    steps_full: int = 0
    steps_forecast: int = 0
    module_full: Counter = field(default_factory=Counter)
    module_forecast: Counter = field(default_factory=Counter)
    cache_bytes: int = 0
    peak_cache_bytes: int = 0
    probe_errors: list[dict] = field(default_factory=list)
    flops_executed: int | None = None  # counted under handle.count_flops(); None when not measured
    flops_skipped: int | None = None  # FLOPs the forecast calls did not execute (each module's counted full cost)

    @property
    def flops_speedup(self) -> float | None:
        """Full-compute FLOPs / executed FLOPs of the measured run (None when not measured)."""
        if not self.flops_executed:
            return None
        return (self.flops_executed + (self.flops_skipped or 0)) / self.flops_executed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (module counters summed over modules)."""
        return {
            "steps_full": self.steps_full,
            "steps_forecast": self.steps_forecast,
            "module_calls_full": sum(self.module_full.values()),
            "module_calls_forecast": sum(self.module_forecast.values()),
            "cache_bytes": self.cache_bytes,
            "peak_cache_bytes": self.peak_cache_bytes,
            "flops_executed": self.flops_executed,
            "flops_skipped": self.flops_skipped,
            "flops_speedup": self.flops_speedup,
        }


class _Zeros(NamedTuple):
    """A skipped module's tensor output, remembered by shape only."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


@dataclass
class _Step:
    index: int
    point: float
    full: bool
    keep_history: bool
    branch: Any
    calls: int = 0  # model calls seen in this step (automatic CFG branch keys)


class CacheHandle:
    """Owns the forecasting state of one model; created by ``taylorseer.apply``. Use as a context manager."""

    def __init__(self, model: nn.Module, config: TaylorSeerConfig, targets: list[Target]):
        self.model = model
        self.config = config
        self.targets = [t for t in targets if t.mode != "shortcut"]  # modules whose outputs are forecast/skipped
        self.shortcuts = [t for t in targets if t.mode == "shortcut"]  # blocks that may take their shortcut
        self.policy = IntervalPolicy.from_config(config)
        self.stats = CacheStats()
        self._factor_dtype = _DTYPES.get(config.factor_dtype) if config.factor_dtype else None
        self._states: dict[tuple[Any, str], tuple[TaylorState, ...]] = {}
        self._structures: dict[tuple[Any, str], Any] = {}
        self._step: _Step | None = None
        self._last_index: int | None = None
        self._last_forecast: int | None = None
        self._num_steps: int | None = None
        self._plan: list[bool] | None = None
        self._saved: list[tuple[nn.Module, bool, Any]] = []
        self._hooks: list[Any] = []
        self._probes: set[str] = set()
        self._flop_counter: Any = None
        self._module_flops: dict[str, int] = {}
        self._removed = False

    # ---------------------------------------------------------------------------------------------------
    # install / remove
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, model: nn.Module, config: TaylorSeerConfig, targets: list[Target]) -> CacheHandle:
        """Swap the forward of each target module (per instance) and return the handle owning them."""
        handle = cls(model, config, targets)
        modules = [(t, model.get_submodule(t.path)) for t in handle.targets + handle.shortcuts]
        taken = [t.path for t, m in modules if id(m) in _INSTALLED]
        if taken:
            raise ValueError(f"taylorseer is already applied to {taken[:3]}: remove() that handle first")
        try:
            for target, module in modules:
                had_own = "forward" in module.__dict__
                handle._saved.append((module, had_own, module.__dict__.get("forward")))
                module.forward = handle._wrap(target, module, module.forward)
                _INSTALLED[id(module)] = handle
            handle._hooks.append(model.register_forward_pre_hook(handle._on_model_call))
        except BaseException:
            handle.remove()
            raise
        return handle

    def remove(self) -> None:
        """Restore every module's original forward and drop all cached tensors. Idempotent."""
        for module, had_own, original in reversed(self._saved):
            if had_own:
                module.forward = original
            else:
                module.__dict__.pop("forward", None)
            _INSTALLED.pop(id(module), None)
        for hook in self._hooks:
            hook.remove()
        self._saved.clear()
        self._hooks.clear()
        self._clear_state()
        self._step = None
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
        if num_steps is not None:
            self._plan = self.policy.plan(num_steps)
        else:
            if self.config.tail_steps:
                raise ValueError("tail_steps > 0 needs num_steps: call handle.begin(num_steps) first")
            self._plan = None
        self._num_steps = num_steps
        # Past the last forecast step no factor is ever read: record nothing and free what is held.
        forecasts = [i for i, full in enumerate(self._plan or []) if not full]
        self._last_forecast = forecasts[-1] if forecasts else (-1 if num_steps is not None else None)
        self._clear_state()
        self.stats = CacheStats()
        self._last_index = None

    def plan(self, num_steps: int) -> list[bool]:
        """The compute (True) / forecast (False) list for a generation of ``num_steps`` steps."""
        return self.policy.plan(num_steps)

    @contextlib.contextmanager
    def step(
        self,
        index: int,
        timestep: float | torch.Tensor | None = None,
        sigma: float | torch.Tensor | None = None,
        branch: Any = None,
    ) -> Iterator[bool]:
        """Context in which model calls belong to step ``index`` (0-based, in sampling order).

        ``timestep``/``sigma`` are needed when the config's abscissa is ``"timestep"``/``"sigma"``. Step 0 starts a
        new generation unless ``begin`` was just called. ``branch`` names the CFG branch of the calls inside;
        by default the k-th model call in a step is branch k. Yields True if the step is computed in full.
        """
        self._check_alive()
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"step index must be an int >= 0, got {index!r}")
        if self._num_steps is not None and index >= self._num_steps:
            raise ValueError(f"step index must be in [0, {self._num_steps - 1}] (num_steps={self._num_steps}), "
                             f"got {index}")
        if self._last_index is not None and index < self._last_index:
            if index != 0:
                raise ValueError(f"step index must not decrease within a generation ({self._last_index} -> "
                                 f"{index}); call handle.begin() to start a new generation")
            self.begin(self._num_steps)
        if self._step is not None:
            raise RuntimeError("handle.step() contexts cannot be nested")
        full = self._is_full(index)
        first_call_of_step = self._last_index != index
        self._step = _Step(index, self._abscissa(index, timestep, sigma), full, self._keeps_history(index), branch)
        self._last_index = index
        if first_call_of_step:
            if full:
                self.stats.steps_full += 1
            else:
                self.stats.steps_forecast += 1
        try:
            yield full
        finally:
            self._step = None

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
            self._flop_counter = counter
            try:
                yield self.stats
            finally:
                self._flop_counter = None
        self.stats.flops_executed = int(counter.get_total_flops())

    def probe(self, *paths: str) -> None:
        """Also compute the true output of these target paths on forecast steps and record the relative L2 error
        of the forecast in ``stats.probe_errors`` (the forecast is still what the model receives). Measurement
        only: it costs the full compute of those modules."""
        known = {t.path for t in self.targets}
        unknown = [p for p in paths if p not in known]
        if unknown:
            raise ValueError(f"probe paths {unknown} are not targets; targets are e.g. {sorted(known)[:4]}")
        self._probes.update(paths)

    # ---------------------------------------------------------------------------------------------------
    # facts
    # ---------------------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes currently held by the cached factors."""
        return sum(s.nbytes() for states in self._states.values() for s in states)

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self.targets)} targets"
        return f"CacheHandle({type(self.model).__name__}, {state}, {self.config.to_json()})"

    # ---------------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("this taylorseer handle was removed; apply() again to get a new one")

    def _clear_state(self) -> None:
        self._states.clear()
        self._structures.clear()
        self.stats.cache_bytes = 0

    def _is_full(self, index: int) -> bool:
        if self._plan is not None:
            return self._plan[index]
        return self.policy.plan(index + 1)[index]

    def _keeps_history(self, index: int) -> bool:
        # The reference code takes no differences on full steps with index <= W - 2 (FLUX drops step 1's history).
        return not (self.config.scheme == "reference" and index <= self.config.warmup_steps - 2)

    def _abscissa(self, index: int, timestep: Any, sigma: Any) -> float:
        kind = self.config.abscissa
        if kind == "step":
            return float(index)
        value = timestep if kind == "timestep" else sigma
        if value is None:
            raise ValueError(f"abscissa={kind!r} needs handle.step(index, {kind}=...) to be told the {kind}")
        if isinstance(value, torch.Tensor):
            value = value.flatten()[0].item()
        return float(value)

    def _on_model_call(self, module: nn.Module, args: tuple) -> None:
        if self._step is not None:
            self._step.calls += 1

    def _wrap(self, target: Target, module: nn.Module, original: Callable) -> Callable:
        if target.mode == "skip":
            return self._wrap_skip(target, original)
        if target.mode == "shortcut":
            return self._wrap_shortcut(target, module, original)
        names = list(inspect.signature(original).parameters) if target.mode == "residual" else []

        def inputs_of(args: tuple, kwargs: dict, is_tensor: list[bool]) -> list[torch.Tensor]:
            # Output position k (a tensor, or item k of a returned tuple) is the residual of target.inputs[k];
            # None items (e.g. SD3's last block returns (None, hidden_states)) have no residual.
            if len(is_tensor) != len(target.inputs):
                raise ValueError(f"block {target.path!r} returned {len(is_tensor)} outputs but its adapter names "
                                 f"{len(target.inputs)} residual inputs {target.inputs}")
            return [kwargs[n] if n in kwargs else args[names.index(n)]
                    for n, t in zip(target.inputs, is_tensor) if t]

        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step
            if step is None:  # not told a step: behave exactly like the original module
                return original(*args, **kwargs)
            branch = step.branch if step.branch is not None else step.calls - 1
            key = (branch, target.path)
            if step.full or key not in self._states:
                counter = self._flop_counter
                before = counter.get_total_flops() if counter is not None else 0
                output = original(*args, **kwargs)
                if counter is not None:
                    self._module_flops[target.path] = counter.get_total_flops() - before
                leaves, spec = _flatten(output)
                tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
                if target.mode == "residual":
                    is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
                    tensors = [o - i for o, i in zip(tensors, inputs_of(args, kwargs, is_tensor))]
                self._record(key, leaves, tensors, spec, step)
                self.stats.module_full[target.path] += 1
                return output
            predicted = self._predict(key, step)
            if target.mode == "residual":
                is_tensor = [x is _TENSOR for x in self._structures[key][1]]
                predicted = [i + r for i, r in zip(inputs_of(args, kwargs, is_tensor), predicted)]
            if target.path in self._probes:
                self._measure(target.path, step, predicted, original(*args, **kwargs))
            return self._assemble(key, predicted)

        return forward

    def _predict(self, key: tuple, step: _Step) -> list[torch.Tensor]:
        """The forecast tensors of a target at this step; counts the forecast call (and its skipped FLOPs)."""
        states = self._states[key]
        if self._factor_dtype is None:
            predicted = [forecast(s, step.point, self.config.scheme) for s in states]
        else:
            dtypes = self._structures[key][2]
            predicted = [forecast(s, step.point, self.config.scheme, dtype=d) for s, d in zip(states, dtypes)]
        path = key[1]
        self.stats.module_forecast[path] += 1
        if self._flop_counter is not None:
            self.stats.flops_skipped = (self.stats.flops_skipped or 0) + self._module_flops.get(path, 0)
        return predicted

    def _assemble(self, key: tuple, predicted: list[torch.Tensor]) -> Any:
        """Predicted tensors put back into the output structure the target returned on its last full step."""
        spec, leaves, _ = self._structures[key]
        if spec is None:
            return predicted[0]
        it = iter(predicted)
        return pytree.tree_unflatten([next(it) if x is _TENSOR else x for x in leaves], spec)

    def _wrap_shortcut(self, target: Target, module: nn.Module, original: Callable) -> Callable:
        """A block whose module targets (``target.inputs``, child names) are all forecast on a forecast step:
        run the adapter's shortcut (gates and residual adds only) instead of the block's forward, skipping work
        whose only consumers are the forecast modules (e.g. the layer norms feeding attention and MLP)."""
        from ..adapters.shortcuts import shortcut_for

        function = shortcut_for(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step
            if step is None or step.full or self._probes:
                return original(*args, **kwargs)
            branch = step.branch if step.branch is not None else step.calls - 1
            keys = [(branch, f"{target.path}.{child}") for child in target.inputs]
            if any(key not in self._states for key in keys):
                return original(*args, **kwargs)
            forecasts = {child: self._assemble(key, self._predict(key, step))
                         for child, key in zip(target.inputs, keys)}
            return function(module, forecasts, *args, **kwargs)

        return forward

    def _wrap_skip(self, target: Target, original: Callable) -> Callable:
        """A module whose outputs feed only forecast targets: zeros of its last computed shape on forecast steps."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step
            key = (None if step is None else step.branch if step.branch is not None else step.calls - 1, target.path)
            # Zeros only while the consumers are forecast: a forecast step of a branch with a computed record.
            if step is None or step.full or key not in self._structures or self._probes:
                counter = self._flop_counter
                before = counter.get_total_flops() if counter is not None else 0
                output = original(*args, **kwargs)
                if step is not None:
                    if counter is not None:
                        self._module_flops[target.path] = counter.get_total_flops() - before
                    leaves, spec = _flatten(output)
                    shapes = [_Zeros(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves]
                    self._structures[key] = (spec, shapes, None)
                    self.stats.module_full[target.path] += 1
                return output
            spec, shapes, _ = self._structures[key]
            self.stats.module_forecast[target.path] += 1
            if self._flop_counter is not None:
                self.stats.flops_skipped = (self.stats.flops_skipped or 0) + self._module_flops.get(target.path, 0)
            zeros = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) if isinstance(x, _Zeros) else x
                     for x in shapes]
            return zeros[0] if spec is None else pytree.tree_unflatten(zeros, spec)

        return forward

    def _record(self, key: tuple, leaves: list, tensors: list, spec: Any, step: _Step) -> None:
        if self._last_forecast is not None and step.index >= self._last_forecast:
            if self._states:
                self._clear_state()
            return
        old = self._states.get(key) or tuple(TaylorState.empty() for _ in tensors)
        if old and old[0].points and old[0].points[0] == step.point:
            raise ValueError(
                f"target {key[1]!r} was computed twice in step {step.index} of branch {key[0]!r}: give each "
                f"model call of a step its own branch (handle.step(..., branch=...)) or let calls number themselves"
            )
        before = sum(s.nbytes() for s in old)
        new = tuple(
            update(s, x.detach(), step.point, self.config.max_order, self.config.scheme,
                   keep_history=step.keep_history, factor_dtype=self._factor_dtype)
            for s, x in zip(old, tensors)
        )
        self._states[key] = new
        # Non-tensor leaves (None, flags) are returned as the last full step gave them; tensor slots are _TENSOR.
        constants = [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        self._structures[key] = (spec, constants, [x.dtype for x in tensors])
        self.stats.cache_bytes += sum(s.nbytes() for s in new) - before
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.stats.cache_bytes)

    def _measure(self, path: str, step: _Step, predicted: list, true_output: Any) -> None:
        true_leaves = [x for x in _flatten(true_output)[0] if isinstance(x, torch.Tensor)]
        num = sum(float((p - t).float().pow(2).sum()) for p, t in zip(predicted, true_leaves))
        den = sum(float(t.float().pow(2).sum()) for t in true_leaves)
        self.stats.probe_errors.append({"path": path, "step": step.index, "rel_l2": (num / max(den, 1e-30)) ** 0.5})
