"""The ``vimerge`` command line. Each sub-command lives in a small function here."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models import list_models, model_defaults
    from .ops import available_backends, resolve_backend

    info = {
        "vimerge": __import__("vimerge").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "scan_backends": available_backends(),
        "auto_backend_cpu": resolve_backend("auto", "cpu").name,
        "models": {name: model_defaults(name) for name in list_models()},
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key != "models":
                print(f"{key:18s} {value}")
        print("models")
        for name, cfg in info["models"].items():
            print(f"  {name:12s} " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vimerge",
        description="Token reduction for Vision Mamba: faster Vims, accuracy rebuilt in minutes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, scan backends usable here, registered models")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
