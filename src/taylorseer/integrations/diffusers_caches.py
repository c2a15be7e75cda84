"""diffusers' own FirstBlockCache and MagCache (``diffusers.hooks``) on a model we sample, told steps like our handle.

For benchmarks only: they let a run compare our forecasts with diffusers' two adaptive step caches at matched
compute. The returned ``DiffusersCache`` is driven exactly like a ``CacheHandle`` (``begin(num_steps)``, then a
``step(index, timestep, sigma)`` context around the model call(s) of each step; ``remove()``), so the same sampler
drives all of them. What diffusers needs, and how we provide it, as its pipelines do:

* hooks: ``apply_first_block_cache(model, FirstBlockCacheConfig(threshold=...))`` and ``apply_mag_cache(model,
  MagCacheConfig(...))``, the functions that ``CacheMixin.enable_cache`` dispatches to (``DiTTransformer2DModel``
  has no ``CacheMixin``, hence no ``enable_cache``/``cache_context`` of its own). Both hook the blocks of the first
  ``ModuleList`` named like ``transformer_blocks``: the first block decides, the others return their input on a
  skipped step and the first (FirstBlockCache: its output; MagCache: its input) gets the cached residual added.
* a cache context per model call: pipelines wrap each denoiser call in ``transformer.cache_context("cond")`` (or
  ``"uncond"``, ``"cond_uncond"`` for a doubled batch). A forward pre-hook on the model sets, with the same function
  ``cache_context`` uses, ``CacheContext(f"branch{k}", step_index=..., num_inference_steps=..., timestep=...,
  sigma=...)`` for the k-th call of each told step (one hook state per CFG branch), and clears it after the call.
* a reset per generation: ``begin`` calls the registry's ``reset_stateful_hooks`` (pipelines do the same through
  ``_reset_stateful_cache`` at the end of each call).

MagCache counts steps itself (its state's ``step_index`` advances once per model call of a branch). We check that
count against the told step before every call and raise ``RuntimeError`` when they disagree, rather than let it
read the wrong magnitude ratio. Its ``mag_ratios`` are per checkpoint and scheduler: ``calibrate_mag_ratios`` runs
diffusers' calibration mode (``MagCacheConfig(calibrate=True)``: nothing skipped, the ratios printed at the end of
the generation) on a few generations and averages the printed ratios.

How skipping is counted: after each model call the decision is read from the hooks' own shared state
(``should_compute``, set by the first block's hook for the branch's context); ``steps_full`` / ``steps_skipped``
count the first branch of each step, like ``CacheStats``. A forward hook on the first child module of the second
block (one that runs only when the remaining blocks are really computed) counts the same steps independently
(``steps_full_observed``); the two must agree.

Removal is exact: diffusers' ``remove_hook`` restores each block's forward as an *instance attribute* and leaves
its registry behind, so ``remove()`` also deletes the ``forward`` and ``_diffusers_hook`` attributes that were not
on a module before installation. Afterwards every module's ``__dict__`` has the keys it had and the model computes
bit-identical outputs.

Example:
    >>> peer = apply_diffusers_cache(model, FirstBlockCacheSettings(threshold=0.1), num_steps=50)  # doctest: +SKIP
    >>> images = sample(model, labels, num_steps=50, listener=peer)                              # doctest: +SKIP
    >>> peer.stats.steps_full, peer.stats.pattern()[:6]                                          # doctest: +SKIP
    (15, 'FffffF')
    >>> peer.remove()                                                                            # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.reference import NUM_CLASSES
from ..models.sampler import sample
from .diffusers_settings import (
    FirstBlockCacheSettings,
    MagCacheSettings,
    PeerSettings,
    SeaCacheSettings,
    _check_int,
)

__all__ = ["PEER_FAMILIES", "DiffusersCache", "FirstBlockCacheSettings", "MagCacheSettings", "PeerSettings",
           "PeerStats", "SeaCacheSettings", "apply_diffusers_cache", "calibrate_mag_ratios", "read_printed_ratios"]

PEER_FAMILIES = ("firstblockcache", "magcache")
# diffusers' lists of block containers (``hooks._common``), repeated here only to validate before applying
_BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers", "visual_transformer_blocks",
                "temporal_transformer_blocks")

#################################################################################
#                                   The peer                                    #
#################################################################################

@dataclass
class PeerStats:
    """What diffusers' cache decided in the current generation (reset by ``begin``).

    ``steps_full`` / ``steps_skipped``: steps whose first branch ran every block / reused the cached residual
    (read from the hooks' state); ``steps_full_observed``: steps whose first branch ran the watched module (the
    first child of the second block), counted by a forward hook, None when there is none to watch;
    ``decisions``: one record per model call {step, branch, compute, observed}; ``peak_cache_bytes``: the most
    bytes of tensors held in the hooks' states after a call.
    """

    steps_full: int = 0
    steps_skipped: int = 0
    steps_full_observed: int | None = 0
    peak_cache_bytes: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def pattern(self, branch: int = 0) -> str:
        """The decisions of one branch as a string: ``F`` computed in full, ``f`` skipped."""
        return "".join("F" if d["compute"] else "f" for d in self.decisions if d["branch"] == branch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; ``steps_forecast`` repeats ``steps_skipped`` under the bench's name."""
        return {"steps_full": self.steps_full, "steps_skipped": self.steps_skipped,
                "steps_forecast": self.steps_skipped, "steps_full_observed": self.steps_full_observed,
                "peak_cache_bytes": self.peak_cache_bytes, "pattern": self.pattern()}

def _hook_names(family: str) -> tuple[str, ...]:
    """(leader hook, block hook, ...) names diffusers registers for ``family``."""
    if family == "seacache":
        from diffusers.hooks.sea_cache import (
            _SEA_CACHE_BLOCK_HOOK,
            _SEA_CACHE_LEADER_BLOCK_HOOK,
            _SEA_CACHE_POST_NORM_HOOK,
            _SEA_CACHE_ROOT_HOOK,
        )

        return _SEA_CACHE_LEADER_BLOCK_HOOK, _SEA_CACHE_BLOCK_HOOK, _SEA_CACHE_ROOT_HOOK, _SEA_CACHE_POST_NORM_HOOK
    if family == "firstblockcache":
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        return _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    return _MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK

def _blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks diffusers' step caches hook: every block of the ``ModuleList`` children named like blocks."""
    return [block for name, child in model.named_children() if name in _BLOCK_LISTS and isinstance(child, nn.ModuleList)
            for block in child]

def _scalar(value: Any) -> float | None:
    """A told timestep or sigma as a float for ``CacheContext`` (None when it is not one number)."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

def _tensor_bytes(value: Any, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return value.untyped_storage().nbytes()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0

class DiffusersCache:
    """diffusers' FirstBlockCache or MagCache hooks installed on ``model``, told the steps like a ``CacheHandle``.

    Build it with ``apply_diffusers_cache``. ``num_steps``: the generation length the hooks were configured for
    (MagCache's ``num_inference_steps``; FirstBlockCache works at any length).
    """

    def __init__(self, model: nn.Module, settings: PeerSettings, num_steps: int, leader: Any,
                 snapshot: list[tuple[nn.Module, bool, bool]]) -> None:
        self.model = model
        self.settings = settings
        self.num_steps = num_steps
        self.stats = PeerStats()
        self._leader = leader  # the first block's hook: its state_manager holds the per-branch shared state
        self._snapshot = snapshot  # (module, had a registry, had an instance forward) before installation
        self._index: int | None = None
        self._branch = -1
        self._explicit_branch: int | None = None
        self._where: dict[str, Any] | None = None
        self._watched_calls = 0
        self._calls_before = 0
        self._removed = False
        self._begun = False
        blocks = _blocks(model)
        watched = next(iter(blocks[min(1, len(blocks) - 1)].children()), None)
        self._handles = [model.register_forward_pre_hook(self._before_call),
                         model.register_forward_hook(self._after_call)]
        if watched is not None:
            self._handles.append(watched.register_forward_hook(self._on_watched))
        self._watching = watched is not None

    # ---------------------------------------------------------------------------------------------------
    # telling the step
    # ---------------------------------------------------------------------------------------------------
    def begin(self, num_steps: int | None = None) -> None:
        """Start a generation: reset diffusers' per-branch state and our stats. MagCache needs ``num_steps`` to
        equal the length it was installed for (its ratios and retention are per step)."""
        from diffusers.hooks import HookRegistry

        self._check_alive()
        if num_steps is not None:
            _check_int("num_steps", num_steps, 1)
            if isinstance(self.settings, MagCacheSettings) and num_steps != self.num_steps:
                raise ValueError(f"MagCache was installed for {self.num_steps} steps, got a generation of {num_steps}")
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        self.stats = PeerStats(steps_full_observed=0 if self._watching else None)
        self._index = None
        self._begun = True

    @contextlib.contextmanager
    def step(self, index: int, timestep: Any = None, sigma: Any = None, branch: int | None = None) -> Iterator[None]:
        """Context in which model calls belong to step ``index`` (0-based); the k-th call is branch k unless
        ``branch`` names it. Step 0 after a finished generation starts a new one (as ``begin`` would)."""
        self._check_alive()
        _check_int("step index", index, 0)
        if index >= self.num_steps and isinstance(self.settings, MagCacheSettings):
            raise ValueError(f"step index must be < {self.num_steps} (MagCache's num_inference_steps), got {index}")
        if self._where is not None:
            raise RuntimeError("step() contexts cannot be nested")
        if self._index is not None and index < self._index:
            if index != 0:
                raise ValueError(f"step index must not decrease within a generation ({self._index} -> {index})")
            self.begin()
        elif self._index is None and not self._begun:
            self.begin()
        self._begun = False
        self._branch = -1 if index != self._index else self._branch
        self._index = index
        self._explicit_branch = branch
        told = _scalar(sigma)
        if isinstance(self.settings, SeaCacheSettings) and told is not None:
            told = told / (1.0 + told)  # VP sigma -> flow-matching sigma of the same SNR (SeaCacheSettings)
        self._where = {"step_index": index, "num_inference_steps": self.num_steps, "timestep": _scalar(timestep),
                       "sigma": told}
        try:
            yield
        finally:
            self._where = None
            self._set_context(None)

    def remove(self) -> None:
        """Remove diffusers' hooks and ours, and the attributes diffusers leaves behind: the model is as before
        installation (same ``__dict__`` keys on every module, bit-identical outputs). Idempotent."""
        from diffusers.hooks import HookRegistry

        if self._removed:
            return
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        registry.reset_stateful_hooks(recurse=True)  # drop the cached tensors
        for handle in self._handles:
            handle.remove()
        for name in _hook_names(self.settings.family):
            registry.remove_hook(name, recurse=True)
        _restore(self._snapshot)
        self._removed = True

    def __enter__(self) -> DiffusersCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError("this diffusers cache was removed")

    def _set_context(self, name: str | None) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.model, None if name is None else CacheContext(name, **(self._where or {})))

    def _before_call(self, module: nn.Module, args: tuple) -> None:
        if self._where is None:
            raise RuntimeError("the model was called outside a told step: wrap each model call in "
                               "cache.step(index, timestep, sigma) (diffusers' caches need a cache context)")
        self._branch = self._explicit_branch if self._explicit_branch is not None else self._branch + 1
        self._set_context(f"branch{self._branch}")
        if isinstance(self.settings, MagCacheSettings):
            counted = self._leader.state_manager.get_state().step_index
            if counted != self._index:
                raise RuntimeError(f"MagCache counts model calls: its step counter for branch {self._branch} is at "
                                   f"{counted} but the sampler told step {self._index}; call begin() before each "
                                   f"generation and make one model call per branch per step")
        self._calls_before = self._watched_calls

    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._leader.state_manager.get_state()
        compute = bool(state.gate_should_compute if isinstance(self.settings, SeaCacheSettings)
                       else state.should_compute)
        observed = self._watched_calls > self._calls_before if self._watching else None
        self.stats.decisions.append({"step": self._index, "branch": self._branch, "compute": compute,
                                     "observed": observed})
        if self._branch == 0:
            if compute:
                self.stats.steps_full += 1
            else:
                self.stats.steps_skipped += 1
            if observed and self.stats.steps_full_observed is not None:
                self.stats.steps_full_observed += 1
        seen: set[int] = set()
        held = sum(_tensor_bytes(v, seen) for s in self._leader.state_manager._state_cache.values()
                   for v in vars(s).values())
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, held)
        self._set_context(None)

    def _on_watched(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._watched_calls += 1

def _snapshot(model: nn.Module) -> list[tuple[nn.Module, bool, bool]]:
    return [(m, "_diffusers_hook" in vars(m), "forward" in vars(m)) for m in model.modules()]

def _restore(snapshot: list[tuple[nn.Module, bool, bool]]) -> None:
    """Delete the registries and instance forwards diffusers left on modules that had none (only where no hook
    remains registered); refresh the child-registry caches of registries that stay."""
    for module, had_registry, had_forward in snapshot:
        registry = vars(module).get("_diffusers_hook")
        if registry is not None and registry.hooks:
            continue
        if not had_forward:
            vars(module).pop("forward", None)
        if not had_registry:
            vars(module).pop("_diffusers_hook", None)
    for module, had_registry, _ in snapshot:
        if had_registry:
            vars(module)["_diffusers_hook"].invalidate_child_registries_cache()

def apply_diffusers_cache(model: nn.Module, settings: PeerSettings, num_steps: int, *,
                          calibrate: bool = False) -> DiffusersCache:
    """Install diffusers' FirstBlockCache or MagCache (by the type of ``settings``) on ``model`` in place.

    ``num_steps``: the generation length (MagCache's ``num_inference_steps``; its ``mag_ratios`` are interpolated
    to it by diffusers). ``calibrate`` (MagCache only): diffusers' calibration mode, which skips nothing and prints
    the ratios at the end of a generation (``calibrate_mag_ratios`` reads them). Raises ``ValueError`` naming why
    when the model cannot take the cache: no block list, too few blocks, a block class diffusers has no metadata
    for, MagCache without ``mag_ratios``, or a cache of this kind already installed.

    Example:
        >>> cache = apply_diffusers_cache(dit, FirstBlockCacheSettings(0.1), num_steps=50)   # doctest: +SKIP
    """
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        HookRegistry,
        MagCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
    )

    if not isinstance(settings, (FirstBlockCacheSettings, MagCacheSettings, SeaCacheSettings)):
        raise TypeError(f"settings must be FirstBlockCacheSettings, MagCacheSettings or SeaCacheSettings, "
                        f"got {type(settings).__name__}")
    _check_int("num_steps", num_steps, 1)
    if calibrate and not isinstance(settings, MagCacheSettings):
        raise ValueError("calibrate=True is MagCache's calibration mode; FirstBlockCache has none")
    blocks = _blocks(model)
    least = 1 if isinstance(settings, MagCacheSettings) else 2
    kind = type(model).__name__
    if len(blocks) < least:
        raise ValueError(f"diffusers' {settings.family} needs at least {least} blocks in a ModuleList named one of "
                         f"{list(_BLOCK_LISTS)}; {kind} has {len(blocks)}")
    names = _hook_names(settings.family)
    for module in model.modules():
        registry = vars(module).get("_diffusers_hook")
        if registry is not None and any(n in registry.hooks for n in names):
            raise ValueError(f"{kind} already has diffusers' {settings.family} hooks: remove them first")
    config: Any
    apply_fn: Callable[..., None]
    if isinstance(settings, FirstBlockCacheSettings):
        config, apply_fn = FirstBlockCacheConfig(threshold=float(settings.threshold)), apply_first_block_cache
    elif isinstance(settings, SeaCacheSettings):
        from diffusers.hooks import SeaCacheConfig
        from diffusers.hooks.sea_cache import apply_sea_cache

        config = SeaCacheConfig(threshold=float(settings.threshold), residual_order=settings.residual_order,
                                retention_steps=settings.retention_steps, cache_end_steps=settings.cache_end_steps,
                                max_consecutive_cached=settings.max_consecutive_cached, raw_vision_callback=_raw_vision)
        apply_fn = apply_sea_cache
    else:
        if settings.mag_ratios is None and not calibrate:
            raise ValueError("MagCache needs mag_ratios for this model: calibrate_mag_ratios(model, num_steps)")
        config = MagCacheConfig(threshold=float(settings.threshold), max_skip_steps=settings.max_skip_steps,
                                retention_ratio=float(settings.retention_ratio), num_inference_steps=num_steps,
                                mag_ratios=None if calibrate else list(settings.mag_ratios or ()), calibrate=calibrate)
        apply_fn = apply_mag_cache
    snapshot = _snapshot(model)
    try:
        apply_fn(model, config)
    except Exception as err:
        for name in names:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(name, recurse=True)
        _restore(snapshot)
        raise ValueError(f"diffusers' {settings.family} cannot be applied to {kind} "
                         f"(blocks {type(blocks[0]).__name__}): {type(err).__name__}: {err}") from err
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()  # as enable_cache does
    leader = getattr(blocks[0], "_diffusers_hook", None)
    leader = leader.get_hook(names[0]) if leader is not None else None
    if leader is None:
        _restore(snapshot)
        raise ValueError(f"diffusers' {settings.family} hooked no first block of {kind}")
    return DiffusersCache(model, settings, num_steps, leader, snapshot)

def _raw_vision(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """SeaCache's visual latents: each sample of an image batch ``[B, C, H, W]`` as one frame ``(C, 1, H, W)``
    (a video batch ``[B, C, T, H, W]`` as it is)."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        raise ValueError(f"SeaCache needs image latents [B, C, H, W] or video [B, C, T, H, W], got "
                         f"{None if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    return [xi.unsqueeze(1) if x.dim() == 4 else xi for xi in x]

#################################################################################
#                              MagCache calibration                             #
#################################################################################

_CALIBRATION_MARK = "[MagCache] Calibration Complete"
_CALIBRATIONS: dict[tuple, tuple[float, ...]] = {}  # (weights digest, settings) -> ratios: a pure memo

def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

def calibrate_mag_ratios(model: nn.Module, num_steps: int, generations: int = 2, num_images: int = 8,
                         guidance_scale: float = 1.5, cfg_mode: str = "batch") -> tuple[float, ...]:
    """MagCache's magnitude ratios of ``model`` for ``num_steps``-step sampling, from diffusers' calibration mode.

    Runs ``generations`` generations of ``num_images`` images (classes 0, 1, ... in turn, seeds 0, 1, ...) with our
    DDIM sampler under ``MagCacheConfig(calibrate=True)``, reads the ratios diffusers prints at the end of each and
    returns their per-step mean (``num_steps`` floats, the first 1.0). ``model`` is left as it was. Results are
    memoised by a digest of the weights and the arguments.

    Example:
        >>> ratios = calibrate_mag_ratios(load_reference(), 50)     # doctest: +SKIP
        >>> len(ratios), ratios[0]                                  # doctest: +SKIP
        (50, 1.0)
    """
    _check_int("generations", generations, 1)
    _check_int("num_images", num_images, 1)
    key = (_weights_digest(model), num_steps, generations, num_images, float(guidance_scale), cfg_mode)
    if key in _CALIBRATIONS:
        return _CALIBRATIONS[key]
    runs = []
    labels = torch.arange(num_images) % NUM_CLASSES
    for seed in range(generations):
        printed = io.StringIO()
        with apply_diffusers_cache(model, MagCacheSettings(), num_steps, calibrate=True) as cache:
            with contextlib.redirect_stdout(printed):
                sample(model, labels, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                       cfg_mode=cfg_mode, listener=cache)
        runs.append(read_printed_ratios(printed.getvalue(), num_steps))
    ratios = tuple(sum(run[i] for run in runs) / len(runs) for i in range(num_steps))
    _CALIBRATIONS[key] = ratios
    return ratios

def read_printed_ratios(text: str, num_steps: int) -> list[float]:
    """The list diffusers prints on the line after its calibration mark (the first branch's, if several)."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if _CALIBRATION_MARK in line]
    if not marks or marks[0] + 1 >= len(lines):
        raise RuntimeError(f"MagCache calibration printed no ratios (expected a line after {_CALIBRATION_MARK!r})")
    ratios = ast.literal_eval(lines[marks[0] + 1].strip())
    if not isinstance(ratios, list) or len(ratios) != num_steps:
        raise RuntimeError(f"MagCache calibration printed {ratios!r}, expected a list of {num_steps} ratios")
    return [float(r) for r in ratios]
