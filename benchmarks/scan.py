"""Selective-scan benchmark: every backend against the reference loop, plus whole-model figures.

Usage:  python benchmarks/scan.py [--threads 2] [--repeats 5] [--skip-model] [--json OUT]

Scan shapes are Vim-S's (batch 8, d_inner 768, d_state 16, L 197), fp32. Each row runs in a
fresh subprocess so that peak memory (resident-set high-water mark above the inputs, read from
/proc after resetting it) is not polluted by the other rows or by JIT compilation, which is
done on a tiny problem first. Times are medians of ``--repeats`` runs after one warm-up.
Model figures: vim_tiny inference images/s at batch 32, and one AdamW training step of
vim_small at batch 8 (time and peak memory), for the default backend and the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from vimerge.measure.memory import reset_peak as _reset_peak
from vimerge.measure.memory import rss_mb as _rss_mb

SCAN_SHAPE = dict(b=8, d=768, n=16, L=197)


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), (max(times) - min(times))


def _mambapy_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The same selective scan computed with mambapy's parallel scan (pscan)."""
    import torch.nn.functional as F
    from mambapy.pscan import pscan
    delta = delta + delta_bias[:, None]
    delta = F.softplus(delta) if delta_softplus else delta
    dA = torch.exp(delta.transpose(1, 2).unsqueeze(-1) * A)                     # (b, L, d, n)
    dBu = (delta * u).transpose(1, 2).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)
    hs = pscan(dA, dBu)                                                         # (b, L, d, n)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2) + D[:, None] * u
    return y * F.silu(z)


def scan_row(backend: str, repeats: int) -> dict:
    """Time one backend (run inside its own subprocess)."""
    from vimerge.ops import selective_scan
    from vimerge.ops.numba_cpu import jit_stats

    def make(b, d, n, L, grad=False):
        g = torch.Generator().manual_seed(0)
        x = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) * 0.5,
                 A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
                 B=torch.randn(b, n, L, generator=g), C=torch.randn(b, n, L, generator=g),
                 D=torch.ones(d), z=torch.randn(b, d, L, generator=g), delta_bias=torch.randn(d, generator=g) - 2)
        return {k: v.requires_grad_(grad) for k, v in x.items()}

    run = (lambda **x: _mambapy_scan(**x, delta_softplus=True)) if backend == "mambapy" else \
        (lambda **x: selective_scan(**x, delta_softplus=True, backend=backend))
    first = time.perf_counter()
    tiny = make(2, 4, 16, 9, grad=True)
    run(**tiny).sum().backward()
    first_call_s = time.perf_counter() - first
    xg = make(**SCAN_SHAPE, grad=True)

    def fwd_bwd():
        for t in xg.values():
            t.grad = None
        run(**xg).sum().backward()

    # peak first: once full-size buffers have been freed, the allocator keeps them resident
    # and a later high-water mark would miss them
    base = _rss_mb("VmRSS")
    exact = _reset_peak()
    fwd_bwd()
    peak = _rss_mb("VmHWM") - base
    fb, fb_spread = _median_ms(fwd_bwd, repeats)
    x = make(**SCAN_SHAPE)
    with torch.no_grad():
        fwd, fwd_spread = _median_ms(lambda: run(**x), repeats)
    return dict(backend=backend, fwd_ms=fwd, fwd_spread_ms=fwd_spread, fwd_bwd_ms=fb,
                fwd_bwd_spread_ms=fb_spread, peak_mb=peak if exact else None,
                first_call_s=first_call_s, jit=jit_stats() if backend == "numba" else {})


def model_row(backend: str, repeats: int) -> dict:
    """vim_tiny inference (batch 32) and a vim_small AdamW step (batch 8) with one backend.

    The peak of the training step is that of the first step in this process (after kernels
    were compiled on a tiny model), so it includes the AdamW state and the gradients.
    """
    import torch.nn.functional as F

    from vimerge import create_model
    torch.manual_seed(0)
    warm = create_model("vim_tiny", depth=1, img_size=32, scan_backend=backend)
    F.cross_entropy(warm(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    small = create_model("vim_small", scan_backend=backend).train()
    opt = torch.optim.AdamW(small.parameters(), lr=1e-4)
    batch, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(small(batch), labels).backward()
        opt.step()

    base = _rss_mb("VmRSS")
    exact = _reset_peak()
    step()
    peak = (_rss_mb("VmHWM") - base) if exact else None
    step_ms, _ = _median_ms(step, max(1, repeats // 2))
    tiny = create_model("vim_tiny", scan_backend=backend).eval()
    images = torch.randn(32, 3, 224, 224)
    with torch.no_grad():
        infer_ms, _ = _median_ms(lambda: tiny(images), max(1, repeats // 2))
    return dict(backend=backend, tiny_infer_img_s=32 / (infer_ms / 1e3), small_step_s=step_ms / 1e3,
                small_step_peak_mb=peak)


def _in_subprocess(kind: str, backend: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_row", kind, backend, "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(backend=backend, error=(out.stderr.strip().splitlines() or ["killed"])[-1]
                    + f" (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", default="reference,recompute,numba,chunked,mambapy")
    p.add_argument("--model-backends", default="numba,recompute,reference")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--_row", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._row:
        kind, backend = args._row
        print(json.dumps((scan_row if kind == "scan" else model_row)(backend, args.repeats)))
        return

    print(f"# selective scan, Vim-S shapes {SCAN_SHAPE}, fp32, {args.threads} threads, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    rows = [_in_subprocess("scan", b, args) for b in args.backends.split(",")]
    ref = next((r for r in rows if r["backend"] == "reference" and "error" not in r), None)
    print("| backend | forward ms | fwd+bwd ms | peak MB fwd+bwd | fwd speed-up | fwd+bwd speed-up "
          "| memory vs ref | first call s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | error: {r['error']} |||||||")
            continue
        sp = (lambda key: ref[key] / r[key]) if ref else (lambda key: None)
        mem = (r["peak_mb"] / ref["peak_mb"]) if ref and r["peak_mb"] and ref["peak_mb"] else None
        print(f"| {r['backend']} | {r['fwd_ms']:.1f} ± {r['fwd_spread_ms'] / 2:.1f} "
              f"| {r['fwd_bwd_ms']:.1f} ± {r['fwd_bwd_spread_ms'] / 2:.1f} | {_fmt(r['peak_mb'], '.0f')} "
              f"| {_fmt(sp('fwd_ms'), '.2f')}x | {_fmt(sp('fwd_bwd_ms'), '.2f')}x "
              f"| {_fmt(mem, '.3f')} | {r['first_call_s']:.1f} |")
    if not args.skip_model:
        print("\n# whole models (random weights and data), fp32")
        print("| scan backend | vim_tiny inference img/s (batch 32) | vim_small train step s (batch 8) "
              "| peak MB of the first step |")
        print("|---|---|---|---|")
        for b in args.model_backends.split(","):
            r = _in_subprocess("model", b, args)
            rows.append(dict(r, kind="model"))
            if "error" in r:
                print(f"| {b} | error: {r['error']} |||")
            else:
                print(f"| {b} | {r['tiny_infer_img_s']:.1f} | {r['small_step_s']:.2f} "
                      f"| {_fmt(r['small_step_peak_mb'], '.0f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
