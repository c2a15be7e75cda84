"""``python tests/distributed/cp_report.py BASETEMP``: the numbers of docs/parallel.md from a run of the distributed
tests kept with ``python -m pytest tests/distributed --basetemp BASETEMP``: per method and layout the worst rank's
relative L2 to one process and the peak cache bytes per rank (one process's beside them), what each rank ended
with in the failing-rank case, the emulated cases, and the hybrid sample's distance to the plain and the
emulating one-process sets."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import world  # noqa: E402


def report(basetemp: str) -> None:
    folder = sorted(glob.glob(os.path.join(basetemp, "cp*")))[-1]
    alone = torch.load(os.path.join(folder, "alone.pt"))
    ranks = world.rank_records(folder)
    print(f"world: {alone['world_seconds']:.1f} s from fork to join")
    for group, k in (((0, 1), 2), ((2, 3), 2), ((0, 1, 2, 3), 4)):
        for key in ranks[group[0]]:
            if key == "unpatched" or key.split("/")[2] != str(k):
                continue
            name = key.split("/")[0]
            error = max(cases.relative_l2(ranks[r][key]["images"], alone[name]["images"]) for r in group)
            print(f"{key:36s} rel L2 {error:.2e}  bytes/rank {ranks[group[0]][key]['peak_cache_bytes']:>8d}"
                  f"  one process {alone[name]['peak_cache_bytes']:>8d}")
    for name, k in world.EMULATED:
        key = f"{name}/ulysses/{k}" if name == "full" else f"{name}/ulysses/{k}/after"
        emulated = alone[f"{name}/emulated/{k}"]["images"]
        print(f"{key}: every rank bitwise the emulating process: "
              f"{all(torch.equal(ranks[r][key]['images'], emulated) for r in range(k))}; "
              f"the plain process bitwise the emulating one: {torch.equal(alone[name]['images'], emulated)}")
    for r in range(world.WORLD):
        with open(os.path.join(folder, f"fault{r}.json")) as f:
            print(f"failing-rank case, rank {r}:", json.load(f))
    one, emulated, hybrid = (np.load(os.path.join(folder, d, "samples.npz"))["images"].astype(np.float64)
                             for d in ("one-sample", "one-sample-emulated", "hybrid"))
    print(f"hybrid 2x2 sample vs one process: rel L2 {np.linalg.norm(hybrid - one) / np.linalg.norm(one):.2e}, "
          f"max abs {np.abs(hybrid - one).max():.2e}, bitwise {np.array_equal(hybrid, one)}; vs one process "
          f"emulating the sharded kernels: bitwise {np.array_equal(hybrid, emulated)}")


if __name__ == "__main__":
    report(sys.argv[1])
