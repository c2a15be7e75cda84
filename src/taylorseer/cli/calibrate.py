"""``calibrate``: fit a linear forecaster and search a schedule, on a shipped reference or a diffusers pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import GRANULARITIES
from .common import (
    DEVICES,
    DTYPES,
    EMBEDDED_MODELS,
    add_config_flag,
    check_out_file,
    config_from_flag,
    device_or_auto,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    subcommand,
)


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
    from ..integrations.family import family_of
    from ..integrations.pipeline_call import is_hub_id

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"argument {flag}: {model!r} is not a diffusers pipeline folder (no model_index.json)")
    elif not is_hub_id(model):
        raise ValueError(f"argument {flag}: {model!r} is neither an existing folder nor a Hugging Face Hub id "
                         f"(owner/name)")
    try:
        family_of(model)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"argument {flag}: {err}") from None


def _check_calibrate(args: argparse.Namespace) -> None:
    if args.out is None:  # the per-user store, where apply(..., speedup=X) finds it (taylorseer.auto)
        from ..auto import default_calibration_path

        args.out = str(default_calibration_path(args.name or f"cal-b{args.budget}-s{args.steps}"))
    check_out_file("--out", args.out)
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
        from ..devices import resolve_device

        try:
            args.device = resolve_device(args.device or "auto")
        except ValueError as err:
            raise ValueError(f"argument --device: {err}") from None
    args.class_ids = _class_list(args.classes) if args.classes else None
    if args.class_ids and max(args.class_ids) > 9:
        raise ValueError(f"argument --classes: the embedded model has classes 0..9, got {args.classes!r}")
    args.full_steps = None
    if args.schedule:
        from ..policy import FixedSchedule

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
    _check_search_config(args)


def _check_search_config(args: argparse.Namespace) -> None:
    """``--config``: the forecaster (and granularity) to search a schedule for, any registered formula forecaster;
    sets ``args.search_config`` (None without it) and ``args.granularity``. Refused: beside --forecaster,
    --schedule or --search-images 0, a fitted (linear) forecaster, and the fields calibrate cannot honour."""
    args.search_config = config_from_flag(args, [])
    if args.search_config is None:  # a pipeline's default is chosen once it is loaded (_default_granularity)
        args.granularity = args.granularity or {None: "module", "flux": "output"}.get(args.model)
        return
    config = args.search_config
    if args.forecaster != "linear":
        raise ValueError(f"argument --config: names the forecaster to search a schedule for, so --forecaster "
                         f"{args.forecaster} would be ignored; drop one of the two")
    if args.full_steps is not None:
        raise ValueError("argument --config: searches a schedule for its forecaster; with --schedule there is nothing "
                         "to search (omit one of them)")
    if args.search_images == 0:
        raise ValueError("argument --search-images: --config searches on sampled images, give at least 1")
    from ..forecast.linear import LinearForecast

    if isinstance(config.forecaster, LinearForecast):
        raise ValueError("argument --config: forecaster LinearForecast holds fitted weights; give a formula "
                         "forecaster to search a schedule for (fitted weights are calibrate's default, without "
                         "--config)")
    for field, value, default in (("abscissa", config.abscissa, "step"),
                                  ("targets.modules", config.targets.modules, ()),
                                  ("store.factor_dtype", config.store.factor_dtype, None)):
        if value != default:
            raise ValueError(f"argument --config: {field}={value!r} is not searched or stored by calibrate (it "
                             f"records at {default!r}); drop it from the config")
    granularity = config.targets.granularity
    if args.granularity is not None and args.granularity != granularity:
        raise ValueError(f"argument --granularity: {args.granularity} differs from the --config granularity "
                         f"{granularity!r}; drop one of the two")
    args.granularity = granularity


# calibrate --search: the names of calibration.search.SEARCH_PLANS (not imported here: torch loads with it)
SEARCH_PLANS = ("fast", "thorough")


# calibrate --forecaster: fitted linear weights (searched with them), or TaylorSeer of order N to search for.
_SEARCH_FORECASTERS = ("linear", "taylor1", "taylor2", "taylor3")


def _search_forecaster(name: str) -> Any:
    """The forecaster config ``calibrate --forecaster NAME`` searches a schedule for (None: fitted weights)."""
    from ..forecast import TaylorForecast

    return None if name == "linear" else TaylorForecast(max_order=int(name.removeprefix("taylor")))


def _default_granularity(scheduler: Any) -> str:
    """What a pipeline's calibration records by default: the model output for flow-matching schedulers (FLUX, SD3,
    ...: best measured on the FLUX reference, 41.10 dB against 39.70 for block residuals held out, and the fast
    search applies: <= 15 projected H100-minutes for FLUX.1-dev), the module outputs otherwise (the DiT's recipe)."""
    return "output" if "FlowMatch" in type(scheduler).__name__ else "module"


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import torch

    from ..calibration import FitOptions, calibrate
    from ..calibration.publish import publish, staging_path
    from ..calibration.search import default_search
    from ..models.pretrained import load_reference

    torch.set_num_threads(args.threads)
    final, args.out = args.out, staging_path(args.out)  # written beside --out, published at the end
    options = FitOptions(history=args.history, bias=args.bias, match_variance=not args.no_match_variance)
    pipe = None
    if args.model is not None and args.model != "flux":
        from ..integrations.pipeline_call import load_pipeline

        pipe = load_pipeline(args.model, args.device, args.dtype)
        args.granularity = args.granularity or _default_granularity(pipe.scheduler)
    # --search fast|thorough (calibration.search.SEARCH_PLANS; none given: fast at output granularity, thorough at
    # module/block, search.default_search) fills what is not given; a thorough search of a FLUX or pipeline
    # calibration samples 10 search images (30 for the embedded DiT)
    args.search = args.search or default_search(args.granularity)
    search_images = (args.search_images if args.search_images is not None
                     else 10 if args.search == "thorough" and args.model == "flux" else None)
    search = {"schedule": args.full_steps, "search_images": search_images, "max_evaluations": args.max_evals,
              "radius": args.radius, "search_seed": args.search_seed, "name": args.name, "search": args.search,
              "granularity": args.granularity, "forecaster": (args.search_config.forecaster if args.search_config
                                                              else _search_forecaster(args.forecaster))}
    if args.model is None:
        guidance = 1.5 if args.cfg_scale is None else args.cfg_scale
        cal = calibrate(load_reference(), args.budget, args.out, num_steps=args.steps, images=args.images,
                        classes=args.class_ids, seed=args.seed, guidance_scale=guidance, options=options,
                        on_policy=False if args.teacher_forced else None, **search)
    elif args.model == "flux":
        from ..eval.flux import FluxSampler
        from ..models.flux_pipeline import DEFAULT_GUIDANCE, load_flux_reference

        ref = load_flux_reference()
        guidance = DEFAULT_GUIDANCE if args.cfg_scale is None else args.cfg_scale
        cal = calibrate(ref.transformer, args.budget, args.out, num_steps=args.steps, images=args.images,
                        classes=args.class_ids, seed=args.seed, guidance_scale=guidance, options=options,
                        cfg_mode="split", sampler=FluxSampler(ref),
                        on_policy=False if args.teacher_forced else None, **search)
    else:
        from ..calibration.pipeline import calibrate_pipeline

        cal = calibrate_pipeline(pipe, args.budget, args.out, prompts=args.prompts, num_steps=args.steps,
                                 images=args.images, seed=args.seed, guidance_scale=args.cfg_scale, options=options,
                                 on_policy=False if args.teacher_forced else None, **search)
    cal = publish(args.out, final, args.force)
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
    plan = data.get("search_plan")
    if plan is not None:
        print(f"search plan: {plan['name']} ({plan['images']} recorded images, {plan['search_images']} search "
              f"images, <= {plan['max_evaluations']} refinement candidates, radius {plan['radius']}, "
              f"{plan.get('moves', 'random')} moves first, early stop after {plan['patience'] or 'none'}); "
              f"--search thorough for the slower search of before")
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


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    """The ``calibrate`` subcommand and its flags."""
    p = subcommand(sub, "calibrate", "fit a learned linear forecaster and search a schedule of --budget full steps "
                    "on the embedded model or a diffusers pipeline (--model); write a calibration file",
                    _cmd_calibrate, _check_calibrate)
    p.add_argument("--budget", type=positive_int, required=True, help="full steps of the schedule")
    p.add_argument("--out", default=None, help="calibration file to write (safetensors); an existing file is "
                   "refused unless --force (default: a new file in the per-user store "
                   "$XDG_CACHE_HOME/taylorseer/calibrations, ~/.cache/... by default, where "
                   "taylorseer.apply(model, speedup=X) finds it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps the calibration is for")
    p.add_argument("--search", choices=SEARCH_PLANS, default=None, help="how much the calibration may spend: "
                   "fast (16 recorded images, 8 search images (the first recorded batch), <= 32 refinement "
                   "candidates, one-step shifts first, early stop; a FLUX.1-dev calibration at 50 steps, budget 8 "
                   "projects to <= 13.7 H100 minutes) or thorough (40 images, 30 search images (10 for a pipeline), "
                   "<= 200 candidates: the search before 2026-12-07); the flags below override the plan's values "
                   "(default: fast with --granularity output, thorough at module or block granularity, where the "
                   "fast search lost 1.3 dB held out)")
    p.add_argument("--images", type=positive_int, default=None, help="calibration images (full-compute "
                   "trajectories) (default: the --search plan's, 16 fast, 40 thorough)")
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
    add_config_flag(p, "its forecaster (any registered formula forecaster) and granularity are those to search a "
                    "schedule for, as --forecaster taylorN does for TaylorSeer, writing a schedule-only file; the "
                    "searched schedule takes the place of its policy")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None, help="what is "
                   "recorded and forecast: the attention/MLP module outputs (the paper's), each block's residual, or "
                   "the model output (default: module for the embedded DiT and DDPM/DDIM-style "
                   "pipelines; output for --model flux and flow-matching pipelines, where it scored best on the FLUX "
                   "reference and takes the fast search)")
    p.add_argument("--schedule", default=None, help="comma-separated full steps to fit for, skipping the search "
                   "(default: search)")
    p.add_argument("--search-images", type=nonnegative_int, default=None, help="images each candidate schedule is "
                   "sampled on (0: refine on the trajectory proxy only, no model call; default: the --search plan's, "
                   "8 fast; thorough: 30 for the embedded model, 10 for a pipeline, whose generations cost more)")
    p.add_argument("--max-evals", type=positive_int, default=None, help="candidate schedules the refinement samples "
                   "(default: the --search plan's, 32 fast, 200 thorough)")
    p.add_argument("--radius", type=positive_int, default=None, help="largest shift of one full step per move "
                   "(default: the --search plan's, 3)")
    p.add_argument("--search-seed", type=nonnegative_int, default=0, help="seed of the refinement's move order")
    p.add_argument("--name", default=None, help="name of the calibration and its bench method (default: "
                   "cal-bBUDGET-sSTEPS)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
