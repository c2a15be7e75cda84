"""Side by side with diffusers' own TaylorSeer (``TaylorSeerCacheConfig``) on tiny DiT, PixArt and Flux models.

    python scripts/compare_diffusers_peer.py --out docs/peer_comparison.md

For each tiny transformer (random weights, every adaLN/gate non-zero so every block contributes) and each schedule
(interval x max_order, same warm-up), four sampling runs on the same latents and conditioning:

* ``full``: every step computed;
* ``ours reference`` / ``ours divided``: ``taylorseer.apply(model, TaylorSeerConfig(..., scheme=...))``;
* ``diffusers``: diffusers' hooks on the same modules (``adapter_regexes``) with the same full/forecast steps
  (``apply_diffusers_taylorseer(..., match_schedule=True)``, factors kept in float32 like ours).

Each method owns its own copy of the model (installed once per schedule). The runs are timed interleaved
(full, ours reference, ours divided, diffusers, full, ...) after one untimed warm-up round, and the median is
reported. Every timed run must reproduce its warm-up output bitwise (a check that ``begin`` resets all state).
The error is the relative L2 distance of the final latents to the full-compute latents. A benchmark output, not a
test: no number here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import taylorseer
from taylorseer import TaylorSeerConfig
from taylorseer.integrations.peers import adapter_regexes, apply_diffusers_taylorseer

MODELS = ("dit", "pixart", "flux")
METHODS = ("full", "ours reference", "ours divided", "diffusers")


#################################################################################
#                                  Tiny models                                  #
#################################################################################

@dataclass(frozen=True)
class Case:
    """A tiny transformer of one diffusers class, its inputs and how one denoising step calls it."""

    name: str
    build: Callable[[], torch.nn.Module]
    latent: tuple[int, ...]  # one image's latent
    context: dict[str, tuple[int, ...]]  # per-row conditioning (shape () = a class label)
    call: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]
    flow: bool  # flow matching (Euler) or epsilon prediction (DDIM)
    cfg: bool  # classifier-free guidance as one doubled batch


def _grid_ids(side: int) -> torch.Tensor:
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    return ids


def _timesteps(t: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (t / scale).expand(x.shape[0])


TEXT = 8  # text tokens
CASES = {
    "dit": Case(
        "dit",
        lambda: diffusers.DiTTransformer2DModel(
            num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
            sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1),
        (4, 16, 16), {"class_labels": ()},
        lambda m, x, t, c: m(x, timestep=_timesteps(t, x), class_labels=c["class_labels"]).sample[:, :4],
        flow=False, cfg=True),
    "pixart": Case(
        "pixart",
        lambda: diffusers.PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
            sample_size=16, patch_size=2, cross_attention_dim=64, caption_channels=32, norm_num_groups=1),
        (4, 16, 16), {"encoder_hidden_states": (TEXT, 32)},
        lambda m, x, t, c: m(x, timestep=_timesteps(t, x), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                             **c).sample[:, :4],
        flow=False, cfg=True),
    "flux": Case(
        "flux",
        lambda: diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        (64, 16), {"encoder_hidden_states": (TEXT, 32), "pooled_projections": (32,)},
        lambda m, x, t, c: m(x, timestep=_timesteps(t, x, 1000), img_ids=_grid_ids(8), txt_ids=torch.zeros(TEXT, 3),
                             **c).sample,
        flow=True, cfg=False),  # FLUX.1-dev style: guidance-distilled, one call per step
}


def build_model(case: Case, seed: int = 0) -> torch.nn.Module:
    """The tiny model with random weights; zero-initialised tensors (adaLN, gates, output projections) re-drawn."""
    torch.manual_seed(seed)
    model = case.build().eval().requires_grad_(False)
    for p in model.parameters():
        if p.abs().max() == 0:
            p.normal_(0, 0.05)
    return model


#################################################################################
#                                 Sampling loop                                 #
#################################################################################

class Sampler:
    """A fixed batch (latents, conditioning) of one case and the standard diffusers denoising loop over it."""

    def __init__(self, case: Case, batch: int = 2, guidance_scale: float = 3.0, seed: int = 0):
        self.case, self.guidance_scale = case, guidance_scale
        generator = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(batch, *case.latent, generator=generator)
        cond = {k: torch.randint(0, 1000, (batch,), generator=generator) if not shape
                else torch.randn(batch, *shape, generator=generator) for k, shape in case.context.items()}
        if case.cfg:
            uncond = {k: torch.full_like(v, 1000) if not case.context[k] else torch.zeros_like(v)
                      for k, v in cond.items()}
            cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        self.cond = cond
        self.scheduler = FlowMatchEulerDiscreteScheduler() if case.flow else DDIMScheduler(clip_sample=False)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, listener: Any, num_steps: int) -> torch.Tensor:
        """Final latents; ``listener`` (a handle or the diffusers peer, or None) is told every step."""
        self.scheduler.set_timesteps(num_steps)
        if listener is not None:
            listener.begin(num_steps)
        x = self.latents
        for i, t in enumerate(self.scheduler.timesteps):
            with listener.step(i, timestep=t) if listener is not None else contextlib.nullcontext():
                out = self.case.call(model, torch.cat([x, x]) if self.case.cfg else x, t, self.cond)
            if self.case.cfg:
                cond, uncond = out.chunk(2)
                out = uncond + self.guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x).prev_sample
        return x


#################################################################################
#                                  Comparison                                   #
#################################################################################

@dataclass
class Row:
    model: str
    interval: int
    max_order: int
    warmup_steps: int
    method: str
    full_steps: int
    rel_l2: float  # ||x - x_full|| / ||x_full|| of the final latents
    wall_s: float  # median seconds of one sampling run
    wall_vs_full: float
    wall_vs_peer: float | None  # ours / diffusers (None on the full and diffusers rows)
    equal_peer: bool | None  # bitwise equal to the diffusers output (None on the full and diffusers rows)
    rel_l2_vs_peer: float | None  # ||x - x_diffusers|| / ||x_diffusers||


def rel_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def compare_schedule(case: Case, base: torch.nn.Module, sampler: Sampler, interval: int, max_order: int,
                     warmup_steps: int, num_steps: int, repeats: int) -> list[Row]:
    """The four methods on one schedule, each on its own copy of ``base``, timed interleaved."""
    listeners: dict[str, Any] = {}
    models = {method: copy.deepcopy(base) for method in METHODS}
    listeners["full"] = None
    for scheme in ("reference", "divided"):
        config = TaylorSeerConfig(interval=interval, warmup_steps=warmup_steps, max_order=max_order, scheme=scheme)
        listeners[f"ours {scheme}"] = taylorseer.apply(models[f"ours {scheme}"], config)
    peer_model = models["diffusers"]
    listeners["diffusers"] = apply_diffusers_taylorseer(peer_model, interval, warmup_steps, max_order,
                                                        adapter_regexes(peer_model))
    try:
        outputs = {m: sampler(models[m], listeners[m], num_steps) for m in METHODS}  # warm-up round, untimed
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(repeats):
            for m in METHODS:
                start = time.perf_counter()
                x = sampler(models[m], listeners[m], num_steps)
                times[m].append(time.perf_counter() - start)
                if not torch.equal(x, outputs[m]):
                    raise RuntimeError(f"{case.name} {m}: a repeated run differs from the first one")
    finally:
        for listener in listeners.values():
            if listener is not None:
                listener.remove()
    full_steps = TaylorSeerConfig(interval=interval, warmup_steps=warmup_steps).full_steps(num_steps)
    wall = {m: statistics.median(times[m]) for m in METHODS}
    rows = []
    for m in METHODS:
        ours = m.startswith("ours")
        rows.append(Row(
            model=case.name, interval=interval, max_order=max_order, warmup_steps=warmup_steps, method=m,
            full_steps=num_steps if m == "full" else full_steps,
            rel_l2=rel_l2(outputs[m], outputs["full"]), wall_s=wall[m], wall_vs_full=wall[m] / wall["full"],
            wall_vs_peer=wall[m] / wall["diffusers"] if ours else None,
            equal_peer=torch.equal(outputs[m], outputs["diffusers"]) if ours else None,
            rel_l2_vs_peer=rel_l2(outputs[m], outputs["diffusers"]) if ours else None))
    return rows


def markdown_table(rows: list[Row], num_steps: int) -> str:
    lines = ["| model | interval | order | warm-up | method | full steps | rel. L2 vs full | wall s (median) "
             "| wall / full | ours / diffusers wall | bitwise = diffusers | rel. L2 vs diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def opt(value: Any, fmt: str) -> str:
            return "—" if value is None else format(value, fmt)

        equal = "—" if r.equal_peer is None else ("yes" if r.equal_peer else "no")
        lines.append(f"| {r.model} | {r.interval} | {r.max_order} | {r.warmup_steps} | {r.method} "
                     f"| {r.full_steps}/{num_steps} | {r.rel_l2:.4e} | {r.wall_s:.4f} | {r.wall_vs_full:.3f} "
                     f"| {opt(r.wall_vs_peer, '.3f')} | {equal} | {opt(r.rel_l2_vs_peer, '.2e')} |")
    return "\n".join(lines)


#################################################################################
#                                    Report                                     #
#################################################################################

def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"cpu": cpu, "logical_cpus": str(os.cpu_count()), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(),
            "threads": str(torch.get_num_threads()), "loadavg": load}


def write_report(path: Path, table: str, command: str, args: argparse.Namespace, before: dict[str, str],
                 after: dict[str, str], seconds: float) -> None:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sizes = ", ".join(f"{name}: {sum(p.numel() for p in build_model(CASES[name]).parameters()):,} parameters"
                      for name in args.models)
    text = f"""# Side by side with diffusers' TaylorSeer

Generated by `scripts/compare_diffusers_peer.py` (issue 5); re-run the command below to refresh it.
A benchmark output, not a test: nothing here is asserted.

* date: {today}
* command: `{command}`
* machine: {before['cpu']}, {before['logical_cpus']} logical CPUs; torch {before['torch']}, diffusers \
{before['diffusers']}, Python {before['python']}; {before['threads']} torch thread(s)
* load average (1/5/15 min) before / after: {before['loadavg']} / {after['loadavg']} (other jobs were running on \
this machine: absolute times are noisy, the interleaved ratios less so)
* {args.steps} sampling steps, batch {args.batch} ({"CFG as one doubled batch, scale 3.0, for dit and pixart; " if
  any(CASES[n].cfg for n in args.models) else ""}one call per step for flux), {args.repeats} timed repeats per \
method after one untimed round; total run {seconds:.0f} s
* tiny random models ({sizes}); DDIM for dit/pixart, flow-match Euler for flux

## What is compared

* **full**: every step computed in full.
* **ours reference** / **ours divided**: `taylorseer.apply(model, TaylorSeerConfig(interval, warmup_steps, \
max_order, scheme=...))` (module granularity, the adapter's modules, default `block_shortcuts=True`).
* **diffusers**: `diffusers.hooks.apply_taylorseer_cache` with `TaylorSeerCacheConfig` on exactly the same modules
  (`adapter_regexes`; Flux's single-block `attn`/`proj_mlp` in diffusers' "skip_predict" mode), through
  `taylorseer.integrations.peers.apply_diffusers_taylorseer` with `match_schedule=True` (diffusers' compute
  decision replaced by our interval plan, so both compute and forecast the same steps) and
  `taylor_factors_dtype=None` (float32 factors like ours; diffusers' default is bfloat16).

Columns: *full steps* computed out of all; *rel. L2 vs full* = ‖x − x_full‖ / ‖x_full‖ of the final latents;
*wall s* = median seconds of one whole sampling run (scheduler included); *wall / full* and *ours / diffusers wall*
are ratios of those medians (below 1: faster); *bitwise = diffusers* says whether our final latents equal the
peer's exactly, *rel. L2 vs diffusers* is ‖x_ours − x_diffusers‖ / ‖x_diffusers‖. Each method runs on its own
deep copy of the model, timed interleaved (full, ours reference, ours divided, diffusers, full, ...), and every
timed run reproduced its untimed first run bitwise.

## Results

{table}

## Reading it

* At `scheme="reference"` ours is the same computation as diffusers' (Taylor factors in step-index units, higher
  orders divided by the latest spacing only), so bitwise equal outputs are expected; the column above says whether
  that held on this run.
* `scheme="divided"` (Newton divided differences over the actual step indices) is, at order 1, the same forecast
  written with a different order of float operations; at order 2 it also differs in value while the last three
  computed steps are unevenly spaced (the warm-up steps are 1 apart, the later ones `interval` apart). Its
  differences from the peer are carried through the whole sampling loop.
* The wall-time ratio compares the per-step overhead of the two hook implementations and, on forecast steps, the
  block shortcuts (only the DiT blocks have one registered: on forecast steps ours skips the norms/modulations
  that only feed forecast modules, diffusers still runs them; PixArt and Flux run the whole block in both).
  On models this small that overhead is a large part of a step. Not measured here: on real checkpoints the
  transformer compute dominates, so the ratio should approach the ratio of executed work (about 1 for PixArt and
  Flux, where both compute the same modules on the same steps).
* Medians of a few repeats on a loaded 2-core machine: differences of a few percent between two rows are within
  the run-to-run noise (compare two runs of the command before reading much into them).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--intervals", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2, help="images per run (doubled by CFG for dit and pixart)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method; the median is reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write a Markdown report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the comparison, print the Markdown table (and write ``--out``); returns the rows."""
    args = parse_args(argv)
    command = "python scripts/compare_diffusers_peer.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    before, start = machine(), time.perf_counter()
    rows: list[Row] = []
    for name in args.models:
        case = CASES[name]
        base, sampler = build_model(case), Sampler(case, batch=args.batch)
        for interval in args.intervals:
            for order in args.orders:
                rows += compare_schedule(case, base, sampler, interval, order, args.warmup, args.steps,
                                         args.repeats)
                print(f"# {name} interval={interval} order={order}: done", file=sys.stderr, flush=True)
    table = markdown_table(rows, args.steps)
    print(table)
    if args.out is not None:
        write_report(args.out, table, command, args, before, machine(), time.perf_counter() - start)
    return rows


if __name__ == "__main__":
    main()

