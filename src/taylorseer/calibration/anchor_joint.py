"""The hybrid's weights fitted on what the output sees: the *summed* residual of the forecast blocks (cache-dit's
structure, with fitted weights).

Under the hybrid (``policy.anchor.AnchorSchedule``) the first block is computed on every step and every later block
adds its forecast residual, so the hidden states that reach the output layer are the fresh first block's output plus
``S_hat(s) = sum_i R_hat_i(s)``. ``calibration.anchor_fit`` fits each block's residual on its own; here one
per-channel ridge fit per forecast step ``s`` aims at the total ``S(s) = sum_i R_i(s)``:

    S(s) ~ sum_i sum_j w_ij * R_i(a_j) + v_0 * A(s) + sum_m v_m * A(a_m) + b

(per channel; ``R_i(a_j)`` block ``i``'s residual at its ``j``-th newest full step, ``A`` the anchor's residual,
``A(s)`` the fresh one). Block ``i`` then forecasts ``sum_j w_ij R_i(a_j)`` and one block, the ``carrier``, adds the
anchor terms and the bias: the forecasts' sum is the fitted ``S_hat``. The result is an ordinary anchored
calibration table (``forecast/anchored.py`` runs it unchanged).

The fit works on raw features (``[steps, rows, tokens, C]`` tensors), not Grams, so that the regressors may come from
another run than the target: teacher-forced (all from full compute) or on-policy (the regressors from the cached
run itself, the target from full compute of the same noise; ``record_block_features`` records both).

Example:
    >>> table, error = fit_joint(features, total, anchor, (0, 12, 21, 31, 43), carrier="b.11")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..forecast.linear import LinearTable, StepWeights
from ..policy.schedule import FixedSchedule
from .anchor_fit import anchored_indices
from .fit import forecast_steps
from .io import new_header, save_calibration
from .record import StepIndexListener


def joint_indices(full_steps: Sequence[int], step: int, num_steps: int, history: int,
                  anchor_history: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(own, anchor) table indices of a forecast of ``step``: the last ``history`` full steps before it (newest
    first), and ``num_steps + step`` (the fresh anchor) then ``num_steps + a`` for the anchor's last
    ``anchor_history`` of them.

    Example:
        >>> joint_indices((0, 4, 6), 8, 10, history=2, anchor_history=1)
        ((6, 4), (18, 16))
    """
    index = anchored_indices(full_steps, step, num_steps, history, anchor_history)
    own = min(history, sum(1 for s in full_steps if s < step))
    return index[:own], index[own:]


def _check(features: Mapping[str, torch.Tensor], total: torch.Tensor, anchor: torch.Tensor,
           full_steps: Sequence[int], history: int, anchor_history: int, carrier: str) -> tuple[int, ...]:
    if not features:
        raise ValueError("fit_joint: features is empty; give the forecast blocks' residual trajectories")
    if carrier not in features:
        raise ValueError(f"fit_joint: carrier must be one of the feature targets {sorted(features)[:3]}..., "
                         f"got {carrier!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"fit_joint: history must be an int >= 1, got {history!r}")
    if isinstance(anchor_history, bool) or not isinstance(anchor_history, int) \
            or not 0 <= anchor_history <= history:
        raise ValueError(f"fit_joint: anchor_history must be an int in [0, history={history}], got "
                         f"{anchor_history!r}")
    shape = tuple(total.shape)
    if len(shape) < 3:
        raise ValueError(f"fit_joint: total must be [steps, rows, ..., C], got shape {shape}")
    for name, x in [*features.items(), ("anchor", anchor)]:
        if tuple(x.shape) != shape:
            raise ValueError(f"fit_joint: {name!r} has shape {tuple(x.shape)}, the total {shape}: every trajectory "
                             f"must have the same steps, rows, tokens and channels")
    full = tuple(int(s) for s in full_steps)
    if not full or full[0] != 0 or list(full) != sorted(set(full)) or full[-1] >= shape[0]:
        raise ValueError(f"fit_joint: full_steps must be sorted, unique, start at 0 and lie below {shape[0]}, got "
                         f"{list(full)}")
    return full


def fit_joint(features: Mapping[str, torch.Tensor], total: torch.Tensor, anchor: torch.Tensor,
              full_steps: Sequence[int], *, history: int = 3, anchor_history: int = 1, ridge: float = 1e-6,
              carrier: str, grouping: str = "target", residuals: dict[int, torch.Tensor] | None = None
              ) -> tuple[LinearTable, dict[str, float]]:
    """Fit every forecast step of ``full_steps`` (see the module docstring).

    ``features[target]``: each forecast block's residual ``[steps, rows, ..., C]`` (the regressors, at the full
    steps); ``total``: what the summed forecast must match at the forecast steps (same shape); ``anchor``: the anchor
    target's residual at every step (same shape; its fresh value at ``s`` and its value at the full steps are
    regressors). ``ridge``: times the mean diagonal of each channel's Gram. ``residuals``: a dict that receives,
    per forecast step, ``total`` minus the fitted sum (float32, shaped like ``total[s]``). Returns the table (every
    target's own weights; the ``carrier``'s also the anchor weights and the bias) and the relative L2 error of the
    fitted sum on these rows (``rel_error``, and ``rel_error_max`` over steps).
    """
    full = _check(features, total, anchor, full_steps, history, anchor_history, carrier)
    n = total.shape[0]
    names = sorted(features)
    channels = total.shape[-1]
    steps: dict[str, dict[int, StepWeights]] = {name: {} for name in names}
    residual_total = energy_total = worst = 0.0
    width = 0
    for s in forecast_steps(full, n):
        own, anchors = joint_indices(full, s, n, history, anchor_history)
        columns = [features[name][a] for name in names for a in own] + [anchor[i - n] for i in anchors]
        x = torch.stack([c.reshape(-1, channels).double() for c in columns] +
                        [torch.ones(columns[0].numel() // channels, channels, dtype=torch.float64)], dim=-1)
        y = total[s].reshape(-1, channels).double()
        gram = torch.einsum("ncp,ncq->cpq", x, x)
        diag = gram.diagonal(dim1=1, dim2=2)
        gram = gram + ridge * diag.mean(-1)[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype)
        w = torch.linalg.solve(gram, torch.einsum("ncp,nc->cp", x, y)[..., None])[..., 0]  # [C, p]
        fitted = torch.einsum("ncp,cp->nc", x, w)
        residual, energy = float((fitted - y).pow(2).sum()), float(y.pow(2).sum())
        if residuals is not None:
            residuals[s] = (y - fitted).float().reshape(total[s].shape)
        residual_total += residual
        energy_total += energy
        worst = max(worst, (residual / max(energy, 1e-300)) ** 0.5)
        k = len(own)
        for t, name in enumerate(names):
            weights = w[:, t * k:(t + 1) * k].T.float()  # [k, C]
            if name == carrier:
                tail = w[:, len(names) * k:len(names) * k + len(anchors)].T.float()
                steps[name][s] = StepWeights(own + anchors, torch.cat([weights, tail])[:, None, :],
                                             w[:, -1].float()[None, :])
            else:
                steps[name][s] = StepWeights(own, weights[:, None, :])
            width = max(width, len(steps[name][s].anchors))
    table = LinearTable(steps=steps, num_steps=n, full_steps=full, grouping=grouping, history=width)
    return table, {"rel_error": (residual_total / max(energy_total, 1e-300)) ** 0.5, "rel_error_max": worst}


def fit_correction(anchor: torch.Tensor, residuals: Mapping[int, torch.Tensor], full_steps: Sequence[int], *,
                   rank: int, anchor_history: int = 1, ridge: float = 1e-4,
                   output_basis: Mapping[int, torch.Tensor] | None = None
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Low-rank cross-channel maps from the anchor to what the per-channel fit missed (``forecast.anchored``'s
    ``AnchoredMapForecast``): for each step of ``residuals`` (``[rows, ..., C]``, e.g. ``fit_joint``'s), ``x`` =
    the anchor at the step and at its last ``anchor_history`` full steps (``[n, (1 + m) C]``), a basis ``[C, rank]``
    (the columns of ``output_basis[s]`` first, orthonormalised, when given: the directions the output layer reads;
    then the residual's principal directions outside them) and the ridge fit ``map`` of ``residual @ basis`` on
    ``x`` (``ridge`` times the mean diagonal). Returns ``{step: (map [(1 + m) C, rank], basis [C, rank])}``; the
    correction is ``(x @ map) @ basis.T``.

    Example:
        >>> maps = fit_correction(anchor, residuals, (0, 12, 21), rank=8)                 # doctest: +SKIP
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"fit_correction: rank must be an int >= 1, got {rank!r}")
    full = tuple(int(a) for a in full_steps)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for s, res in residuals.items():
        channels = res.shape[-1]
        if rank > channels:
            raise ValueError(f"fit_correction: rank {rank} exceeds the {channels} channels")
        before = [a for a in full if a < s][::-1][:anchor_history]
        x = torch.cat([anchor[a].reshape(-1, channels).double() for a in [s, *before]], dim=1)
        r = res.reshape(-1, channels).double()
        cov = r.T @ r
        given = torch.zeros(channels, 0, dtype=torch.float64)
        if output_basis is not None and s in output_basis:
            given = torch.linalg.qr(output_basis[s].double()[:, :rank]).Q
        rest = cov - given @ (given.T @ cov)
        rest = rest - (rest @ given) @ given.T
        extra = torch.linalg.eigh((rest + rest.T) / 2).eigenvectors[:, channels - (rank - given.shape[1]):]
        basis = torch.linalg.qr(torch.cat([given, extra], dim=1)).Q if rank > given.shape[1] else given
        g = x.T @ x
        g = g + ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
        out[int(s)] = (torch.linalg.solve(g, x.T @ (r @ basis)).float(), basis.float())
    return out


def save_correction(path: str, maps: Mapping[int, tuple[torch.Tensor, torch.Tensor]], *, target: str, tokens: int,
                    anchor_history: int) -> str:
    """Write ``fit_correction``'s maps for ``target``'s tensors of ``tokens`` rows; returns the file's SHA-256."""
    import json

    from safetensors.torch import save_file

    from ..forecast.anchored import CORRECTION_KIND
    from ..models.checkpoint import file_sha256

    meta = {"kind": CORRECTION_KIND, "target": target, "tokens": int(tokens), "anchor_history": int(anchor_history),
            "steps": sorted(int(s) for s in maps)}
    tensors = {}
    for s, (m, basis) in maps.items():
        tensors[f"s{s}.map"], tensors[f"s{s}.basis"] = m.contiguous(), basis.contiguous()
    save_file(tensors, path, {"correction": json.dumps(meta)})
    return file_sha256(path)


def save_joint(path: str, table: LinearTable, error: dict[str, float], model: nn.Module, *, name: str,
               anchor: str, history: int, anchor_history: int, ridge: float, carrier: str,
               calibration_data: dict[str, Any], search: Any = None) -> Any:
    """Write ``fit_joint``'s table as an anchored calibration file (block granularity; the header's ``forecaster``
    names the anchor, the carrier and the fit) and return it as loaded (``anchor_fit.anchored_config`` runs it)."""
    fit = {"history": history, "bias": True, "channelwise": True, "ridge": ridge, "match_variance": False,
           "anchor": anchor, "anchor_history": anchor_history, "joint": "summed residual", "carrier": carrier}
    header = new_header("linear", name, model, FixedSchedule(table.full_steps, table.num_steps),
                        granularity="block", forecaster=fit, targets={t: t for t in table.steps}, fit=error,
                        calibration_data=calibration_data, search=search)
    return save_calibration(path, header, table)


class BlockFeatures(StepIndexListener):
    """A sampler listener that hooks the blocks of a FLUX-layout transformer (``transformer_blocks`` then
    ``single_transformer_blocks``, each called with ``hidden_states=`` and returning ``(encoder, hidden)``) and
    keeps each block's residual on the image tokens (``hidden_states`` out minus in) at every step it runs, both CFG
    calls of a step along the rows (``dtype``).
    Installed after a taylorseer handle it sees what the cached run's blocks return (forecasts included)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float16):
        blocks = list(getattr(model, "transformer_blocks", [])) + list(getattr(model, "single_transformer_blocks", []))
        if not blocks:
            raise ValueError(f"BlockFeatures: {type(model).__name__} has no transformer_blocks / "
                             f"single_transformer_blocks (a FLUX-layout transformer is needed)")
        self.dtype = dtype
        self.index: int | None = None
        self.rows: dict[int, dict[int, list[torch.Tensor]]] = {}
        self.hooks = [b.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.index is None:
                return
            residual = output[1] - kwargs["hidden_states"]
            self.rows.setdefault(i, {}).setdefault(self.index, []).append(residual.detach().to(self.dtype))
            if i == 0:  # the first block's input (index -1) and its conditioning embedding (index -2)
                self.rows.setdefault(-1, {}).setdefault(self.index, []).append(
                    kwargs["hidden_states"].detach().to(self.dtype))
                self.rows.setdefault(-2, {}).setdefault(self.index, []).append(kwargs["temb"].detach().float())
        return hook

    def begin(self, num_steps: int | None = None) -> None:
        self.rows = {}

    def take(self) -> dict[int, dict[int, torch.Tensor]]:
        """``{block index: {step: [rows, tokens, C]}}`` (index -1: the first block's input; -2: its ``temb``) for
        the steps each block was called at, then forgets them."""
        out = {i: {s: torch.cat(x) for s, x in per.items()} for i, per in self.rows.items()}
        self.rows = {}
        return out

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
