"""Closed-form (ridge) least-squares fits of linear forecasters from the running normal equations.

For a schedule (the full steps of a ``num_steps`` generation) and a history of ``K`` features, the forecast of a
skipped step ``s`` is ``F_hat(s) = sum_j w[j] * F(a_j) (+ b)`` over its anchors ``a_0 > a_1 > ...``: the last
``min(K, computed so far)`` full steps before ``s``, newest first (exactly the features the runtime holds at
``s``). Per group of targets and channel ``c`` (``channelwise=True``; otherwise one set of weights for all
channels) the weights minimise ``sum_p (F_s[p, c] - sum_j w[j, c] F_{a_j}[p, c] - b[c])**2
+ ridge * mean(diag G_AA) * |w|^2`` over the calibration rows ``p``; the bias is not penalised. With
``G = TrajectoryStats.gram[group]`` this is the ``(k + 1) x (k + 1)`` system
``(G[A, A] + lambda I) w = G[A, s]`` per channel (``A``: the anchors plus the constant row when ``bias``), solved in
float64. The fit error of step ``s`` is the residual ``G[s, s] - 2 w.G[A, s] + w.G[A, A].w`` (unregularised),
summed over channels: squared feature units, over every calibration row of the group.

``fit_on_policy`` solves the same systems on ``record.OnPolicyStats``: the anchors are the features a cached run
with the teacher-forced weights computed at its full steps (after its own forecasts moved it), the targets the
full-compute features, so the weights also undo the drift their forecasts cause.

Example:
    >>> table = fit_linear(stats, (0, 1, 2, 5, 9, 14, 20, 30), history=3, bias=True)   # doctest: +SKIP
    >>> table.steps["transformer_blocks.0.attn1"][3].anchors                           # doctest: +SKIP
    (2, 1, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..forecast.linear import LinearTable, StepWeights
from .record import OnPolicyStats, TrajectoryStats

MAX_HISTORY = 4


def anchors_for(full_steps: Sequence[int], step: int, history: int) -> tuple[int, ...]:
    """The full steps before ``step`` whose features a forecast at ``step`` combines: the last ``history`` of
    them, newest first.

    Example:
        >>> anchors_for((0, 1, 5, 9), 7, history=2)
        (5, 1)
    """
    before = [s for s in full_steps if s < step]
    return tuple(reversed(before[-history:]))


def forecast_steps(full_steps: Sequence[int], num_steps: int) -> list[int]:
    """The steps a schedule forecasts (all but the full ones)."""
    full = set(full_steps)
    return [s for s in range(num_steps) if s not in full]


@dataclass(frozen=True)
class FitOptions:
    """How weights are fitted: ``history`` K (1..4) features, a ``bias`` term, per-channel weights
    (``channelwise``), and the relative ``ridge`` (times the mean diagonal of the anchors' Gram block).

    The defaults are the best held-out setting on the embedded model (docs/design.md "Calibrated forecasting",
    ``scripts/experiments/calibration_options.py``): K = 4, per channel, no bias (a bias lowers the calibration fit
    error but fits the calibration images' mean trajectory: -0.15 dB on held-out images), ridge 1e-6 (1e-3 already
    costs 1.4 dB: extrapolation weights are large and must not be shrunk).

    ``match_variance`` (default): a least-squares forecast has less variance than its target (its error is
    uncorrelated with it), so forecast images come out slightly smoother than full compute's. Each fitted forecast
    ``f`` (per step, row group and channel) becomes ``m + rho (f - m)``, ``m`` its calibration mean and
    ``rho = sqrt(var(target) / var(f))`` (clamped to [1, 2]), i.e. weights ``rho w`` and a bias: the forecast's
    variance over the calibration rows is the target's. It costs a little MSE on the calibration features and
    gains on held-out images, where the drift of a smoothed forecast compounds: +0.20 dB at 6 and at 8 of 50 full
    steps (200 development images, seed 7), +0.20 dB without guidance (1,000 images).

    Example:
        >>> FitOptions().history, FitOptions().bias
        (4, False)
    """

    history: int = 4
    bias: bool = False
    channelwise: bool = True
    ridge: float = 1e-6
    match_variance: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.history, bool) or not isinstance(self.history, int) or not 1 <= self.history <= MAX_HISTORY:
            raise ValueError(f"FitOptions.history must be an int in [1, {MAX_HISTORY}], got {self.history!r}")
        if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ValueError(f"FitOptions.ridge must be a number >= 0, got {self.ridge!r}")
        for name in ("bias", "channelwise", "match_variance"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FitOptions.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def has_bias(self) -> bool:
        """Whether the fitted table carries a bias (a fitted one, or the one variance matching adds)."""
        return self.bias or self.match_variance


def solve_rows(flat: torch.Tensor, step: int, anchors: tuple[int, ...], options: FitOptions
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ridge fit of ``step`` from ``anchors`` for every row of normal equations ``flat`` ``[N, S + 1, S + 1]``
    (one row per channel, row group and target): solutions ``[N, m]`` (``m = k`` anchors, plus the bias when
    ``options.has_bias``), the unregularised residuals ``[N]`` and target energies ``[N]`` (squared feature units).
    """
    const = flat.shape[-1] - 1
    index = list(anchors) + ([const] if options.bias else [])
    k = len(anchors)
    a = flat[:, index][:, :, index]  # [N, m, m]
    rhs = flat[:, index, step]  # [N, m]
    reg = torch.zeros_like(a)
    scale = a[:, :k, :k].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)  # [N]
    reg[:, range(k), range(k)] = (options.ridge * scale)[:, None]
    try:
        w = torch.linalg.solve(a + reg, rhs)
    except torch.linalg.LinAlgError:
        w = torch.linalg.lstsq(a + reg, rhs).solution
    if options.match_variance:
        w = _match_variance(flat, step, list(anchors), w, options.bias)
        index, rhs = list(anchors) + [const], flat[:, list(anchors) + [const], step]
        a = flat[:, index][:, :, index]
    energy = flat[:, step, step]
    residual = energy - 2 * (w * rhs).sum(-1) + torch.einsum("ni,nij,nj->n", w, a, w)
    return w, residual.clamp_min(0), energy


def _match_variance(flat: torch.Tensor, step: int, anchors: list[int], w: torch.Tensor, bias: bool) -> torch.Tensor:
    """``[N, k + 1]`` weights and bias whose forecast is ``m + rho (f - m)`` (``FitOptions.match_variance``) for
    the fit ``w`` (``[N, k]``, or ``[N, k + 1]`` with its bias), from the Gram's constant row (the row count ``n``,
    the features' sums)."""
    const = flat.shape[-1] - 1
    k = len(anchors)
    n = flat[:, const, const].clamp_min(1.0)  # [N]
    wa, b = w[:, :k], (w[:, k] if bias else torch.zeros_like(w[:, 0]))
    mean_a = flat[:, anchors, const] / n[:, None]  # [N, k]
    mean_t = flat[:, step, const] / n
    var_t = flat[:, step, step] / n - mean_t ** 2
    cov_a = flat[:, anchors][:, :, anchors] / n[:, None, None] - mean_a[:, :, None] * mean_a[:, None, :]
    var_f = torch.einsum("ni,nij,nj->n", wa, cov_a, wa)
    rho = torch.where(var_f > 0, (var_t.clamp_min(0) / var_f.clamp_min(1e-300)).sqrt(), torch.ones_like(var_f))
    rho = rho.clamp(1.0, 2.0)
    mean_f = (wa * mean_a).sum(-1) + b
    return torch.cat([rho[:, None] * wa, (rho * b + (1 - rho) * mean_f)[:, None]], dim=1)


def solve_step(gram: torch.Tensor, step: int, anchors: tuple[int, ...], options: FitOptions
               ) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """Fit ``step`` from ``anchors`` on one group's Gram ``[R, C, S + 1, S + 1]``: weights ``[k, R, C']``
    (``C' = C`` channelwise, else 1), bias ``[R, C']`` (or None), and the residual and target energy (squared
    feature units, summed over the group's rows and channels)."""
    rows, channels = gram.shape[0], gram.shape[1]
    k = len(anchors)
    if not options.channelwise:
        gram = gram.sum(1, keepdim=True)  # one fit over all channels: the channels' normal equations add up
    w, residual, energy = solve_rows(gram.reshape(-1, *gram.shape[-2:]), step, anchors, options)
    width = channels if options.channelwise else 1
    weights = w[:, :k].T.reshape(k, rows, width)
    bias = w[:, k].reshape(rows, width) if options.has_bias else None
    return weights, bias, float(residual.sum()), float(energy.sum())


def fit_linear(stats: TrajectoryStats, full_steps: Sequence[int], options: FitOptions | None = None,
               ) -> tuple[LinearTable, dict[str, float]]:
    """Fit every forecast step of the schedule ``full_steps`` for every group of ``stats``.

    Returns the weights table and the fit error: ``rel_error`` = sqrt(sum of residuals / sum of target
    energies) over all groups and forecast steps (a relative L2 error of the teacher-forced forecasts, i.e. from
    full-compute anchors), and ``rel_error_max`` (the worst step of any group).

    Example:
        >>> table, err = fit_linear(stats, (0, 1, 4, 8), FitOptions(history=2))   # doctest: +SKIP
    """
    options = options or FitOptions()
    full = tuple(int(s) for s in full_steps)
    return _fit(stats, full, stats.num_steps, options, anchor_index=lambda a: a, target_index=lambda s: s)


def fit_on_policy(stats: OnPolicyStats, options: FitOptions | None = None) -> tuple[LinearTable, dict[str, float]]:
    """Fit every forecast step of ``stats``' schedule from the cached run's own features at its full steps to the
    full-compute feature of that step (``record.OnPolicyStats``): the weights correct the drift the forecasts
    cause, which teacher-forced weights (``fit_linear``) never see.

    The error is the same relative L2 measure as ``fit_linear``'s, but against the full-compute features from the
    cached run's anchors, so it includes the drift the weights cannot undo (it is larger than the teacher-forced
    error and not comparable with it).

    Example:
        >>> table, err = fit_on_policy(record_on_policy(model, labels, cal.cache_config()))   # doctest: +SKIP
    """
    options = options or FitOptions()
    return _fit(stats.pairs, stats.full_steps, stats.num_steps, options, anchor_index=stats.anchor_index,
                target_index=stats.target_index)


def _fit(stats: TrajectoryStats, full: tuple[int, ...], num_steps: int, options: FitOptions,
         anchor_index: Callable[[int], int], target_index: Callable[[int], int]
         ) -> tuple[LinearTable, dict[str, float]]:
    """Fit every forecast step of ``full`` (a ``num_steps`` schedule) per group of ``stats``, the anchors and the
    target read at the Gram indices ``anchor_index(step)`` / ``target_index(step)``."""
    residual_total = energy_total = 0.0
    worst = 0.0
    steps: dict[str, dict[int, StepWeights]] = {}
    for group, gram in stats.gram.items():
        steps[group] = {}
        for s in forecast_steps(full, num_steps):
            anchors = anchors_for(full, s, options.history)
            if not anchors:
                raise ValueError(f"step {s} has no full step before it: full_steps must contain step 0")
            w, b, residual, energy = solve_step(gram, target_index(s), tuple(anchor_index(a) for a in anchors),
                                                options)
            steps[group][s] = StepWeights(anchors, w.float(), None if b is None else b.float())
            residual_total += residual
            energy_total += energy
            worst = max(worst, (residual / max(energy, 1e-300)) ** 0.5)
    table = LinearTable(steps=steps, num_steps=num_steps, full_steps=full, grouping=stats.grouping,
                        history=options.history)
    error = {"rel_error": (residual_total / max(energy_total, 1e-300)) ** 0.5, "rel_error_max": worst}
    return table, error
