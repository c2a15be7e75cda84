"""The one table of dtypes and devices the package accepts, by name: a ground-floor module (imports nothing of
ours; torch only inside the functions that need it, so that parsing a command line imports no torch).

- ``DTYPES``: every dtype name a factor store or a tensor may take (``float32``, ``float16``, ``bfloat16``,
  ``float64``); ``WEIGHT_DTYPES``: those a pipeline's weights may be loaded in (``--dtype``).
- ``DEVICE_PATTERN`` / ``DEVICES``: the device names (``cpu``, ``cuda``, ``cuda:N``, ``mps``); ``AUTO_DEVICE``
  (``"auto"``: cuda when visible, else cpu).

Example:
    >>> torch_dtype("bfloat16")
    torch.bfloat16
    >>> resolve_device("cpu")
    'cpu'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float16", "bfloat16", "float64")  # every dtype accepted by name
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")  # a pipeline's weights (generate/sample/calibrate --dtype)
DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d+|mps")
DEVICES = "cpu, cuda, cuda:N, mps"
AUTO_DEVICE = "auto"  # cuda when available, else cpu


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` of a name of ``DTYPES``; ``ValueError`` naming the allowed names for any other.

    Example:
        >>> torch_dtype("float16")
        torch.float16
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    import torch  # here, not at the top: the command line parses without importing torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def check_device(device: str) -> None:
    """Refuse, with one line naming the allowed devices, a ``device`` that is malformed or not available here.

    Allowed: ``cpu``, ``cuda``, ``cuda:N`` (N < the number of visible CUDA devices), ``mps``.

    Example:
        >>> check_device("cpu")
    """
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {device!r} is not available: no CUDA device visible (torch {torch.__version__}, "
                             f"{build}); allowed here: cpu")
        if ":" in device and int(device.split(":")[1]) >= count:
            raise ValueError(f"device {device!r} is not available: {count} CUDA device(s) visible, allowed: cpu, "
                             f"cuda, cuda:0..cuda:{count - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available here (torch.backends.mps.is_available() is False); "
                         "allowed here: cpu" + (", cuda" if torch.cuda.is_available() else ""))


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` if a CUDA device is visible, else ``cpu``; any other name is checked by ``check_device``
    and returned as given.

    Example:
        >>> resolve_device("cpu")
        'cpu'
    """
    if device == AUTO_DEVICE:
        import torch

        return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    check_device(device)
    return device
