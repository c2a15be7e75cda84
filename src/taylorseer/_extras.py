"""Optional dependencies: import a module of an extra, or fail with one line that names the pip command.

The core install (torch, diffusers, safetensors, numpy, tqdm) is enough for ``taylorseer.apply`` and the
``plan``/``generate`` commands. The measuring side (``bench``, ``report``, ``demo``: metrics and plots) needs the
``bench`` extra, ``pip install "taylorseer[bench]"``. Modules of that side call ``require`` before importing an
optional package, so a missing one gives a message that says what to install instead of a bare traceback.

Example:
    >>> require("json").dumps([1])
    '[1]'
    >>> try:
    ...     require("no_such_module_xyz")
    ... except MissingExtraError as err:
    ...     print(err)
    no_such_module_xyz is not installed; this needs the bench extra: pip install "taylorseer[bench]"
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message is one line ending with the ``pip install`` command."""


def require(module: str, extra: str = "bench") -> ModuleType:
    """Import and return ``module``; if it cannot be imported, raise ``MissingExtraError`` naming the extra.

    ``extra`` is the name of the optional-dependency group in ``pyproject.toml`` that provides ``module``.

    Example:
        >>> require("math").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        missing = getattr(err, "name", None)
        why = "is not installed" if missing in (None, top) else f"cannot be imported ({err})"
        message = f'{top} {why}; this needs the {extra} extra: pip install "taylorseer[{extra}]"'
        raise MissingExtraError(message) from err
