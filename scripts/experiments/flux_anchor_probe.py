"""Which anchored forecast structure could reach the hybrid's target on the FLUX reference? Teacher-forced errors.

    OMP_NUM_THREADS=1 python scripts/experiments/flux_anchor_probe.py --images 32 --test-images 8 \
        --schedule 0,12,21,31,43 --out /work/runs/anchor2/probe.pt

Records full-compute features of ``--images`` images (noise seeds ``--seed``, ``--seed + 1``, ... per batch of 8;
default 1000, the calibration seeds) at every step and both CFG branches: the first block's input and residual
(image tokens; its text residual too), every block's residual on the image tokens, ``temb`` and the model output.
Then, for the schedule, fits several predictors of ``S(s)``, the summed image residual of blocks 2..12 at each
forecast step ``s`` (what the hybrid adds to the freshly computed first block), on the first images and reports
the relative L2 error of ``S`` and of the model output (``norm_out``/``proj_out`` of ``H0(s) + S_hat``) on the last
``--test-images``. Teacher-forced: every regressor comes from the full-compute trajectory.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from taylorseer.eval.flux import FluxSampler
from taylorseer.models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference


class Recorder:
    """Hooks on every block and the model: per (step, call) the image-token residuals, block 0's input, temb."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        self.index: int | None = None
        self.rows: dict[str, dict[int, list[torch.Tensor]]] = {}
        self.hooks = [b.register_forward_hook(self._block(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        self.hooks.append(model.register_forward_hook(self._out, with_kwargs=True))

    def keep(self, name: str, x: torch.Tensor) -> None:
        self.rows.setdefault(name, {}).setdefault(self.index, []).append(x.detach().float().clone())

    def _block(self, i: int):
        def hook(module, args, kwargs, output):
            if self.index is None:
                return
            enc_out, img_out = output
            img_in, enc_in = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            self.keep(f"r{i}", img_out - img_in)
            if i == 0:
                self.keep("in0", img_in)
                self.keep("a_txt", enc_out - enc_in)
                self.keep("temb", kwargs["temb"])
        return hook

    def _out(self, module, args, kwargs, output):
        if self.index is not None:
            self.keep("v", output[0] if isinstance(output, tuple) else output.sample)

    def begin(self, num_steps=None):
        self.rows = {}

    def step(self, index, timestep=None, sigma=None):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.index = index
            try:
                yield
            finally:
                self.index = None
        return ctx()

    def take(self, num_steps: int) -> dict[str, torch.Tensor]:
        # [steps, calls * B, ...]: the calls of a step (cond, uncond) stacked along rows
        out = {k: torch.stack([torch.cat(v[i]) for i in range(num_steps)]) for k, v in self.rows.items()}
        self.rows = {}
        return out


def record(ref, images: int, seed: int, steps: int) -> dict[str, torch.Tensor]:
    sampler = FluxSampler(ref)
    rec = Recorder(ref.transformer)
    parts: dict[str, list[torch.Tensor]] = {}
    labels = torch.arange(images) % 10
    for b, chunk in enumerate(torch.split(labels, 8)):
        sampler(ref.transformer, chunk, num_steps=steps, guidance_scale=DEFAULT_GUIDANCE, seed=seed + b,
                listener=rec)
        for k, v in rec.take(steps).items():
            parts.setdefault(k, []).append(v.half() if k.startswith("r") else v)
        print(f"batch {b} recorded", flush=True)
    for h in rec.hooks:
        h.remove()
    return {k: torch.cat(v, dim=1) for k, v in parts.items()}


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """Least squares ``y ~ x @ w`` with ridge ``lam`` x mean diagonal; x [n, p], y [n, q]."""
    g = x.T @ x
    g = g + lam * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, x.T @ y)


def channelwise(xs: list[torch.Tensor], y: torch.Tensor, lam: float = 1e-6):
    """Per-channel fit ``y[:, c] ~ sum_k w_k[c] xs[k][:, c] + b[c]``; xs each [n, C]. Returns a predictor."""
    x = torch.stack(xs + [torch.ones_like(y)], dim=-1).double()  # [n, C, p]
    g = torch.einsum("ncp,ncq->cpq", x, x)
    g = g + lam * g.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(g.shape[-1], dtype=g.dtype)
    w = torch.linalg.solve(g, torch.einsum("ncp,nc->cp", x, y.double()))  # [C, p]

    def predict(zs: list[torch.Tensor]) -> torch.Tensor:
        z = torch.stack(zs + [torch.ones_like(zs[0])], dim=-1).double()
        return torch.einsum("ncp,cp->nc", z, w).float()
    return predict


def cached_record(ref, path: str, images: int, seed: int, steps: int) -> dict:  # noqa: ANN001
    """``record``'s features, loaded from ``path`` when it exists, else recorded and saved there."""
    if os.path.exists(path):
        return torch.load(path)
    data = record(ref, images, seed, steps)
    torch.save(data, path)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--test-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--schedule", default="0,12,21,31,43")
    parser.add_argument("--history", type=int, default=3)
    parser.add_argument("--per-step", action="store_true")
    parser.add_argument("--out", default="/work/runs/anchor2/probe.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = load_flux_reference()
    data = cached_record(ref, args.out, args.images, args.seed, args.steps)
    model = ref.transformer
    n_img = data["in0"].shape[1] // 2  # rows per step: cond calls then uncond calls of each batch
    full = tuple(int(s) for s in args.schedule.split(","))
    # rows: [steps, rows(images x branch, in batch order), tokens, C] -> train/test split by image row
    rows = data["in0"].shape[1]
    test_rows = torch.zeros(rows, dtype=torch.bool)
    # each batch of 8 images contributes 16 rows (8 cond, 8 uncond); the last batches are the test images
    test_rows[rows - 2 * args.test_images:] = True
    blocks = sorted(int(k[1:]) for k in data if k.startswith("r"))
    S = sum(data[f"r{i}"].float() for i in blocks[1:])  # [steps, rows, 64, C]
    A, IN = data["r0"].float(), data["in0"]

    def flat(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return x[sel].reshape(-1, x.shape[-1])

    def velocity(h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.proj_out(model.norm_out(h, temb))

    results: dict[str, list[float]] = {}
    for s in range(args.steps):
        if s in full:
            continue
        before = [a for a in full if a < s][::-1][:args.history]
        a0 = before[0]
        y_tr, y_te = flat(S[s], ~test_rows), flat(S[s], test_rows)
        own_tr = [flat(S[a], ~test_rows) for a in before]
        own_te = [flat(S[a], test_rows) for a in before]
        anc_tr = [flat(A[s], ~test_rows), flat(A[a0], ~test_rows)]
        anc_te = [flat(A[s], test_rows), flat(A[a0], test_rows)]
        din_tr, din_te = flat(IN[s] - IN[a0], ~test_rows), flat(IN[s] - IN[a0], test_rows)
        dA_tr, dA_te = anc_tr[0] - anc_tr[1], anc_te[0] - anc_te[1]
        preds: dict[str, torch.Tensor] = {}
        preds["reuse"] = own_te[0]
        preds["pc-own"] = channelwise(own_tr, y_tr)(own_te)
        p1 = channelwise(own_tr + anc_tr, y_tr)
        preds["pc-own+anchor"] = p1(own_te + anc_te)
        per_block_tr = [flat(data[f"r{i}"][a].float(), ~test_rows) for i in blocks[1:] for a in before]
        per_block_te = [flat(data[f"r{i}"][a].float(), test_rows) for i in blocks[1:] for a in before]
        preds["pc-blocks+anchor"] = channelwise(per_block_tr + anc_tr, y_tr)(per_block_te + anc_te)
        # today's structure: each block fitted on its own residual, the forecasts summed
        indiv = torch.zeros_like(y_te)
        for i in blocks[1:]:
            ri_tr = [flat(data[f"r{i}"][a].float(), ~test_rows) for a in before]
            ri_te = [flat(data[f"r{i}"][a].float(), test_rows) for a in before]
            indiv += channelwise(ri_tr + anc_tr, flat(data[f"r{i}"][s].float(), ~test_rows))(ri_te + anc_te)
        preds["pc-indiv+anchor"] = indiv
        # joint per-block per-channel, then a rank-r cross-channel correction from the anchor's change, in the
        # subspace the output layer reads (proj_out's rows scaled by the step's mean modulation 1 + scale)
        pj = channelwise(per_block_tr + anc_tr, y_tr)
        rj_tr = (y_tr - pj(per_block_tr + anc_tr)).double()
        emb = model.norm_out.linear(model.norm_out.silu(data["temb"][s])).float()
        scale = emb.chunk(2, dim=1)[0].mean(0)  # AdaLayerNormContinuous: scale, shift = chunk(2)
        pw = model.proj_out.weight.detach().float() * (1 + scale)[None, :]  # [4, C]
        pw = pw - pw.mean(1, keepdim=True)
        u_full, _, _ = torch.linalg.svd(pw.T.double(), full_matrices=False)  # [C, 4]
        cov = (rj_tr.T @ rj_tr)
        for rank in (4, 8, 16):
            if rank <= 4:
                u = u_full[:, :rank]
            else:  # the output subspace plus the residual's own top directions outside it
                rest = cov - u_full @ (u_full.T @ cov)
                rest = rest - (rest @ u_full) @ u_full.T
                ev = torch.linalg.eigh(rest).eigenvectors[:, -(rank - 4):]
                u = torch.linalg.qr(torch.cat([u_full, ev], 1)).Q
            for name, xtr, xte in (("dA", dA_tr, dA_te), ("dA,A0", torch.cat(anc_tr, 1), torch.cat(anc_te, 1))):
                mr = ridge(xtr.double(), rj_tr @ u)
                preds[f"pcj+rank{rank}({name})"] = pj(per_block_te + anc_te) + ((xte.double() @ mr) @ u.T).float()
        r_tr = y_tr - p1(own_tr + anc_tr)
        m = ridge(dA_tr.double(), r_tr.double())
        preds["pc+map(dA)"] = preds["pc-own+anchor"] + (dA_te.double() @ m).float()
        x2_tr = torch.cat([dA_tr, din_tr], 1).double()
        m2 = ridge(x2_tr, r_tr.double())
        preds["pc+map(dA,din)"] = preds["pc-own+anchor"] + (torch.cat([dA_te, din_te], 1).double() @ m2).float()
        xf_tr = torch.cat(own_tr + anc_tr + [flat(IN[s], ~test_rows), flat(IN[a0], ~test_rows),
                                             torch.ones_like(y_tr[:, :1])], 1).double()
        xf_te = torch.cat(own_te + anc_te + [flat(IN[s], test_rows), flat(IN[a0], test_rows),
                                             torch.ones_like(y_te[:, :1])], 1).double()
        preds["full-map"] = (xf_te @ ridge(xf_tr, y_tr.double())).float()
        xn_tr = torch.cat(own_tr + anc_tr + [torch.ones_like(y_tr[:, :1])], 1).double()
        xn_te = torch.cat(own_te + anc_te + [torch.ones_like(y_te[:, :1])], 1).double()
        preds["full-map-noin"] = (xn_te @ ridge(xn_tr, y_tr.double())).float()
        for lam in (1e-6, 1e-3, 1e-2):
            preds[f"full-map-noin-l{lam:g}"] = (xn_te @ ridge(xn_tr, y_tr.double(), lam)).float()
        # token means of the anchor's change (attention mixes tokens): broadcast to every token
        def mean_tokens(x: torch.Tensor, tok: int = 64) -> torch.Tensor:
            return x.reshape(-1, tok, x.shape[-1]).mean(1, keepdim=True).expand(-1, tok, -1).reshape(x.shape)
        xm_tr = torch.cat([xn_tr, mean_tokens(dA_tr).double()], 1)
        xm_te = torch.cat([xn_te, mean_tokens(dA_te).double()], 1)
        preds["full-map-noin+mean"] = (xm_te @ ridge(xm_tr, y_tr.double())).float()
        # one map per CFG branch (rows of a batch: 8 cond then 8 uncond)
        def branch_rows(sel: torch.Tensor, cond: bool) -> torch.Tensor:
            r = torch.arange(rows)
            return sel & (((r % 16) < 8) == cond)
        pb = torch.empty_like(y_te)
        for cond in (True, False):
            tr, te = branch_rows(~test_rows, cond), branch_rows(test_rows, cond)
            xb_tr = torch.cat([flat(S[a], tr) for a in before] + [flat(A[s], tr), flat(A[a0], tr),
                                                                  torch.ones(int(tr.sum()) * 64, 1)], 1).double()
            xb_te = torch.cat([flat(S[a], te) for a in before] + [flat(A[s], te), flat(A[a0], te),
                                                                  torch.ones(int(te.sum()) * 64, 1)], 1).double()
            pred = (xb_te @ ridge(xb_tr, flat(S[s], tr).double())).float()
            picked = (torch.arange(rows)[test_rows] % 16 < 8) == cond
            pb.view(-1, 64, pb.shape[-1])[picked] = pred.view(-1, 64, pred.shape[-1])
        preds["full-map-noin-branch"] = pb
        # output granularity: forecast the model output v itself (4 channels per token)
        V = data["v"]
        vy_tr, vy_te = flat(V[s], ~test_rows), flat(V[s], test_rows)
        vo_tr = [flat(V[a], ~test_rows) for a in before]
        vo_te = [flat(V[a], test_rows) for a in before]
        direct: dict[str, torch.Tensor] = {}
        direct["v:pc-own"] = channelwise(vo_tr, vy_tr)(vo_te)
        vp = channelwise(vo_tr, vy_tr)
        vr_tr = vy_tr - vp(vo_tr)
        xa_tr = torch.cat([dA_tr, din_tr], 1).double()
        xa_te = torch.cat([dA_te, din_te], 1).double()
        direct["v:pc+map(dA,din)"] = direct["v:pc-own"] + (xa_te @ ridge(xa_tr, vr_tr.double())).float()
        xv_tr = torch.cat(vo_tr + [dA_tr, din_tr, flat(A[a0], ~test_rows), flat(IN[a0], ~test_rows),
                                   torch.ones_like(vy_tr[:, :1])], 1).double()
        xv_te = torch.cat(vo_te + [dA_te, din_te, flat(A[a0], test_rows), flat(IN[a0], test_rows),
                                   torch.ones_like(vy_te[:, :1])], 1).double()
        direct["v:full-map"] = (xv_te @ ridge(xv_tr, vy_tr.double())).float()
        for name, p in direct.items():
            ev = float((p - vy_te).norm() / vy_te.norm())
            results.setdefault(name, []).append((s, ev, ev))
        # the output error: H = in0 + A + S at step s (test rows); temb per row
        h0 = (IN[s] + A[s])[test_rows]
        temb = data["temb"][s][test_rows]
        v_true = data["v"][s][test_rows]
        for name, p in preds.items():
            es = float((p - y_te).norm() / y_te.norm())
            v = velocity(h0 + p.reshape(h0.shape), temb)
            ev = float((v - v_true).norm() / v_true.norm())
            results.setdefault(name, []).append((s, es, ev))
    if args.per_step:
        for name in ("pc-blocks+anchor", "full-map-noin"):
            print(name, [(s, round(ev, 3)) for s, _, ev in results[name]])
    summary = {}
    for name, rs in results.items():
        es = torch.tensor([r[1] for r in rs])
        ev = torch.tensor([r[2] for r in rs])
        summary[name] = {"S_rel_rms": round(float(es.pow(2).mean().sqrt()), 4),
                         "v_rel_rms": round(float(ev.pow(2).mean().sqrt()), 4),
                         "v_rel_max": round(float(ev.max()), 4)}
        print(json.dumps({"predictor": name, **summary[name]}), flush=True)
    print(json.dumps({"schedule": list(full), "train_images": n_img - args.test_images,
                      "test_images": args.test_images}))


if __name__ == "__main__":
    main()
