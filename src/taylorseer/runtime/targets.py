"""Per-target behaviour by kind: what a target does when computed and on a forecast step, in eager and traced form.

A target is one of four kinds (``Target.mode``): ``output`` (its output is forecast), ``residual`` (a block's
``out - in`` is forecast and its inputs added back), ``skip`` (zeros shaped like its last output) and ``shortcut``
(a block that computes its output from its children's forecasts). Each kind is a small stateless object; the
engine (engine.py) holds the state and calls ``forecast`` (eager, host bookkeeping allowed) or ``traced`` (inside
a graph that ``torch.compile`` is tracing: tensor math on bound factors and weights only, no host reads).

Example:
    >>> KINDS["output"].name
    'output'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from .state import TENSOR, input_shapes, residual_leaves, to_device, unflatten

Tensor = torch.Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, Slot


def traced_sum(factors: tuple, weights: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``sum_i weights[i] * factors[i]`` (``weights[0]`` is 1) as graph operations: what a compiled block fuses
    with its gate and residual add. ``weights``: a 1-D tensor on the factors' device."""
    output = factors[0] if dtype is None or factors[0].dtype == dtype else factors[0].to(dtype)
    for i in range(1, len(factors)):
        factor = factors[i] if dtype is None or factors[i].dtype == dtype else factors[i].to(dtype)
        output = output + weights[i] * factor
    return output if len(factors) > 1 else output.clone()


def assemble(entry: Any, predicted: list) -> Any:
    """Predicted tensors put back into the structure the target returned on its last full step."""
    if entry.spec is None:
        return predicted[0]
    it = iter(predicted)
    return pytree.tree_unflatten([next(it) if x is TENSOR else x for x in entry.constants], entry.spec)


class OutputKind:
    """The module's output is forecast."""

    name = "output"
    forecasts = True
    residual = False

    def forecast(self, engine: Engine, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        entry = slot.entry
        predicted = engine.ready.pop(slot.index, None)
        if predicted is None or entry is None:
            reason = "non-finite" if (engine.controller.branch, slot.path) in engine.nonfinite else "no-factors"
            return engine.fallback(slot, original, args, kwargs, reason)
        if len(args) == 1 and isinstance(args[0], Tensor):  # one tensor argument (most targets): inlined
            shapes = (args[0].shape,)
            for value in kwargs.values():  # keyword arguments left at None add nothing to input_shapes
                if value is not None:
                    shapes = input_shapes(args, kwargs)
                    break
        else:
            shapes = input_shapes(args, kwargs)
        if entry.shape != shapes:
            engine.store.drop((engine.controller.branch, slot.path))  # re-anchor: compute, start the factors again
            return engine.fallback(slot, original, args, kwargs, "shape")
        if self.residual:
            predicted = self.finish(slot, entry, args, kwargs, predicted)
        if engine.measure and slot.path in engine.measure:
            engine.measure_error(slot, predicted, original(*args, **kwargs))
        engine.forecast_hits.append(slot.path)
        if engine.flops is not None:
            engine.flops.skipped(slot.path)
        return predicted[0] if entry.spec is None else assemble(entry, predicted)

    def finish(self, slot: Slot, entry: Any, args: tuple, kwargs: dict, predicted: list) -> list:
        return predicted

    def traced(self, engine: Engine, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        entry = slot.entry
        if entry.shape != input_shapes(args, kwargs):
            return engine.forecast_eager(slot, original, args, kwargs)  # a graph break: re-anchor on the host
        weights = slot.weights
        predicted = [traced_sum(s.factors, weights, d if engine.cast else None)
                     for s, d in zip(entry.states, entry.dtypes)]
        return assemble(entry, self.finish(slot, entry, args, kwargs, predicted))


class ResidualKind(OutputKind):
    """A block's residual ``out - in`` is forecast; the block's inputs are added back on forecast steps."""

    name = "residual"
    residual = True

    def finish(self, slot: Slot, entry: Any, args: tuple, kwargs: dict, predicted: list) -> list:
        return residual_leaves(slot.path, slot.target.inputs, slot.names, args, kwargs, predicted, entry.constants)


class SkipKind:
    """Nothing is forecast: zeros shaped like the last computed output (the caller adds nothing)."""

    name = "skip"
    forecasts = False

    def forecast(self, engine: Engine, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        zeros = engine.zeros.get((engine.controller.branch, slot.path))
        if zeros is None or engine.measure:
            return engine.fallback(slot, original, args, kwargs, "no-factors")
        spec, shapes, inputs = zeros
        if inputs != input_shapes(args, kwargs):  # zeros shaped for other inputs: compute in full
            return engine.fallback(slot, original, args, kwargs, "shape")
        engine.forecast_hits.append(slot.path)
        if engine.flops is not None:
            engine.flops.skipped(slot.path)
        return unflatten([torch.zeros(x[0], dtype=x[1], device=x[2]) if isinstance(x, tuple) else x
                          for x in shapes], spec)

    def traced(self, engine: Engine, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        return engine.forecast_eager(slot, original, args, kwargs)


class ShortcutKind:
    """A block that, when every child it consumes is forecast, computes its output from their forecasts alone."""

    name = "shortcut"
    forecasts = False

    def forecast(self, engine: Engine, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        children = slot.children
        first = input_shapes(args, kwargs)[:1]  # the block's hidden states: what its children take (see shortcuts)
        if engine.measure or any(c.entry is None or c.index not in engine.ready or c.entry.shape[:1] != first
                                 for c in children):
            return original(*args, **kwargs)  # the children decide for themselves (fallbacks included)
        forecasts = {}
        for name, child in zip(slot.target.inputs, children):
            forecasts[name] = assemble(child.entry, engine.ready.pop(child.index))
            engine.forecast_hits.append(child.path)
            child.seen = engine.call_id
        if engine.flops is not None:
            for child in children:
                engine.flops.skipped(child.path)
        if engine.flops is not None and slot.saved_flops is not None:
            stats = engine.observer.stats
            stats.flops_skipped = (stats.flops_skipped or 0) + slot.saved_flops(slot.module, *args, **kwargs)
        return slot.shortcut(slot.module, forecasts, *args, **kwargs)

    def traced(self, engine: Engine, slot: Slot, original: Any, args: tuple, kwargs: dict) -> Any:
        first = input_shapes(args, kwargs)[:1]
        children = slot.children
        if any(c.entry.shape[:1] != first for c in children):
            return original(*args, **kwargs)
        forecasts = {}
        for name, child in zip(slot.target.inputs, children):
            predicted = [traced_sum(s.factors, child.weights, d if engine.cast else None)
                         for s, d in zip(child.entry.states, child.entry.dtypes)]
            forecasts[name] = assemble(child.entry, predicted)
        return slot.shortcut(slot.module, forecasts, *args, **kwargs)


def bind_traced(engine: Engine, branch: Any, point: float) -> None:
    """A forecasting branch under ``torch.compile``: bind each slot's factors and weight tensor for ``traced``
    (``slot.live``), or leave it to the eager path (no factors, mixed abscissae, a measured forecast). On CUDA (or
    with ``engine.static_factors``) the factors and weights sit in buffers at fixed addresses, for CUDA graphs
    (``state.StaticFactors``); this runs outside any captured region."""
    entries, weights_of, measuring = engine.store.entries, engine.traced_weights, bool(engine.measure)
    cache: dict[tuple, torch.Tensor] = {}
    for slot in engine.forecast_slots:
        entry = entries.get((branch, slot.path))
        slot.entry, slot.live = entry, False
        if entry is None or not entry.states or measuring or weights_of is None:
            continue
        state = entry.states[0]
        if any(s.points != state.points or len(s.factors) != len(state.factors) for s in entry.states):
            continue
        device = state.factors[0].device
        static = engine.static_factors if engine.static_factors is not None else device.type == "cuda"
        key = (state.points, len(state.factors), device)
        if key not in cache:
            values = weights_of(state, point)
            cache[key] = engine.static.weights(values, device, len(cache)) if static else to_device(values, device)
        if static:
            slot.entry = engine.static.bind(engine.store, (branch, slot.path), entry)
        slot.weights, slot.live = cache[key], True
    for slot in engine.slots:
        if slot.mode == "shortcut":
            slot.live = bool(slot.children) and all(c.live for c in slot.children) and not measuring


KINDS: dict[str, Any] = {"output": OutputKind(), "residual": ResidualKind(), "skip": SkipKind(),
                         "shortcut": ShortcutKind()}
