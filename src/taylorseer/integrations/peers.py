"""diffusers' own TaylorSeer (``diffusers.hooks.taylorseer_cache``) on the same model, modules and schedule as ours.

For benchmarks only: it lets a run compare our handle with ``TaylorSeerCacheConfig`` at equal settings. The
returned ``DiffusersTaylorSeer`` is driven exactly like a ``CacheHandle`` (``begin(num_steps)``, then a
``step(index, timestep, sigma)`` context around the model call(s) of each step; ``remove()``), so the same sampler
drives both. What it needs from diffusers, and how we provide it:

* hooks: ``apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_identifiers=..., skip_predict_identifiers=...))``
  with the regexes of *our* adapter's targets (its default patterns hook nothing on DiT and PixArt);
* a ``cache_context``: its state lookup raises without one, and most pipelines never open one; a forward
  pre-hook on the model sets ``CacheContext(f"branch{k}", step_index=...)`` for the k-th call of each told step;
* a reset per generation: ``begin`` calls the registry's ``reset_stateful_hooks``.

Schedules: diffusers computes a step if ``step < disable_cache_before_step`` or
``(step - disable_cache_before_step - 1) % cache_interval == 0``, which is not our interval policy (it forecasts
step W and computes W + 1). With ``match_schedule=True`` (default) each hook instance's compute decision is
replaced by our ``IntervalPolicy`` plan at the told step index, so both run the same full/forecast steps and only
the forecasting code differs; with ``match_schedule=False`` diffusers' own rule and call counting are used
(``cache_interval=interval``, ``disable_cache_before_step=warmup_steps``).

Example:
    >>> peer = apply_diffusers_taylorseer(model, interval=4, warmup_steps=2, max_order=1,
    ...                                   module_regexes=adapter_regexes(model))         # doctest: +SKIP
    >>> images = sample(model, labels, num_steps=50, listener=peer)                      # doctest: +SKIP
    >>> peer.remove()                                                                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters.registry import resolve_targets
from ..config import TaylorSeerConfig
from ..parts import CacheConfig, Targets, parts_of
from ..policy.interval import IntervalPolicy


def adapter_regexes(model: nn.Module, where: Targets | CacheConfig | TaylorSeerConfig | None = None
                    ) -> tuple[list[str], list[str]]:
    """``(cache, skip)`` regexes (for ``re.fullmatch``) naming exactly our module-granularity targets of ``model``:
    forecast modules, and modules that return zeros on forecast steps (diffusers' "skip_predict" mode). ``where``:
    the ``Targets`` (or a config holding them) whose ``modules`` and ``block_shortcuts`` apply (default: the
    adapter's); the granularity is always ``module``."""
    chosen = Targets() if where is None else where if isinstance(where, Targets) else parts_of(where).targets
    targets = resolve_targets(model, dataclasses.replace(chosen, granularity="module"))
    cache = [re.escape(t.path) for t in targets if t.mode == "output"]
    skip = [re.escape(t.path) for t in targets if t.mode == "skip"]
    return cache, skip


class DiffusersTaylorSeer:
    """diffusers' TaylorSeer hooks installed on ``model``, told the steps like a ``CacheHandle``."""

    def __init__(self, model: nn.Module, hooks: dict[str, Any], policy: IntervalPolicy | None):
        self.model = model
        self.hooks = hooks  # module path -> diffusers TaylorSeerCacheHook
        self.policy = policy
        self._plan: list[bool] | None = None
        self._index: int | None = None
        self._branch = 0
        self._where: dict[str, Any] = {}
        self._pre_hook = model.register_forward_pre_hook(self._on_model_call)
        if policy is not None:
            for hook in hooks.values():
                hook._measure_should_compute = self._decision_for(hook)  # per hook instance, removed with it

    @property
    def hooked(self) -> list[str]:
        """Paths of the modules diffusers hooked."""
        return list(self.hooks)

    def begin(self, num_steps: int | None = None) -> None:
        """Start a generation: reset diffusers' per-module state (and make our plan when matching schedules)."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        if self.policy is not None:
            if num_steps is None:
                raise ValueError("match_schedule=True needs num_steps: call begin(num_steps)")
            self._plan = self.policy.plan(num_steps)
        self._index = None

    @contextlib.contextmanager
    def step(self, index: int, timestep: Any = None, sigma: Any = None, branch: Any = None) -> Iterator[None]:
        """Context in which model calls belong to step ``index``; the k-th call of the step is branch k."""
        if self.policy is not None and self._plan is None:
            raise RuntimeError("call begin(num_steps) before the first step")
        self._branch = -1 if index != self._index else self._branch
        self._index = index
        self._where = {"step_index": index, "timestep": timestep,
                       "sigma": float(sigma) if isinstance(sigma, (int, float, torch.Tensor)) else None}
        try:
            yield
        finally:
            self._where = {}
            self._set_context(None)

    def remove(self) -> None:
        """Remove diffusers' hooks and ours. The hooked modules keep diffusers' instance ``forward`` (a bound
        method of the original) and registry attribute: diffusers' removal is outside our control."""
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        self._pre_hook.remove()
        HookRegistry.check_if_exists_or_initialize(self.model).remove_hook(_TAYLORSEER_CACHE_HOOK, recurse=True)
        self.hooks = {}

    def __enter__(self) -> DiffusersTaylorSeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------------------------------------------
    def _on_model_call(self, module: nn.Module, args: tuple) -> None:
        if not self._where:
            return  # outside a told step: diffusers' hooks will raise for want of a cache_context
        self._branch += 1
        self._set_context(f"branch{self._branch}")

    def _set_context(self, name: str | None) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        context = None if name is None else CacheContext(name, **self._where)
        _set_cache_context(self.model, context)

    def _decision_for(self, hook: Any) -> Any:
        def should_compute() -> tuple[bool, Any]:
            state = hook.state_manager.get_state()
            index = hook.state_manager.context.step_index
            state.current_step = index
            assert self._plan is not None, "begin(num_steps) makes the plan before any step runs"
            return self._plan[index] or state.last_update_step is None, state

        return should_compute


def apply_diffusers_taylorseer(
    model: nn.Module,
    interval: int,
    warmup_steps: int,
    max_order: int,
    module_regexes: Sequence[str] | tuple[Sequence[str], Sequence[str]],
    *,
    factor_dtype: torch.dtype | None = None,
    match_schedule: bool = True,
) -> DiffusersTaylorSeer:
    """Hook diffusers' ``TaylorSeerCacheConfig`` onto the modules of ``model`` named by ``module_regexes``.

    ``module_regexes`` are ``re.fullmatch`` patterns on module paths, or a ``(cache, skip)`` pair such as
    ``adapter_regexes(model)`` returns (skip modules use diffusers' zero-returning "skip_predict" mode).
    ``interval`` / ``warmup_steps`` / ``max_order`` mean what they mean in ``TaylorSeerConfig``; ``factor_dtype``
    None keeps each feature's dtype (diffusers' default is bfloat16). Raises ``ValueError`` if nothing is hooked.

    Example:
        >>> peer = apply_diffusers_taylorseer(dit, 4, 2, 1, adapter_regexes(dit))   # doctest: +SKIP
        >>> peer.begin(50); len(peer.hooked) > 0                                    # doctest: +SKIP
        True
    """
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK, TaylorSeerCacheConfig, apply_taylorseer_cache

    policy = IntervalPolicy(interval, warmup_steps)  # validates the three ints
    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 0:
        raise ValueError(f"max_order must be an int >= 0, got {max_order!r}")
    if len(module_regexes) == 2 and not isinstance(module_regexes[0], str):  # a (cache, skip) pair
        cache, skip = list(module_regexes[0]), list(module_regexes[1])
    else:
        cache, skip = [r for r in module_regexes if isinstance(r, str)], []
        if len(cache) != len(module_regexes):
            raise TypeError(f"module_regexes must be regex strings or a (cache, skip) pair of them, "
                            f"got {module_regexes!r}")
    if not cache:
        raise ValueError("module_regexes must name at least one module to cache, e.g. adapter_regexes(model)")
    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=warmup_steps,
        max_order=max_order,
        taylor_factors_dtype=factor_dtype,
        cache_identifiers=cache,
        skip_predict_identifiers=skip,
    )
    apply_taylorseer_cache(model, config)
    hooks = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_TAYLORSEER_CACHE_HOOK) if registry is not None else None
        if hook is not None:
            hooks[name] = hook
    if not hooks:
        raise ValueError(f"diffusers' TaylorSeer hooked no module of {type(model).__name__} with {cache + skip}")
    return DiffusersTaylorSeer(model, hooks, policy if match_schedule else None)
