"""State: the factors of every (branch, target), the output structure they are put back into, and their bytes.

One owner (the runtime of one handle), one reset (``clear``, at the start of every generation). The forecast
math comes from the forecaster (``forecast/``); this file only stores, checks and frees.

Example:
    >>> from taylorseer.forecast import TaylorForecast, build_forecaster
    >>> store = FactorStore(build_forecaster(TaylorForecast(max_order=1)))
    >>> store.record((0, "blocks.0.attn"), [torch.ones(2)], None, point=0.0, keep_history=True, shape=(2,))
    >>> store.nbytes
    8
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..forecast.base import FactorState, Forecaster

TENSOR = object()  # placeholder for a tensor leaf in a stored output structure
Key = tuple[Any, str]  # (branch, target path)


def flatten(output: Any) -> tuple[list, Any]:
    """Leaves and structure of a module output; a bare tensor (the common case) skips pytree (spec None)."""
    if isinstance(output, torch.Tensor):
        return [output], None
    return pytree.tree_flatten(output)


def unflatten(leaves: list, spec: Any) -> Any:
    """Inverse of ``flatten``."""
    return leaves[0] if spec is None else pytree.tree_unflatten(leaves, spec)


def describe_leaves(target: str, leaves: list) -> None:
    """``TypeError`` naming ``target`` if an output leaf cannot be forecast (only floating tensors and constants
    such as None, bools, ints and strings that the block returns unchanged every step)."""
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not (leaf.is_floating_point() or leaf.is_complex()):
                raise TypeError(f"target {target!r} returns a {leaf.dtype} tensor: only floating-point outputs can "
                                f"be forecast; leave this module out of modules=...")
        elif not isinstance(leaf, (type(None), bool, int, float, str)):
            raise TypeError(f"target {target!r} returns a {type(leaf).__name__} object: only tensors (in tuples, "
                            f"lists or dicts) and constants can be forecast; leave this module out of modules=...")


@dataclass
class Entry:
    """What is kept for one (branch, target): factors per tensor leaf, the structure, the input shape."""

    states: tuple[FactorState, ...]
    spec: Any
    constants: list  # the output's leaves with TENSOR in the tensor slots
    dtypes: list[torch.dtype]
    shape: tuple  # the shape of the target's first tensor input at the last full step (checked on forecasts)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)


class FactorStore:
    """Factors of every (branch, target), through one forecaster; ``factor_dtype`` stores them in another dtype."""

    def __init__(self, forecaster: Forecaster, factor_dtype: torch.dtype | None = None):
        self.forecaster = forecaster
        self.factor_dtype = factor_dtype
        self.entries: dict[Key, Entry] = {}
        self.nbytes = 0
        self.peak_nbytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def clear(self) -> None:
        """Drop every factor (a new generation, or no forecast step left)."""
        self.entries.clear()
        self.nbytes = 0

    def drop(self, key: Key) -> None:
        """Forget one (branch, target): its next call is computed in full and starts the factors again."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes()

    def record(self, key: Key, leaves: list, spec: Any, *, point: float, keep_history: bool, shape: tuple) -> None:
        """Update the factors of ``key`` from the output ``leaves`` computed at abscissa ``point``.

        A change of output structure or of any tensor's shape starts the factors again (re-anchoring), so a
        forecast never mixes features of different shapes.
        """
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        constants = [TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        old = self.entries.get(key)
        if old is not None and (old.spec != spec or old.constants != constants or old.shape != shape
                                or any(s.factors[0].shape != t.shape for s, t in zip(old.states, tensors))):
            self.drop(key)
            old = None
        states = old.states if old is not None else tuple(self.forecaster.empty() for _ in tensors)
        new = tuple(self.forecaster.update(s, t.detach(), point, keep_history=keep_history,
                                           factor_dtype=self.factor_dtype) for s, t in zip(states, tensors))
        entry = Entry(new, spec, constants, [t.dtype for t in tensors], shape)
        self.nbytes += entry.nbytes() - (old.nbytes() if old is not None else 0)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        self.entries[key] = entry

    def finite(self, key: Key) -> bool:
        """Whether the newest highest-order factor of every leaf is finite (a NaN or an overflow anywhere in the
        differences reaches it); one reduction per tensor, taken on full steps only."""
        return all(bool(torch.isfinite(s.factors[-1]).all()) for s in self.entries[key].states)

    def predict(self, key: Key, point: float) -> list[torch.Tensor]:
        """The forecast tensors of ``key`` at abscissa ``point`` (in the dtypes the target returned)."""
        entry = self.entries[key]
        if self.factor_dtype is None:
            return [self.forecaster.predict(s, point) for s in entry.states]
        return [self.forecaster.predict(s, point, dtype=d) for s, d in zip(entry.states, entry.dtypes)]

    def assemble(self, key: Key, predicted: list[torch.Tensor]) -> Any:
        """Predicted tensors put back into the structure the target returned on its last full step."""
        entry = self.entries[key]
        if entry.spec is None:
            return predicted[0]
        it = iter(predicted)
        return pytree.tree_unflatten([next(it) if x is TENSOR else x for x in entry.constants], entry.spec)
