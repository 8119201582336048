"""Throughput of a Vim at several reduction ratios: the R-MeeTo paper's Table 12, on any machine.

``vimerge bench --model vim_small --ratios 0,0.14,0.28,0.31,0.42,0.54 [--method rmeeto]``
times the forward pass on random images (warm-up, then repeated timed runs; median and
spread), and reports images/s, the speed-up over the unreduced model, FLOPs, peak memory and
the share of the time spent in the reduction itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .memory import reset_peak, rss_mb, trim_heap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ReduceTimer:
    """Wraps a reducer's ``reduce`` to add up the time spent in it."""

    def __init__(self, reducer, device: torch.device):
        self.reducer, self.device, self.seconds = reducer, device, 0.0
        self.inner = reducer.reduce

        def timed(state, model):
            _sync(device)
            start = time.perf_counter()
            out = self.inner(state, model)
            _sync(device)
            self.seconds += time.perf_counter() - start
            return out

        reducer.reduce = timed

    def restore(self) -> None:
        self.reducer.reduce = self.inner


def measure(model, *, batch_size: int, dtype: str = "fp32", device: str = "cpu", warmup: int = 1,
            repeats: int = 5) -> dict:
    """Time ``model`` (with its active reduction) on random images; returns one table row."""
    dev = torch.device(device)
    conv = model.patch_embed.proj
    images = torch.randn(batch_size, conv.in_channels, *model.patch_embed.img_size, device=dev)
    autocast = torch.autocast(dev.type, dtype=DTYPES[dtype]) if dtype != "fp32" else None
    timer = _ReduceTimer(model.reduction, dev) if model.reduction is not None else None

    def run() -> None:
        with torch.inference_mode():
            if autocast is not None:
                with autocast:
                    model(images)
            else:
                model(images)
        _sync(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trim_heap()
    base = rss_mb("VmRSS") if dev.type == "cpu" else None
    exact = dev.type == "cpu" and reset_peak()
    for _ in range(warmup):
        run()
    if timer is not None:
        timer.seconds = 0.0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if timer is not None:
        reduce_share = timer.seconds / sum(times)
        timer.restore()
    else:
        reduce_share = 0.0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = (rss_mb("VmHWM") - base) if exact and base is not None else None
    med = statistics.median(times)
    return dict(img_s=batch_size / med, img_s_min=batch_size / max(times), img_s_max=batch_size / min(times),
                batch_ms=med * 1e3, reduce_share=reduce_share, peak_mb=peak)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--ratios", default="0,0.14,0.28,0.31,0.42,0.54",
                   help="comma-separated reduction ratios (0 = unreduced)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_bench(args: argparse.Namespace) -> int:
    from ..cli import build_model, reduction_from_args
    from ..reduce import apply, remove, token_counts
    from .flops import count_flops

    args.ratio, args.r = None, None
    method = reduction_from_args(args)[0]
    method = "rmeeto" if method == "none" else method
    model = build_model(args).to(args.device)
    n0 = model.num_patches + 1
    rows = []
    ratios = [float(x) for x in args.ratios.split(",")]
    for ratio in ratios:
        remove(model)
        if ratio > 0:
            args.ratio = ratio
            _, options = reduction_from_args(argparse.Namespace(**{**vars(args), "method": method}))
            apply(model, method, **options)
        counts = token_counts(model)
        row = dict(model=args.model, method=method if ratio > 0 else "none", ratio=ratio,
                   token_ratio=1 - sum(counts) / (len(counts) * n0),
                   gflops_paper=count_flops(model, "paper") / 1e9, gflops_full=count_flops(model, "full") / 1e9,
                   batch_size=args.batch_size, dtype=args.dtype, device=args.device, threads=torch.get_num_threads())
        row.update(measure(model, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                           warmup=args.warmup, repeats=args.repeats))
        rows.append(row)
    base = next((r["img_s"] for r in rows if r["ratio"] == 0), rows[0]["img_s"])
    for r in rows:
        r["speedup"] = r["img_s"] / base
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
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
