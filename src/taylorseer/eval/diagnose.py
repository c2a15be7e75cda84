"""A way to look: where a method's forecasts drift on your own model, per step and per target.

``taylorseer.apply(model, config, diagnose=True)`` (or ``speedup=X, diagnose=True``) makes the first generation
also compute every forecast target in full on its forecast steps and record the forecast's relative L2 error
``||forecast - full|| / ||full||`` (``handle.probe`` on every target; the model still receives the forecasts, so the
images are those of the method). This module turns those records into a table and one PNG.

Example:
    >>> handle = taylorseer.apply(model, taylorseer.preset("paper_dit"), diagnose=True)   # doctest: +SKIP
    >>> images = taylorseer.sample(model, labels, listener=handle)                         # doctest: +SKIP
    >>> errors = forecast_errors(handle.stats)                                             # doctest: +SKIP
    >>> plot_forecast_errors(errors, "forecast_error.png")                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

MAX_LINES = 8  # targets drawn one by one; more are drawn as their median and maximum per step


def forecast_errors(stats: Any) -> dict[str, list[tuple[int, float]]]:
    """Per target path (``""``: the model output), its ``(step, relative L2 error)`` pairs in step order, from
    ``stats.probe_errors`` (a ``CacheStats`` or its ``probe_errors`` list). Several records of one step and target
    (CFG as separate calls, one per branch) keep the largest error.

    Example:
        >>> forecast_errors([{"path": "a", "step": 3, "rel_l2": 0.1}, {"path": "a", "step": 2, "rel_l2": 0.05}])
        {'a': [(2, 0.05), (3, 0.1)]}
    """
    records = getattr(stats, "probe_errors", stats)
    worst: dict[str, dict[int, float]] = {}
    for record in records:
        path, step, error = str(record["path"]), record["step"], float(record["rel_l2"])
        if step is None:
            continue
        steps = worst.setdefault(path, {})
        steps[int(step)] = max(error, steps.get(int(step), -math.inf))
    return {path: sorted(steps.items()) for path, steps in sorted(worst.items())}


def summary(errors: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """One row per forecast step: the median and the largest error over the targets and the worst target.

    Example:
        >>> summary({"a": [(2, 0.1)], "b": [(2, 0.3)]})
        [{'step': 2, 'targets': 2, 'median': 0.2, 'max': 0.3, 'worst': 'b'}]
    """
    by_step: dict[int, list[tuple[float, str]]] = {}
    for path, pairs in errors.items():
        for step, error in pairs:
            by_step.setdefault(step, []).append((error, path))
    rows = []
    for step in sorted(by_step):
        values = sorted(by_step[step])
        n = len(values)
        median = values[n // 2][0] if n % 2 else (values[n // 2 - 1][0] + values[n // 2][0]) / 2
        rows.append({"step": step, "targets": n, "median": median, "max": values[-1][0],
                     "worst": values[-1][1] or "(output)"})
    return rows


def plot_forecast_errors(errors: dict[str, list[tuple[int, float]]], path: str | os.PathLike,
                         title: str = "forecast error per step") -> Path:
    """Write one PNG: relative L2 forecast error (log scale) against the step index, one line per target (up to
    ``MAX_LINES``; with more targets, their median and maximum per step, and the worst target's line).

    Example:
        >>> plot_forecast_errors({"": [(2, 0.04), (3, 0.07)]}, "errors.png")   # doctest: +SKIP
        PosixPath('errors.png')
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not errors or not any(errors.values()):
        raise ValueError("errors holds no forecast: run a generation with diagnose=True (or handle.probe) that "
                         "forecasts at least one step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(errors) <= MAX_LINES:
        for target, pairs in errors.items():
            ax.plot([s for s, _ in pairs], [e for _, e in pairs], marker=".", label=target or "(model output)")
    else:
        rows = summary(errors)
        worst = max(errors, key=lambda t: max(e for _, e in errors[t]) if errors[t] else -1.0)
        ax.plot([r["step"] for r in rows], [r["median"] for r in rows], marker=".", label=f"median of {len(errors)} "
                f"targets")
        ax.plot([r["step"] for r in rows], [r["max"] for r in rows], marker=".", label="largest")
        ax.plot([s for s, _ in errors[worst]], [e for _, e in errors[worst]], linestyle="--",
                label=f"worst: {worst or '(model output)'}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2 error of the forecast")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
