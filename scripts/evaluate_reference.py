"""Evaluate the shipped reference DiT at full compute and write its numbers into the assets manifest.

    python scripts/evaluate_reference.py --per-class 30 --threads 2

    python scripts/evaluate_reference.py --weights /tmp/candidate.safetensors --per-class 50

Prints class accuracy (shipped classifier, overall and per class) and FID-FMNIST (vs the 10k test set
statistics) of DDIM-50 samples.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from taylorseer.eval import metrics
from taylorseer.models.checkpoint import read_manifest, update_manifest
from taylorseer.models.pretrained import REFERENCE_FILE, load_reference
from taylorseer.models.sampler import sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, nargs="+", default=[1.5])
    parser.add_argument("--guidance-interval", nargs="+", default=["0:500"],
                        help="timestep intervals LO:HI where guidance applies, or 'all' (every step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--weights", default=None,
                        help="an exported reference file to evaluate instead of the shipped one (no --record)")
    parser.add_argument("--record", action="store_true", help="write the results into MANIFEST.json")
    args = parser.parse_args()
    if args.weights and args.record:
        parser.error("--record writes the shipped model's manifest entry: it cannot be used with --weights")
    torch.set_num_threads(args.threads)
    model = load_reference(args.weights)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    results = []
    intervals = [None if v == "all" else tuple(int(x) for x in v.split(":")) for v in args.guidance_interval]
    for scale, interval in [(s, i) for s in args.cfg_scale for i in intervals]:
        start = time.perf_counter()
        images = sample(model, labels, num_steps=args.steps, guidance_scale=scale, guidance_interval=interval,
                        seed=args.seed, progress=True)
        seconds = time.perf_counter() - start
        row = {"images": len(labels), "ddim_steps": args.steps, "cfg_scale": scale,
               "guidance_interval": list(interval) if interval else "all", "seed": args.seed,
               "class_accuracy": round(metrics.class_accuracy(images, labels), 4),
               "fid_fmnist": round(metrics.fid_fmnist(images), 3), "seconds": round(seconds, 1),
               "per_class_accuracy": [round(metrics.class_accuracy(images[labels == c], labels[labels == c]), 3)
                                      for c in range(10)],
               "threads": args.threads}
        print(json.dumps(row))
        results.append(row)
    if args.record:
        entry = dict(read_manifest()[REFERENCE_FILE])
        entry["evaluation"] = results
        update_manifest(REFERENCE_FILE, entry)


if __name__ == "__main__":
    main()
