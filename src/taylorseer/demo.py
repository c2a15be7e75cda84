"""`taylorseer demo`: the embedded DiT at full compute and with TaylorSeer, side by side, measured.

Everything runs on the CPU from files shipped in the package: the trained reference DiT, the evaluation
classifier and the Fashion-MNIST test statistics. Caching reaches the model through ``taylorseer.apply``, the
same path users take.

Example:
    >>> rows = run_demo(out_dir="out/demo", per_class=4)   # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import apply
from .config import TaylorSeerConfig, preset
from .eval.grid import side_by_side
from .models.sampler import sample
from .runtime.measure import count_flops


@dataclass(frozen=True)
class DemoMethod:
    """One row of the demo: a cache config (None: no cache) and the sampler's number of steps."""

    label: str
    config: TaylorSeerConfig | None
    num_steps: int


def demo_methods(num_steps: int = 50) -> list[DemoMethod]:
    """Full compute, the paper's DiT schedule, a faster schedule, and the baselines at the same model-call count."""
    # The fast schedule: N = 5 with DiT's warm-up of 2 (11 full steps of 50), in the library's default step units;
    # on the shipped model both orders beat reuse there (docs/design.md, "Abscissa on the embedded model").
    fast = TaylorSeerConfig(interval=5, warmup_steps=2, max_order=2, name="taylorseer-n5-o2")
    fast_o1 = fast.replace(max_order=1, name="taylorseer-n5-o1")
    fora = fast.replace(max_order=0, name="fora-n5")
    evals = fast.full_steps(num_steps)
    return [
        DemoMethod(f"full ({num_steps} steps)", None, num_steps),
        DemoMethod("TaylorSeer paper_dit (N=4, O=4)", preset("paper_dit"), num_steps),
        DemoMethod("TaylorSeer N=5, O=2", fast, num_steps),
        DemoMethod("TaylorSeer N=5, O=1", fast_o1, num_steps),
        DemoMethod("FORA reuse N=5 (O=0)", fora, num_steps),
        DemoMethod(f"DDIM {evals} steps (same model calls)", None, evals),
    ]


def _generate(model, method: DemoMethod, labels, seed: int, guidance_scale: float, progress: bool):
    if method.config is None:
        return sample(model, labels, num_steps=method.num_steps, guidance_scale=guidance_scale, seed=seed,
                      progress=progress), None
    with apply(model, method.config) as handle:
        images = sample(model, labels, num_steps=method.num_steps, guidance_scale=guidance_scale, seed=seed,
                        listener=handle, progress=progress)
        return images, handle.stats


def _flops(model, method: DemoMethod, guidance_scale: float) -> int:
    labels = torch.tensor([0])  # FLOPs scale linearly with the batch: one image gives the exact ratio
    return count_flops(lambda: _generate(model, method, labels, 0, guidance_scale, False))[1]


def run_demo(
    out_dir: str | Path = "out/demo",
    per_class: int = 8,
    num_steps: int = 50,
    guidance_scale: float = 1.5,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    methods: list[DemoMethod] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate ``per_class`` images of each class per method; return one row of measurements per method.

    Speedups are wall-clock ratios to the full-compute run in this process (seconds, ``time.perf_counter``);
    PSNR (dB) and SSIM compare each method's images with the full-compute images of the same seeds.
    """
    from .eval import metrics  # needs the shipped classifier assets

    if model is None:
        from .models.pretrained import load_reference

        model = load_reference()
    methods = demo_methods(num_steps) if methods is None else methods
    labels = torch.arange(10).repeat_interleave(per_class)
    results: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    for method in methods:
        start = time.perf_counter()
        images, stats = _generate(model, method, labels, seed, guidance_scale, progress)
        seconds = time.perf_counter() - start
        results[method.label] = images
        rows.append({"method": method.label, "seconds": seconds, "images": images, "stats": stats,
                     "flops": _flops(model, method, guidance_scale),
                     "full_steps": stats.steps_full if stats else method.num_steps})
    reference = rows[0]
    for row in rows:
        images = row.pop("images")
        row["speedup"] = reference["seconds"] / row["seconds"]
        row["flops_speedup"] = reference["flops"] / row["flops"]
        row["psnr"] = metrics.psnr(images, results[reference["method"]])
        row["ssim"] = metrics.ssim(images, results[reference["method"]])
        row["class_acc"] = metrics.class_accuracy(images, labels)
        row["fid_fmnist"] = metrics.fid_fmnist(images)
        row["fid_to_full"] = metrics.fid_between(images, results[reference["method"]])
        stats = row.pop("stats")
        row["cache_mb"] = stats.peak_cache_bytes / 2**20 if stats is not None else 0.0
    out = Path(out_dir)
    side_by_side({m.label: results[m.label] for m in methods}, out / "demo.png", ncol=per_class)
    return rows


def format_table(rows: list[dict]) -> str:
    """The demo rows as a Markdown table."""
    head = ("| method | full steps | wall s | speedup | FLOPs speedup | PSNR dB | SSIM | class acc | FID-FMNIST "
            "| FID to full | cache MB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        psnr = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
        lines.append(f"| {r['method']} | {r['full_steps']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['flops_speedup']:.2f}x | {psnr} | {r['ssim']:.4f} | {r['class_acc']:.1%} | "
                     f"{r['fid_fmnist']:.2f} | {r['fid_to_full']:.3f} | {r['cache_mb']:.1f} |")
    return "\n".join(lines)
