"""The shipped references' commands: ``demo`` (full compute vs our best methods vs baselines) and
``train-reference``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import (
    EMBEDDED_MODELS,
    add_config_flag,
    check_out_folder,
    config_from_flag,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    subcommand,
)

if TYPE_CHECKING:
    from ..models.train import TrainConfig

def _check_demo(args: argparse.Namespace) -> None:
    check_out_folder("--out", args.out)
    args.config = config_from_flag(args, [])  # read (and refused) before any model is loaded

def _check_train(args: argparse.Namespace) -> None:
    if args.out_dir is not None:
        check_out_folder("--out-dir", args.out_dir)
    if args.stop_at is not None and args.model != "flux":
        raise ValueError("argument --stop-at: applies to --model flux (the DiT trains to --steps)")

def _cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from ..demo import format_table, run_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "flux":
        from ..models.flux_pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

        steps, scale, sampler = args.steps or DEFAULT_STEPS, args.cfg_scale or DEFAULT_GUIDANCE, "Euler"
    else:
        steps, scale, sampler = args.steps or 50, args.cfg_scale or 1.5, "DDIM"
    rows = run_demo(out_dir=args.out, per_class=args.per_class, num_steps=steps, guidance_scale=scale,
                    seed=args.seed, rounds=args.rounds, reference=args.model, config=args.config)
    print(f"\n{10 * args.per_class} images, {steps} {sampler} steps, CFG {scale}, "
          f"{torch.get_num_threads()} CPU thread(s); PSNR/SSIM vs the full-compute images of the same seeds; "
          f"FID-FMNIST over {10 * args.per_class} images (compare rows, not with other sample counts)\n")
    print(format_table(rows))
    print(f"\nside-by-side: {args.out}/demo.png")

def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of ``train-reference``: the flags given, the shipped recipe for the rest."""
    from ..models.train import TrainConfig

    given = {k: getattr(args, k) for k in ("out_dir", "steps", "batch_size", "lr", "threads", "seed")}
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def _cmd_train(args: argparse.Namespace) -> None:
    if args.model == "flux":
        return _train_flux(args)
    from ..models.train import train_reference

    cfg = train_config_from_args(args)
    path = train_reference(cfg)
    print(f"training state: {path}")
    if args.export:
        from ..models.pretrained import export_reference

        notes = {k: getattr(cfg, k) for k in ("size", "batch_size", "lr", "ema_decay", "beta_schedule", "seed",
                                              "model_label_dropout")}
        print(f"exported: {export_reference(path, notes=notes)}")


def _train_flux(args: argparse.Namespace) -> None:
    """``train-reference --model flux``: the flow-matching reference (models.train_flux; defaults = shipped recipe)."""
    from ..models.flux_pipeline import export_flux_reference
    from ..models.train_flux import FluxTrainConfig, train_flux_reference

    given = {k: getattr(args, k) for k in ("out_dir", "steps", "batch_size", "lr", "threads", "seed")}
    if given["out_dir"] is None:
        given["out_dir"] = "runs/flux"
    cfg = FluxTrainConfig(**{k: v for k, v in given.items() if v is not None})
    path = train_flux_reference(cfg, stop_at=args.stop_at)
    print(f"training state: {path}")
    if args.export:
        notes = {k: getattr(cfg, k) for k in ("size", "batch_size", "lr", "ema_decay", "seed", "null_prob")}
        print(f"exported: {export_flux_reference(path, notes=notes)}")


def add_demo(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` subcommand and its flags."""
    p = subcommand(sub, "demo", "a shipped reference (DiT or FLUX): full compute vs our best methods vs "
                    "baselines, measured, side by side", _cmd_demo, _check_demo)
    p.add_argument("--out", default="out/demo", help="folder for demo.png")
    p.add_argument("--model", choices=("dit", "flux"), default="dit", help="the shipped reference: dit (DDIM, "
                   "epsilon prediction) or flux (flow matching through diffusers' FluxPipeline)")
    p.add_argument("--per-class", type=positive_int, default=4, help="images per class, 10 classes")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps of the full-compute run "
                   "(default: 50 for dit, 28 for flux)")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=None, help="classifier-free guidance scale "
                   "(default: 1.5 for dit, the model card's for flux)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="noise seed")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: 1: the process "
                   "CPU time then measures the work, not a second thread spin-waiting for the first on a shared "
                   "machine, and the CPU-time speedups of two runs agree)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds, methods interleaved (median)")
    add_config_flag(p, "one more row of the table and column of the picture, at --steps")


def add_train(sub: argparse._SubParsersAction) -> None:
    """The ``train-reference`` subcommand and its flags."""
    p = subcommand(sub, "train-reference", "train (or resume) the shipped small DiT; unset flags take the shipped "
                    "model's recipe (TrainConfig defaults)", _cmd_train, _check_train)
    p.add_argument("--model", choices=EMBEDDED_MODELS, default="dit", help="which shipped reference: dit "
                   "(epsilon-prediction DiT) or flux (rectified-flow FluxTransformer2DModel)")
    p.add_argument("--out-dir", help="folder for the training state and log (default: runs/reference; flux: "
                   "runs/flux)")
    p.add_argument("--steps", type=positive_int, help="total optimiser steps, sets the lr schedule (default: the "
                   "shipped recipe's)")
    p.add_argument("--batch-size", type=positive_int, help="images per optimiser step (default: the shipped "
                   "recipe's)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: the shipped recipe's)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: the shipped recipe's)")
    p.add_argument("--seed", type=nonnegative_int, help="data, noise and init seed (default: the shipped recipe's)")
    p.add_argument("--export", action="store_true", help="export the EMA weights into the package when done")
    p.add_argument("--stop-at", type=positive_int, default=None, help="flux: stop (resumably) at this optimiser "
                   "step of the schedule set by --steps (the shipped flux weights: 7000 of 14000) (default: train "
                   "to the end)")
