"""What every subcommand shares: argparse types (the value of one flag), checks after parsing (the disk), the
parser class and help formatter, the global flags, the cache-config flags and ``--config JSON|FILE|NAME``."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..config import ABSCISSAE, GRANULARITIES, PRESET_NAMES, SCHEMES, TaylorSeerConfig, preset
from ..devices import DEVICE_PATTERN, DEVICES, WEIGHT_DTYPES

if TYPE_CHECKING:
    from ..parts import CacheConfig

EMBEDDED_MODELS = ("dit", "flux")  # the shipped references, by name

DTYPES = WEIGHT_DTYPES  # --dtype: a pipeline's weights (the one table: taylorseer.devices)
CONFIG_FLAGS = {"interval": "--interval", "max_order": "--order", "warmup_steps": "--warmup",
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
    after parsing, by ``taylorseer.devices.check_device``)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be one of {DEVICES}, got {text!r}")
    return text


def device_or_auto(text: str) -> str:
    """argparse type: ``auto`` (cuda when available, else cpu) or a device name accepted by ``device_type``."""
    if text == "auto":
        return text
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be one of auto, {DEVICES}, got {text!r}")
    return text


#################################################################################
#                checks after parsing: the machine and the disk                 #
#################################################################################

def nearest_existing(path: Path) -> Path:
    for part in (path, *path.parents):
        if part.exists():
            return part
    return Path.cwd()


def check_creatable(flag: str, value: str, folder: Path) -> None:
    base = nearest_existing(folder)
    if not base.is_dir():
        raise ValueError(f"argument {flag}: {value!r} lies below {str(base)!r}, which is an existing file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"argument {flag}: cannot write {value!r}: {str(base)!r} is not writable")


def check_out_folder(flag: str, value: str) -> None:
    """``value`` names a folder to write into: not an existing file, creatable."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"argument {flag}: {value!r} is an existing file; a folder is expected")
    check_creatable(flag, value, path)


def check_out_file(flag: str, value: str) -> None:
    """``value`` names a file to write or append to: not an existing folder, creatable."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"argument {flag}: {value!r} is an existing folder; a file is expected, e.g. "
                         f"{str(path / 'records.jsonl')!r}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"argument {flag}: {value!r} is not writable")
    check_creatable(flag, value, path.parent)


def check_in_file(flag: str, value: str) -> None:
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"argument {flag}: {value!r} is a folder; a file is expected")
    if not path.is_file():
        raise FileNotFoundError(f"argument {flag}: no such file {value!r}")


def add_config_flag(p: argparse.ArgumentParser, role: str) -> None:
    """``--config JSON|FILE|NAME`` (``args.config_spec``): a cache config with any registered parts; ``role`` says
    what the command does with it."""
    p.add_argument("--config", dest="config_spec", default=None, metavar="JSON|FILE|NAME", help="a cache config "
                   "with any registered policy and forecaster (a CacheConfig, or TaylorSeerConfig fields) as inline "
                   f"JSON, a JSON file or a preset name: {role} (default: none)")


def given_config_flags(args: argparse.Namespace) -> list[str]:
    """The preset and field flags given on the command line (their unset value is None)."""
    return [flag for name, flag in (("preset", "--preset"), *CONFIG_FLAGS.items()) if getattr(args, name, None)
            is not None]


def config_from_flag(args: argparse.Namespace, given: list[str]) -> CacheConfig | None:
    """The ``CacheConfig`` of ``--config`` (None without it), read by ``taylorseer.parts.load_config``; the
    error names the flag and the field (``argument --config: ...``), and ``given`` preset/field flags are refused
    beside it (they would be ignored)."""
    if args.config_spec is None:
        return None
    if given:
        raise ValueError(f"argument --config: the config is the whole cache config, so {given} would be ignored; "
                         f"drop one or the other")
    from ..parts import load_config

    try:
        return load_config(args.config_spec)
    except (TypeError, ValueError, OSError) as err:
        raise ValueError(f"argument --config: {err}") from None


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
            raise ValueError(f"argument {CONFIG_FLAGS[name]}: {err}") from None
    if args.preset:
        return preset(args.preset, **overrides)
    return TaylorSeerConfig(**overrides)


def context_parallel_from_args(args: argparse.Namespace) -> Any:
    """The ``ContextParallel`` of --context-parallel/--cp-kind (None without them); ``ValueError`` naming the flag."""
    if args.context_parallel is None:
        if args.cp_kind is not None:
            raise ValueError("argument --cp-kind: only with --context-parallel K")
        return None
    from ..distributed.layout import ContextParallel

    try:
        return ContextParallel(args.context_parallel, args.cp_kind or "ulysses")
    except ValueError as err:
        raise ValueError(f"argument --context-parallel: {err}") from None


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    from ..distributed.layout import CP_KINDS

    p.add_argument("--context-parallel", type=positive_int, default=None, metavar="K", help="under torchrun: "
                   "shard each sample's tokens over K ranks with diffusers' context parallelism (a job of W "
                   "processes is W/K data-parallel replicas of K ranks; docs/parallel.md) (default: off)")
    p.add_argument("--cp-kind", choices=CP_KINDS, default=None, help="with --context-parallel: ulysses (all-to-all "
                   "over heads; K must divide them) or ring (needs an attention backend returning the log-sum-exp) "
                   "(default: ulysses)")



#################################################################################
#                                    Parser                                     #
#################################################################################

class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2), the usage left to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each flag's default; a flag whose help already says what
    its default is, a switch, or one whose default is None (its help says what unset means) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_global_flags(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    """Flags accepted before and after the subcommand; a subcommand leaves them unset unless given there."""
    parser.add_argument("--default-malloc", action="store_true",
                        default=argparse.SUPPRESS if in_subcommand else False,
                        help="keep the C allocator's default settings; otherwise commands that run a model call "
                        "taylorseer.tune_cpu_allocator() first (glibc: about 20%% faster on CPU here, the process "
                        "keeps its peak memory)")


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "paper_dit",
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


def subcommand(sub: argparse._SubParsersAction, name: str, help: str,
                run: Callable[[argparse.Namespace], None],
                check: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=HelpFormatter)
    add_global_flags(p, in_subcommand=True)
    p.set_defaults(func=run, check=check)
    return p
