"""The commands on a diffusers pipeline or a model family: ``plan`` and ``generate``."""

from __future__ import annotations

import argparse

from .common import (
    CONFIG_FLAGS,
    DEVICES,
    DTYPES,
    add_config_args,
    add_config_flag,
    add_parallel_args,
    check_in_file,
    check_out_folder,
    config_from_args,
    config_from_flag,
    context_parallel_from_args,
    device_or_auto,
    given_config_flags,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    subcommand,
)


def _check_plan(args: argparse.Namespace) -> None:
    """Refuse a bad --steps; with --model, read its family (config files only) and start from its preset."""
    if args.steps < 1:
        raise ValueError(f"argument --steps: num_steps must be an integer >= 1, got {args.steps}")
    args.family = None
    if args.model is not None:
        from ..integrations.family import family_of

        try:
            args.family = family_of(args.model)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"argument --model: {err}") from None
    args.given_preset = args.preset
    args.config = config_from_flag(args, given_config_flags(args))
    if args.config is not None:  # any registered parts: the policy's plan (None: decided while generating)
        from ..policy import build_policy

        try:
            args.plan = build_policy(args.config.policy).plan(args.steps)
        except ValueError as err:
            raise ValueError(f"argument --config: {err}") from None
        return
    if args.preset is None:
        args.preset = (args.family.preset or None) if args.family is not None else "paper_dit"
    args.config = config_from_args(args)


def _check_generate(args: argparse.Namespace) -> None:
    """Resolve --device auto and refuse an unavailable device; refuse contradictory flags; set ``args.config``
    (a ``TaylorSeerConfig`` from --preset, ``"family"`` for the model family's preset, None for --no-cache or
    --calibration) and ``args.overrides`` (the field flags given, applied to the family's preset once the model is
    loaded). --calibration: the file must load and be for --steps steps (its model is checked after loading)."""
    from ..devices import resolve_device
    from ..generate import FAMILY

    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        raise ValueError(f"argument --device: {err}") from None
    check_out_folder("--out", args.out)
    given = given_config_flags(args)
    config = config_from_flag(args, given)  # --config: the whole cache config, read before any work
    if config is not None:
        given = ["--config"]
    if args.no_cache and given:
        raise ValueError(f"argument --no-cache: runs without taylorseer, so the cache flags {given} would be ignored; "
                         "drop one or the other")
    if args.no_cache and args.no_baseline:
        raise ValueError("argument --no-baseline: --no-cache runs only the baseline; drop one of the two")
    if args.calibration is not None:
        if given:
            raise ValueError(f"argument --calibration: the file is the cache config (its schedule and fitted "
                             f"weights), so the cache flags {given} would be ignored; drop one or the other")
        if args.no_cache:
            raise ValueError("argument --calibration: --no-cache runs without taylorseer; drop one of the two")
        check_in_file("--calibration", args.calibration)
        from ..generate import read_calibration

        try:  # the file and the step count; the model is checked once the pipeline is loaded
            read_calibration(args.calibration, args.steps)
        except ValueError as err:
            raise ValueError(f"argument --calibration: {err}") from None
        args.config, args.overrides = None, {}
        return
    args.overrides = {}
    if config is not None:
        args.config = config
        return
    fields = config_from_args(args)  # validates each field flag, naming it
    if args.no_cache:
        args.config = None
    elif args.preset:
        args.config = fields  # the preset with the field flags applied
    else:  # the family's preset, known once the pipeline is loaded, with the field flags applied to it
        args.config = FAMILY
        args.overrides = {name: getattr(fields, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}

def _cmd_plan(args: argparse.Namespace) -> None:
    from ..policy.interval import IntervalPolicy

    config, family = args.config, args.family
    if family is not None:
        print(f"model: {family.class_name} (from {family.source}), adapter {family.adapter.name}")
        recommended = family.preset or "none (TaylorSeerConfig defaults)"
        print(f"recommended preset: {recommended}" + (f": {family.reason}" if family.reason else ""))
        if args.config_spec is not None:
            print(f"config used: {config.name} (--config, given)")
        elif args.given_preset is not None and args.given_preset != family.preset:
            print(f"preset used: {args.given_preset} (given)")
    print(config.to_json())
    if args.config_spec is not None and args.plan is None:
        print(f"{type(config.policy).__name__} decides each step while generating: no fixed pattern")
        return
    pattern = ("".join("F" if full else "f" for full in args.plan) if args.config_spec is not None
               else IntervalPolicy.from_config(config).pattern(args.steps))
    print(f"{pattern}\n{pattern.count('F')} full / {args.steps} steps (F = computed, f = forecast)")

def _cmd_generate(args: argparse.Namespace) -> None:
    from .. import generate as gen

    context_parallel = context_parallel_from_args(args)
    accelerated = args.config is not None or args.calibration is not None
    result = gen.generate(model=args.model, prompt=args.prompt, config=args.config, overrides=args.overrides,
                          baseline=accelerated and not args.no_baseline, num_inference_steps=args.steps,
                          seed=args.seed, out_dir=args.out, num_images=args.num_images,
                          guidance_scale=args.guidance_scale, device=args.device, dtype=args.dtype,
                          measure_flops=args.measure_flops, progress=True, calibration=args.calibration,
                          context_parallel=context_parallel)
    if "rank" not in result:  # rank 0 (or alone); the other ranks of a context-parallel job print nothing
        print(format_generate(result))


def format_generate(result: dict) -> str:
    """The summary ``taylorseer generate`` prints: what ran, both wall times, speedup, PSNR, files, stats."""
    import json

    lines = [f"model: {result.get('model')} ({result.get('pipeline')}, {result.get('transformer')}) on "
             f"{result.get('device')}, {result.get('num_inference_steps')} steps, seed {result.get('seed')}"]
    config, stats, baseline = result.get("config"), result.get("stats") or {}, result.get("baseline")
    if config is not None:
        reason = result.get("preset_reason")
        lines.append(f"config: {config.get('name')}" + (f" (the family's preset: {reason})" if reason else "")
                     + f" {json.dumps(config, sort_keys=True)}")
    calibration = result.get("calibration")
    if calibration is not None:
        lines.append(f"calibration: {calibration['name']} ({calibration['path']}, sha256 "
                     f"{(calibration['sha256'] or '')[:12]}...): full steps {calibration['full_steps']} of "
                     f"{calibration['num_steps']}, guidance scale {result.get('guidance_scale')}")
    if baseline is not None:
        lines.append(f"baseline:   {baseline['seconds']:.3f} s (full compute)")
    if config is not None and "seconds" in result:
        counted = ", timed while counting FLOPs" if stats.get("flops_executed") is not None else ""
        lines.append(f"taylorseer: {result['seconds']:.3f} s ({stats.get('steps_full')} full / "
                     f"{stats.get('steps_forecast')} forecast steps{counted})")
    elif "seconds" in result:
        lines.append(f"baseline:   {result['seconds']:.3f} s (full compute, --no-cache)")
    if result.get("speedup") is not None:
        lines.append(f"speedup:    {result['speedup']:.2f}x (wall time, baseline / taylorseer)")
    if stats.get("flops_speedup") is not None:
        lines.append(f"FLOPs:      {stats['flops_speedup']:.2f}x (full-compute FLOPs / executed FLOPs)")
    if baseline is not None:
        psnr = result.get("psnr_db")
        lines.append(f"PSNR:       {psnr:.2f} dB (taylorseer vs baseline, same seed)" if psnr is not None
                     else f"PSNR:       {result.get('psnr_note')}")
    images = [*(baseline or {}).get("images", []), *result.get("images", [])]
    lines.append(f"images:     {', '.join(images) if images else 'none'}")
    if result.get("record"):
        lines.append(f"record:     {result['record']}")
    if result.get("stats") is not None:
        lines.append(f"stats:      {json.dumps(result['stats'], sort_keys=True)}")
    return "\n".join(lines)


def add_plan(sub: argparse._SubParsersAction) -> None:
    """The ``plan`` subcommand and its flags."""
    p = subcommand(sub, "plan", "print a schedule's compute/forecast pattern; with --model, the preset recommended "
                    "for the model's family and why", _cmd_plan, _check_plan)
    add_config_args(p, default_preset=None, unset="paper_dit; with --model the family's recommended preset")
    add_config_flag(p, "its pattern instead of a preset's (instead of --preset and the field flags)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the generation")
    p.add_argument("--model", default=None, help="a registered transformer class name (FluxTransformer2DModel), a "
                   "local diffusers model or pipeline folder (only its config files are read), or a hub id (its "
                   "config is downloaded: needs internet) (default: none)")


def add_generate(sub: argparse._SubParsersAction) -> None:
    """The ``generate`` subcommand and its flags."""
    p = subcommand(sub, "generate", "run a diffusers pipeline at full compute and with TaylorSeer (same seed); save "
                    "both images and a JSON record; print wall times, speedup and PSNR", _cmd_generate,
                    _check_generate)
    p.add_argument("--model", required=True, help="hub id or local folder of a diffusers pipeline")
    p.add_argument("--prompt", default=None, help="the text prompt; for class-conditional DiT pipelines "
                   "comma-separated class ids or label names (default: none; class 0 for DiT)")
    p.add_argument("--steps", type=positive_int, default=50, help="num_inference_steps")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="generator seed")
    p.add_argument("--out", default="out/generate", help="folder for NNN-baseline-K.png, NNN-taylorseer-K.png "
                   "(videos .gif) and NNN.json, NNN one above the highest run number there: earlier runs are never "
                   "overwritten")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--guidance-scale", type=nonnegative_float, default=None, help="classifier-free guidance scale "
                   "(default: the pipeline's)")
    p.add_argument("--device", type=device_or_auto, default="auto", help=f"torch device, auto (cuda when "
                   f"available, else cpu) or one of {DEVICES}")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: as saved)")
    p.add_argument("--measure-flops", action="store_true", help="count executed/skipped FLOPs (slower: the "
                   "accelerated run's wall time then includes the counting)")
    p.add_argument("--no-baseline", action="store_true", help="skip the full-compute run (no speedup or PSNR)")
    p.add_argument("--no-cache", action="store_true", help="run the pipeline without taylorseer (the baseline only)")
    p.add_argument("--calibration", default=None, metavar="FILE", help="a file written by `taylorseer calibrate "
                   "--model` for this pipeline and --steps: the accelerated run uses its schedule and fitted weights "
                   "instead of a preset, and its guidance scale unless --guidance-scale is given (default: none)")
    add_parallel_args(p)
    add_config_args(p, default_preset=None, unset="the preset recommended for the model's transformer family")
    add_config_flag(p, "the accelerated run's config (instead of --preset and the field flags)")
