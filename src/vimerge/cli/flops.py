"""``vimerge flops``: FLOPs per image in both conventions and the tokens each block sees."""

from __future__ import annotations

import argparse
import json

from vimerge.measure.flops import model_cost
from vimerge.reduce import spec_of

from .common import build_model

HELP = "FLOPs per image (paper and full conventions) and tokens per block"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _gflops(value: float) -> str:
    """Two decimals as the papers print them (115.33), four significant digits below 1 (0.03711)."""
    return f"{value:.2f}" if value >= 1 else f"{value:.4g}"


def run(args: argparse.Namespace) -> int:
    model = build_model(args)
    spec = spec_of(model.reduction)
    result = {"model": args.model, "reduce": spec, "method": spec.split(":")[0], **model_cost(model)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model} ({spec}): {_gflops(result['gflops_paper'])} GFLOPs (paper convention), "
          f"{_gflops(result['gflops_full'])} GFLOPs (full count); reduction ratio {result['reduction_ratio']:.3f}")
    print("tokens per block: " + " ".join(map(str, result["token_counts"])))
    return 0
