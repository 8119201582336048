"""The ``vimerge`` command line: one module per verb (``HELP``, ``add_args(parser)``,
``run(args) -> int``), the options they share in :mod:`.common`, and here the one place that
turns errors into a one-line message naming the problem and the fix (exit 2: usage mistakes,
the library's errors, files that cannot be written), Ctrl-C into one line and exit 130, and a
closed output pipe (``vimerge ... --json | head``) into a quiet exit 141. Every option's
``--help`` shows its default.

Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from types import ModuleType

from vimerge._version import __version__
from vimerge.data import DatasetError
from vimerge.models import CheckpointError

from . import bench, demo, info, retrain, train, visualize
from . import eval as eval_
from . import flops as flops_
from .common import CommandError, add_model_args, add_reduction_args, build_model, reduction_spec

# verb -> module; the ones taking the model and reduction options get them added here
VERBS: dict[str, tuple[ModuleType, bool]] = {
    "info": (info, False),
    "flops": (flops_, True),
    "eval": (eval_, True),
    "bench": (bench, True),
    "retrain": (retrain, True),
    "train": (train, True),
    "demo": (demo, False),
    "visualize": (visualize, True),
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help names its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            default = action.default
            if isinstance(default, (list, tuple)):
                default = ",".join(map(str, default))
            text += f" (default: {str(default).replace('%', '%%')})"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the fix (``--help``), exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vimerge",
        description="Token reduction for Vision Mamba: faster Vims, accuracy rebuilt in minutes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details; show tracebacks")
    parser.add_argument("--version", action="version", version=f"vimerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, takes_model) in VERBS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if takes_model:
            add_model_args(p)
            add_reduction_args(p)
        module.add_args(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:     # a usage error: one line printed, exit 2 (--help and --version exit as usual)
        if exc.code in (0, None):
            raise
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with _warnings_as_lines():
            status = args.func(args)
        sys.stdout.flush()      # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return 141              # 128 + SIGPIPE, as a shell reports a writer whose reader left
    except (CommandError, CheckpointError, DatasetError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"vimerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:      # a file or directory the command cannot read or write
        if args.verbose:
            raise
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"vimerge {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vimerge {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _warnings_as_lines():
    """The library's warnings as one line each on stderr, without source lines (restored after)."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"vimerge: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that the exit flush stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # stdout without a file descriptor (tests)
        pass


__all__ = ["main", "build_parser", "build_model", "reduction_spec", "add_model_args", "add_reduction_args",
           "VERBS"]
