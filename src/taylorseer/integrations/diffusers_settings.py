"""The settings of diffusers' own step caches (FirstBlockCache, MagCache, SeaCache) as we run them: typed, frozen,
validated, JSON-ready. ``integrations.diffusers_caches`` installs them; each names its bench ``family``.

Example:
    >>> FirstBlockCacheSettings(threshold=0.1).to_dict()
    {'threshold': 0.1}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


def _check_float(name: str, value: Any, low: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class FirstBlockCacheSettings:
    """diffusers' FirstBlockCache: skip the remaining blocks while the first block's residual changes little.

    ``threshold``: the largest relative change ``mean|r - r_prev| / mean|r_prev|`` of the first block's residual
    (``r_prev`` from the last fully computed step) at which the remaining blocks are skipped; diffusers computes
    when the change is ``> threshold``, so 0 skips only a step whose residual did not change at all.

    Example:
        >>> FirstBlockCacheSettings(threshold=0.1).to_dict()
        {'threshold': 0.1}
    """

    threshold: float = 0.05
    family: ClassVar[str] = "firstblockcache"

    def __post_init__(self) -> None:
        _check_float("threshold", self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass(frozen=True)
class MagCacheSettings:
    """diffusers' MagCache: skip all blocks (reuse the last residual) while the accumulated magnitude error is small.

    ``threshold``: the largest accumulated error ``sum |1 - prod ratios|`` over consecutive skipped steps;
    ``max_skip_steps``: at most this many consecutive skipped steps (K in the paper); ``retention_ratio``: the first
    ``int(retention_ratio * num_steps + 0.5)`` steps are always computed. ``mag_ratios``: the per-step residual
    magnitude ratios of the checkpoint (None: calibrate them on the model when installed, with
    ``calibration_generations`` generations of ``calibration_images`` images each; see ``calibrate_mag_ratios``).
    Threshold 0 or ``max_skip_steps`` 0 never skips (unless a ratio is exactly 1).

    Example:
        >>> MagCacheSettings(threshold=0.06, retention_ratio=0.04).to_dict()["max_skip_steps"]
        3
    """

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: tuple[float, ...] | None = None
    calibration_generations: int = 2
    calibration_images: int = 8
    family: ClassVar[str] = "magcache"

    def __post_init__(self) -> None:
        _check_float("threshold", self.threshold)
        _check_int("max_skip_steps", self.max_skip_steps, 0)
        _check_float("retention_ratio", self.retention_ratio)
        if self.retention_ratio > 1:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        if self.mag_ratios is not None:
            ratios = tuple(self.mag_ratios)
            if not ratios or not all(isinstance(r, (int, float)) and math.isfinite(r) for r in ratios):
                raise ValueError("mag_ratios must be None or a non-empty sequence of finite numbers")
            object.__setattr__(self, "mag_ratios", tuple(float(r) for r in ratios))
        _check_int("calibration_generations", self.calibration_generations, 1)
        _check_int("calibration_images", self.calibration_images, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``mag_ratios`` as a list or None)."""
        out = asdict(self)
        out["mag_ratios"] = list(self.mag_ratios) if self.mag_ratios is not None else None
        return out


@dataclass(frozen=True)
class SeaCacheSettings:
    """diffusers' SeaCache (``diffusers.hooks.SeaCacheConfig``, arXiv 2602.18993): skip the whole block stack (reuse,
    or with ``residual_order=1`` extrapolate, the last residuals) while the accumulated relative change of a
    spectral-evolution-aware indicator of the *input latent* stays below ``threshold``; at most
    ``max_consecutive_cached`` skips in a row; the first ``retention_steps`` and last ``cache_end_steps`` steps full.

    SeaCache reads the flow-matching sigma in [0, 1] from the cache context. Our DDIM sampler tells the VP sigma
    ``s = sqrt((1 - alpha_bar) / alpha_bar)``; the peer passes ``s / (1 + s)``, the flow-matching sigma with the same
    signal-to-noise ratio (``x0 + s * eps`` up to scale). Told unconverted (s > 1 in early steps), SeaCache runs in
    its fail-open mode (every step full). Its indicator is built from each sample's latent as one frame
    ``(C, 1, H, W)``.

    Example:
        >>> SeaCacheSettings(threshold=0.5, max_consecutive_cached=8).to_dict()["residual_order"]
        1
    """

    threshold: float = 0.25
    max_consecutive_cached: int = 2
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    family: ClassVar[str] = "seacache"

    def __post_init__(self) -> None:
        _check_float("threshold", self.threshold)
        for name in ("max_consecutive_cached", "retention_steps", "cache_end_steps"):
            _check_int(name, getattr(self, name), 0)
        if self.residual_order not in (0, 1):
            raise ValueError(f"residual_order must be 0 or 1, got {self.residual_order!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


PeerSettings = FirstBlockCacheSettings | MagCacheSettings | SeaCacheSettings
