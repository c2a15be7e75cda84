"""The hybrid k=1 on the FLUX reference with weights fitted on the summed residual (teacher-forced, on-policy), on dev.

    OMP_NUM_THREADS=1 python scripts/experiments/flux_anchor_joint.py --schedule 0,12,21,31,43 --onpolicy 2 \
        --out /work/runs/anchor2/joint.safetensors

1. Records full-compute block residuals (image tokens) of ``--images`` calibration images (noise seeds ``--seed``,
   ``--seed + 1``, ... per batch of 8; default 1000) and the full-compute images of ``--dev-images`` development
   images (noise seed ``--dev-seed``, default 3000; never the bench's 0 or the held-out 5000). Cached in ``--cache``.
2. ``calibration.anchor_joint.fit_joint`` on the schedule (teacher-forced), the hybrid run on the dev images: PSNR
   to full compute, FLOPs fraction (one counted image).
3. ``--onpolicy N``: N rounds of running the current weights as the hybrid on the calibration images, recording the
   cached run's residuals (its full steps) and fresh anchors (every step), refitting with those as regressors and
   full compute's summed residual as the target (``--pull``: plus full compute's first-block output minus the cached
   run's, so the hidden states aim at full compute's); each round evaluated on dev.
4. ``--search N``: coordinate moves of one full step (+-1, 2, 4) on dev PSNR with teacher-forced joint weights,
   N candidates at most, before the on-policy rounds.
``--baseline FILE``: also evaluates an existing anchored file on the same dev images. One JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import torch

from taylorseer.api import apply
from taylorseer.calibration.anchor_fit import anchored_config
from taylorseer.calibration.anchor_joint import BlockFeatures, fit_correction, fit_joint, save_correction, save_joint
from taylorseer.eval import metrics
from taylorseer.eval.flux import FluxSampler
from taylorseer.forecast.anchored import AnchoredMapForecast
from taylorseer.models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference
from taylorseer.runtime.measure import count_flops

ANCHOR = "transformer_blocks.0"


def block_paths(model) -> list[str]:
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + \
        [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]


def stack(per_step: dict[int, torch.Tensor], steps: int, like: torch.Tensor | None = None) -> torch.Tensor:
    like = like if like is not None else next(iter(per_step.values()))
    return torch.stack([per_step[s] if s in per_step else torch.zeros_like(like) for s in range(steps)])


def record(ref, sampler, labels, seed, steps, config=None):
    """Per block index: [steps, rows, tokens, C] over all batches (full compute, or the cached run of config)."""
    parts: dict[int, list[torch.Tensor]] = {}
    for b, chunk in enumerate(torch.split(labels, 8)):
        if config is None:
            rec = BlockFeatures(ref.transformer)
            try:
                sampler(ref.transformer, chunk, num_steps=steps, guidance_scale=DEFAULT_GUIDANCE, seed=seed + b,
                        listener=rec)
            finally:
                rec.remove()
        else:
            with apply(ref.transformer, config) as handle:
                rec = BlockFeatures(ref.transformer)  # after apply: it sees what the cached run's blocks return
                try:
                    sampler(ref.transformer, chunk, num_steps=steps, guidance_scale=DEFAULT_GUIDANCE, seed=seed + b,
                            listener=Both(handle, rec))
                finally:
                    rec.remove()
        taken = rec.take()
        missing = [i for i in (-1, 0) if len(taken[i]) != steps]
        if missing:
            raise RuntimeError(f"the first block was not seen at every step ({missing}): the anchors are incomplete")
        for i, per in taken.items():
            parts.setdefault(i, []).append(stack(per, steps, taken[-1 if i != -2 else -2][0]))
    return {i: torch.cat(v, dim=1) for i, v in parts.items()}


class Both:
    def __init__(self, *ls):
        self.ls = ls

    def begin(self, num_steps=None):
        for x in self.ls:
            x.begin(num_steps)

    def step(self, index, timestep=None, sigma=None):
        import contextlib
        stack_ = contextlib.ExitStack()
        for x in self.ls:
            stack_.enter_context(x.step(index, timestep, sigma))
        return stack_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--dev-images", type=int, default=32)
    parser.add_argument("--dev-seed", type=int, default=3000)
    parser.add_argument("--schedule", default="0,12,21,31,43")
    parser.add_argument("--history", type=int, default=3)
    parser.add_argument("--anchor-history", type=int, default=1)
    parser.add_argument("--ridge", type=float, default=1e-6)
    parser.add_argument("--onpolicy", type=int, default=0)
    parser.add_argument("--pull", action="store_true")
    parser.add_argument("--search", type=int, default=0)
    parser.add_argument("--baseline", default="")
    parser.add_argument("--rank", type=int, default=0, help="also a low-rank anchor correction of this rank")
    parser.add_argument("--correction-ridge", type=float, default=1e-4)
    parser.add_argument("--cache", default="/work/runs/anchor2/joint_cache.pt")
    parser.add_argument("--name", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    ref = load_flux_reference()
    sampler = FluxSampler(ref)
    model = ref.transformer
    paths = block_paths(model)
    labels = torch.arange(args.images) % 10
    dev_labels = torch.arange(args.dev_images) % 10
    if os.path.exists(args.cache):
        cache = torch.load(args.cache)
    else:
        cache = {"cal": record(ref, sampler, labels, args.seed, args.steps),
                 "dev_full": sampler(model, dev_labels, num_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                                     seed=args.dev_seed)}
        torch.save(cache, args.cache)
    cal, dev_full = cache["cal"], cache["dev_full"]
    print(json.dumps({"recorded": args.images, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    total_ref = sum(cal[i].float() for i in range(1, len(paths)))
    h0_ref = cal[-1].float() + cal[0].float()
    carrier = paths[-1]
    data = {"labels": labels.tolist(), "seed": args.seed, "batch_size": 8, "num_steps": args.steps,
            "guidance_scale": DEFAULT_GUIDANCE, "cfg_mode": "split", "images": args.images}
    flops_cache: dict[tuple, float] = {}

    def fit(full, feats=None):
        feats = feats or cal
        features = {paths[i]: feats[i].float() for i in range(1, len(paths))}
        total = total_ref
        if feats is not cal and args.pull:
            total = total_ref + h0_ref - (feats[-1].float() + feats[0].float())
        return fit_joint(features, total, feats[0].float(), full, history=args.history,
                         anchor_history=args.anchor_history, ridge=args.ridge, carrier=carrier)

    def save(path, table, error, full, label, search=None):
        return save_joint(path, table, error, model, name=label, anchor=ANCHOR, history=args.history,
                          anchor_history=args.anchor_history, ridge=args.ridge, carrier=carrier,
                          calibration_data={**data, "fit": label}, search=search)

    def evaluate(path, label, full, config=None):
        config = config or anchored_config(path)
        with apply(model, config) as handle:
            images = sampler(model, dev_labels, num_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                             seed=args.dev_seed, listener=handle)
        psnr = float(metrics.psnr(images, dev_full))
        key = (tuple(full), type(config.forecaster).__name__)
        if key not in flops_cache:
            def one(cfg=None):
                if cfg is None:
                    return sampler(model, dev_labels[:1], num_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                                   seed=0)
                with apply(model, cfg) as h:
                    return sampler(model, dev_labels[:1], num_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                                   seed=0, listener=h)
            full_flops = flops_cache.setdefault(("full",), count_flops(one)[1])
            flops_cache[key] = count_flops(lambda: one(config))[1] / full_flops
        row = {"variant": label, "full_steps": list(full), "dev_psnr": round(psnr, 3),
               "flops_fraction": round(flops_cache[key], 4), "dev_images": args.dev_images,
               "dev_seed": args.dev_seed, "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        return psnr

    tmp = tempfile.mkdtemp(prefix="flux_anchor_joint_")  # candidates; the chosen fits go beside --out
    if args.baseline:
        cfg = anchored_config(args.baseline)
        evaluate(args.baseline, f"baseline {os.path.basename(args.baseline)}", cfg.policy.full_steps)
    best = tuple(int(s) for s in args.schedule.split(","))
    seen: dict[tuple, float] = {}

    def teacher(full):
        if full in seen:
            return seen[full]
        table, error = fit(full)
        path = os.path.join(tmp, "candidate.safetensors")
        save(path, table, error, full, "candidate")
        seen[full] = evaluate(path, f"joint teacher-forced (fit {error['rel_error']:.3f})", full)
        return seen[full]

    teacher(best)
    improved = args.search > 0
    while improved and len(seen) < args.search:
        improved = False
        for i in range(1, len(best)):
            for delta in (1, -1, 2, -2, 4, -4):
                cand = sorted(set(best[:i] + (best[i] + delta,) + best[i + 1:]))
                if len(cand) != len(best) or cand[-1] >= args.steps or cand[i] <= 0 or len(seen) >= args.search:
                    continue
                if teacher(tuple(cand)) > seen[best]:
                    best, improved = tuple(cand), True
    table, error = fit(best)
    label = args.name or os.path.splitext(os.path.basename(args.out))[0]
    search = {"method": "coordinate moves on dev PSNR", "dev_images": args.dev_images, "dev_seed": args.dev_seed,
              "candidates": len(seen)}
    cal_file = save(args.out, table, error, best, label, search)
    scores = {"teacher": seen[best]}
    current, feats = args.out, cal
    for r in range(args.onpolicy):
        feats = record(ref, sampler, labels, args.seed, args.steps, anchored_config(current))
        table, error = fit(best, feats)
        path = args.out.replace(".safetensors", f"-op{r + 1}.safetensors")
        save(path, table, error, best, f"{label}-op{r + 1}", search)
        scores[path] = evaluate(path, f"joint on-policy round {r + 1}{' pull' if args.pull else ''} "
                                      f"(fit {error['rel_error']:.3f})", best)
        current = path
    if args.rank:  # on the last round's regressors (those the last refit used)
        residuals: dict[int, torch.Tensor] = {}
        features = {paths[i]: feats[i].float() for i in range(1, len(paths))}
        total = total_ref
        if feats is not cal and args.pull:
            total = total_ref + h0_ref - (feats[-1].float() + feats[0].float())
        table, error = fit_joint(features, total, feats[0].float(), best, history=args.history,
                                 anchor_history=args.anchor_history, ridge=args.ridge, carrier=carrier,
                                 residuals=residuals)
        path = args.out.replace(".safetensors", f"-r{args.rank}.safetensors")
        joint = save(path, table, error, best, f"{label}-r{args.rank}", search)
        basis = {}
        for s_ in residuals:
            emb = model.norm_out.linear(model.norm_out.silu(cal[-2][s_].reshape(-1, cal[-2].shape[-1]))).float()
            scale = emb.chunk(2, dim=1)[0].mean(0)
            pw = model.proj_out.weight.detach().float() * (1 + scale)[None, :]
            basis[s_] = (pw - pw.mean(1, keepdim=True)).T
        maps = fit_correction(feats[0].float(), residuals, best, rank=args.rank, anchor_history=args.anchor_history,
                              ridge=args.correction_ridge, output_basis=basis)
        map_path = path.replace(".safetensors", "-map.safetensors")
        digest = save_correction(map_path, maps, target=carrier, tokens=feats[0].shape[-2],
                                 anchor_history=args.anchor_history)
        config = dataclasses.replace(anchored_config(path),
                                     forecaster=AnchoredMapForecast(path, map_path, joint.sha256, digest))
        scores[map_path] = evaluate(path, f"joint + rank-{args.rank} correction (fit {error['rel_error']:.3f}; "
                                          f"regressors {'on-policy' if feats is not cal else 'teacher-forced'})",
                                    best, config)
    print(json.dumps({"best_schedule": list(best), "scores": scores, "out": args.out, "sha256": cal_file.sha256,
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
