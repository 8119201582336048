"""``vimerge info``: versions, scan backends usable here, registered models and methods."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from vimerge._version import __version__
from vimerge.models import list_models, model_defaults
from vimerge.ops import available_backends, resolve_backend
from vimerge.reduce import list_methods

HELP = "versions, scan backends usable here, registered models and reduction methods"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    info = {
        "vimerge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "scan_backends": available_backends(),
        "auto_backend_cpu": resolve_backend("auto", "cpu").name,
        "methods": list_methods(),
        "models": {name: model_defaults(name) for name in list_models()},
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if key != "models":
            print(f"{key:18s} {value}")
    print("models")
    for name, cfg in info["models"].items():
        print(f"  {name:12s} " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    return 0
