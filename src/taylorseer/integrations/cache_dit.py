"""cache-dit's DBCache on a model we sample, through cache-dit's own API, told the steps like our handle.

For benchmarks: cache-dit (the cache that SGLang, vLLM-Omni, TensorRT-LLM and xDiT embed) runs here as its users run
it: ``cache_dit.BlockAdapterRegister.get_adapter(transformer)`` finds cache-dit's own ``BlockAdapter`` for the
transformer class (for ``DiTTransformer2DModel``: its DiT adapter, forward pattern 3 with its ``DiTPatchFunctor``;
for ``FluxTransformer2DModel``: its Flux adapter), and ``cache_dit.enable_cache(adapter, cache_config=DBCacheConfig(
..., num_inference_steps=N, enable_separate_cfg=False), calibrator_config=...)`` installs DBCache: the first
``Fn`` blocks are computed on every step, the residual of the rest is reused or forecast by a calibrator
(TaylorSeer, FoCa, DMD), the last ``Bn`` blocks are computed again; which steps are computed in full is decided by
cache-dit's own threshold rule (relative L1 change of the Fn output, warm-up, caps) or by a step mask
(``steps_computation_mask``; ``mask_policy="static"`` reuses on every masked step, ``"dynamic"`` lets the threshold
rule decide there). The model is a parameter: any transformer class cache-dit has an adapter for (by class name)
works, and ``apply_cache_dit(..., adapter=...)`` takes a ``BlockAdapter`` built by hand for others.

cache-dit counts the steps itself (one transformer call per step when CFG is one batch, ``enable_separate_cfg=False``)
and starts a new generation after ``num_inference_steps`` calls. ``CacheDitPeer`` is driven like a ``CacheHandle``
(``begin(num_steps)``, a ``step(index, ...)`` context per step, ``remove()``); it counts the model calls of each
told step and raises if a step makes other than one call (cache-dit's count would then drift from the told step).

cache-dit is optional (the ``peers`` extra: ``pip install "taylorseer[peers]"``). ``cache_dit_version()`` is None
without it, and ``eval.peer_grid.cache_dit_methods`` then returns no method (the bench prints one line saying
so).

Example:
    >>> settings = CacheDitSettings(fn_blocks=1, calibrator="taylorseer")
    >>> peer = apply_cache_dit(model, settings, num_steps=50)           # doctest: +SKIP
    >>> images = sample(model, labels, num_steps=50, listener=peer)     # doctest: +SKIP
    >>> peer.stats()["steps_full"]                                      # doctest: +SKIP
    20
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import nn

PEER_FAMILY = "cache-dit"
CALIBRATORS = ("none", "taylorseer", "foca", "dmd")
MASK_POLICIES = ("static", "dynamic")


def cache_dit_version() -> str | None:
    """The installed cache-dit's version, None when it is not installed (or does not import).

    Example:
        >>> cache_dit_version() is None or isinstance(cache_dit_version(), str)
        True
    """
    try:
        module = importlib.import_module("cache_dit")
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def _require() -> Any:
    try:
        return importlib.import_module("cache_dit")
    except ImportError as err:
        raise ImportError("cache-dit is not installed: pip install \"taylorseer[peers]\" (cache-dit==1.5.3)") from err


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """cache-dit logs every install and summary at INFO: hold its loggers at WARNING inside the block."""
    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name == "cache_dit" or name.startswith("cache_dit.")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


#################################################################################
#                                    Settings                                   #
#################################################################################

@dataclass(frozen=True)
class CacheDitSettings:
    """One DBCache setting, in cache-dit's terms.

    ``fn_blocks`` / ``bn_blocks``: ``Fn_compute_blocks`` (>= 1) / ``Bn_compute_blocks`` (>= 0). ``threshold``:
    ``residual_diff_threshold`` (cache-dit's rule: reuse while the relative L1 change of the Fn output stays below
    it). ``warmup_steps``: ``max_warmup_steps``. ``max_cached_steps`` / ``max_continuous_cached_steps``: cache-dit's
    caps (-1: none). ``full_steps``: a step mask (the 0-based steps marked 1 in ``steps_computation_mask``; None: no
    mask, the threshold rule decides) with ``mask_policy`` (``"static"``: every other step reuses/forecasts;
    ``"dynamic"``: the threshold rule decides there). ``calibrator``: ``"none"`` (plain residual reuse),
    ``"taylorseer"`` (of ``taylorseer_order``), ``"foca"`` or ``"dmd"``.

    Example:
        >>> CacheDitSettings(fn_blocks=2, calibrator="taylorseer", taylorseer_order=2).label()
        'F2B0-ts2-t0.08'
    """

    fn_blocks: int = 1
    bn_blocks: int = 0
    threshold: float = 0.08
    warmup_steps: int = 2
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    full_steps: tuple[int, ...] | None = None
    mask_policy: str = "static"
    calibrator: str = "none"
    taylorseer_order: int = 1
    separate_cfg: bool | None = None
    family: ClassVar[str] = PEER_FAMILY

    def __post_init__(self) -> None:
        for name, low in (("fn_blocks", 1), ("bn_blocks", 0), ("warmup_steps", 0), ("max_cached_steps", -1),
                          ("max_continuous_cached_steps", -1), ("taylorseer_order", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CacheDitSettings.{name} must be an int >= {low}, got {value!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"CacheDitSettings.threshold must be a finite number >= 0, got {t!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"CacheDitSettings.calibrator must be one of {list(CALIBRATORS)}, got {self.calibrator!r}")
        if self.separate_cfg not in (None, True, False):
            raise ValueError(f"CacheDitSettings.separate_cfg must be None, True or False, got {self.separate_cfg!r}")
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"CacheDitSettings.mask_policy must be one of {list(MASK_POLICIES)}, "
                             f"got {self.mask_policy!r}")
        if self.full_steps is not None:
            steps = tuple(self.full_steps)
            if not steps or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])) or \
                    not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
                raise ValueError(f"CacheDitSettings.full_steps must be None or sorted unique ints starting with 0, "
                                 f"got {self.full_steps!r}")
            object.__setattr__(self, "full_steps", steps)

    def label(self) -> str:
        """A short name: blocks, calibrator, and the threshold or ``mask``."""
        cal = {"none": "reuse", "taylorseer": f"ts{self.taylorseer_order}", "foca": "foca", "dmd": "dmd"}
        rule = "mask" if self.full_steps is not None and self.mask_policy == "static" else f"t{self.threshold:g}"
        return f"F{self.fn_blocks}B{self.bn_blocks}-{cal[self.calibrator]}-{rule}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``full_steps`` as a list or None)."""
        out = asdict(self)
        out["full_steps"] = list(self.full_steps) if self.full_steps is not None else None
        return out

    def cache_config(self, num_steps: int, separate_cfg: bool = False) -> Any:
        """cache-dit's ``DBCacheConfig`` for a ``num_steps``-step generation: CFG as one batch, or with
        ``separate_cfg`` (the settings' own value wins when not None) two calls per step, cond then uncond, each
        with its own cache (cache-dit's ``enable_separate_cfg``)."""
        cache_dit = _require()
        mask = None
        if self.full_steps is not None:
            if self.full_steps[-1] >= num_steps:
                raise ValueError(f"CacheDitSettings.full_steps must lie below num_steps={num_steps}, "
                                 f"got step {self.full_steps[-1]}")
            full = set(self.full_steps)
            mask = [1 if step in full else 0 for step in range(num_steps)]
        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.fn_blocks, Bn_compute_blocks=self.bn_blocks,
            residual_diff_threshold=float(self.threshold), max_warmup_steps=self.warmup_steps,
            max_cached_steps=self.max_cached_steps, max_continuous_cached_steps=self.max_continuous_cached_steps,
            enable_separate_cfg=bool(separate_cfg if self.separate_cfg is None else self.separate_cfg),
            num_inference_steps=num_steps, steps_computation_mask=mask,
            steps_computation_policy=self.mask_policy)

    def calibrator_config(self) -> Any:
        """cache-dit's calibrator config (None for plain reuse)."""
        if self.calibrator == "none":
            return None
        cache_dit = _require()
        if self.calibrator == "taylorseer":
            return cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
        if self.calibrator == "foca":
            return cache_dit.FoCaCalibratorConfig()
        return cache_dit.DMDCalibratorConfig()


#################################################################################
#                                   The peer                                    #
#################################################################################

class CacheDitPeer:
    """cache-dit's DBCache installed on ``model``; told the steps like a ``CacheHandle``. Build with
    ``apply_cache_dit``. ``adapter``: what ``enable_cache`` was given (a ``BlockAdapter``, or the pipeline on the
    pipeline path); ``calls_per_step``: the model calls cache-dit counts per step (2 with separate CFG)."""

    def __init__(self, model: nn.Module, adapter: Any, settings: CacheDitSettings, num_steps: int,
                 calls_per_step: int = 1):
        self.model, self.adapter, self.settings, self.num_steps = model, adapter, settings, num_steps
        self.calls_per_step = calls_per_step
        self._calls = 0
        self._index: int | None = None
        self._removed = False
        self._hook = model.register_forward_pre_hook(self._on_call)

    def begin(self, num_steps: int | None = None) -> None:
        """A new generation; ``num_steps`` must be the one cache-dit was configured for."""
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"cache-dit was installed for {self.num_steps} steps (num_inference_steps), "
                             f"got a generation of {num_steps}")
        self._index = None

    @contextlib.contextmanager
    def step(self, index: int, timestep: Any = None, sigma: Any = None, branch: Any = None) -> Iterator[None]:
        """Model calls inside belong to step ``index``; cache-dit counts them itself, so exactly one is allowed."""
        if self._removed:
            raise RuntimeError("this cache-dit peer was removed")
        self._index, self._calls = index, 0
        try:
            yield
        finally:
            calls, self._index = self._calls, None
            if calls != self.calls_per_step:
                raise RuntimeError(f"step {index} made {calls} model calls: cache-dit was installed for "
                                   f"{self.calls_per_step} per step (enable_separate_cfg="
                                   f"{self.calls_per_step == 2}; one CFG batch per step is cfg_mode='batch')")

    def _on_call(self, module: nn.Module, args: tuple) -> None:
        self._calls += 1

    def stats(self) -> dict[str, Any]:
        """What cache-dit reports for the last generation: ``steps_full`` / ``steps_forecast`` (from its cached
        steps), ``pattern`` (``F`` computed, ``f`` cached) and ``cache_dit`` (its version)."""
        cache_dit = _require()
        with _quiet():
            summaries = cache_dit.summary(self.model, logging=False)
        cached: list[int] | None = None
        for item in summaries:
            steps = getattr(item, "cached_steps", None)
            if steps is not None:
                cached = sorted(int(s) for s in steps)
                break
        if cached is None:
            return {"cache_dit": cache_dit_version()}
        done = set(cached)
        return {"steps_full": self.num_steps - len(done), "steps_forecast": len(done),
                "pattern": "".join("f" if i in done else "F" for i in range(self.num_steps)),
                "cache_dit": cache_dit_version()}

    def remove(self) -> None:
        """Remove our hook and cache-dit's cache (``cache_dit.disable_cache``). Idempotent."""
        if self._removed:
            return
        self._hook.remove()
        cache_dit = _require()
        with _quiet(), contextlib.suppress(Exception):  # cache-dit's own removal; the bench drops the copy anyway
            cache_dit.disable_cache(self.adapter)
        self._removed = True


# Transformer classes whose users run cache-dit on a diffusers pipeline: class name -> (a builder of that pipeline
# around the transformer, whether its sampler runs CFG as two calls per step). ``register_pipeline`` fills it.
PIPELINES: dict[str, tuple[Callable[[nn.Module], Any], bool]] = {}


def register_pipeline(transformer_class: str, builder: Callable[[nn.Module], Any], separate_cfg: bool) -> None:
    """Run cache-dit on ``transformer_class`` models through their pipeline, as its users do:
    ``cache_dit.enable_cache(builder(model), ...)`` (cache-dit's registered adapter for the pipeline class), with
    ``enable_separate_cfg=separate_cfg`` unless the settings say otherwise.

    Example:
        >>> register_pipeline("FluxTransformer2DModel", flux_pipeline, separate_cfg=True)   # doctest: +SKIP
    """
    if not isinstance(transformer_class, str) or not transformer_class or not callable(builder):
        raise ValueError(f"register_pipeline needs a class name and a builder, got {transformer_class!r}, {builder!r}")
    PIPELINES[transformer_class] = (builder, bool(separate_cfg))


def apply_cache_dit(model: nn.Module, settings: CacheDitSettings, num_steps: int, *, adapter: Any = None
                    ) -> CacheDitPeer:
    """Install cache-dit's DBCache on ``model`` in place with ``settings`` for ``num_steps``-step generations.

    ``adapter``: a ``cache_dit.BlockAdapter`` for ``model`` (None: for a class with a registered pipeline
    (``register_pipeline``, e.g. the FLUX reference's ``FluxPipeline``) cache-dit's pipeline path,
    ``cache_dit.enable_cache(pipe, ...)``; else cache-dit's registered adapter for the model's class).
    On the pipeline path cache-dit patches the pipeline *class*'s ``__call__`` to reset its caches per generation,
    so every pipeline of that class around ``model`` samples with the cache until ``remove()``. ``ValueError``
    naming why when cache-dit has no adapter for the class, or when ``Fn + Bn`` exceeds the model's blocks;
    ``ImportError`` without cache-dit.

    Example:
        >>> peer = apply_cache_dit(copy.deepcopy(dit), CacheDitSettings(), 50)   # doctest: +SKIP
    """
    cache_dit = _require()
    if not isinstance(settings, CacheDitSettings):
        raise TypeError(f"settings must be CacheDitSettings, got {type(settings).__name__}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    pipeline = PIPELINES.get(type(model).__name__) if adapter is None else None
    separate = pipeline[1] if pipeline is not None else False
    separate = separate if settings.separate_cfg is None else settings.separate_cfg
    config, calibrator = settings.cache_config(num_steps, separate), settings.calibrator_config()
    with _quiet():
        if pipeline is not None:
            pipe = pipeline[0](model)
            _check_blocks(cache_dit.BlockAdapterRegister.get_adapter(pipe), settings, model)
            cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
            return CacheDitPeer(model, pipe, settings, num_steps, 2 if separate else 1)
        if adapter is None:
            adapter = cache_dit.BlockAdapterRegister.get_adapter(model)
        if adapter is None:
            raise ValueError(f"cache-dit {cache_dit_version()} has no block adapter for {type(model).__name__}; "
                             f"pass adapter=cache_dit.BlockAdapter(transformer=..., blocks=..., forward_pattern=...)")
        _check_blocks(adapter, settings, model)
        cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
    return CacheDitPeer(model, adapter, settings, num_steps, 2 if separate else 1)


def _check_blocks(adapter: Any, settings: CacheDitSettings, model: nn.Module) -> None:
    blocks = sum(len(b) for b in _block_lists(adapter))
    if settings.fn_blocks + settings.bn_blocks > blocks:
        raise ValueError(f"CacheDitSettings: fn_blocks + bn_blocks = {settings.fn_blocks + settings.bn_blocks} "
                         f"exceeds the {blocks} blocks of {type(model).__name__}")


def _block_lists(adapter: Any) -> list[Any]:
    blocks = adapter.blocks
    while isinstance(blocks, (list, tuple)) and blocks and isinstance(blocks[0], (list, tuple)):
        blocks = [b for group in blocks for b in group]
    return list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]


#################################################################################
#                                 Bench methods                                 #
#################################################################################

# cache-dit on its own rule: the threshold rule at Fn=1 (its cheapest anchor) with plain reuse and its TaylorSeer
# calibrator (O=1, O=2). Measured on the embedded DiT (8 images, seed 0, warm-up 2), full steps of 50: threshold
# 0.12 -> 13, 0.2 -> 9, 0.3 -> 6, 0.5 -> 4 (the rule is adaptive: each record's steps_full is measured). 0.08 is
# cache-dit's default.
OWN_RULE = tuple(CacheDitSettings(fn_blocks=1, threshold=t, calibrator=c, taylorseer_order=o, warmup_steps=2)
                 for t in (0.08, 0.12, 0.2, 0.3) for c, o in (("none", 1), ("taylorseer", 1), ("taylorseer", 2)))
# Fixed-interval step masks (warm-up 2) sparse enough for Fn=1 to fit near 22 % of full compute on a 6-block model:
# N = 16 and 24 give 5 and 4 full steps of 50.
MASK_INTERVALS = (16, 24)
# with a searched schedule as its step mask: Fn/Bn and every calibrator
MASKED = ((1, 0, "none", 1), (1, 0, "taylorseer", 1), (1, 0, "taylorseer", 2), (1, 0, "foca", 1), (1, 0, "dmd", 1),
          (1, 1, "taylorseer", 1), (2, 0, "taylorseer", 2))
