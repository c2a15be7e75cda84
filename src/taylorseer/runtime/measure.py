"""Measurement kept outside computation: FLOPs counted by ``torch.utils.flop_counter``.

Example:
    >>> out, flops = count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2))
    >>> flops
    128
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch  # noqa: F401  (used in the docstring example)
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return its result with the floating-point operations it executed (matmul-type ops,
    counted by ``torch.utils.flop_counter``; elementwise ops are not counted)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())
