"""Writing a calibration file without ever replacing one the user did not ask to replace: the work is written to a
staging name beside the target (same file system), then published in one step.

``taylorseer calibrate --out FILE`` writes to ``staging_path(FILE)`` and ends with ``publish(staged, FILE, force)``:
without ``force`` the name is taken only if it still does not exist (``os.link`` fails on an existing name), so a
file that appeared while calibrating is kept and the result stays at the staging name, named in the error.

Example:
    >>> staged = staging_path("out/dit-b8.safetensors")                  # doctest: +SKIP
    >>> calibrate(model, 8, staged, num_steps=50)                         # doctest: +SKIP
    >>> cal = publish(staged, "out/dit-b8.safetensors", force=False)     # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import Calibration, load_calibration


def staging_path(out: str | os.PathLike) -> str:
    """Where a calibration bound for ``out`` is written first: ``.NAME.PID.partial`` beside it.

    Example:
        >>> staging_path("/tmp/cal.safetensors").startswith("/tmp/.cal.safetensors.")
        True
    """
    path = Path(out).expanduser()
    return str(path.with_name(f".{path.name}.{os.getpid()}.partial"))


def publish(staged: str | os.PathLike, out: str | os.PathLike, force: bool) -> Calibration:
    """Move the finished calibration ``staged`` to ``out``: with ``force`` replacing whatever is there, else only
    if ``out`` still does not exist (``FileExistsError`` naming both paths otherwise; nothing is moved or deleted).
    Returns the calibration loaded from ``out``."""
    target = Path(out).expanduser()
    if force:
        os.replace(staged, target)
    else:
        try:
            os.link(staged, target)
        except FileExistsError:
            raise FileExistsError(f"argument --out: {str(out)!r} was created while calibrating; it is left as it is "
                                  f"and the calibration is at {str(staged)!r} (move it, or rerun with --force)"
                                  ) from None
        os.remove(staged)
    return load_calibration(target)
