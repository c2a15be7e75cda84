"""Probe bookkeeping for adaptive policies: what the probe targets computed, how far that was from their
forecast, how much it changed since their previous computed step, and what to record if the step is computed.

Example:
    >>> probes = Probes()
    >>> probes.observation()
    (0.0, 0.0)
"""

from __future__ import annotations

from typing import Any

import torch

from .observers import l1_change_sums, squared_error_sums
from .state import FactorStore


class Probes:
    """One handle's probe state: the previous outputs per (branch, target) and this branch's sums."""

    def __init__(self) -> None:
        self.previous: dict[tuple, list[torch.Tensor]] = {}  # probe targets' last computed outputs
        self.reset()

    def reset(self) -> None:
        """A new branch: no sums, nothing pending."""
        self.pending: list[tuple] = []  # (slot, key, leaves, spec, shape), recorded if the step is computed
        self.sums: list[Any] = [0.0, 0.0, 0.0, 0.0]  # forecast error num/den (L2), change num/den (L1), on device
        self.ready = True  # every probe target had factors of the right shape to forecast from

    def clear(self) -> None:
        self.previous.clear()
        self.reset()

    def remember(self, key: tuple, leaves: list) -> None:
        """A probe target's computed output: the next probe's change is measured from it."""
        self.previous[key] = [x.detach() for x in leaves if isinstance(x, torch.Tensor)]

    def observe(self, store: FactorStore, point: float, slot: Any, key: tuple, leaves: list, spec: Any,
                shape: tuple) -> None:
        """Compare a probe target's computed output with its forecast and with its previous output."""
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        entry = store.entries.get(key)
        tell = getattr(store.forecaster, "observe_anchor", None)
        if tell is not None:  # the anchored forecaster regresses on the probe's fresh output (forecast/anchored.py)
            tell(slot.path, point, tensors, None if entry is None else entry.states)
        if entry is None or entry.shape != shape:
            self.ready = False
        else:
            num, den = squared_error_sums(store.predict(key, point), tensors)
            self.sums[0] = self.sums[0] + num
            self.sums[1] = self.sums[1] + den
        num, den = l1_change_sums(tensors, self.previous.get(key))
        self.sums[2] = self.sums[2] + num
        self.sums[3] = self.sums[3] + den
        self.remember(key, leaves)
        self.pending.append((slot, key, leaves, spec, shape))

    def device_sums(self) -> list[Any]:
        """The four sums (tensors on the device, or floats): read on the host once, by the engine."""
        return list(self.sums)

    def observation(self) -> tuple[float, float]:
        """(relative L2 forecast error, relative L1 change) over the probe targets of this branch, from the sums
        once the engine has read them on the host (``sums`` are then floats)."""
        v = [float(x) for x in self.sums]
        return (v[0] / max(v[1], 1e-30)) ** 0.5, v[2] / max(v[3], 1e-30)
