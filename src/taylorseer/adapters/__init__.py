"""Adapters: where forecasting intercepts a model (registered per class, or path patterns for any model)."""

from . import diffusers as _diffusers  # noqa: F401  (registers the diffusers model records)
from .registry import (
                       AdapterSpec,
                       Target,
                       default_config,
                       find_adapter,
                       match_modules,
                       register_adapter,
                       resolve_targets,
                       unwrap,
)

__all__ = ["AdapterSpec", "Target", "default_config", "find_adapter", "match_modules", "register_adapter",
           "resolve_targets", "unwrap"]
