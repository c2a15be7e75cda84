"""How FID-FMNIST responds to small changes of the full-compute images, and the classifier's true-class logit
margin per method, from images saved by ``scripts/quality_at_scale.py --save DIR`` (docs/design.md, "FID-FMNIST at
scale").

    python scripts/experiments/fid_sensitivity.py /root/taylorseer-runs/quality/cfg1.5-n1000/seed0 \\
        --methods ts-O2-N5-divided,fora-N5,ddim-11
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.functional import avg_pool2d

from taylorseer.eval.classifier import shipped_classifier
from taylorseer.eval.metrics import fid_between, fid_fmnist, psnr
from taylorseer.models.data import load_fashion_mnist, resize_images


def margin(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean (true-class logit - best other logit) of the shipped classifier."""
    with torch.inference_mode():
        logits = shipped_classifier(images.shape[-1]).eval()(images.float())
    true = logits.gather(1, labels[:, None]).squeeze(1)
    return float((true - logits.scatter(1, labels[:, None], float("-inf")).max(1).values).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path, help="one seed*/ directory holding full.safetensors")
    parser.add_argument("--methods", default="ts-O2-N5-divided,fora-N5,ddim-11")
    args = parser.parse_args()
    saved = load_file(str(args.seed_dir / "full.safetensors"))
    full, labels = saved["images"], saved["labels"]
    g = torch.Generator().manual_seed(0)
    print(f"full compute: FID-FMNIST {fid_fmnist(full):.3f}, margin {margin(full, labels):.3f}")
    real, real_labels = load_fashion_mnist("test")
    print(f"real test images: margin {margin(resize_images(real, full.shape[-1]), real_labels):.3f}\n")
    blur = avg_pool2d(full, 3, 1, 1, count_include_pad=False)
    for a in (-0.1, 0.1):
        y = (full + a * (full - blur)).clamp(-1, 1)
        print(f"full {'sharpened' if a > 0 else 'blurred'} (x + {a:+.1f} (x - blur3)): {psnr(y, full):.1f} dB, "
              f"FID-FMNIST {fid_fmnist(y):.3f}")
    for name in [n for n in args.methods.split(",") if n]:
        x = load_file(str(args.seed_dir / f"{name}.safetensors"))["images"]
        err = x - full
        rmse = float(err.pow(2).mean().sqrt())
        iid = (full + torch.randn(full.shape, generator=g) * rmse).clamp(-1, 1)
        shuffled = (full + err[torch.randperm(len(err), generator=g)]).clamp(-1, 1)
        print(f"\n{name}: RMSE {rmse:.4f}, FID-FMNIST {fid_fmnist(x):.3f}, FID to full {fid_between(x, full):.3f}, "
              f"margin {margin(x, labels):.3f}")
        print(f"  full + i.i.d. noise at that RMSE: FID-FMNIST {fid_fmnist(iid):.3f}")
        print(f"  full + the method's error maps on other images: FID-FMNIST {fid_fmnist(shuffled):.3f}")


if __name__ == "__main__":
    main()
