"""The evaluation commands: ``bench`` (many methods, JSONL records), ``sample`` (N samples of one method, alone
or under torchrun) and ``report`` (from records only)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    CONFIG_FLAGS,
    DEVICES,
    DTYPES,
    EMBEDDED_MODELS,
    add_config_args,
    add_parallel_args,
    check_in_file,
    check_out_file,
    check_out_folder,
    config_from_args,
    context_parallel_from_args,
    device_type,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    subcommand,
)


def _method_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _check_bench(args: argparse.Namespace) -> None:
    check_out_file("--out", args.out)
    if args.methods is not None and not _method_names(args.methods):
        raise ValueError(f"argument --methods: no method name in {args.methods!r}; give comma-separated names of "
                         "the grid, e.g. fora-N5,ts-O1-N5-divided")
    for path in args.calibration or []:
        check_in_file("--calibration", path)
    args.configs = _config_methods(args.config_specs or [], args.steps)  # read (and refused) before any work


def _config_methods(specs: list[str], num_steps: int) -> list[Any]:
    """``bench --config``: one method per config (any registered parts), named after the config (``configK`` for
    an unnamed one); a name the grid already has is refused."""
    from ..eval.bench import method_from_config
    from ..parts import load_config

    methods = []
    for k, spec in enumerate(specs, 1):
        try:
            config = load_config(spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"argument --config: {err}") from None
        methods.append(method_from_config(config, num_steps, None if config.name != "custom" else f"config{k}"))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"argument --config: two configs have the same name: {names}; name them apart (\"name\")")
    return methods


def _with_configs(methods: list[Any], configs: list[Any]) -> list[Any]:
    clash = sorted({m.name for m in configs} & {m.name for m in methods})
    if clash:
        raise ValueError(f"argument --config: the grid already has a method named {clash}; give the config another "
                         f"\"name\"")
    return methods + configs


def _check_report(args: argparse.Namespace) -> None:
    check_in_file("RECORDS", args.records)
    check_out_folder("--out", args.out)

def _cmd_bench(args: argparse.Namespace) -> None:
    from ..eval.bench import default_grid, run_bench, select_methods
    from ..models.pretrained import load_reference

    if args.model == "flux":
        return _bench_flux(args)
    methods = default_grid(quick=args.quick, num_steps=args.steps)
    if args.calibration:
        from ..eval.bench import calibrated_methods

        model = load_reference()
        methods += [m for path in args.calibration for m in calibrated_methods(path, model, args.steps)]
    if args.methods is not None:
        methods = select_methods(methods, _method_names(args.methods))
    methods = _with_configs(methods, args.configs)
    images = args.images if args.images is not None else (8 if args.quick else 50)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    records = run_bench(load_reference(), methods, num_images=images, seed=args.seed, threads=args.threads,
                        repeats=repeats, out_path=args.out, model_name="DiT-FM-B/2-16 (embedded, Fashion-MNIST 16x16)")
    print(f"{len(records)} records appended to {args.out}; next: taylorseer report {args.out}")


def _bench_flux(args: argparse.Namespace) -> None:
    """``bench --model flux``: the flow-matching reference through diffusers' FluxPipeline (eval.flux)."""
    import torch

    from ..eval.bench import calibrated_methods, schedule_companions, select_methods
    from ..eval.flux import FluxSampler, cache_dit_flux_methods, flux_grid, mag_ratios, run_flux_bench
    from ..models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference
    from ..parts import CacheConfig
    from ..policy.schedule import FixedSchedule

    torch.set_num_threads(args.threads)
    ref = load_flux_reference()
    scale = DEFAULT_GUIDANCE if args.cfg_scale is None else args.cfg_scale
    methods = flux_grid(args.steps, ratios=mag_ratios(FluxSampler(ref), args.steps, scale))
    calibrated = set()
    for path in args.calibration or []:
        own = calibrated_methods(path, ref.transformer, args.steps, guidance_scale=scale, cfg_mode="split")
        calibrated |= {m.name for m in own if not m.name.endswith("-taylor2")}
        methods += own
    # the hybrid and Spectrum on each fitted calibration's schedule; cache-dit through its pipeline path (its own
    # rule, budget-fitting masks, and each calibration's schedule as its step mask; none without the extra)
    methods += [m for m in schedule_companions(methods) if m.name.split("@")[0] in ("anchor1", "spectrum-fc")]
    schedules = {m.name: m.config.policy.full_steps for m in methods if m.name in calibrated
                 and isinstance(m.config, CacheConfig) and isinstance(m.config.policy, FixedSchedule)}
    methods += cache_dit_flux_methods(args.steps, schedules)
    if args.methods is not None:
        methods = select_methods(methods, _method_names(args.methods))
    methods = _with_configs(methods, args.configs)
    images = args.images if args.images is not None else (8 if args.quick else 50)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    records = run_flux_bench(ref, methods, num_images=images, seed=args.seed, repeats=repeats, guidance_scale=scale,
                             out_path=args.out, threads=args.threads)
    print(f"{len(records)} records appended to {args.out}; next: taylorseer report {args.out}")

def _cmd_report(args: argparse.Namespace) -> None:
    from ..eval.report import write_report

    print(f"report: {write_report(args.records, args.out, notes=args.notes, allow_incomplete=args.allow_incomplete)}")

_SAMPLE_RUN_FLAGS = {"num_samples": "--num-samples", "method": "--method", "config_json": "--config",
                     "model": "--model", "prompt": "--prompt"}


def _check_sample(args: argparse.Namespace) -> None:
    """Refuse contradictory flags; build ``args.spec`` (None with ``--merge``: the folder's manifest says what)."""
    from ..devices import check_device

    check_out_folder("--out", args.out)
    if args.reference is not None and not Path(args.reference, "manifest.json").is_file():
        raise FileNotFoundError(f"argument --reference: {args.reference!r} is not a sample folder (no manifest.json)")
    given_config = [flag for name, flag in (("preset", "--preset"), *CONFIG_FLAGS.items())
                    if getattr(args, name) is not None]
    if args.merge:
        given = [flag for name, flag in _SAMPLE_RUN_FLAGS.items() if getattr(args, name) is not None] + given_config
        if given:
            raise ValueError(f"argument --merge: merges what DIR's manifest describes, so {given} would be ignored; "
                             "drop them")
        args.spec = None
        return
    try:
        check_device(args.device)
    except ValueError as err:
        raise ValueError(f"argument --device: {err}") from None
    if args.num_samples is None:
        raise ValueError("argument --num-samples is required (unless --merge)")
    from ..eval.sample import MAX_BATCHES, MAX_SAMPLES

    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value > MAX_SAMPLES:
            raise ValueError(f"argument {flag}: must be <= {MAX_SAMPLES}, got {value}")
    if -(-args.num_samples // args.batch_size) > MAX_BATCHES:
        raise ValueError(f"argument --batch-size: --num-samples {args.num_samples} in batches of {args.batch_size} "
                         f"makes more than {MAX_BATCHES} shards; raise --batch-size")
    chosen = [flag for flag, on in (("--method", args.method is not None), ("--config", args.config_json is not None),
                                    ("--preset/field flags", bool(given_config))) if on]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --method NAME, --config JSON or --preset (with field flags), got "
                         f"{chosen or 'none'}")
    if args.prompt is not None and args.model is None:
        raise ValueError("argument --prompt: only for a diffusers pipeline (--model); the embedded model samples "
                         "labels i % 10")
    from ..eval.sample import SampleSpec, load_config, method_from_config, resolve_method

    if args.method is not None:
        method = resolve_method(args.method, args.steps)
    else:
        config = load_config(args.config_json) if args.config_json is not None else config_from_args(args)
        method = method_from_config(config, args.steps)
    args.spec = SampleSpec(method, args.num_samples, seed=args.seed, batch_size=args.batch_size,
                           guidance_scale=args.cfg_scale, image_dtype=args.image_dtype, model=args.model,
                           prompt=args.prompt, weights_dtype=args.dtype, config_file=args.config_json,
                           context_parallel=context_parallel_from_args(args))


def _cmd_sample(args: argparse.Namespace) -> None:
    import json

    from ..eval.sample import evaluate, merge_samples, run_sample

    if args.spec is None:
        merge_samples(args.out)
        result: dict[str, Any] | None = evaluate(args.out, args.reference)
    else:
        result = run_sample(args.spec, args.out, device=args.device, threads=args.threads, reference=args.reference,
                            progress=True)
    if result is not None:  # rank 0
        print(json.dumps(result, indent=1, sort_keys=True))


def add_bench(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand and its flags."""
    p = subcommand(sub, "bench", "measure speed, memory and quality of many methods; write JSONL records",
                    _cmd_bench, _check_bench)
    p.add_argument("--quick", action="store_true", help="a handful of methods and images (CI)")
    p.add_argument("--model", choices=EMBEDDED_MODELS, default="dit", help="the shipped reference: dit (DDIM-50 "
                   "grid) or flux (flow matching through FluxPipeline; its grid at the --steps budgets)")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=None, help="flux: true CFG scale (default: the "
                   "model card's); dit: 1.5")
    p.add_argument("--out", default="out/bench/records.jsonl", help="JSONL file, appended to; sample grids go beside "
                   "it)")
    p.add_argument("--images", type=positive_int, default=None, help="images per method (default: 50; --quick: 8)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps of the full-compute reference")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per method (default: 2; "
                   "--quick: 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1 gives the most stable "
                   "ratios)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="noise seed")
    p.add_argument("--methods", default=None, help="comma-separated method names of the grid to run, full is "
                   "always run; e.g. fora-N5,ts-O1-N5-divided,ddim-11 (default: the whole grid)")
    p.add_argument("--calibration", action="append", default=None, metavar="FILE", help="a file written by "
                   "`taylorseer calibrate`: adds its methods (family calibrated: NAME and NAME-taylor2) to the grid; "
                   "repeatable (default: none)")
    p.add_argument("--config", dest="config_specs", action="append", default=None, metavar="JSON|FILE|NAME",
                   help="a method from a config with any registered policy and forecaster: inline JSON, a JSON file "
                   "or a preset name (a CacheConfig, or TaylorSeerConfig fields); added to the grid (or to the "
                   "--methods chosen), named by its \"name\"; repeatable (default: none)")


def add_report(sub: argparse._SubParsersAction) -> None:
    """The ``report`` subcommand and its flags."""
    p = subcommand(sub, "report", "write a Markdown/HTML report with plots from bench records", _cmd_report,
                    _check_report)
    p.add_argument("records", metavar="RECORDS", help="a JSONL file written by `taylorseer bench`")
    p.add_argument("--out", default="out/report", help="folder for report.md, report.html and the plots")
    p.add_argument("--notes", default=None, help="a paragraph added to the report, e.g. why a target was missed "
                   "(default: none)")
    p.add_argument("--allow-incomplete", action="store_true", help="report the run even if it did not finish (no "
                   "run_end record), marked INCOMPLETE RUN (default: refuse it)")


def add_sample(sub: argparse._SubParsersAction) -> None:
    """The ``sample`` subcommand and its flags."""
    p = subcommand(sub, "sample", "generate N samples of one method into shards (alone or under torchrun, "
                    "resumable, the same set for any process count), merge them and score them", _cmd_sample,
                    _check_sample)
    p.add_argument("--num-samples", type=positive_int, default=None, help="samples to make, indices 0..N-1 "
                   "(default: none; required unless --merge)")
    p.add_argument("--method", default=None, help="a bench method name: full, ddim-K, fora-N5, ts-O2-N5-divided, "
                   "gate-t0.08, ... (default: none; or give --config / --preset)")
    p.add_argument("--config", dest="config_json", default=None, metavar="JSON|FILE|NAME", help="a config with any "
                   "registered policy and forecaster (a CacheConfig, or TaylorSeerConfig fields) as inline JSON, a "
                   "JSON file (its SHA-256 goes in the manifest) or a preset name (default: none)")
    p.add_argument("--out", default="out/sample", help="the sample folder: shards/, manifest.json, samples.npz, "
                   "metrics.json")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="run seed; sample i's noise depends on (seed, i) "
                   "only")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=None, help="classifier-free guidance scale "
                   "(default: 1.5 for the embedded model, the pipeline's own for --model)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps (ddim-K: K)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="samples per model call and per shard; part "
                   "of the run's identity (batch composition changes the last bits, and adaptive decisions)")
    p.add_argument("--device", type=device_type, default="cpu", help=f"torch device, one of {DEVICES}; under "
                   "torchrun, cuda takes cuda:LOCAL_RANK (and the nccl backend; gloo on cpu)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per process (the same count "
                   "keeps runs bitwise comparable)")
    p.add_argument("--image-dtype", choices=("float16", "float32", "uint8"), default=None, help="how images are "
                   "stored (default: float16 for the embedded model, uint8 for pipelines)")
    p.add_argument("--model", default=None, help="hub id or local folder of a diffusers pipeline (default: the "
                   "embedded DiT)")
    p.add_argument("--prompt", default=None, help="with --model: the text prompt, or class ids/names for DiT "
                   "pipelines, sample i taking the (i mod L)-th (default: none)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="with --model: weights dtype (default: as saved)")
    p.add_argument("--merge", action="store_true", help="only merge DIR's shards into samples.npz and score them "
                   "(done anyway on rank 0 at the end of a run)")
    p.add_argument("--reference", default=None, help="another sample folder of the same seeds (e.g. full compute): "
                   "FID and PSNR to it (default: none)")
    add_parallel_args(p)
    add_config_args(p, default_preset=None)
