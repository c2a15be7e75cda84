"""One verb: ``apply(model_or_pipe, config) -> handle``; ``handle.remove()`` (or leaving ``with``) undoes it exactly.

On a model, the sampling loop tells the handle each step. On a diffusers pipeline (an object with ``.transformer``
and ``.scheduler``), the pipeline's scheduler tells it: just call the pipeline.

Example:
    >>> import taylorseer
    >>> handle = taylorseer.apply(model, taylorseer.preset("paper_dit"))         # doctest: +SKIP
    >>> with handle.step(0, timestep=999):                                         # doctest: +SKIP
    ...     eps = model(x, 999, labels)
    >>> handle.remove()                                                            # doctest: +SKIP
    >>> with taylorseer.apply(pipe, taylorseer.preset("paper_flux")) as handle:  # doctest: +SKIP
    ...     image = pipe("a cat", num_inference_steps=50).images[0]
"""

from __future__ import annotations

import logging
from typing import Any, overload

from torch import nn

from .adapters import default_config, resolve_targets, unwrap
from .auto import plan_speedup
from .config import TaylorSeerConfig
from .forecast.linear_file import calibration_of
from .integrations.pipeline import PipelineHandle, check_pipeline, is_pipeline
from .parts import CacheConfig, parts_of
from .runtime.handle import CacheHandle

__all__ = ["apply", "default_config"]  # default_config: the adapters' (the family's preset), re-exported

log = logging.getLogger("taylorseer")


@overload
def apply(model: nn.Module, config: TaylorSeerConfig | CacheConfig | None = None, *,
          guidance_scale: float | None = None, cfg_mode: str | None = None, speedup: float | None = None,
          diagnose: bool = False) -> CacheHandle: ...


@overload
def apply(model: Any, config: TaylorSeerConfig | CacheConfig | None = None, *,
          guidance_scale: float | None = None, cfg_mode: str | None = None, speedup: float | None = None,
          diagnose: bool = False) -> PipelineHandle: ...


def apply(model: nn.Module | Any, config: TaylorSeerConfig | CacheConfig | None = None, *,
          guidance_scale: float | None = None, cfg_mode: str | None = None, speedup: float | None = None,
          diagnose: bool = False) -> CacheHandle | PipelineHandle:
    """Install forecasting on ``model`` (in place, reversibly) and return the handle that owns its state.

    ``model`` is a ``torch.nn.Module`` (a transformer, ``torch.compile``d or not; returns a ``CacheHandle``) or a
    diffusers pipeline with ``.transformer`` and ``.scheduler`` (returns a ``PipelineHandle``; the scheduler tells
    the steps). On a module the steps are told by your loop (``handle.step``) or, when nothing tells them, read
    from each call's timestep argument, so ``apply(pipe.transformer)`` then ``pipe(...)`` works too.
    ``config=None`` takes the family's recommended preset (``default_config``). The targets come from
    ``config.modules`` path patterns or the adapter registered for the model's class. Everything is validated
    before the model is touched: on any error the model is left unmodified.

    A calibrated config (``load_calibration(path).cache_config()``: fitted weights) is refused for another model
    class, config or weights, and, when given, for another ``guidance_scale`` or a ``cfg_mode`` (``"batch"``: one
    doubled CFG batch per step, ``"split"``: a call per branch) its weights' row layout cannot serve
    (``CalibrationError`` naming the mismatch). The guidance scale cannot be seen from the model's calls: pass it
    here. The row layout is also checked at the first step of every generation, before any forecast.

    ``speedup=X`` instead of a config: the library picks, per generation, the best method it knows that reaches X
    FLOPs speedup on this model (a calibration of this model found by its fingerprint, else the family preset
    adapted to X) and says what it chose in ``repr(handle)`` and the log (``taylorseer.auto``; docs/design.md,
    "Speed targets"). ``config`` and ``speedup`` are mutually exclusive. ``diagnose=True``: the first generation
    also computes every forecast target in full and records the forecast's relative L2 error per step and target in
    ``stats.probe_errors`` (the model still receives the forecasts; ``taylorseer.eval.diagnose``).

    Example:
        >>> with taylorseer.apply(pipe.transformer) as handle:   # doctest: +SKIP
        ...     image = pipe("a cat", num_inference_steps=50).images[0]
        >>> handle = taylorseer.apply(model, speedup=6)          # doctest: +SKIP
    """
    if speedup is not None or diagnose is not False:
        if not isinstance(diagnose, bool):
            raise TypeError(f"diagnose must be a bool, got {type(diagnose).__name__} {diagnose!r}")
        if speedup is None:
            handle = apply(model, config, guidance_scale=guidance_scale, cfg_mode=cfg_mode)
        elif config is not None:
            raise ValueError("apply(): speedup and config are mutually exclusive: give config (the method, by hand) "
                             "or speedup=X (the method that reaches X is chosen), not both")
        else:  # taylorseer.auto chooses the family and the planner; installed as any config, then told the planner
            chosen, planner, line = plan_speedup(model, speedup, guidance_scale)
            handle = apply(model, chosen, guidance_scale=guidance_scale, cfg_mode=cfg_mode)
            getattr(handle, "cache", handle).planner = planner
            log.info("%s", line)
        getattr(handle, "cache", handle).diagnose_generations = int(diagnose)
        return handle
    given = default_config(model) if config is None else config
    if not isinstance(given, (TaylorSeerConfig, CacheConfig)):
        raise TypeError(f"config must be a TaylorSeerConfig or a CacheConfig (see taylorseer.preset), "
                        f"got {type(given).__name__}")
    parts = parts_of(given)  # the one conversion: below the API everything reads a CacheConfig
    calibration = calibration_of(parts)
    if calibration is not None:
        calibration.check_sampling(guidance_scale, cfg_mode)
    elif cfg_mode is not None and cfg_mode not in ("batch", "split"):
        raise ValueError(f"cfg_mode must be one of ['batch', 'split'] or None, got {cfg_mode!r}")
    if isinstance(model, nn.Module):
        model = unwrap(model)  # a torch.compile'd module: install on the module it compiles
        return CacheHandle.install(model, parts, resolve_targets(model, parts.targets), given)
    if is_pipeline(model) or hasattr(model, "transformer") or hasattr(model, "unet"):
        check_pipeline(model)
        return PipelineHandle.install(model, parts, resolve_targets(unwrap(model.transformer), parts.targets), given)
    raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline with .transformer and .scheduler, "
                    f"got {type(model).__name__}")
