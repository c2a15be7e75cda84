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
    taylorseer plan --config '{"policy": {"type": "ConfidenceGate"}, "forecaster": {"type": "AdamsForecast"}}'
                                         # any registered parts, on every command (JSON, a JSON file or a preset)

Bad input is refused before any work (no model loaded, nothing written) with one line on stderr and exit status 2:
a malformed flag value by its argparse type (``positive_int``, ``device_type``, ...; argparse raises
``SystemExit(2)``), a value that does not fit this machine or file system by the command's ``_check_*`` function,
a cache config field by the config itself (``main`` returns 2 for these two).

One module per group of subcommands, each defining its subcommands' flags (``add_*``), the checks after parsing
(``_check_*``) and the call into the API (``_cmd_*``): ``shipped`` (demo, train-reference), ``pipelines`` (plan,
generate), ``calibrate``, ``evaluate`` (bench, sample, report); ``common`` holds the argparse types, the disk
checks and the flags several commands share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .._extras import MissingExtraError
from .calibrate import add_calibrate
from .common import HelpFormatter, Parser, add_global_flags
from .evaluate import add_bench, add_report, add_sample
from .pipelines import add_generate, add_plan
from .shipped import add_demo, add_train

__all__ = ["build_parser", "main"]

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

Every command that runs a cache takes --config JSON|FILE|NAME: a cache config with any registered policy and
forecaster, as inline JSON, a JSON file or a preset name.
Run `taylorseer COMMAND --help` for a command's flags.
"""

def build_parser() -> argparse.ArgumentParser:
    """The ``taylorseer`` argument parser."""
    parser = Parser(prog="taylorseer", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"taylorseer {__version__}",
                        help="print the version and exit")
    add_global_flags(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add in (add_demo, add_plan, add_train, add_bench, add_calibrate, add_report, add_generate, add_sample):
        add(sub)
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
    from ..models.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.check(args)
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as err:  # a check may need an extra too
        return _fail(args.command, err)
    if not args.default_malloc and args.command in _RUNS_MODELS:
        from ..runtime.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError, MissingExtraError) as err:
        return _fail(args.command, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

