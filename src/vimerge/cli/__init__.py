"""The ``vimerge`` command line: one module per verb (``HELP``, ``add_args(parser)``,
``run(args) -> int``), the options they share in :mod:`.common`, and here the one place that
turns the library's errors into a one-line message (exit 2) and Ctrl-C into exit 130.

Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (CommandError, CheckpointError, DatasetError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"vimerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nvimerge {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "build_model", "reduction_spec", "add_model_args", "add_reduction_args",
           "VERBS"]
