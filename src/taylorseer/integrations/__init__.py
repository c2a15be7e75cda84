"""Integrations with other libraries: diffusers pipelines (``pipeline``) and diffusers' own TaylorSeer (``peers``)."""

from .pipeline import PipelineHandle, is_pipeline

__all__ = ["PipelineHandle", "is_pipeline"]
