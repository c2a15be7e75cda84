"""Measure ``taylorseer.apply(model, speedup=X)`` on the embedded model: what it chose, FLOPs speedup, PSNR to full.

    python scripts/speed_target.py --speedup 6 --images 200 --seed 0 --guidance 1.5 --steps 50
    python scripts/speed_target.py --speedup 6 --images 50 --guidance 4.0 --force-file ts2-output-b8-s50

Full compute and the speed target sample the same noise (``taylorseer.sample``, seed ``--seed``, labels cycling
0..9); FLOPs are counted by ``torch.utils.flop_counter`` over the whole generation; PSNR is ``eval.metrics.psnr``
over the batch. ``--force-file NAME`` runs a shipped calibration whatever the guidance scale (to see why
``apply`` refuses it at another scale), instead of the speed target.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import taylorseer
from taylorseer.auto import SHIPPED_DIR
from taylorseer.calibration.io import load_calibration
from taylorseer.eval.metrics import psnr


def _run(model, labels, args, handle=None):
    start = time.process_time()
    with FlopCounterMode(display=False) as counter:
        images = taylorseer.sample(model, labels, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                   listener=handle)
    return images, counter.get_total_flops(), time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speedup", type=float, default=6.0)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tell-guidance", action="store_true", help="pass guidance_scale to apply")
    parser.add_argument("--force-file", default=None, help="a shipped calibration's name, used as it is")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model = taylorseer.load_reference()
    labels = torch.arange(args.images) % 10
    full, flops_full, cpu_full = _run(model, labels, args)
    if args.force_file:
        cal = load_calibration(SHIPPED_DIR / f"{args.force_file}.safetensors", model=model, num_steps=args.steps)
        handle = taylorseer.apply(model, cal.cache_config())
    else:
        handle = taylorseer.apply(model, speedup=args.speedup,
                                  guidance_scale=args.guidance if args.tell_guidance else None)
    with handle:
        cached, flops, cpu = _run(model, labels, args, handle)
        print(f"chose: {handle!r}")
        print(f"pattern: {handle.stats.pattern()}  switched_off: {handle.stats.switched_off}")
    print(f"{args.images} images, seed {args.seed}, guidance {args.guidance:g}, {args.steps} steps: FLOPs speedup "
          f"{flops_full / flops:.3f}x, PSNR to full {psnr(cached, full):.2f} dB, process CPU time {cpu_full:.1f} s "
          f"full / {cpu:.1f} s cached ({cpu_full / cpu:.2f}x)")


if __name__ == "__main__":
    main()
