"""Wall time of full compute and TaylorSeer, eager and under torch.compile, on the embedded model, in one process.

Regional compile (``block.compile()`` on every transformer block) or whole-model ``torch.compile``; every method
gets one untimed warm-up generation (compilation included), then the methods are timed interleaved over
``--rounds`` rounds (rotated order) and each time is the median. Writes JSONL records and a Markdown table.

    python scripts/experiments/compile_speed.py --images 16 --rounds 5 --out docs/results/compile_speed
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.eval.bench import machine_facts
from taylorseer.models.pretrained import load_reference
from taylorseer.models.sampler import sample


def _compile(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "regional":
        for block in model.transformer_blocks:
            block.compile()
        return model
    return torch.compile(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images per generation (CFG doubles the batch)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--compile", choices=("regional", "whole"), default="regional", help="how to compile")
    p.add_argument("--out", type=Path, default=Path("docs/results/compile_speed"), help="output folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    taylorseer.tune_cpu_allocator()
    config = TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, name="ts-O2-N5-divided")
    labels = torch.arange(args.images) % 10
    eager = load_reference()
    compiled_full = _compile(copy.deepcopy(eager), args.compile)
    ts_model = copy.deepcopy(eager)
    compiled_ts = _compile(ts_model, args.compile)
    compiled_handle = taylorseer.apply(compiled_ts, config)  # stays installed: one set of compiled variants

    def eager_ts() -> torch.Tensor:
        with taylorseer.apply(eager, config) as handle:
            return sample(eager, labels, num_steps=args.steps, listener=handle)

    methods = {
        "full eager": lambda: sample(eager, labels, num_steps=args.steps),
        "TaylorSeer O=2, N=5 eager": eager_ts,
        f"full compiled ({args.compile})": lambda: sample(compiled_full, labels, num_steps=args.steps),
        f"TaylorSeer O=2, N=5 compiled ({args.compile})":
            lambda: sample(compiled_ts, labels, num_steps=args.steps, listener=compiled_handle),
    }
    outputs, warm = {}, {}
    for name, run in methods.items():
        t0 = time.perf_counter()
        outputs[name] = run()
        warm[name] = time.perf_counter() - t0
        print(f"warm-up {name}: {warm[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    median = {n: statistics.median(t) for n, t in times.items()}
    names_full = {"eager": names[0], "compiled": names[2]}
    rows = []
    for name in names:
        kind = "compiled" if "compiled" in name else "eager"
        rows.append({"method": name, "wall_s": median[name], "wall_min_s": min(times[name]),
                     "wall_max_s": max(times[name]), "warmup_s": warm[name],
                     "speedup_vs_full_same_mode": median[names_full[kind]] / median[name],
                     "speedup_vs_full_eager": median[names[0]] / median[name]})
    diff = float((outputs[names[3]] - outputs[names[1]]).abs().max())
    facts = {**machine_facts(), "images": args.images, "steps": args.steps, "rounds": args.rounds,
             "compile": args.compile, "max_abs_diff_compiled_vs_eager_taylorseer": diff}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"records-{args.compile}.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "header", **facts}) + "\n")
        for row in rows:
            f.write(json.dumps({"kind": "method", **row}) + "\n")
    lines = [f"# Eager vs torch.compile ({args.compile}), embedded model", "",
             f"{dt.date.today()}, {facts['cpu']}, {args.threads} thread(s), torch {facts['torch']}; "
             f"{args.images} images (CFG batch {2 * args.images}), DDIM {args.steps}; median of {args.rounds} "
             f"interleaved rounds after one warm-up generation each. Made by "
             f"`python scripts/experiments/compile_speed.py --images {args.images} --rounds {args.rounds} "
             f"--compile {args.compile}`.", "",
             "| method | wall s (min-max) | warm-up s | speedup vs full, same mode | speedup vs full eager |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['wall_s']:.2f} ({row['wall_min_s']:.2f}-{row['wall_max_s']:.2f}) | "
                     f"{row['warmup_s']:.1f} | {row['speedup_vs_full_same_mode']:.2f}x | "
                     f"{row['speedup_vs_full_eager']:.2f}x |")
    lines += ["", f"Largest absolute difference between compiled and eager TaylorSeer images: {diff:.2e}.", ""]
    (args.out / f"compile_speed-{args.compile}.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    compiled_handle.remove()


if __name__ == "__main__":
    main()
