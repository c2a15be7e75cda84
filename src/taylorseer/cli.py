"""Command line: parses arguments and calls the API; nothing else lives here.

    taylorseer demo                      # embedded DiT, full compute vs TaylorSeer, side by side
    taylorseer plan --preset paper_dit   # print a schedule's compute/forecast pattern
    taylorseer bench [--quick]           # measure methods, write JSONL records
    taylorseer report RECORDS.jsonl      # Markdown/HTML report with plots, from records only
    taylorseer generate --model PATH --prompt "..."   # a diffusers pipeline, accelerated
    taylorseer train-reference           # (re)train the embedded model, resumable
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import ABSCISSAE, GRANULARITIES, PRESET_NAMES, SCHEMES, TaylorSeerConfig, preset

if TYPE_CHECKING:
    from .models.train import TrainConfig


def _add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "paper_dit") -> None:
    g = p.add_argument_group("cache config (a preset, with any field overridden)")
    g.add_argument("--preset", choices=PRESET_NAMES, default=default_preset)
    g.add_argument("--interval", type=int, help="N: compute one step in N (1 = every step)")
    g.add_argument("--order", type=int, dest="max_order", help="O: Taylor order (0 = reuse, FORA)")
    g.add_argument("--warmup", type=int, dest="warmup_steps", help="W: first steps always computed")
    g.add_argument("--tail", type=int, dest="tail_steps", help="last steps always computed")
    g.add_argument("--scheme", choices=SCHEMES)
    g.add_argument("--abscissa", choices=ABSCISSAE)
    g.add_argument("--granularity", choices=GRANULARITIES)
    g.add_argument("--modules", nargs="+", help="path patterns of the modules to forecast, e.g. 'blocks.*.attn'")


def config_from_args(args: argparse.Namespace) -> TaylorSeerConfig:
    """The ``TaylorSeerConfig`` named by ``--preset`` with the explicitly given fields overridden."""
    fields = ("interval", "max_order", "warmup_steps", "tail_steps", "scheme", "abscissa", "granularity")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.modules:
        overrides["modules"] = tuple(args.modules)
    if args.preset:
        return preset(args.preset, **overrides)
    return TaylorSeerConfig(**overrides)


def _cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from .demo import format_table, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_demo(out_dir=args.out, per_class=args.per_class, num_steps=args.steps, guidance_scale=args.cfg_scale,
                    seed=args.seed, rounds=args.rounds)
    print(f"\n{10 * args.per_class} images, {args.steps} DDIM steps, CFG {args.cfg_scale}, "
          f"{torch.get_num_threads()} CPU thread(s); PSNR/SSIM vs the full-compute images of the same seeds; "
          f"FID-FMNIST over {10 * args.per_class} images (compare rows, not with other sample counts)\n")
    print(format_table(rows))
    print(f"\nside-by-side: {args.out}/demo.png")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .policy.interval import IntervalPolicy

    config = config_from_args(args)
    pattern = IntervalPolicy.from_config(config).pattern(args.steps)
    print(config.to_json())
    print(f"{pattern}\n{pattern.count('F')} full / {args.steps} steps (F = computed, f = forecast)")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of ``train-reference``: the flags given, the shipped recipe for the rest."""
    from .models.train import TrainConfig

    given = {k: getattr(args, k) for k in ("out_dir", "steps", "batch_size", "lr", "threads", "seed")}
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def _cmd_train(args: argparse.Namespace) -> None:
    from .models.train import train_reference

    cfg = train_config_from_args(args)
    path = train_reference(cfg)
    print(f"training state: {path}")
    if args.export:
        from .models.pretrained import export_reference

        notes = {k: getattr(cfg, k) for k in ("size", "batch_size", "lr", "ema_decay", "beta_schedule", "seed",
                                              "model_label_dropout")}
        print(f"exported: {export_reference(path, notes=notes)}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .eval.bench import default_grid, run_bench, select_methods
    from .models.pretrained import load_reference

    methods = default_grid(quick=args.quick, num_steps=args.steps)
    if args.methods:
        methods = select_methods(methods, [n.strip() for n in args.methods.split(",") if n.strip()])
    images = args.images or (8 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick else 2)
    records = run_bench(load_reference(), methods, num_images=images, seed=args.seed, threads=args.threads,
                        repeats=repeats, out_path=args.out, model_name="DiT-FM-B/2-16 (embedded, Fashion-MNIST 16x16)")
    print(f"{len(records)} records appended to {args.out}; next: taylorseer report {args.out}")


def _cmd_report(args: argparse.Namespace) -> None:
    from .eval.report import write_report

    print(f"report: {write_report(args.records, args.out, notes=args.notes)}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate

    config = None if args.no_cache else config_from_args(args)
    stats = generate(model=args.model, prompt=args.prompt, config=config, num_inference_steps=args.steps,
                     seed=args.seed, out_dir=args.out, num_images=args.num_images, guidance_scale=args.guidance_scale,
                     device=args.device, dtype=args.dtype, measure_flops=args.measure_flops, progress=True)
    for key, value in stats.items():
        print(f"{key}: {value}")


def build_parser() -> argparse.ArgumentParser:
    """The ``taylorseer`` argument parser."""
    parser = argparse.ArgumentParser(prog="taylorseer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep the C allocator's default settings; otherwise commands that run a model call "
                        "taylorseer.tune_cpu_allocator() first (glibc: about 20%% faster on CPU here, the process "
                        "keeps its peak memory)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="embedded DiT: full compute vs TaylorSeer, measured, side by side")
    p.add_argument("--out", default="out/demo", help="folder for demo.png")
    p.add_argument("--per-class", type=int, default=8, help="images per class (10 classes)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the full-compute run")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, methods interleaved (median; after a warm-up)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plan", help="print a schedule's compute/forecast pattern")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=50)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("train-reference", help="train (or resume) the embedded reference DiT; unset flags take "
                       "the shipped model's recipe (TrainConfig defaults)")
    p.add_argument("--out-dir", help="where the training state and log go (default runs/reference)")
    p.add_argument("--steps", type=int, help="total optimiser steps (sets the lr schedule)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--export", action="store_true", help="export the EMA weights into the package when done")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("bench", help="measure speed, memory and quality of many methods; write JSONL records")
    p.add_argument("--quick", action="store_true", help="a handful of methods and images (CI)")
    p.add_argument("--out", default="out/bench/records.jsonl", help="JSONL file (appended)")
    p.add_argument("--images", type=int, default=None, help="images per method (default: 50; --quick: 8)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the full-compute reference")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 2; --quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives the most stable ratios)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None, help="comma-separated method names of the grid to run (full is always "
                   "run); e.g. fora-N5,ts-O1-N5-divided,ddim-11")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="write a Markdown/HTML report with plots from bench records")
    p.add_argument("records", help="a JSONL file written by `taylorseer bench`")
    p.add_argument("--out", default="out/report")
    p.add_argument("--notes", default=None, help="a paragraph added to the report (e.g. why a target was missed)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("generate", help="run a diffusers pipeline with TaylorSeer and save its images")
    p.add_argument("--model", required=True, help="hub id or local folder of a diffusers pipeline")
    p.add_argument("--prompt", default=None)
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/generate")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as saved)")
    p.add_argument("--measure-flops", action="store_true", help="count executed/skipped FLOPs (slower)")
    p.add_argument("--no-cache", action="store_true", help="run the pipeline without taylorseer")
    _add_config_args(p, default_preset=None)
    p.set_defaults(func=_cmd_generate)
    return parser


_RUNS_MODELS = ("demo", "bench", "generate", "train-reference")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit with status 2."""
    from .models.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    if not args.default_malloc and args.command in _RUNS_MODELS:
        from .runtime.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as err:
        print(f"taylorseer {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
