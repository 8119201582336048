"""``vimerge bench``: images/s, speed-up, FLOPs and peak memory at several reduction ratios
(the R-MeeTo paper's Table 12 protocol, on this machine)."""

from __future__ import annotations

import argparse
import json

import torch

from vimerge.measure.bench import DTYPES, measure
from vimerge.measure.flops import model_cost
from vimerge.reduce import NONE, apply, parse_spec

from .common import CommandError, build_model, given_options, merge_options, reduction_spec

HELP = "images/s, speed-up, FLOPs and peak memory at several reduction ratios (R-MeeTo Table 12 on this machine)"


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"--ratios: {bad[0]} is not a reduction ratio in [0, 1)")
    return values


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--ratios", type=_ratios, default=_ratios("0,0.14,0.28,0.31,0.42,0.54"),
                   help="comma-separated mean-token reduction ratios, 0 = unreduced "
                        "(default: 0,0.14,0.28,0.31,0.42,0.54)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--json", action="store_true", help="print the rows as JSON")


def row_specs(args: argparse.Namespace) -> list[str]:
    """One spec per ratio: the arguments' method (default rmeeto) and options at each ratio."""
    flags = given_options(args)
    if "r" in flags or "ratio" in flags:
        raise CommandError("bench sets the amount from --ratios: drop --r/--ratio")
    if args.reduce is None and args.method is None:
        name, options = "rmeeto", {}
    else:
        name, options = parse_spec(reduction_spec(args))
    if name == NONE:
        raise CommandError("bench compares reductions: give --method or --reduce (default: rmeeto)")
    options = {k: v for k, v in options.items() if k not in ("r", "ratio")}
    return [NONE if ratio == 0 else merge_options(name, {**options, "ratio": ratio}, flags) for ratio in args.ratios]


def run(args: argparse.Namespace) -> int:
    specs = row_specs(args)
    model = build_model(args, NONE).to(args.device)
    rows = []
    for spec, ratio in zip(specs, args.ratios):
        apply(model, spec)
        cost = model_cost(model)
        row = dict(model=args.model, method=parse_spec(spec)[0], reduce=spec, ratio=ratio,
                   token_ratio=cost["reduction_ratio"], gflops_paper=cost["gflops_paper"],
                   gflops_full=cost["gflops_full"], batch_size=args.batch_size, dtype=args.dtype,
                   device=args.device, threads=torch.get_num_threads())
        row.update(measure(model, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                           warmup=args.warmup, repeats=args.repeats))
        rows.append(row)
    base = next((r["img_s"] for r in rows if r["ratio"] == 0), rows[0]["img_s"])
    for r in rows:
        r["speedup"] = r["img_s"] / base
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    method = next((r["method"] for r in rows if r["method"] != NONE), NONE)
    print(f"# {args.model}, {method}, batch {args.batch_size}, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| ratio | mean-token ratio | GFLOPs (paper) | GFLOPs (full) | img/s (min-max) | speed-up "
          "| reduction share | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"| {r['ratio']:.2f} | {r['token_ratio']:.3f} | {r['gflops_paper']:.2f} | {r['gflops_full']:.2f} "
              f"| {r['img_s']:.1f} ({r['img_s_min']:.1f}-{r['img_s_max']:.1f}) | {r['speedup']:.2f}x "
              f"| {100 * r['reduce_share']:.1f}% | {peak} |")
    return 0
