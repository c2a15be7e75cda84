"""Install and remove: swap the forward of each target module (per instance), restore it exactly.

The swapped-in forward is a small ``Forward`` object whose hot path reads a few plain flags and either returns the
target's ready forecast (an eager forecast step, after the step's batched pass) or calls one engine entry point;
all bookkeeping lives in the engine. A copy of a model with an applied handle (``copy.deepcopy``)
is a plain model: each ``Forward`` copies itself as the module's own forward. Pickling one (``torch.save(model)``)
is refused with a message saying to ``remove()`` first or save the ``state_dict``.

Example:
    >>> installation = Installation.install(model, engine)   # doctest: +SKIP
    >>> installation.remove()                                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import types
from typing import Any

import torch
from torch import nn

from ..adapters.registry import unwrap as unwrap  # defined with the adapters; importable here as before
from .engine import Engine, Slot

# ``torch.compiler.is_compiling()`` in one Python frame instead of two: dynamo folds ``is_dynamo_compiling`` to True
# while it traces; non-strict export (no dynamo) sets the module flag ``_is_compiling_flag`` around its tracing.
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler
Tensor = torch.Tensor
_INSTALLED: dict[int, Any] = {}  # id(module) -> owner, to refuse applying twice anywhere in one model


class Forward:
    """A target's forward while installed. Eager: the ready forecast of a plain forecast call, handed out here
    (``engine.hot``, ``slot.fast``), or one call into the engine. Traced by ``torch.compile``: plain
    flags and bound tensors only, so a forecast step adds no graph break; dynamo guards on ``engine.active``,
    ``engine.forecasting``, ``engine.branch_open`` and the slot's ``live`` / ``opens`` (constant within a
    generation) and on the bound factors' shapes."""

    __slots__ = ("engine", "slot", "original", "module")

    def __init__(self, engine: Engine, slot: Slot, original: Any, module: nn.Module):
        self.engine, self.slot, self.original, self.module = engine, slot, original, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine
        if not engine.active:  # no told step; or removed (never active again) but left in another wrapper's chain
            return self.original(*args, **kwargs)
        slot = self.slot
        if not (_is_dynamo_compiling() or _compiler._is_compiling_flag):  # eager
            # A forecast call in an eager forecasting branch after its batched pass (``engine.hot``): the target's
            # ready tensor, when the call is what ``engine.call`` and ``OutputKind.forecast`` would pass straight
            # through (a target that is neither the branch's opening one nor already run in it; one tensor
            # argument of the shape recorded, ``slot.fast``; keyword arguments left at None). Anything else, and
            # a target without a ready forecast, takes ``engine.call``.
            if engine.hot and slot.fast is not None and len(args) == 1 and not slot.opens \
                    and slot.seen != engine.call_id:
                x = args[0]
                if type(x) is Tensor and x.shape == slot.fast:
                    for value in kwargs.values():
                        if value is not None:
                            break
                    else:
                        predicted = engine.ready.pop(slot.index, None)
                        if predicted is not None:
                            slot.seen = engine.call_id
                            engine.forecast_hits.append(slot.path)
                            return predicted[0]
            return engine.call(slot, self.original, args, kwargs)
        # Traced: what follows becomes part of the compiled graph; host work is behind disabled calls.
        engine.compiled = True
        if engine.counting:
            return engine.call_eager(slot, self.original, args, kwargs)
        if slot.opens:
            if engine.branch_open:
                engine.enter(slot)  # the next model call of the step (a CFG branch): a graph break
            else:
                engine.branch_open = True
        elif not engine.branch_open:
            engine.enter(slot)  # a target called before the opening slot (another call order)
        if slot.resolves and engine.controller.probing:
            engine.resolve()  # the probe group has run: the decision of the step (a graph break)
        if engine.forecasting:
            if slot.live:
                return slot.kind.traced(engine, slot, self.original, args, kwargs)
            return engine.forecast_traced_fallback(slot, self.original, args, kwargs)
        if slot.mode == "shortcut":
            return self.original(*args, **kwargs)
        return engine.computed(slot, args, kwargs, self.original(*args, **kwargs))

    def __deepcopy__(self, memo: dict) -> Any:
        # Called while the module's __dict__ is copied: the copy gets the original forward, bound to the copy.
        new_module = memo.get(id(self.module))
        original = self.original
        if isinstance(original, types.MethodType) and original.__self__ is self.module:
            return types.MethodType(original.__func__, new_module if new_module is not None else self.module)
        return copy.deepcopy(original, memo)

    def __reduce__(self) -> Any:
        raise TypeError(f"cannot pickle a model with taylorseer applied (module {self.slot.path!r}): call "
                        f"handle.remove() first, or save model.state_dict()")


_VARIANTS: dict[tuple, type] = {}


def is_applied(model: nn.Module) -> bool:
    """Whether a taylorseer handle is installed on ``model`` or any module in it (``torch.compile`` wrappers are
    looked through).

    Example:
        >>> is_applied(nn.Linear(2, 2))
        False
    """
    return any(id(m) in _INSTALLED for m in unwrap(model).modules())


def forward_class(original: Any, slot: Slot) -> type:
    """A ``Forward`` subclass whose ``__call__`` has its own code object for each (module forward, mode,
    ``enters``): dynamo keeps compiled variants per code object, so targets of different kinds never share (and
    exhaust) one recompile budget, while the same kind in every block shares one compiled frame."""
    code = getattr(getattr(original, "__func__", original), "__code__", None)
    key = (code, slot.mode, slot.enters)
    if key not in _VARIANTS:
        base = Forward.__call__
        name = f"{getattr(code, 'co_name', 'forward')}_{slot.mode}{'_enters' if slot.enters else ''}"
        call = types.FunctionType(base.__code__.replace(co_name=f"__call__[{name}]"), base.__globals__,
                                  base.__name__, base.__defaults__, base.__closure__)
        _VARIANTS[key] = type(f"Forward[{name}]", (Forward,), {"__slots__": (), "__call__": call})
    return _VARIANTS[key]


class Installation:
    """The swapped forwards of one handle, and how to restore them."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, bool, Any]] = []
        self.roots: list[int] = []

    @classmethod
    def install(cls, model: nn.Module, engine: Engine, owner: Any) -> Installation:
        """Swap the forward of every slot's module; on any error, restore what was swapped and re-raise."""
        taken = [name or type(model).__name__ for name, m in model.named_modules() if id(m) in _INSTALLED]
        if taken:
            raise ValueError(f"taylorseer is already applied to {taken[:3]}: remove() that handle first")
        installation = cls()
        try:
            for slot in engine.slots:
                module = model.get_submodule(slot.path)
                original = module.forward
                if slot.mode == "residual":
                    slot.names = list(inspect.signature(original).parameters)
                installation.saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
                module.forward = forward_class(original, slot)(engine, slot, original, module)
                _INSTALLED[id(module)] = owner
            if id(model) not in _INSTALLED:  # the root too, so that a second handle anywhere in it is refused
                _INSTALLED[id(model)] = owner
                installation.roots.append(id(model))
        except BaseException:
            installation.remove()
            raise
        return installation

    def remove(self) -> None:
        """Restore every swapped forward exactly. Idempotent."""
        for module, had_own, original in reversed(self.saved):
            if isinstance(module.__dict__.get("forward"), Forward):
                if had_own:
                    module.forward = original
                else:
                    module.__dict__.pop("forward", None)
            elif isinstance(module.__dict__.get("_old_forward"), Forward):
                module._old_forward = original  # an offload hook attached after apply saved our forward inside
            _INSTALLED.pop(id(module), None)
        for root in self.roots:
            _INSTALLED.pop(root, None)
        self.saved.clear()
        self.roots.clear()
