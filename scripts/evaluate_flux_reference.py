"""Evaluate the flow-matching reference at full compute (class accuracy, FID-FMNIST) through FluxPipeline.

    python scripts/evaluate_flux_reference.py --per-class 50 --steps 28 50 --cfg-scale 1.0 1.5 2.0 3.0 --record

    python scripts/evaluate_flux_reference.py --weights /tmp/candidate.safetensors --per-class 10

Prints class accuracy (the shipped 16x16 classifier, overall and per class) and FID-FMNIST (vs the 10k test-set
statistics) of Euler samples; ``--record`` writes them into the assets manifest beside the shipped weights.
Seeds: 2000 + (steps, scale) do not matter: every row of one run uses the same noise (seed ``--seed``), disjoint
from the bench's (0) and the calibrations' (1000+) seeds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from taylorseer.eval import metrics
from taylorseer.models.checkpoint import file_sha256, read_manifest, update_manifest
from taylorseer.models.flux_pipeline import FLUX_FILE, load_flux_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--cfg-scale", type=float, nargs="+", default=[2.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100, help="images per pipeline call")
    parser.add_argument("--weights", default=None, help="an exported file to evaluate instead of the shipped one")
    parser.add_argument("--record", action="store_true", help="write the results into MANIFEST.json")
    args = parser.parse_args()
    if args.weights and args.record:
        parser.error("--record writes the shipped model's manifest entry: it cannot be used with --weights")
    torch.set_num_threads(args.threads)
    ref = (load_flux_reference(args.weights, sha256=file_sha256(args.weights)) if args.weights
           else load_flux_reference())
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    for steps in args.steps:
        for scale in args.cfg_scale:
            start = time.perf_counter()
            images = torch.cat([ref.generate(labels[i:i + args.batch], num_steps=steps, guidance_scale=scale,
                                             seed=args.seed + i)
                                for i in range(0, len(labels), args.batch)])
            seconds = time.perf_counter() - start
            per_class = [metrics.class_accuracy(images[labels == c], labels[labels == c]) for c in range(10)]
            row = {"steps": steps, "cfg_scale": scale, "images": len(labels), "seed": args.seed,
                   "class_accuracy": round(metrics.class_accuracy(images, labels), 4),
                   "fid_fmnist": round(metrics.fid_fmnist(images), 3),
                   "per_class_accuracy": [round(a, 3) for a in per_class], "seconds": round(seconds, 1),
                   "threads": args.threads}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.record:
        entry = read_manifest().get(FLUX_FILE, {})
        update_manifest(FLUX_FILE, {**entry, "evaluation": rows})


if __name__ == "__main__":
    main()
