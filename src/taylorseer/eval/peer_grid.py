"""The bench methods of the peers of other libraries and how the bench installs them: diffusers' FirstBlockCache,
MagCache and SeaCache (``integrations.diffusers_caches``) and cache-dit's DBCache (``integrations.cache_dit``).

Each runs on a deep copy of the bench's model (the peers' removal leaves attributes behind), so a peer never
touches the model the other methods run on. A model a peer cannot take raises ``ValueError`` saying why, which
the bench records as the method's ``error``.

Example:
    >>> [m.family for m in peer_methods(50)][:1]
    ['firstblockcache']
"""

from __future__ import annotations

import copy

from torch import nn

from ..integrations.cache_dit import (
    MASK_INTERVALS,
    MASKED,
    OWN_RULE,
    CacheDitSettings,
    apply_cache_dit,
    cache_dit_version,
)
from ..integrations.diffusers_caches import (
    FirstBlockCacheSettings,
    MagCacheSettings,
    SeaCacheSettings,
    apply_diffusers_cache,
    calibrate_mag_ratios,
)
from ..policy.interval import IntervalPolicy
from .install import Installed, register_installer
from .methods import Method

# Chosen on the shipped checkpoint (load_reference(), DDIM 50 steps, CFG 1.5 as one doubled batch, the bench's
# 8 images of classes 0..7, seed 0): threshold -> full steps of 50 (PSNR dB vs full compute), measured
#   FirstBlockCache        0.05 -> 25 (29.4)   0.14 -> 11 (18.5)   0.2 -> 8 (14.8)
#   MagCache, K=8, r=0.04  0.06 -> 21 (27.0)   0.3  -> 11 (17.7)   0.8 -> 8 (16.7)
# i.e. near 8 and 11 full steps (our N=7 / N=5 grid points) plus diffusers' default threshold (for MagCache with
# our K and retention). Added for the calibrated comparison at 6 and 10 full steps (2026-12-01, the bench's 16
# images, seed 0): FirstBlockCache 0.16 -> 10, 0.3 -> 6; MagCache 0.4 -> 10, 1.2 -> 7 (with at most K=8 skips in a
# row and 2 steps always computed, 7 is the fewest it reached: 2.0 also gives 7). The counts are adaptive: other
# images, seeds or weights give other counts (each record's steps_full is measured). The calibrated MagCache
# ratios of that model fall from 0.996 (step 1) to 0.964 (step 45), then rise to 1.013 and 1.704 at the last two
# steps, which therefore cut most skip runs short.
FBCACHE_THRESHOLDS = (0.05, 0.14, 0.16, 0.2, 0.3)
MAGCACHE_THRESHOLDS = (0.06, 0.3, 0.4, 0.8, 1.2)
MAGCACHE_MAX_SKIP = 8
MAGCACHE_RETENTION = 0.04  # int(0.04 * 50 + 0.5) = 2 steps always computed: our grid's warm-up
# SeaCache (threshold, max consecutive skips), measured on the shipped checkpoint (2 images, seed 0, DDIM 50, CFG
# 1.5 batch; 2026-12-06): (1.0, 8) -> 7 full steps, (0.5, 8) -> 8, (0.5, 5) -> 11, (0.25, 4) -> 14. With its default
# of 2 consecutive skips it keeps >= 17 of 50 steps full (0.25 -> 19, 1.0 -> 18).
SEACACHE_SETTINGS = ((1.0, 8), (0.5, 8), (0.5, 5), (0.25, 4))


def peer_methods(num_steps: int = 50) -> list[Method]:
    """The bench methods of diffusers' FirstBlockCache, MagCache and SeaCache at the chosen settings.

    MagCache runs with ``max_skip_steps=MAGCACHE_MAX_SKIP`` and ``retention_ratio=MAGCACHE_RETENTION`` (diffusers'
    defaults, 3 and 0.2, keep at least 20 of 50 steps full) and ratios calibrated on the benchmarked model when
    installed. SeaCache runs at the ``SEACACHE_SETTINGS`` (threshold, consecutive skips).

    Example:
        >>> [m.name for m in peer_methods(50)]
        ['fbcache-t0.05', 'fbcache-t0.14', 'fbcache-t0.16', 'fbcache-t0.2', 'fbcache-t0.3', 'magcache-t0.06', \
'magcache-t0.3', 'magcache-t0.4', 'magcache-t0.8', 'magcache-t1.2', 'seacache-t1-k8', 'seacache-t0.5-k8', \
'seacache-t0.5-k5', 'seacache-t0.25-k4']
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    fbc = [Method(f"fbcache-t{t:g}", FirstBlockCacheSettings(t), num_steps) for t in FBCACHE_THRESHOLDS]
    mag = [Method(f"magcache-t{t:g}", MagCacheSettings(t, MAGCACHE_MAX_SKIP, MAGCACHE_RETENTION), num_steps)
           for t in MAGCACHE_THRESHOLDS]
    sea = [Method(f"seacache-t{t:g}-k{k}", SeaCacheSettings(t, k), num_steps) for t, k in SEACACHE_SETTINGS]
    return fbc + mag + sea


def install_diffusers_cache(model: nn.Module, method: Method) -> Installed:
    """diffusers' FirstBlockCache / MagCache on a deep copy of ``model`` (the bench's model is never touched).

    MagCache without ``mag_ratios`` is first calibrated on the copy (``calibrate_mag_ratios``, memoised per
    weights). A model the cache cannot take raises ``ValueError`` saying why, which the bench records as the
    method's ``error``.
    """
    settings = method.config
    if not isinstance(settings, (FirstBlockCacheSettings, MagCacheSettings, SeaCacheSettings)):
        raise ValueError(f"method {method.name!r} has no diffusers cache settings: {settings!r}")
    clone = copy.deepcopy(model)
    if isinstance(settings, MagCacheSettings) and settings.mag_ratios is None:
        ratios = calibrate_mag_ratios(clone, method.num_steps, settings.calibration_generations,
                                      settings.calibration_images)
        settings = MagCacheSettings(settings.threshold, settings.max_skip_steps, settings.retention_ratio, ratios)
    cache = apply_diffusers_cache(clone, settings, method.num_steps)
    return Installed(clone, cache, cache.remove, lambda: cache.stats.to_dict())


def cache_dit_methods(num_steps: int = 50, schedules: dict[str, tuple[int, ...]] | None = None,
                      own_rule: bool = True) -> list[Method]:
    """Bench methods of family ``cache-dit``: its own threshold rule (``OWN_RULE``), the fixed-interval masks of
    ``MASK_INTERVALS`` (Fn=1, TaylorSeer O=1/O=2), and, for each named schedule of
    ``schedules`` (name -> full steps, e.g. a calibration file's), that schedule as a static step mask with the
    ``MASKED`` Fn/Bn/calibrator choices (``own_rule=False``: these alone). Empty when cache-dit is not installed.

    Example:
        >>> [m.name for m in cache_dit_methods(50)][:1] if cache_dit_version() else []   # doctest: +SKIP
        ['cachedit-F1B0-reuse-t0.12']
    """
    if cache_dit_version() is None:
        return []
    methods = [Method(f"cachedit-{s.label()}", s, num_steps) for s in OWN_RULE] if own_rule else []
    named = {f"N{n}": tuple(i for i, full in enumerate(IntervalPolicy(n, 2).plan(num_steps)) if full)
             for n in MASK_INTERVALS} if own_rule else {}
    for name, steps in named.items():
        for calibrator, order in (("taylorseer", 1), ("taylorseer", 2)):
            s = CacheDitSettings(1, 0, full_steps=steps, calibrator=calibrator, taylorseer_order=order, warmup_steps=0)
            methods.append(Method(f"cachedit-{s.label()}@{name}", s, num_steps))
    for name, steps in (schedules or {}).items():
        for fn, bn, calibrator, order in MASKED:
            s = CacheDitSettings(fn, bn, full_steps=steps, calibrator=calibrator, taylorseer_order=order,
                                 warmup_steps=0)
            methods.append(Method(f"cachedit-{s.label()}@{name}", s, num_steps))
    return methods


def install_cache_dit(model: nn.Module, method: Method) -> Installed:
    """cache-dit on a deep copy of ``model`` (the bench's model is never touched)."""
    settings = method.config
    if not isinstance(settings, CacheDitSettings):
        raise ValueError(f"method {method.name!r} has no CacheDitSettings: {settings!r}")
    clone = copy.deepcopy(model)
    peer = apply_cache_dit(clone, settings, method.num_steps)
    return Installed(clone, peer, peer.remove, peer.stats)


for _family in ("firstblockcache", "magcache", "seacache"):
    register_installer(_family, install_diffusers_cache)
register_installer(CacheDitSettings.family, install_cache_dit)
