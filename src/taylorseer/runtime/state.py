"""State: the factors of every (branch, target), the output structure they are put back into, and their bytes.

One owner (the runtime of one handle), one reset (``clear``, at the start of every generation). The forecast
math comes from the forecaster (``forecast/``); this file only stores, checks and frees.

Example:
    >>> from taylorseer.forecast import TaylorForecast, build_forecaster
    >>> store = FactorStore(build_forecaster(TaylorForecast(max_order=1)))
    >>> entry = store.record((0, "blocks.0.attn"), [torch.ones(2)], None, point=0.0, keep_history=True, shape=(2,))
    >>> store.nbytes
    8
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..forecast.base import FactorState, Forecaster, writable

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


def _check_unchanged(target: str, old: Entry, spec: Any, constants: list, tensors: list) -> None:
    """``ValueError`` if an output computed from inputs of unchanged shapes differs from the stored one in
    structure, tensor shapes or non-tensor values: then it depends on more than the step's features, and the
    forecast steps since the last full step returned the old ones."""
    if old.spec != spec or len(old.constants) != len(constants):
        change = "its output structure"
    elif old.constants != constants:
        was, now = ("a tensor" if x is TENSOR else repr(x)
                    for x in next((a, b) for a, b in zip(old.constants, constants) if a is not b and a != b))
        change = f"a non-tensor output ({was} -> {now})"
    elif any(s.factors[0].shape != t.shape for s, t in zip(old.states, tensors)):
        change = "the shape of an output tensor"
    else:
        return
    raise ValueError(f"target {target!r} changed {change} between full steps although its inputs kept their "
                     f"shapes: forecast steps return the output of the last full step, so only outputs whose "
                     f"structure and non-tensor values stay the same can be forecast; leave this module out of "
                     f"modules=...")


def input_shapes(args: tuple, kwargs: dict) -> tuple:
    """The shapes of the tensor arguments (positional first, then keyword; one level into lists and tuples, whose
    lengths count too), as ``torch.Size`` (a tuple): what a forecast is checked against. The first item is the
    first tensor argument's shape."""
    shapes: list = []
    for value in args:
        if isinstance(value, torch.Tensor):
            shapes.append(value.shape)
        elif isinstance(value, (list, tuple)):
            shapes.append(tuple(v.shape if isinstance(v, torch.Tensor) else None for v in value))
    if kwargs:
        for value in kwargs.values():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                shapes.append(value.shape)
            elif isinstance(value, (list, tuple)):
                shapes.append(tuple(v.shape if isinstance(v, torch.Tensor) else None for v in value))
    return tuple(shapes)


def residual_leaves(path: str, names: tuple[str, ...], parameters: list[str], args: tuple, kwargs: dict,
                    leaves: list, constants: list | None) -> list:
    """Block granularity: output k is ``inputs[k] + residual``. With ``constants`` None, ``leaves`` are a block's
    outputs and their residuals are returned (None items pass through); else ``leaves`` are predicted residuals
    (the tensor slots of ``constants``; fresh tensors, overwritten with the outputs where ``writable``) and the
    outputs are returned. ``names``: the forward arguments the outputs
    are residuals of, in output order; ``parameters``: the forward's argument names (positional lookup)."""
    subtract = constants is None
    is_tensor = ([isinstance(x, torch.Tensor) for x in leaves] if constants is None
                 else [x is TENSOR for x in constants])
    if len(is_tensor) != len(names):
        raise ValueError(f"block {path!r} returned {len(is_tensor)} outputs but its adapter names "
                         f"{len(names)} residual inputs {names}")
    inputs = [kwargs[n] if n in kwargs else args[parameters.index(n)] for n, t in zip(names, is_tensor) if t]
    if subtract:
        it = iter(inputs)
        return [x - next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    # Predicted residuals are fresh forecasts: the input is added in place where that gives the same bits.
    return [r.add_(i) if writable(r, i) else i + r for i, r in zip(inputs, tensors)]


@dataclass
class Entry:
    """What is kept for one (branch, target): factors per tensor leaf, the structure, the input shape."""

    states: tuple[FactorState, ...]
    spec: Any
    constants: list  # the output's leaves with TENSOR in the tensor slots
    dtypes: list[torch.dtype]
    shape: tuple  # the shapes of the target's tensor inputs at the last full step (checked on forecasts)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)


class FactorStore:
    """Factors of every (branch, target), through one forecaster; ``factor_dtype`` stores them in another dtype."""

    def __init__(self, forecaster: Forecaster, factor_dtype: torch.dtype | None = None):
        self.forecaster = forecaster
        self.factor_dtype = factor_dtype
        self.entries: dict[Key, Entry] = {}
        self.version = 0  # changes whenever an entry does (a batched plan over the entries stays valid until then)
        self.nbytes = 0
        self.peak_nbytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def clear(self) -> None:
        """Drop every factor (a new generation, or no forecast step left)."""
        self.version += 1
        self.entries.clear()
        self.nbytes = 0

    def drop(self, key: Key) -> None:
        """Forget one (branch, target): its next call is computed in full and starts the factors again."""
        entry = self.entries.pop(key, None)
        self.version += 1
        if entry is not None:
            self.nbytes -= entry.nbytes()

    def record(self, key: Key, leaves: list, spec: Any, *, point: float, keep_history: bool, shape: tuple) -> Entry:
        """Update the factors of ``key`` from the output ``leaves`` computed at abscissa ``point``; returns the new
        entry.

        A change of the input shapes (``shape``) starts the factors again (re-anchoring), so a forecast never mixes
        features of different shapes. With the same input shapes, the output's structure, tensor shapes and
        non-tensor values must not change (forecast steps return them as the last full step gave them):
        ``ValueError`` naming the target otherwise.
        """
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        constants = [TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        old = self.entries.get(key)
        if old is not None and old.shape != shape:
            self.drop(key)
            old = None
        if old is not None:
            _check_unchanged(key[1], old, spec, constants, tensors)
        states = old.states if old is not None else tuple(self.forecaster.empty() for _ in tensors)
        new = tuple(self.forecaster.update(s, t.detach(), point, keep_history=keep_history,
                                           factor_dtype=self.factor_dtype) for s, t in zip(states, tensors))
        entry = Entry(new, spec, constants, [t.dtype for t in tensors], shape)
        self.nbytes += entry.nbytes() - (old.nbytes() if old is not None else 0)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        self.entries[key] = entry
        self.version += 1
        return entry

    def check_factors(self, entry: Entry) -> list[torch.Tensor]:
        """The factors whose finiteness proves the entry's: in the feature's own dtype a NaN or an overflow
        anywhere in the differences reaches the newest highest-order factor, so only that one; with
        ``factor_dtype`` each factor is cast on its own (a feature above 65504 overflows in float16 while its
        differences may not), so all of them."""
        return [f for s in entry.states for f in (s.factors if self.factor_dtype is not None else s.factors[-1:])]

    def finite(self, key: Key) -> bool:
        """Whether every factor of every leaf of ``key`` is finite (a host read; the runtime batches these reads
        in ``FiniteChecks`` instead).

        Example:
            >>> from taylorseer.forecast import TaylorForecast, build_forecaster
            >>> store = FactorStore(build_forecaster(TaylorForecast(max_order=0)))
            >>> store.record((0, "t"), [torch.ones(2)], None, point=0.0, keep_history=True, shape=(2,)).states[0].order
            0
            >>> store.finite((0, "t"))
            True
        """
        checks = FiniteChecks()
        entry = self.entries[key]
        checks.add(key, entry, self.check_factors(entry))
        return not checks.read_store(self, [])[0]

    def predict(self, key: Key, point: float) -> list[torch.Tensor]:
        """The forecast tensors of ``key`` at abscissa ``point`` (in the dtypes the target returned)."""
        entry = self.entries[key]
        # A forecaster with per_target = True (fitted weights per target) is also told the target path.
        extra: dict[str, Any] = {"target": key[1]} if getattr(self.forecaster, "per_target", False) else {}
        if self.factor_dtype is None:
            return [self.forecaster.predict(s, point, **extra) for s in entry.states]
        return [self.forecaster.predict(s, point, dtype=d, **extra) for s, d in zip(entry.states, entry.dtypes)]

    def assemble(self, key: Key, predicted: list[torch.Tensor]) -> Any:
        """Predicted tensors put back into the structure the target returned on its last full step."""
        entry = self.entries[key]
        if entry.spec is None:
            return predicted[0]
        it = iter(predicted)
        return pytree.tree_unflatten([next(it) if x is TENSOR else x for x in entry.constants], entry.spec)


def read_host(counter: Any, tensors: list) -> list[float]:
    """The values of ``tensors`` (0-d or 1-d, any device; floats pass through) on the host, in one transfer: the
    runtime's one way of reading a device value, counted in ``counter.host_reads`` when a device is read.

    Example:
        >>> class Counter: host_reads = 0
        >>> read_host(Counter, [torch.tensor(1.5), 2.0])
        [1.5, 2.0]
    """
    if not tensors:
        return []
    if all(not isinstance(t, torch.Tensor) for t in tensors):
        return [float(t) for t in tensors]
    parts = [t.reshape(-1).to(torch.float64) if isinstance(t, torch.Tensor) else torch.tensor([float(t)],
                                                                                              dtype=torch.float64)
             for t in tensors]
    device = next(t.device for t in tensors if isinstance(t, torch.Tensor))
    joined = torch.cat([p.to(device) for p in parts])
    counter.host_reads += 1
    return joined.cpu().tolist()  # one device-to-host copy (none on the CPU)


class FiniteChecks:
    """The factors' finiteness, checked on the device in one batched pass and read on the host lazily: once, at
    the start of the next branch whose decisions need it (or with a probe's observation), for every target at once.

    ``add`` keeps the factors recorded on a full step; ``launch`` (at the step's end) reduces them all with one
    ``torch._foreach_norm`` (L2, float32: a NaN or an infinity anywhere makes it non-finite; L2 rather than L1
    because the CPU's L1 norm is several times slower: 221 vs 32 us on one [32, 64, 128] float32 factor, 1 thread,
    AMD EPYC, scripts/experiments/elementwise_micro.py) and, on CUDA, starts a non-blocking copy of the flags to
    pinned host memory; ``read`` waits for that copy and returns the keys whose factors are not finite. Only a norm
    that overflowed on finite elements (above about 1.8e19 in float32) takes the exact element check (a second read,
    only then).

    Example:
        >>> checks = FiniteChecks()
        >>> checks.needed(0)
        False
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Key, Any, list[torch.Tensor]]] = []
        self.launched: list[tuple[list, torch.Tensor, Any]] = []  # (items, flags on the host or device, event)
        self.settled: list[Key] = []  # the keys of the last read

    def clear(self) -> None:
        self.pending.clear()
        self.launched.clear()

    def add(self, key: Key, entry: Any, factors: list[torch.Tensor]) -> None:
        self.pending.append((key, entry, factors))

    def needed(self, branch: Any) -> bool:
        """Whether a check of ``branch``'s factors is unread."""
        return any(k[0] == branch for k, _, _ in self.pending) or any(
            k[0] == branch for items, _, _ in self.launched for k, _, _ in items)

    def launch(self) -> None:
        """Reduce the pending factors on their device, one pass for all; start the flags' way to the host."""
        if not self.pending:
            return
        items, self.pending = self.pending, []
        factors = [f for _, _, fs in items for f in fs]
        if not factors:
            self.launched.append((items, torch.ones(0, dtype=torch.bool), None))
            return
        by_device: dict[tuple, list[int]] = {}
        for i, f in enumerate(factors):
            wide = f.dtype in (torch.float64, torch.complex128)
            by_device.setdefault((f.device, torch.float64 if wide else torch.float32), []).append(i)
        flags: list[torch.Tensor] = []
        order: list[int] = []
        for (device, accumulate), members in by_device.items():
            norms = torch._foreach_norm([factors[i] for i in members], 2, dtype=accumulate)
            flags.append(torch.isfinite(torch.stack(list(norms))).cpu() if device.type != "cuda"
                         else torch.isfinite(torch.stack(list(norms))))
            order.extend(members)
        event = None
        if any(f.device.type == "cuda" for f in flags):
            host = [torch.empty(f.shape, dtype=torch.bool, pin_memory=True) for f in flags]
            for h, f in zip(host, flags):
                h.copy_(f, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        joined = flags[0] if len(flags) == 1 else torch.cat(flags)
        if len(by_device) > 1:
            joined = joined[torch.tensor(order).argsort()]
        self.launched.append((items, joined, event))

    def read(self, counter: Any, extra: list | None = None) -> tuple[list[Key], list[float]]:
        """Wait for the launched checks, read them (and ``extra`` tensors, in the same read), and return the keys
        whose factors are not finite (stale entries, since replaced or dropped, are left out) and ``extra``'s
        values. Counted in ``counter.host_reads``."""
        return self.read_store(getattr(counter, "store", None), extra or [], counter)

    def read_store(self, store: Any, extra: list, counter: Any = None) -> tuple[list[Key], list[float]]:
        counter = counter if counter is not None else _Count()
        self.launch()
        batches, self.launched = self.launched, []
        for _, _, event in batches:
            if event is not None:
                event.synchronize()  # the copy issued at the full step's end (the device runs ahead until here)
        values = read_host(counter, extra)
        if batches and not any(isinstance(t, torch.Tensor) for t in extra):
            counter.host_reads += 1  # the flags' read (with a probe observation it is the same read)
        bad: list[Key] = []
        self.settled = []
        for items, flags, _ in batches:
            flat = flags.tolist()  # host memory: no device read here
            i = 0
            for key, entry, factors in items:
                ok = all(flat[i:i + len(factors)])
                i += len(factors)
                if store is not None and store.entries.get(key) is not entry:
                    continue  # replaced or dropped since: its check says nothing about the factors held now
                self.settled.append(key)
                if not ok:
                    # Non-finite norm: exact only if an element is not finite (finite elements may overflow it).
                    exact = read_host(counter, [torch.stack([torch.isfinite(f).all() for f in factors]).all()])
                    if not exact[0]:
                        bad.append(key)
        return bad, values


class _Count:
    host_reads = 0


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """``values`` as a float32 tensor on ``device``, without blocking the host on CUDA (from pinned memory).

    Example:
        >>> to_device([1.0, 0.5], torch.device("cpu")).tolist()
        [1.0, 0.5]
    """
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":  # a blocking copy would synchronize the stream
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class StaticFactors:
    """Factor and weight buffers at fixed addresses, for CUDA graphs (``torch.compile(mode="reduce-overhead")``).

    A captured graph reads its inputs from the addresses it was recorded with; any other input is copied into a
    static placeholder at every replay (every factor of every target, every forecast step) or makes the graph be
    recorded again. So when a traced forecast binds a target's factors (``bind``, at the start of a forecasting
    branch, outside any captured region), each factor is copied into a buffer that keeps its address for the life
    of the handle (one buffer per (branch, target, leaf, order), allocated at the first bind of its shape and
    marked with ``torch._dynamo.mark_static_address``), and the store's entry is pointed at the buffers, so no
    second copy is kept: the next full step's update reads them, and the bind after it copies the new factors in.
    The copy happens once per factor per full step (forecast steps between two full steps find the entry bound).
    The forecast weights go the same way (``weights``: one buffer per group, updated in place, from pinned memory
    without blocking on CUDA). The buffers outlive generations (the next generation replays the same graphs);
    ``release`` frees them (``handle.remove()``).

    Example:
        >>> static = StaticFactors()
        >>> static.weights([1.0, 0.5], torch.device("cpu"), 0).tolist()
        [1.0, 0.5]
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, list[torch.Tensor]] = {}  # (key, leaf) -> one buffer per factor index
        self.bound: dict[Key, Entry] = {}  # key -> the entry whose factors are the buffers
        self.weight_buffers: dict[tuple, torch.Tensor] = {}
        self.copies = 0  # factor tensors copied into buffers (one per factor per full step)

    def release(self) -> None:
        self.buffers.clear()
        self.bound.clear()
        self.weight_buffers.clear()

    def bind(self, store: FactorStore, key: Key, entry: Entry) -> Entry:
        """The entry with its factors in this key's static buffers (copied in if the store has a newer entry);
        the store then holds that entry. Entries whose states are not ``FactorState`` pass through."""
        if self.bound.get(key) is entry:
            return entry
        if not all(isinstance(s, FactorState) for s in entry.states):
            return entry
        sources = [f for s in entry.states for f in s.factors]
        held = {b.data_ptr() for leaf in range(len(entry.states)) for b in self.buffers.get((key, leaf), [])}
        if any(f.data_ptr() in held for f in sources):  # a factor carried over from the buffers (raw history)
            sources = [f.clone() if f.data_ptr() in held else f for f in sources]
        it = iter(sources)
        states = []
        for leaf, state in enumerate(entry.states):
            buffers = self.buffers.setdefault((key, leaf), [])
            factors = []
            for i in range(len(state.factors)):
                source = next(it)
                if i == len(buffers):
                    buffers.append(self._new(source))
                elif (buffers[i].shape, buffers[i].dtype, buffers[i].device) != (source.shape, source.dtype,
                                                                                  source.device):
                    buffers[i] = self._new(source)  # another shape: a new address (graphs record again)
                buffers[i].copy_(source)
                self.copies += 1
                factors.append(buffers[i])
            states.append(state._replace(factors=tuple(factors)))
        bound = Entry(tuple(states), entry.spec, entry.constants, entry.dtypes, entry.shape)
        store.entries[key] = bound  # same values: the store's version (and any plan over it) stays valid
        self.bound[key] = bound
        return bound

    @staticmethod
    def _new(like: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        torch._dynamo.mark_static_address(buffer)
        return buffer

    def weights(self, values: list[float], device: torch.device, group: int) -> torch.Tensor:
        """``values`` in the float32 buffer of (group, length, device), written in place."""
        key = (group, len(values), device)
        buffer = self.weight_buffers.get(key)
        if buffer is None:
            buffer = self.weight_buffers[key] = torch.empty(len(values), dtype=torch.float32, device=device)
            torch._dynamo.mark_static_address(buffer)
        host = torch.tensor(values, dtype=torch.float32)
        buffer.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=device.type == "cuda")
        return buffer
