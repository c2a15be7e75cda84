"""Paired bootstrap intervals for FID-FMNIST differences between methods, from images saved by
``scripts/quality_at_scale.py --save DIR``.

All methods of one seed share the initial noise and labels, so image i of every method comes from the same start.
Each bootstrap draw resamples image indices once and applies them to every method (paired), which removes the
sampling noise common to all methods from their differences. Also printed:

- the floor: FID-FMNIST of subsets of *real* training images of the same size (what a perfect generator scores at
  this N, since the statistic is biased upward for small N);
- FID-FMNIST split into its mean term |mu - mu_real|^2 and covariance term;
- "FID to full": the Fréchet distance to the full-compute images of the same seed (a distribution-level fidelity
  measure, 0 for a method that reproduces full compute);
- each method's feature-mean shift from full compute, projected on the unit vector from full compute's mean to the
  real data's: positive moves towards the real statistics (lowering FID-FMNIST's mean term), negative away.

    python scripts/experiments/fid_intervals.py /root/taylorseer-runs/quality/cfg1.5-n1000 --baseline fora-N5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from taylorseer.eval.metrics import classifier_features, frechet_distance, reference_statistics
from taylorseer.models.data import load_fashion_mnist, resize_images


def features(images: torch.Tensor) -> np.ndarray:
    """Penultimate features [N, 128] (float64) of the shipped classifier for images [N, 1, S, S] in [-1, 1]."""
    return classifier_features(images.float()).numpy()


def gaussian(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


def fid(f: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> float:
    mu, sigma = gaussian(f)
    return frechet_distance(mu, sigma, ref[0], ref[1])


def interval(values: np.ndarray) -> str:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return f"[{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory holding seed*/<method>.safetensors")
    parser.add_argument("--baseline", default="fora-N5")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--floor-subsets", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    seeds = sorted(p for p in args.root.glob("seed*") if p.is_dir())
    if not seeds:
        raise SystemExit(f"no seed*/ directories under {args.root}")
    feats: dict[str, dict[str, np.ndarray]] = {}
    size = n = 0
    for sd in seeds:
        feats[sd.name] = {}
        for f in sorted(sd.glob("*.safetensors")):
            images = load_file(str(f))["images"]
            size, n = int(images.shape[-1]), int(images.shape[0])
            feats[sd.name][f.stem] = features(images)
    mu_r, sigma_r = (t.numpy() for t in reference_statistics(size))
    ref = (mu_r, sigma_r)

    train = resize_images(load_fashion_mnist("train")[0], size)
    floor = [fid(features(train[idx]), ref)
             for idx in (torch.from_numpy(rng.choice(len(train), n, replace=False)) for _ in range(args.floor_subsets))]
    print(f"{n} images per method and seed, {size}x{size}; seeds: {', '.join(s.name for s in seeds)}")
    print(f"floor (real training images, {args.floor_subsets} subsets of {n}): FID-FMNIST "
          f"{np.mean(floor):.3f} +- {np.std(floor, ddof=1):.3f}\n")

    names = sorted(set().union(*(set(v) for v in feats.values())) - {"full"})
    methods = ["full"] + names
    table: dict[str, dict[str, float]] = {m: {} for m in methods}
    for seed, fm in feats.items():
        print(f"## {seed}: paired bootstrap, {args.draws} draws; intervals are 95% percentile intervals\n")
        print(f"| method | FID-FMNIST | mean term | cov term | minus full | minus {args.baseline} | FID to full | "
              "shift along full->real |")
        print("|---|---|---|---|---|---|---|---|")
        draws = [rng.integers(0, n, n) for _ in range(args.draws)]
        boot = {m: np.array([fid(fm[m][idx], ref) for idx in draws]) for m in methods if m in fm}
        mu_full = fm["full"].mean(0)
        gap = mu_r - mu_full
        g_unit = gap / np.linalg.norm(gap)
        for m in methods:
            if m not in fm:
                continue
            value = fid(fm[m], ref)
            table[m][seed] = value
            mu, sigma = gaussian(fm[m])
            mean_term = float((mu - mu_r) @ (mu - mu_r))
            to_full = frechet_distance(mu, sigma, *gaussian(fm["full"]))
            shift = float((mu - mu_full) @ g_unit)
            d_full = "-" if m == "full" else interval(boot[m] - boot["full"])
            d_base = "-" if m == args.baseline or args.baseline not in boot else interval(boot[m] - boot[args.baseline])
            print(f"| {m} | {value:.3f} | {mean_term:.3f} | {value - mean_term:.3f} | {d_full} | {d_base} | "
                  f"{to_full:.3f} | {shift:+.4f} |")
        print()
    print("## across seeds (each method over the seeds it has)\n")
    print(f"| method | seeds | FID-FMNIST per seed | mean | below {args.baseline} | below full |")
    print("|---|---|---|---|---|---|")
    base = table.get(args.baseline, {})
    for m, values in table.items():
        vs_base = [values[s] < base[s] for s in values if s in base]
        vs_full = [values[s] < table["full"][s] for s in values if s in table["full"]]
        print(f"| {m} | {', '.join(values)} | {', '.join(f'{v:.3f}' for v in values.values())} | "
              f"{np.mean(list(values.values())):.3f} | {sum(vs_base)}/{len(vs_base)} | {sum(vs_full)}/{len(vs_full)} |")


if __name__ == "__main__":
    main()
