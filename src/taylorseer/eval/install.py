"""How a bench method is made ready on a model: one installer per family of peers, ``taylorseer.apply`` for any
``CacheConfig``, nothing for plain sampling.

An installer takes the bench's model and a ``Method`` and returns an ``Installed``: the model to sample (the same
one, or a deep copy for peers whose removal leaves attributes behind), the listener to tell the steps to, how to
undo it, how to read its stats. ``installer_for`` picks the installer registered for the method's family, else
``taylorseer.apply`` for a ``CacheConfig`` (any family, any registered parts).

Example:
    >>> installed = installer_for(method)(model, method)     # doctest: +SKIP
    >>> installed.remove()                                   # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..api import apply
from ..config import TaylorSeerConfig
from ..devices import torch_dtype
from ..integrations.peers import adapter_regexes, apply_diffusers_taylorseer
from ..models.sampler import StepListener
from ..parts import CacheConfig
from ..policy.interval import IntervalSchedule
from .methods import PLAIN_FAMILIES, Method


@dataclass
class Installed:
    """A method made ready on a model: what to sample with, what to tell, how to undo it and read its stats."""

    model: nn.Module
    listener: StepListener | None
    remove: Callable[[], None]
    stats: Callable[[], dict[str, Any]]
    targets: list[str] = field(default_factory=list)
    probe: Callable[[str], None] | None = None


Installer = Callable[[nn.Module, Method], Installed]
INSTALLERS: dict[str, Installer] = {}


def register_installer(family: str, installer: Installer) -> None:
    """Register how methods of ``family`` are installed on a model (replaces any previous installer)."""
    INSTALLERS[family] = installer


def _install_plain(model: nn.Module, method: Method) -> Installed:
    stats = {"steps_full": method.num_steps, "steps_forecast": 0, "peak_cache_bytes": 0}
    return Installed(model, None, lambda: None, lambda: dict(stats))


def _install_taylorseer(model: nn.Module, method: Method) -> Installed:
    handle = apply(model, method.cache_config())

    def stats() -> dict[str, Any]:
        return {**handle.stats.to_dict(), "probe_errors": list(handle.stats.probe_errors)}

    return Installed(model, handle, handle.remove, stats, [t.path for t in handle.targets], handle.probe)


def _install_peer(model: nn.Module, method: Method) -> Installed:
    """diffusers' own TaylorSeer hook via ``taylorseer.integrations.peers``, on our adapter's modules and schedule.

    It runs on a deep copy of the model (diffusers' hook removal leaves attributes behind), so the peer never
    touches the model the other methods run on. The peer is told the steps like our handle when it has
    ``begin``/``step``; a ``stats`` attribute (``to_dict()`` or a dict) is recorded if present. Any failure,
    including a missing module, becomes the method's ``error``.
    """
    cfg = method.cache_config()
    policy, forecaster = cfg.policy, cfg.forecaster
    if not isinstance(policy, IntervalSchedule) or not hasattr(forecaster, "max_order"):
        raise TypeError(f"method {method.name!r}: diffusers' TaylorSeer reproduces a fixed interval with a Taylor "
                        f"forecaster, got {type(policy).__name__} and {type(forecaster).__name__}")
    clone = copy.deepcopy(model)
    factor_dtype = None if cfg.store.factor_dtype is None else torch_dtype(cfg.store.factor_dtype)
    where = TaylorSeerConfig(modules=cfg.targets.modules, block_shortcuts=cfg.targets.block_shortcuts)
    peer = apply_diffusers_taylorseer(clone, policy.interval, policy.warmup_steps, forecaster.max_order,
                                      adapter_regexes(clone, where), factor_dtype=factor_dtype)
    listener = peer if hasattr(peer, "begin") and hasattr(peer, "step") else None

    def stats() -> dict[str, Any]:
        raw: Any = getattr(peer, "stats", None)
        raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
        return dict(raw) if isinstance(raw, dict) else {}

    return Installed(clone, listener, getattr(peer, "remove", lambda: None), stats)


def installer_for(method: Method) -> Installer:
    """The installer registered for ``method.family``, else ``taylorseer.apply`` for a ``CacheConfig``; a peer's
    settings without a registered installer raise ``KeyError`` naming the registered families.

    Example:
        >>> installer_for(Method("full")) is INSTALLERS["full"]
        True
    """
    installer = INSTALLERS.get(method.family)
    if installer is not None:
        return installer
    if isinstance(method.config, CacheConfig):
        return _install_taylorseer
    raise KeyError(f"method {method.name!r}: no installer for family {method.family!r}; "
                   f"registered: {sorted(INSTALLERS)}")


def applies_config(method: Method) -> bool:
    """Whether ``method`` runs through ``taylorseer.apply`` (so its targets can be probed)."""
    return installer_for(method) is _install_taylorseer


for _family in PLAIN_FAMILIES:
    register_installer(_family, _install_plain)
register_installer("diffusers-peer", _install_peer)
