"""The probe vote under context parallelism, now ``taylorseer.runtime.vote`` (the handle uses it at every
generation, and the runtime stands below this package; issue 21). Kept importable under its old name.

Example:
    >>> from taylorseer.distributed.vote import probes_for   # the same function as taylorseer.runtime.vote's
"""

from __future__ import annotations

from ..runtime.vote import PooledProbes, probes_for, sample_group

__all__ = ["PooledProbes", "probes_for", "sample_group"]
