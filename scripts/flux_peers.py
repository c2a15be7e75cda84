"""The peers bench on the flow-matching reference (issue #23): ours at each budget against cache-dit (its pipeline
path), diffusers' hooks, FORA and Spectrum, in one run (one table), images disjoint from every calibration.

    python scripts/flux_peers.py --steps 50 --images 32 \
        --calibration docs/results/flux/calibration/ts2-output-b6-s50.safetensors ... \
        --anchored docs/results/flux/calibration/anchor1-b5-s50.safetensors --out docs/results/flux/peers/records.jsonl
    taylorseer report docs/results/flux/peers/records.jsonl --out docs/results/flux/peers

Methods: full compute; from ``eval.flux.flux_grid``: FORA at the budgets, ``paper_flux``, diffusers' hooks
(TaylorSeer, FirstBlockCache, SeaCache, MagCache with ratios from its own calibration mode); each ``--calibration``
file's methods (``eval.grids.calibrated_methods``) and Spectrum's forecaster on its schedule (``spectrum-fc@NAME``);
each ``--anchored`` file as the hybrid with its anchored weights (``anchor1@NAME``); and cache-dit
(``eval.flux.cache_dit_flux_methods``: its own threshold rule, budget-fitting interval masks, every calibration's
schedule as its step mask with Fn/Bn and each calibrator). Noise seed ``--seed`` (default 0, the bench's).
"""

from __future__ import annotations

import argparse

import torch

from taylorseer.calibration.anchor_fit import anchored_config
from taylorseer.eval.bench import calibrated_methods, schedule_companions
from taylorseer.eval.flux import FluxSampler, cache_dit_flux_methods, flux_grid, mag_ratios, run_flux_bench
from taylorseer.eval.methods import Method
from taylorseer.models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference
from taylorseer.parts import CacheConfig
from taylorseer.policy.schedule import FixedSchedule

GRID_KINDS = ("full", "fora-", "paper_flux", "diffusers-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--calibration", action="append", default=[])
    parser.add_argument("--anchored", action="append", default=[])
    parser.add_argument("--skip", default="", help="comma-separated method names to leave out")
    parser.add_argument("--only", default="", help="comma-separated method names to keep (and full compute)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = load_flux_reference()
    ratios = mag_ratios(FluxSampler(ref), args.steps, DEFAULT_GUIDANCE)
    methods = [m for m in flux_grid(args.steps, ratios=ratios) if m.name.startswith(GRID_KINDS)]
    ours: list[Method] = []
    for path in args.calibration:
        ours += calibrated_methods(path, ref.transformer, args.steps, guidance_scale=DEFAULT_GUIDANCE,
                                   cfg_mode="split")
    ours = [m for m in ours if not m.name.endswith("-taylor2")]
    methods += ours + [m for m in schedule_companions(ours) if m.name.startswith("spectrum-fc@")]
    for path in args.anchored:
        config = anchored_config(path)
        methods.append(Method(f"anchor1@{config.name}", config, args.steps))
    schedules = {m.name: m.config.policy.full_steps for m in ours
                 if isinstance(m.config, CacheConfig) and isinstance(m.config.policy, FixedSchedule)}
    methods += cache_dit_flux_methods(args.steps, schedules)
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    methods = [m for m in methods if m.name not in skip]
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    if only:
        unknown = sorted(only - {m.name for m in methods})
        if unknown:
            parser.error(f"--only: unknown {unknown}")
        methods = [m for m in methods if m.name in only or m.name == "full"]
    print(f"{len(methods)} methods: {[m.name for m in methods]}", flush=True)
    records = run_flux_bench(ref, methods, num_images=args.images, seed=args.seed, repeats=args.repeats,
                             guidance_scale=DEFAULT_GUIDANCE, out_path=args.out, threads=1)
    print(f"{len(records)} records appended to {args.out}; next: taylorseer report {args.out}")


if __name__ == "__main__":
    main()
