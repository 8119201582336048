"""VideoMamba on clips: throughput unreduced and with R-MeeTo (Table 13's r = 88), and what the
merge itself costs.

Usage:  python benchmarks/video.py [--model videomamba_tiny_k400] [--frames 8] [--batch-sizes 1,2]
                                   [--r 88] [--repeats 3] [--threads 2] [--json OUT]

Random weights and clips (no download), fp32, eval mode, the default scan backend. For each batch
size, the unreduced model and ``rmeeto:r=R`` are warmed up, then timed in ``--repeats``
interleaved rounds of one forward each (:func:`vimerge.measure.bench.measure`), so that another
process's busy spell on a shared machine slows both alike; the table gives the fastest round
(and the median), and for the fastest round the share of the time spent inside the reducer's
``reduce`` (matching + merging of both streams).
A second table times one R-MeeTo step on 1569 tokens of width 192 (the first merge of
videomamba_tiny at 8 frames): the matching (:func:`~vimerge.reduce.rmeeto.bipartite_plan`) and
the merge (:func:`~vimerge.tokens.merge_state`), fastest of 30 calls. The paper counts the
matching in its FLOPs; the column "matching FLOPs" is that part of the reduced model's count.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vimerge
from vimerge.measure.bench import measure
from vimerge.reduce.rmeeto import bipartite_plan
from vimerge.tokens import TokenState, input_shape, merge_state


def fastest_ms(fn, calls: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def model_rows(args) -> list[dict]:
    model = vimerge.create_model(args.model, num_frames=args.frames).eval()
    specs = ["none", f"rmeeto:r={args.r}"]
    rows = []
    for batch in args.batch_sizes:
        runs: dict[str, list[dict]] = {spec: [] for spec in specs}
        for spec in specs:                      # one-time costs (compilation, allocator growth) first
            vimerge.apply(model, spec)
            measure(model, batch_size=batch, warmup=1, repeats=1)
        for _ in range(args.repeats):           # interleaved rounds: a busy spell hits both alike
            for spec in specs:
                vimerge.apply(model, spec)
                runs[spec].append(measure(model, batch_size=batch, warmup=0, repeats=1))
        base = None
        for spec in specs:
            reducer = vimerge.apply(model, spec)
            counts = vimerge.token_counts(model)
            total = vimerge.count_flops(model)
            matching = reducer.flops(counts, model.num_tokens, model.embed_dim) if reducer is not None else 0.0
            ms = sorted(r["batch_ms"] for r in runs[spec])
            best = min(runs[spec], key=lambda r: r["batch_ms"])
            base = base or ms[0]
            rows.append(dict(model=args.model, frames=args.frames, batch=batch, reduce=spec, tokens_last=counts[-1],
                             gflops=total / 1e9, matching_flops_share=matching / total,
                             clips_s=batch * 1e3 / ms[0], clips_s_median=batch * 1e3 / ms[len(ms) // 2],
                             ms_per_clip=ms[0] / batch, speedup=base / ms[0], reduce_share=best["reduce_share"],
                             peak_mb=best["peak_mb"]))
    vimerge.remove(model)
    return rows


def step_rows(args) -> list[dict]:
    rows = []
    n, width = 1 + 196 * args.frames, 192
    for batch in args.batch_sizes:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(batch, n, width, generator=g)
        state = TokenState(hidden, torch.randn(batch, n, width, generator=g), torch.ones(batch, n, 1), 0)
        plan_ms = fastest_ms(lambda: bipartite_plan(hidden, 0, args.r))
        plan = bipartite_plan(hidden, 0, args.r)

        def merge():
            plan.gather = None              # the per-step index work counted too
            merge_state(state, plan)
        rows.append(dict(batch=batch, tokens=n, width=width, r=args.r, matching_ms=plan_ms, merge_ms=fastest_ms(merge)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="videomamba_tiny_k400")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2])
    p.add_argument("--r", type=int, default=88)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = vimerge.create_model(args.model, num_frames=args.frames)
    print(f"# {args.model}, {args.frames} frames ({model.num_tokens} tokens, input {input_shape(model, 1)[1:]}), "
          f"fp32, cpu, {torch.get_num_threads()} threads, scan backend {model.scan_backend}, torch {torch.__version__}")
    rows = model_rows(args)
    print("| batch | reduction | tokens (last block) | GFLOPs (paper) | matching FLOPs | clips/s best (median) "
          "| ms/clip | speed-up | reduce share of time | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"| {r['batch']} | `{r['reduce']}` | {r['tokens_last']} | {r['gflops']:.2f} | "
              f"{100 * r['matching_flops_share']:.1f}% | {r['clips_s']:.2f} ({r['clips_s_median']:.2f}) "
              f"| {r['ms_per_clip']:.0f} | {r['speedup']:.2f}x | {100 * r['reduce_share']:.1f}% | {peak} |")
    steps = step_rows(args)
    print()
    print("| batch | tokens | width | r | matching ms | merge ms (hidden + residual + sizes) |")
    print("|---|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['batch']} | {s['tokens']} | {s['width']} | {s['r']} | {s['matching_ms']:.2f} | {s['merge_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": rows, "steps": steps}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
