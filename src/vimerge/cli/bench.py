"""``vimerge bench``: images/s, speed-up, FLOPs and peak memory at several reduction ratios
(the R-MeeTo paper's Table 12 protocol, on this machine).

Every row is measured the same way, whatever its place in the table: all rows are built and
checked first (an unreachable ratio fails before any timing), every row's model runs once
untimed (one-time costs: kernel compilation, allocator growth), then each row is warmed up
again, its peak-memory counter reset, and timed (see :func:`vimerge.measure.bench.measure`).
The default ratios are the paper's, less those the model cannot reach (said on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vimerge.measure.bench import DTYPES, measure, warm_up
from vimerge.measure.flops import model_cost
from vimerge.reduce import NONE, apply, parse_spec

from .common import (
    CommandError,
    build_model,
    device_arg,
    given_options,
    merge_options,
    positive_int,
    reduction_spec,
)

DEFAULT_RATIOS = (0.0, 0.14, 0.28, 0.31, 0.42, 0.54)   # R-MeeTo Table 12

AMOUNTS = ("r", "ratio", "final_ratio")   # options that set how much is reduced: --ratios does here

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
    g.add_argument("--ratios", type=_ratios, default=None,
                   help="comma-separated mean-token reduction ratios, 0 = unreduced (default: "
                        f"{','.join(f'{r:g}' for r in DEFAULT_RATIOS)}, less those the model cannot reach)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="images per forward")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32: none)")
    g.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:N (default: auto: cuda when available)")
    g.add_argument("--warmup", type=int, default=1, help="untimed forwards before each row's timing")
    g.add_argument("--repeats", type=positive_int, default=5, help="timed forwards per row (median, min-max)")
    g.add_argument("--json", action="store_true", help="print the rows as JSON")


def _reachable(model, spec: str) -> str | None:
    """None when ``model`` can run ``spec``, else why not (the library's message)."""
    try:
        apply(model, spec)
        model_cost(model)
    except ValueError as exc:
        return str(exc)
    finally:
        apply(model, NONE)
    return None


def row_specs(args: argparse.Namespace, model=None) -> list[str]:
    """One spec per ratio: the arguments' method (default rmeeto) and options at each ratio.

    With ``model``, every row is checked against it: an unreachable ratio the user gave is an
    error; an unreachable default ratio is left out with a note on stderr. Sets
    ``args.ratios`` to the ratios kept.
    """
    flags = given_options(args)
    if any(k in flags for k in AMOUNTS):
        raise CommandError("bench sets the amount from --ratios: drop --r/--ratio/--final-ratio")
    if args.reduce is None and args.method is None:
        name, options = "rmeeto", {}
    else:
        name, options = parse_spec(reduction_spec(args))
    if name == NONE:
        raise CommandError("bench compares reductions: give --method or --reduce (default: rmeeto)")
    options = {k: v for k, v in options.items() if k not in AMOUNTS}
    given = args.ratios is not None
    ratios = list(args.ratios) if given else list(DEFAULT_RATIOS)
    specs = [NONE if ratio == 0 else merge_options(name, {**options, "ratio": ratio}, flags) for ratio in ratios]
    if model is not None:
        kept, dropped = [], []
        for ratio, spec in zip(ratios, specs):
            why = _reachable(model, spec)
            if why is None:
                kept.append((ratio, spec))
            elif given:
                raise CommandError(f"--ratios: {ratio:g} ({spec}): {why}")
            else:
                dropped.append(f"{ratio:g}")
        if dropped:
            print(f"vimerge bench: note: default ratio(s) {', '.join(dropped)} out of reach for {args.model} "
                  f"with {name}; left out (give --ratios to choose)", file=sys.stderr)
        ratios, specs = [r for r, _ in kept], [s for _, s in kept]
    args.ratios = ratios
    return specs


def run(args: argparse.Namespace) -> int:
    model = build_model(args, NONE).to(args.device)
    specs = row_specs(args, model)      # every row checked before any timing
    for spec in specs:                  # one-time costs (compilation, allocator growth) out of every row
        apply(model, spec)
        warm_up(model, batch_size=args.batch_size, dtype=args.dtype, device=args.device)
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
        print(f"| {r['ratio']:.2f} | {r['token_ratio']:.3f} | {r['gflops_paper']:.4g} | {r['gflops_full']:.4g} "
              f"| {r['img_s']:.1f} ({r['img_s_min']:.1f}-{r['img_s_max']:.1f}) | {r['speedup']:.2f}x "
              f"| {100 * r['reduce_share']:.1f}% | {peak} |")
    return 0
