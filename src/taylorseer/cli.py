"""Command line: parses arguments, checks them, then calls the API; nothing else lives here.

    taylorseer demo                      # embedded DiT, full compute vs TaylorSeer, side by side
    taylorseer plan --preset paper_dit   # print a schedule's compute/forecast pattern
    taylorseer plan --model PATH_OR_CLASS   # a model family's recommended preset, why, and its pattern
    taylorseer bench [--quick]           # measure methods, write JSONL records
    taylorseer calibrate --budget 8 --out FILE   # fit a linear forecaster and search a schedule (embedded model)
    taylorseer calibrate --model PATH --prompt "..." --budget 8 --out FILE   # the same for a diffusers pipeline
    taylorseer report RECORDS.jsonl      # Markdown/HTML report with plots, from records only
    taylorseer generate --model PATH --prompt "..."   # a diffusers pipeline: full compute vs accelerated
    taylorseer generate --model PATH --calibration FILE   # accelerated with a calibration file instead of a preset
    taylorseer sample --num-samples N --method NAME --out DIR   # many samples; alone or under torchrun
    taylorseer train-reference           # (re)train the embedded model, resumable

Bad input is refused before any work (no model loaded, nothing written) with one line on stderr and exit status 2:
a malformed flag value by its argparse type (``positive_int``, ``device_type``, ...; argparse raises
``SystemExit(2)``), a value that does not fit this machine or file system by the command's ``_check_*`` function,
a cache config field by ``TaylorSeerConfig`` itself (``main`` returns 2 for these two).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from ._extras import MissingExtraError
from .config import ABSCISSAE, GRANULARITIES, PRESET_NAMES, SCHEMES, TaylorSeerConfig, preset

if TYPE_CHECKING:
    from .models.train import TrainConfig

EMBEDDED_MODELS = ("dit", "flux")  # the shipped references, by name

DESCRIPTION = """\
Make diffusion transformers generate images and videos faster, without retraining: on skipped denoising steps
taylorseer forecasts the features of the expensive blocks with a Taylor series instead of computing them
(TaylorSeer, arXiv 2503.06923). Works with diffusers pipelines (DiT, PixArt, SD3, FLUX, Wan, HunyuanVideo, ...)
and any PyTorch DiT.

start here (CPU, no downloads):
  taylorseer demo [--model flux]       full compute vs our best methods vs baselines on a small model shipped
                                       in the package (a DiT, or a FLUX-architecture flow-matching model):
                                       speed, quality, and a side-by-side picture
  taylorseer generate --model ID_OR_PATH --prompt "a red fox"
                                       run a diffusers pipeline (hub id or local folder) at full compute and
                                       accelerated: both images, wall times, speedup and PSNR
  taylorseer plan --preset paper_flux  show which steps a schedule computes and which it forecasts
  taylorseer plan --model ID_OR_PATH_OR_CLASS
                                       the preset recommended for a model's family, why, and its pattern
  taylorseer bench, taylorseer report  measure many methods, then write a report with plots
  taylorseer train-reference           retrain the shipped small model

Run `taylorseer COMMAND --help` for a command's flags.
"""

# The same set as taylorseer.generate.DEVICE_PATTERN (which also checks availability); kept here so that parsing
# needs no torch import.
_DEVICE = re.compile(r"cpu|cuda|cuda:\d+|mps")
DEVICES = "cpu, cuda, cuda:N, mps"
DTYPES = ("float32", "float16", "bfloat16")
_CONFIG_FLAGS = {"interval": "--interval", "max_order": "--order", "warmup_steps": "--warmup",
                 "tail_steps": "--tail", "scheme": "--scheme", "abscissa": "--abscissa",
                 "granularity": "--granularity", "modules": "--modules"}


#################################################################################
#                    argparse types: the value of one flag                      #
#################################################################################

def _bounded_int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = _bounded_int(1)
positive_int.__doc__ = "argparse type: an integer >= 1 (counts: steps, images, threads, repeats)."
nonnegative_int = _bounded_int(0)
nonnegative_int.__doc__ = "argparse type: an integer >= 0 (seeds)."


def _finite_float(text: str, positive: bool) -> float:
    allowed = "a finite number > 0" if positive else "a finite number >= 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (learning rate)."""
    return _finite_float(text, positive=True)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0 (guidance scale)."""
    return _finite_float(text, positive=False)


def device_type(text: str) -> str:
    """argparse type: a torch device name, one of ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (availability is checked
    after parsing, by ``taylorseer.generate.check_device``)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be one of {DEVICES}, got {text!r}")
    return text


def device_or_auto(text: str) -> str:
    """argparse type: ``auto`` (cuda when available, else cpu) or a device name accepted by ``device_type``."""
    if text == "auto":
        return text
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be one of auto, {DEVICES}, got {text!r}")
    return text


#################################################################################
#                checks after parsing: the machine and the disk                 #
#################################################################################

def _nearest_existing(path: Path) -> Path:
    for part in (path, *path.parents):
        if part.exists():
            return part
    return Path.cwd()


def _check_creatable(flag: str, value: str, folder: Path) -> None:
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ValueError(f"argument {flag}: {value!r} lies below {str(base)!r}, which is an existing file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"argument {flag}: cannot write {value!r}: {str(base)!r} is not writable")


def _check_out_folder(flag: str, value: str) -> None:
    """``value`` names a folder to write into: not an existing file, creatable."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"argument {flag}: {value!r} is an existing file; a folder is expected")
    _check_creatable(flag, value, path)


def _check_out_file(flag: str, value: str) -> None:
    """``value`` names a file to write or append to: not an existing folder, creatable."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"argument {flag}: {value!r} is an existing folder; a file is expected, e.g. "
                         f"{str(path / 'records.jsonl')!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"argument {flag}: {value!r} is not writable")
    _check_creatable(flag, value, path.parent)


def _check_in_file(flag: str, value: str) -> None:
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"argument {flag}: {value!r} is a folder; a file is expected")
    if not path.is_file():
        raise FileNotFoundError(f"argument {flag}: no such file {value!r}")


def config_from_args(args: argparse.Namespace) -> TaylorSeerConfig:
    """The ``TaylorSeerConfig`` named by ``--preset`` with the explicitly given fields overridden.

    A field the config refuses raises ``ValueError`` naming the flag and the field (``argument --order: max_order
    must be an int >= 0, got -1``).
    """
    fields = ("interval", "max_order", "warmup_steps", "tail_steps", "scheme", "abscissa", "granularity")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.modules:
        overrides["modules"] = tuple(args.modules)
    base = preset(args.preset) if args.preset else TaylorSeerConfig()
    for name, value in overrides.items():  # one at a time, so that the error names the flag
        try:
            base.replace(**{name: value})
        except (TypeError, ValueError) as err:
            raise ValueError(f"argument {_CONFIG_FLAGS[name]}: {err}") from None
    if args.preset:
        return preset(args.preset, **overrides)
    return TaylorSeerConfig(**overrides)


def _check_demo(args: argparse.Namespace) -> None:
    _check_out_folder("--out", args.out)


def _check_plan(args: argparse.Namespace) -> None:
    """Refuse a bad --steps; with --model, read its family (config files only) and start from its preset."""
    if args.steps < 1:
        raise ValueError(f"argument --steps: num_steps must be an integer >= 1, got {args.steps}")
    args.family = None
    if args.model is not None:
        from .generate import family_of

        try:
            args.family = family_of(args.model)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"argument --model: {err}") from None
    args.given_preset = args.preset
    if args.preset is None:
        args.preset = (args.family.preset or None) if args.family is not None else "paper_dit"
    args.config = config_from_args(args)


def _check_train(args: argparse.Namespace) -> None:
    if args.out_dir is not None:
        _check_out_folder("--out-dir", args.out_dir)
    if args.stop_at is not None and args.model != "flux":
        raise ValueError("argument --stop-at: applies to --model flux (the DiT trains to --steps)")


def _method_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _check_bench(args: argparse.Namespace) -> None:
    _check_out_file("--out", args.out)
    if args.methods is not None and not _method_names(args.methods):
        raise ValueError(f"argument --methods: no method name in {args.methods!r}; give comma-separated names of "
                         "the grid, e.g. fora-N5,ts-O1-N5-divided")
    for path in args.calibration or []:
        _check_in_file("--calibration", path)


def _check_report(args: argparse.Namespace) -> None:
    _check_in_file("RECORDS", args.records)
    _check_out_folder("--out", args.out)


def _check_generate(args: argparse.Namespace) -> None:
    """Resolve --device auto and refuse an unavailable device; refuse contradictory flags; set ``args.config``
    (a ``TaylorSeerConfig`` from --preset, ``"family"`` for the model family's preset, None for --no-cache or
    --calibration) and ``args.overrides`` (the field flags given, applied to the family's preset once the model is
    loaded). --calibration: the file must load and be for --steps steps (its model is checked after loading)."""
    from .generate import FAMILY, resolve_device

    try:
        args.device = resolve_device(args.device)
    except ValueError as err:
        raise ValueError(f"argument --device: {err}") from None
    _check_out_folder("--out", args.out)
    given = [flag for name, flag in (("preset", "--preset"), *_CONFIG_FLAGS.items()) if getattr(args, name)
             is not None]
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
        _check_in_file("--calibration", args.calibration)
        from .generate import read_calibration

        try:  # the file and the step count; the model is checked once the pipeline is loaded
            read_calibration(args.calibration, args.steps)
        except ValueError as err:
            raise ValueError(f"argument --calibration: {err}") from None
        args.config, args.overrides = None, {}
        return
    config = config_from_args(args)  # validates each field flag, naming it
    args.overrides = {}
    if args.no_cache:
        args.config = None
    elif args.preset:
        args.config = config  # the preset with the field flags applied
    else:  # the family's preset, known once the pipeline is loaded, with the field flags applied to it
        args.config = FAMILY
        args.overrides = {name: getattr(config, name) for name in _CONFIG_FLAGS if getattr(args, name) is not None}


#################################################################################
#                     commands: call the API, print results                     #
#################################################################################

def _cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from .demo import format_table, run_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "flux":
        from .models.flux_pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

        steps, scale, sampler = args.steps or DEFAULT_STEPS, args.cfg_scale or DEFAULT_GUIDANCE, "Euler"
    else:
        steps, scale, sampler = args.steps or 50, args.cfg_scale or 1.5, "DDIM"
    rows = run_demo(out_dir=args.out, per_class=args.per_class, num_steps=steps, guidance_scale=scale,
                    seed=args.seed, rounds=args.rounds, reference=args.model)
    print(f"\n{10 * args.per_class} images, {steps} {sampler} steps, CFG {scale}, "
          f"{torch.get_num_threads()} CPU thread(s); PSNR/SSIM vs the full-compute images of the same seeds; "
          f"FID-FMNIST over {10 * args.per_class} images (compare rows, not with other sample counts)\n")
    print(format_table(rows))
    print(f"\nside-by-side: {args.out}/demo.png")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .policy.interval import IntervalPolicy

    config, family = args.config, args.family
    pattern = IntervalPolicy.from_config(config).pattern(args.steps)
    if family is not None:
        print(f"model: {family.class_name} (from {family.source}), adapter {family.adapter.name}")
        recommended = family.preset or "none (TaylorSeerConfig defaults)"
        print(f"recommended preset: {recommended}" + (f": {family.reason}" if family.reason else ""))
        if args.given_preset is not None and args.given_preset != family.preset:
            print(f"preset used: {args.given_preset} (given)")
    print(config.to_json())
    print(f"{pattern}\n{pattern.count('F')} full / {args.steps} steps (F = computed, f = forecast)")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of ``train-reference``: the flags given, the shipped recipe for the rest."""
    from .models.train import TrainConfig

    given = {k: getattr(args, k) for k in ("out_dir", "steps", "batch_size", "lr", "threads", "seed")}
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def _cmd_train(args: argparse.Namespace) -> None:
    if args.model == "flux":
        return _train_flux(args)
    from .models.train import train_reference

    cfg = train_config_from_args(args)
    path = train_reference(cfg)
    print(f"training state: {path}")
    if args.export:
        from .models.pretrained import export_reference

        notes = {k: getattr(cfg, k) for k in ("size", "batch_size", "lr", "ema_decay", "beta_schedule", "seed",
                                              "model_label_dropout")}
        print(f"exported: {export_reference(path, notes=notes)}")


def _train_flux(args: argparse.Namespace) -> None:
    """``train-reference --model flux``: the flow-matching reference (models.train_flux; defaults = shipped recipe)."""
    from .models.flux_pipeline import export_flux_reference
    from .models.train_flux import FluxTrainConfig, train_flux_reference

    given = {k: getattr(args, k) for k in ("out_dir", "steps", "batch_size", "lr", "threads", "seed")}
    if given["out_dir"] is None:
        given["out_dir"] = "runs/flux"
    cfg = FluxTrainConfig(**{k: v for k, v in given.items() if v is not None})
    path = train_flux_reference(cfg, stop_at=args.stop_at)
    print(f"training state: {path}")
    if args.export:
        notes = {k: getattr(cfg, k) for k in ("size", "batch_size", "lr", "ema_decay", "seed", "null_prob")}
        print(f"exported: {export_flux_reference(path, notes=notes)}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .eval.bench import default_grid, run_bench, select_methods
    from .models.pretrained import load_reference

    if args.model == "flux":
        return _bench_flux(args)
    methods = default_grid(quick=args.quick, num_steps=args.steps)
    if args.calibration:
        from .eval.bench import calibrated_methods

        model = load_reference()
        methods += [m for path in args.calibration for m in calibrated_methods(path, model, args.steps)]
    if args.methods is not None:
        methods = select_methods(methods, _method_names(args.methods))
    images = args.images if args.images is not None else (8 if args.quick else 50)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    records = run_bench(load_reference(), methods, num_images=images, seed=args.seed, threads=args.threads,
                        repeats=repeats, out_path=args.out, model_name="DiT-FM-B/2-16 (embedded, Fashion-MNIST 16x16)")
    print(f"{len(records)} records appended to {args.out}; next: taylorseer report {args.out}")


def _bench_flux(args: argparse.Namespace) -> None:
    """``bench --model flux``: the flow-matching reference through diffusers' FluxPipeline (eval.flux)."""
    import torch

    from .eval.bench import calibrated_methods, schedule_companions, select_methods
    from .eval.flux import FluxSampler, flux_grid, mag_ratios, run_flux_bench
    from .models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference

    torch.set_num_threads(args.threads)
    ref = load_flux_reference()
    scale = DEFAULT_GUIDANCE if args.cfg_scale is None else args.cfg_scale
    methods = flux_grid(args.steps, ratios=mag_ratios(FluxSampler(ref), args.steps, scale))
    for path in args.calibration or []:
        methods += calibrated_methods(path, ref.transformer, args.steps, guidance_scale=scale, cfg_mode="split")
    # the hybrid and Spectrum on each fitted calibration's schedule (cache-dit's BlockAdapter path is the DiT's)
    methods += [m for m in schedule_companions(methods) if m.name.split("@")[0] in ("anchor1", "spectrum-fc")]
    if args.methods is not None:
        methods = select_methods(methods, _method_names(args.methods))
    images = args.images if args.images is not None else (8 if args.quick else 50)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    records = run_flux_bench(ref, methods, num_images=images, seed=args.seed, repeats=repeats, guidance_scale=scale,
                             out_path=args.out, threads=args.threads)
    print(f"{len(records)} records appended to {args.out}; next: taylorseer report {args.out}")


def _class_list(text: str) -> list[int]:
    """``"0-4"`` or ``"0,2,7"`` (or a mix, ``"0-2,7"``) as a list of class ids."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, _, high = part.partition("-")
        if not (low.isdigit() and (not high or high.isdigit())):
            raise ValueError(f"argument --classes: {text!r} is not a list of class ids such as 0-4 or 0,2,7")
        out += list(range(int(low), int(high) + 1)) if high else [int(low)]
    if not out:
        raise ValueError(f"argument --classes: no class id in {text!r}")
    return out


def _prompt_list(values: list[str] | None) -> list[str]:
    """--prompt values (repeatable), each split at ``|``."""
    return [p.strip() for value in values or [] for p in value.split("|") if p.strip()]


def _check_pipeline_model(flag: str, model: str) -> None:
    """``model`` names a diffusers pipeline: a folder with model_index.json or a hub id; its transformer family
    has an adapter (config files only: no weights loaded)."""
    from .generate import _HUB_ID, family_of

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"argument {flag}: {model!r} is not a diffusers pipeline folder (no model_index.json)")
    elif not _HUB_ID.fullmatch(model) or model.startswith((".", "/", "~")):
        raise ValueError(f"argument {flag}: {model!r} is neither an existing folder nor a Hugging Face Hub id "
                         f"(owner/name)")
    try:
        family_of(model)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"argument {flag}: {err}") from None


def _check_calibrate(args: argparse.Namespace) -> None:
    if args.out is None:  # the per-user store, where apply(..., speedup=X) finds it (taylorseer.auto)
        from .auto import default_calibration_path

        args.out = str(default_calibration_path(args.name or f"cal-b{args.budget}-s{args.steps}"))
    _check_out_file("--out", args.out)
    if Path(args.out).expanduser().exists() and not args.force:
        raise ValueError(f"argument --out: {args.out!r} exists, and calibrate does not overwrite a file it did not "
                         f"create: give another --out, or --force to replace it")
    if args.budget > args.steps:
        raise ValueError(f"argument --budget: {args.budget} full steps exceed --steps {args.steps}")
    if not 1 <= args.history <= 4:
        raise ValueError(f"argument --history: must be 1..4, got {args.history}")
    args.prompts = None
    if args.model in EMBEDDED_MODELS:  # the shipped references are named, not paths
        args.model = None if args.model == "dit" else args.model
    if args.model is None or args.model in EMBEDDED_MODELS:
        for flag, value in (("--prompt", args.prompt), ("--device", args.device), ("--dtype", args.dtype)):
            if value is not None:
                raise ValueError(f"argument {flag}: applies to a diffusers pipeline (--model PATH); the embedded "
                                 f"model takes --classes")
    else:
        if args.classes is not None:
            raise ValueError("argument --classes: is for the embedded model; give a pipeline's calibration prompts "
                             "with --prompt (class ids or label names for class-conditional DiT pipelines)")
        args.prompts = _prompt_list(args.prompt)
        if not args.prompts:
            raise ValueError("argument --prompt: --model needs the calibration prompts (--prompt, repeatable or "
                             "'|'-separated; class ids or label names for class-conditional DiT pipelines)")
        _check_pipeline_model("--model", args.model)
        from .generate import resolve_device

        try:
            args.device = resolve_device(args.device or "auto")
        except ValueError as err:
            raise ValueError(f"argument --device: {err}") from None
    args.class_ids = _class_list(args.classes) if args.classes else None
    if args.class_ids and max(args.class_ids) > 9:
        raise ValueError(f"argument --classes: the embedded model has classes 0..9, got {args.classes!r}")
    args.full_steps = None
    if args.schedule:
        from .policy import FixedSchedule

        try:
            steps = tuple(int(x) for x in args.schedule.split(","))
            args.full_steps = FixedSchedule(steps, args.steps, name="given")
        except ValueError as err:
            raise ValueError(f"argument --schedule: {err}") from None
        if len(steps) > args.budget:
            raise ValueError(f"argument --schedule: {len(steps)} full steps exceed --budget {args.budget}")
        if args.forecaster != "linear":
            raise ValueError(f"argument --forecaster: {args.forecaster} searches a schedule for that forecaster; "
                             f"with --schedule there is nothing to search (omit one of them)")
    if args.forecaster != "linear" and args.search_images == 0:
        raise ValueError(f"argument --search-images: --forecaster {args.forecaster} searches on sampled images, "
                         f"give at least 1")


def _staging(out: str) -> str:
    """Where ``calibrate`` writes before publishing to ``out``: a name of its own beside it (same file system)."""
    path = Path(out).expanduser()
    return str(path.with_name(f".{path.name}.{os.getpid()}.partial"))


def _publish(staged: str, out: str, force: bool) -> Any:
    """Move the finished calibration ``staged`` to ``out``: with ``force`` replacing whatever is there, else only
    if ``out`` still does not exist (``os.link`` fails on an existing name: a file that appeared during the work is
    kept, and the result stays at ``staged``, named in the error). Returns the file loaded from ``out``."""
    from .calibration import load_calibration

    target = Path(out).expanduser()
    if force:
        os.replace(staged, target)
    else:
        try:
            os.link(staged, target)
        except FileExistsError:
            raise FileExistsError(f"argument --out: {out!r} was created while calibrating; it is left as it is and "
                                  f"the calibration is at {staged!r} (move it, or rerun with --force)") from None
        os.remove(staged)
    return load_calibration(target)


# calibrate --forecaster: fitted linear weights (searched with them), or TaylorSeer of order N to search for.
_SEARCH_FORECASTERS = ("linear", "taylor1", "taylor2", "taylor3")


def _search_forecaster(name: str) -> Any:
    """The forecaster config ``calibrate --forecaster NAME`` searches a schedule for (None: fitted weights)."""
    from .forecast import TaylorForecast

    return None if name == "linear" else TaylorForecast(max_order=int(name.removeprefix("taylor")))


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import torch

    from .calibration import FitOptions, calibrate
    from .models.pretrained import load_reference

    torch.set_num_threads(args.threads)
    final, args.out = args.out, _staging(args.out)  # written beside --out, published at the end (_publish)
    options = FitOptions(history=args.history, bias=args.bias, match_variance=not args.no_match_variance)
    search_images = args.search_images if args.search_images is not None else (30 if args.model is None else 10)
    search = {"schedule": args.full_steps, "search_images": search_images, "max_evaluations": args.max_evals,
              "radius": args.radius, "search_seed": args.search_seed, "name": args.name,
              "granularity": args.granularity, "forecaster": _search_forecaster(args.forecaster)}
    if args.model is None:
        guidance = 1.5 if args.cfg_scale is None else args.cfg_scale
        cal = calibrate(load_reference(), args.budget, args.out, num_steps=args.steps, images=args.images,
                        classes=args.class_ids, seed=args.seed, guidance_scale=guidance, options=options,
                        on_policy=False if args.teacher_forced else None, **search)
    elif args.model == "flux":
        from .eval.flux import FluxSampler
        from .models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference

        ref = load_flux_reference()
        guidance = DEFAULT_GUIDANCE if args.cfg_scale is None else args.cfg_scale
        cal = calibrate(ref.transformer, args.budget, args.out, num_steps=args.steps, images=args.images,
                        classes=args.class_ids, seed=args.seed, guidance_scale=guidance, options=options,
                        cfg_mode="split", sampler=FluxSampler(ref),
                        on_policy=False if args.teacher_forced else None, **search)
    else:
        from .calibration.pipeline import calibrate_pipeline
        from .generate import load_pipeline

        pipe = load_pipeline(args.model, args.device, args.dtype)
        cal = calibrate_pipeline(pipe, args.budget, args.out, prompts=args.prompts, num_steps=args.steps,
                                 images=args.images, seed=args.seed, guidance_scale=args.cfg_scale, options=options,
                                 on_policy=False if args.teacher_forced else None, **search)
    cal = _publish(args.out, final, args.force)
    header = cal.header
    print(f"calibration {header['name']!r} written to {cal.path} (sha256 {(cal.sha256 or '')[:12]}...)")
    print(f"schedule: {cal.schedule.pattern()}  ({len(cal.schedule.full_steps)} full / {cal.num_steps})")
    data = header["calibration_data"]
    what = f"prompts {data['prompts']}" if "prompts" in data else f"classes {data['classes']}"
    print(f"trajectories: {data['images']} images, {what}, seed {data['seed']}, CFG {data['guidance_scale']} "
          f"({data['cfg_mode']}, {data['row_groups']} row group(s)): {data['model_calls']} model calls, "
          f"{data['seconds']:.1f} s")
    search = header["search"]
    if search is not None:
        psnr = f", {search['psnr_db']:.2f} dB on the search images" if search["psnr_db"] is not None else ""
        print(f"search: {search['evaluations']} candidates, {search['model_calls']} model calls "
              f"({search['full_calls']} full), {search['seconds']:.1f} s{psnr}")
    cost = data.get("cost")
    if cost is not None:  # model calls x batch, and what the same calls would cost on FLUX.1-dev (calibrate.py)
        print(f"cost: {cost['image_calls']} image calls (model calls x batch; {cost['full_image_calls']} computing "
              f"the model); projected: {cost['projection']}")
    fit = header["fit"]
    if fit is None:
        used = header["forecaster"]["searched_with"]
        print(f"schedule only (no weights), searched for {used['type']} {used}")
    elif "teacher_forced" in fit:
        on = data["on_policy"]
        print(f"fit: relative L2 error {fit['teacher_forced']['rel_error']:.4f} teacher-forced, then refitted "
              f"on-policy ({on['images']} images, {on['model_calls']} model calls, {on['seconds']:.1f} s): "
              f"{fit['rel_error']:.4f} from the cached run's own features")
    else:
        print(f"fit: relative L2 error {fit['rel_error']:.4f} (teacher-forced), {fit['seconds']:.2f} s")
    if args.model is None or args.model == "flux":
        model_flag = " --model flux" if args.model == "flux" else ""
        print(f"next: taylorseer bench{model_flag} --steps {cal.num_steps} --calibration {cal.path} --methods "
              f"{header['name']}")
    else:
        print(f"next: taylorseer generate --model {args.model} --steps {args.steps} --calibration {cal.path} "
              f"--prompt ...")


def _cmd_report(args: argparse.Namespace) -> None:
    from .eval.report import write_report

    print(f"report: {write_report(args.records, args.out, notes=args.notes, allow_incomplete=args.allow_incomplete)}")


def _context_parallel(args: argparse.Namespace) -> Any:
    """The ``ContextParallel`` of --context-parallel/--cp-kind (None without them); ``ValueError`` naming the flag."""
    if args.context_parallel is None:
        if args.cp_kind is not None:
            raise ValueError("argument --cp-kind: only with --context-parallel K")
        return None
    from .distributed.layout import ContextParallel

    try:
        return ContextParallel(args.context_parallel, args.cp_kind or "ulysses")
    except ValueError as err:
        raise ValueError(f"argument --context-parallel: {err}") from None


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    from .distributed.layout import CP_KINDS

    p.add_argument("--context-parallel", type=positive_int, default=None, metavar="K", help="under torchrun: "
                   "shard each sample's tokens over K ranks with diffusers' context parallelism (a job of W "
                   "processes is W/K data-parallel replicas of K ranks; docs/parallel.md) (default: off)")
    p.add_argument("--cp-kind", choices=CP_KINDS, default=None, help="with --context-parallel: ulysses (all-to-all "
                   "over heads; K must divide them) or ring (needs an attention backend returning the log-sum-exp) "
                   "(default: ulysses)")


def _cmd_generate(args: argparse.Namespace) -> None:
    from . import generate as gen

    context_parallel = _context_parallel(args)
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


_SAMPLE_RUN_FLAGS = {"num_samples": "--num-samples", "method": "--method", "config_json": "--config",
                     "model": "--model", "prompt": "--prompt"}


def _check_sample(args: argparse.Namespace) -> None:
    """Refuse contradictory flags; build ``args.spec`` (None with ``--merge``: the folder's manifest says what)."""
    from .generate import check_device

    _check_out_folder("--out", args.out)
    if args.reference is not None and not Path(args.reference, "manifest.json").is_file():
        raise FileNotFoundError(f"argument --reference: {args.reference!r} is not a sample folder (no manifest.json)")
    given_config = [flag for name, flag in (("preset", "--preset"), *_CONFIG_FLAGS.items())
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
    from .eval.sample import MAX_BATCHES, MAX_SAMPLES

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
    from .eval.sample import SampleSpec, load_config, method_from_config, resolve_method

    if args.method is not None:
        method = resolve_method(args.method, args.steps)
    else:
        config = load_config(args.config_json) if args.config_json is not None else config_from_args(args)
        method = method_from_config(config, args.steps)
    args.spec = SampleSpec(method, args.num_samples, seed=args.seed, batch_size=args.batch_size,
                           guidance_scale=args.cfg_scale, image_dtype=args.image_dtype, model=args.model,
                           prompt=args.prompt, weights_dtype=args.dtype, config_file=args.config_json,
                           context_parallel=_context_parallel(args))


def _cmd_sample(args: argparse.Namespace) -> None:
    import json

    from .eval.sample import evaluate, merge_samples, run_sample

    if args.spec is None:
        merge_samples(args.out)
        result: dict[str, Any] | None = evaluate(args.out, args.reference)
    else:
        result = run_sample(args.spec, args.out, device=args.device, threads=args.threads, reference=args.reference,
                            progress=True)
    if result is not None:  # rank 0
        print(json.dumps(result, indent=1, sort_keys=True))


#################################################################################
#                                    Parser                                     #
#################################################################################

class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2), the usage left to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each flag's default; a flag whose help already says what
    its default is, a switch, or one whose default is None (its help says what unset means) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _add_global_flags(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    """Flags accepted before and after the subcommand; a subcommand leaves them unset unless given there."""
    parser.add_argument("--default-malloc", action="store_true",
                        default=argparse.SUPPRESS if in_subcommand else False,
                        help="keep the C allocator's default settings; otherwise commands that run a model call "
                        "taylorseer.tune_cpu_allocator() first (glibc: about 20%% faster on CPU here, the process "
                        "keeps its peak memory)")


def _add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "paper_dit",
                     unset: str | None = None) -> None:
    """The preset and field flags; ``unset`` says what an unset --preset means (default: the default preset, or
    the TaylorSeerConfig defaults)."""
    g = p.add_argument_group("cache config (a preset, with any field overridden; unset fields: the preset's)")
    if unset is None:
        unset = "the TaylorSeerConfig defaults" if default_preset is None else default_preset
    g.add_argument("--preset", choices=PRESET_NAMES, default=default_preset,
                   help=f"named settings to start from (default: {unset})")
    g.add_argument("--interval", type=int, help="N: compute one step in N (1 = every step; default: the preset's)")
    g.add_argument("--order", type=int, dest="max_order", help="O: Taylor order (0 = reuse, FORA; default: the "
                   "preset's)")
    g.add_argument("--warmup", type=int, dest="warmup_steps", help="W: first steps always computed (default: the "
                   "preset's)")
    g.add_argument("--tail", type=int, dest="tail_steps", help="last steps always computed (default: the preset's)")
    g.add_argument("--scheme", choices=SCHEMES, help="reference: the official code's differences; divided: Newton "
                   "divided differences over the actual abscissae (default: the preset's)")
    g.add_argument("--abscissa", choices=ABSCISSAE, help="what the series is expanded in (default: the preset's)")
    g.add_argument("--granularity", choices=GRANULARITIES, help="forecast module outputs, block residuals or the "
                   "model output (default: the preset's)")
    g.add_argument("--modules", nargs="+", help="path patterns of the modules to forecast, e.g. 'blocks.*.attn' "
                   "(default: the adapter registered for the model)")


def _subcommand(sub: argparse._SubParsersAction, name: str, help: str,
                run: Callable[[argparse.Namespace], None],
                check: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_HelpFormatter)
    _add_global_flags(p, in_subcommand=True)
    p.set_defaults(func=run, check=check)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``taylorseer`` argument parser."""
    parser = _Parser(prog="taylorseer", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"taylorseer {__version__}",
                        help="print the version and exit")
    _add_global_flags(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "demo", "a shipped reference (DiT or FLUX): full compute vs our best methods vs "
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
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds, methods interleaved (median)")

    p = _subcommand(sub, "plan", "print a schedule's compute/forecast pattern; with --model, the preset recommended "
                    "for the model's family and why", _cmd_plan, _check_plan)
    _add_config_args(p, default_preset=None, unset="paper_dit; with --model the family's recommended preset")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the generation")
    p.add_argument("--model", default=None, help="a registered transformer class name (FluxTransformer2DModel), a "
                   "local diffusers model or pipeline folder (only its config files are read), or a hub id (its "
                   "config is downloaded: needs internet) (default: none)")

    p = _subcommand(sub, "train-reference", "train (or resume) the shipped small DiT; unset flags take the shipped "
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

    p = _subcommand(sub, "bench", "measure speed, memory and quality of many methods; write JSONL records",
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

    p = _subcommand(sub, "calibrate", "fit a learned linear forecaster and search a schedule of --budget full steps "
                    "on the embedded model or a diffusers pipeline (--model); write a calibration file",
                    _cmd_calibrate, _check_calibrate)
    p.add_argument("--budget", type=positive_int, required=True, help="full steps of the schedule")
    p.add_argument("--out", default=None, help="calibration file to write (safetensors); an existing file is "
                   "refused unless --force (default: a new file in the per-user store "
                   "$XDG_CACHE_HOME/taylorseer/calibrations, ~/.cache/... by default, where "
                   "taylorseer.apply(model, speedup=X) finds it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps the calibration is for")
    p.add_argument("--images", type=positive_int, default=40, help="calibration images (full-compute trajectories)")
    p.add_argument("--classes", default=None, help="embedded model: classes of the calibration images, e.g. 0-4 "
                   "(default: 0-9)")
    p.add_argument("--model", default=None, help="dit or flux (the shipped references, by name), or the hub id or "
                   "local folder of a diffusers pipeline to calibrate "
                   "(default: the embedded DiT)")
    p.add_argument("--prompt", action="append", default=None, help="with --model: a calibration prompt, "
                   "repeatable, several in one value separated by '|'; for class-conditional DiT pipelines class "
                   "ids or label names (comma-separated); image k takes prompt k mod the count (default: none; "
                   "required with --model)")
    p.add_argument("--device", type=device_or_auto, default=None, help=f"with --model: torch device, auto (cuda "
                   f"when available, else cpu) or one of {DEVICES} (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="with --model: weights dtype (default: as saved)")
    p.add_argument("--seed", type=nonnegative_int, default=1000, help="noise seed of the first calibration batch "
                   "(keep it apart from evaluation seeds)")
    p.add_argument("--cfg-scale", type=nonnegative_float, default=None, help="classifier-free guidance scale, as "
                   "the generations will use it (default: 1.5 for the embedded model, the pipeline's own for --model)")
    p.add_argument("--history", type=positive_int, default=4, help="K: computed features each forecast combines")
    p.add_argument("--bias", action="store_true", help="fit a bias term too (lower fit error, worse held-out)")
    p.add_argument("--no-match-variance", action="store_true", help="keep the plain least-squares forecasts (by "
                   "default each is scaled about its calibration mean so that its variance is the target's: "
                   "least-squares forecasts are smoother than full compute; +0.2 dB held-out on the embedded model)")
    p.add_argument("--teacher-forced", action="store_true", help="skip the on-policy refit: keep the weights fitted "
                   "on full-compute features only (cheaper by one full and one cached pass over the images; at module "
                   "granularity 1.7 dB worse held-out at 8 of 50 full steps on the embedded model; with --granularity "
                   "output there is no refit by default, it costs 5 dB there)")
    p.add_argument("--forecaster", choices=_SEARCH_FORECASTERS, default="linear", help="linear: fit "
                   "per-step weights and search the schedule with them; taylorN: search a schedule for TaylorSeer of "
                   "order N (divided differences) and write a schedule-only file, no weights (default: linear)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="module", help="what is "
                   "recorded and forecast: the attention/MLP module outputs (the paper's), each block's residual, or "
                   "the model output (default: module)")
    p.add_argument("--schedule", default=None, help="comma-separated full steps to fit for, skipping the search "
                   "(default: search)")
    p.add_argument("--search-images", type=nonnegative_int, default=None, help="images each candidate schedule is "
                   "sampled on (0: refine on the trajectory proxy only, no model call; default: 30 for the embedded "
                   "model, 10 for a pipeline, whose generations cost more)")
    p.add_argument("--max-evals", type=positive_int, default=200, help="candidate schedules the refinement samples")
    p.add_argument("--radius", type=positive_int, default=3, help="largest shift of one full step per move")
    p.add_argument("--search-seed", type=nonnegative_int, default=0, help="seed of the refinement's move order")
    p.add_argument("--name", default=None, help="name of the calibration and its bench method (default: "
                   "cal-bBUDGET-sSTEPS)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")

    p = _subcommand(sub, "report", "write a Markdown/HTML report with plots from bench records", _cmd_report,
                    _check_report)
    p.add_argument("records", metavar="RECORDS", help="a JSONL file written by `taylorseer bench`")
    p.add_argument("--out", default="out/report", help="folder for report.md, report.html and the plots")
    p.add_argument("--notes", default=None, help="a paragraph added to the report, e.g. why a target was missed "
                   "(default: none)")
    p.add_argument("--allow-incomplete", action="store_true", help="report the run even if it did not finish (no "
                   "run_end record), marked INCOMPLETE RUN (default: refuse it)")

    p = _subcommand(sub, "generate", "run a diffusers pipeline at full compute and with TaylorSeer (same seed); save "
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
    _add_parallel_args(p)
    _add_config_args(p, default_preset=None, unset="the preset recommended for the model's transformer family")

    p = _subcommand(sub, "sample", "generate N samples of one method into shards (alone or under torchrun, "
                    "resumable, the same set for any process count), merge them and score them", _cmd_sample,
                    _check_sample)
    p.add_argument("--num-samples", type=positive_int, default=None, help="samples to make, indices 0..N-1 "
                   "(default: none; required unless --merge)")
    p.add_argument("--method", default=None, help="a bench method name: full, ddim-K, fora-N5, ts-O2-N5-divided, "
                   "gate-t0.08, ... (default: none; or give --config / --preset)")
    p.add_argument("--config", dest="config_json", default=None, help="a TaylorSeerConfig or CacheConfig as a JSON "
                   "file (its SHA-256 goes in the manifest) or inline JSON (default: none)")
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
    _add_parallel_args(p)
    _add_config_args(p, default_preset=None)
    return parser


_RUNS_MODELS = ("demo", "bench", "generate", "train-reference", "sample", "calibrate")


def _fail(command: str, err: BaseException) -> int:
    print(f"taylorseer {command}: error: {' '.join(str(err).split(chr(10)))}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, check, run a subcommand; returns the exit status.

    A malformed flag exits through argparse (``SystemExit(2)``); an input refused by a check or by the API returns
    2; both print one line on stderr and neither loads a model or writes a file first.
    """
    from .models.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.check(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        return _fail(args.command, err)
    if not args.default_malloc and args.command in _RUNS_MODELS:
        from .runtime.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError, MissingExtraError) as err:
        return _fail(args.command, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
