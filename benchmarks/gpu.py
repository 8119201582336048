"""GPU benchmark: the scan backends, vim_small inference with R-MeeTo, one re-training step.

Usage:  python benchmarks/gpu.py [--repeats 10] [--budget 450] [--skip-sweep] [--json OUT]
        python benchmarks/gpu.py --smoke        # tiny shapes on any device: checks the script
        python benchmarks/gpu.py --cpu-check    # without CUDA: the Triton kernels in Triton's
                                                # interpreter on a tiny CPU problem

Prints markdown tables (meant to finish within 8 minutes on one H100/H200; sections past
``--budget`` seconds are skipped with a note):

1. the selective scan (``triton``, ``chunked``, ``mamba_ssm`` when importable, ``reference`` at
   the small size only): forward and forward+backward milliseconds, peak memory of the
   forward+backward above its inputs, and the largest relative error against the reference
   at the small size; shapes: Vim-S (d_inner 768 = expand 2 x 384, d_state 16, L 197) at
   batch 8 and 128, VideoMamba-S (L 1569 = 8 frames x 196 + 1) at batch 16;
2. a sweep of the Triton block sizes at Vim-S batch 128 (to tune ``vimerge.ops.triton``);
3. vim_small inference at batch 128 (the R-MeeTo Table 12 protocol: warm-up, then
   synchronised wall-clock timing, median), fp32 and fp16/bf16 autocast, R-MeeTo at the
   mean-token reduction ratios 0, 0.14, 0.31, 0.54 (``vimerge.apply(model, "rmeeto:ratio=X")``):
   images/s, speed-up against ratio 0, peak memory and the merge's share of the time (CUDA
   events around every ``reduce`` call in a separate, instrumented forward, over the whole
   forward's events: the instrumented run does not synchronise inside the forward);
4. one re-training step of vim_small at batch 128 with ``rmeeto:r=11`` (AdamW, cross-entropy,
   bf16 autocast and fp32): images/s and peak memory.

Models have random weights (speed does not depend on them). Without CUDA (and without
``--smoke``) the script prints "no CUDA: GPU benchmarks skipped" and exits 0.
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
import torch.nn.functional as F

import vimerge
from vimerge.ops import available_backends, resolve_backend, selective_scan
from vimerge.ops import triton as triton_scan

VIM_S = dict(d=768, n=16, L=197)
VIDEOMAMBA_S = dict(d=768, n=16, L=1569)
RATIOS = (0.0, 0.14, 0.31, 0.54)


class Device:
    """Timing and memory on one device: CUDA synchronisation and allocator peaks, or the CPU
    (``--smoke``), where peaks are not reported."""

    def __init__(self, name: str):
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> float:
        """Reset the peak counter; returns the memory allocated now (MiB)."""
        if not self.cuda:
            return 0.0
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.dev)
        return torch.cuda.memory_allocated(self.dev) / 2**20

    def peak(self, base: float) -> float | None:
        if not self.cuda:
            return None
        self.sync()
        return torch.cuda.max_memory_allocated(self.dev) / 2**20 - base

    def median_s(self, fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def event(self):
        """A point in time on the device's stream (CUDA event) or of the host clock."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def between(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def over(self, section: str) -> bool:
        if self.left() <= 0:
            print(f"\n({section}: skipped, the {self.seconds:.0f} s budget is spent)")
            return True
        return False


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return "out of memory" if "out of memory" in text.lower() else text[:120]


# ---- 1-2: the scan -------------------------------------------------------------------------

def scan_inputs(b: int, d: int, n: int, L: int, dev: Device, seed: int = 0) -> dict:
    g = torch.Generator(device=dev.dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=dev.dev)  # noqa: E731
    return dict(u=r(b, d, L), delta=r(b, d, L) * 0.5,
                A=-(torch.rand(d, n, generator=g, device=dev.dev) * 4 + 0.1),
                B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.5 - 2)


def scan_row(fn, shape: dict, dev: Device, repeats: int, ref: torch.Tensor | None = None) -> dict:
    """Forward and forward+backward time of ``fn(**inputs)``, peak memory, error vs ``ref``."""
    x = scan_inputs(**shape, dev=dev)
    with torch.no_grad():
        out = fn(**x)
        err = None if ref is None else ((out - ref).abs().max() / ref.abs().max()).item()
        fwd = dev.median_s(lambda: fn(**x), repeats)
    del out
    xg = {k: v.clone().requires_grad_() for k, v in x.items()}

    def fwd_bwd() -> None:
        for t in xg.values():
            t.grad = None
        fn(**xg).sum().backward()

    fwd_bwd()                                  # compile / warm up before the peak is taken
    for t in xg.values():
        t.grad = None
    base = dev.reset_peak()
    fwd_bwd()
    peak = dev.peak(base)
    fb = dev.median_s(fwd_bwd, repeats, warmup=0)
    return dict(fwd_ms=fwd * 1e3, fwd_bwd_ms=fb * 1e3, peak_mb=peak, rel_err=err)


def scan_section(dev: Device, args, budget: Budget, rows: list) -> None:
    names = [b for b in ("triton", "mamba_ssm", "chunked") if b in available_backends(dev.dev.type)]
    missing = {b: _why(b, dev) for b in ("triton", "mamba_ssm") if b not in names}
    shapes = [("Vim-S", dict(b=8, **VIM_S)), ("Vim-S", dict(b=128, **VIM_S)),
              ("VideoMamba-S", dict(b=16, **VIDEOMAMBA_S))]
    if args.smoke:
        shapes = [("tiny", dict(b=2, d=16, n=4, L=37)), ("tiny", dict(b=4, d=16, n=4, L=37)),
                  ("tiny-long", dict(b=1, d=16, n=4, L=300))]
    print(f"\n## Selective scan (fp32 inputs, softplus, D, z; {args.repeats} repeats, median)")
    for name, why in missing.items():
        print(f"- `{name}` not run: {why}")
    print("\n| shape | backend | forward ms | fwd+bwd ms | peak MiB fwd+bwd | fwd+bwd vs chunked "
          "| rel. error vs reference |")
    print("|---|---|---|---|---|---|---|")
    for i, (label, shape) in enumerate(shapes):
        if budget.over(f"scan at {label} {shape}"):
            return
        x = scan_inputs(**shape, dev=dev)
        ref = None
        backends = list(names)
        if i == 0:   # the reference loop only at the small size (it is the accuracy yardstick)
            with torch.no_grad():
                ref = selective_scan(**x, delta_softplus=True, backend="reference")
            backends.append("reference")
        del x
        results = {}
        for b in backends:
            fn = lambda b=b, **x: selective_scan(**x, delta_softplus=True, backend=b)  # noqa: E731
            try:
                results[b] = scan_row(fn, shape, dev, args.repeats, ref)
            except Exception as exc:  # OOM, a compile failure: one row, not the whole run
                results[b] = dict(error=_error(exc))
            if dev.cuda:
                torch.cuda.empty_cache()
        base = results.get("chunked", {}).get("fwd_bwd_ms")
        for b, r in results.items():
            rows.append(dict(section="scan", shape=label, **shape, backend=b, **r))
            desc = f"{label} b{shape['b']} L{shape['L']}"
            if "error" in r:
                print(f"| {desc} | {b} | {r['error']} ||||| ")
                continue
            vs = base / r["fwd_bwd_ms"] if base else None
            print(f"| {desc} | {b} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {_fmt(r['peak_mb'], '.0f')} "
                  f"| {_fmt(vs, '.1f')}x | {_fmt(r['rel_err'], '.1e')} |")


def _why(backend: str, dev: Device) -> str:
    try:
        resolve_backend(backend, dev.dev)
    except Exception as exc:
        return str(exc)
    return "usable"


def sweep_section(dev: Device, args, budget: Budget, rows: list) -> None:
    if "triton" not in available_backends(dev.dev.type) or args.skip_sweep:
        return
    shape = dict(b=4, d=64, n=16, L=197) if args.smoke else dict(b=128, **VIM_S)
    print(f"\n## Triton block sizes (scan at b{shape['b']} L{shape['L']}; default "
          f"block_d={triton_scan.BLOCK_D}, block_t={triton_scan.BLOCK_T})\n")
    print("| block_d | block_t | forward ms | fwd+bwd ms | peak MiB fwd+bwd |")
    print("|---|---|---|---|---|")
    for bd, bt in ((16, 16), (32, 16), (16, 32), (8, 32), (32, 8)):
        if budget.over("the rest of the block sweep"):
            return
        fn = lambda bd=bd, bt=bt, **x: triton_scan.selective_scan_triton(  # noqa: E731
            **x, delta_softplus=True, block_d=bd, block_t=bt)
        try:
            r = scan_row(fn, shape, dev, args.repeats)
        except Exception as exc:
            r = dict(error=_error(exc))
        rows.append(dict(section="sweep", block_d=bd, block_t=bt, **r))
        if "error" in r:
            print(f"| {bd} | {bt} | {r['error']} |||")
        else:
            print(f"| {bd} | {bt} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {_fmt(r['peak_mb'], '.0f')} |")


# ---- 3: inference --------------------------------------------------------------------------

def _model(args, dev: Device):
    overrides = dict(depth=12, img_size=64) if args.smoke else {}
    return vimerge.create_model("vim_small", **overrides).to(dev.dev).eval()


def _amp(dtype: str, dev: Device):
    if dtype == "fp32":
        return torch.autocast(dev.dev.type, enabled=False)
    return torch.autocast(dev.dev.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])


def infer_row(model, images: torch.Tensor, dtype: str, dev: Device, repeats: int) -> dict:
    """Images/s of the forward (no instrumentation), peak memory, and the merge's time share."""
    def run() -> None:
        with torch.inference_mode(), _amp(dtype, dev):
            model(images)

    run()                                      # compile / warm up
    base = dev.reset_peak()
    run()
    peak = dev.peak(base)
    sec = dev.median_s(run, repeats)
    share = None
    reducer = model.reduction
    if reducer is not None:                    # separate instrumented forwards
        marks: list = []
        inner = reducer.reduce

        def timed(state, m):
            start = dev.event()
            out = inner(state, m)
            marks.append((start, dev.event()))
            return out

        reducer.reduce = timed
        try:
            shares = []
            for _ in range(3):
                marks.clear()
                start = dev.event()
                run()
                end = dev.event()
                dev.sync()
                total = dev.between(start, end)
                shares.append(sum(dev.between(a, b) for a, b in marks) / total)
            share = statistics.median(shares)
        finally:
            reducer.reduce = inner
    return dict(img_s=images.shape[0] / sec, batch_ms=sec * 1e3, peak_mb=peak, merge_share=share)


def infer_section(dev: Device, args, budget: Budget, rows: list) -> None:
    batch = 2 if args.smoke else args.batch
    dtypes = ["fp32", "fp16", "bf16"] if dev.cuda else ["fp32", "bf16"]
    model = _model(args, dev)
    images = torch.randn(batch, 3, *model.img_size, device=dev.dev)
    scan = resolve_backend("auto", dev.dev).name
    print(f"\n## vim_small inference, batch {batch} (scan backend: auto = `{scan}`; "
          f"{args.repeats} repeats, median)\n")
    print("| precision | ratio | tokens per block (mean) | img/s | ms / batch | speed-up vs ratio 0 "
          "| merge share of the time | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        base_img_s = None
        for ratio in RATIOS:
            if budget.over(f"inference {dtype} ratio {ratio} and after"):
                return
            mean_tokens = None
            try:
                if ratio:
                    vimerge.apply(model, f"rmeeto:ratio={ratio}")
                else:
                    vimerge.remove(model)
                counts = vimerge.token_counts(model)
                mean_tokens = sum(counts) / len(counts)
                r = infer_row(model, images, dtype, dev, args.repeats)
            except Exception as exc:
                r = dict(error=_error(exc))
            rows.append(dict(section="inference", dtype=dtype, ratio=ratio, batch=batch,
                             mean_tokens=mean_tokens, **r))
            if "error" in r:
                print(f"| {dtype} | {ratio} | {_fmt(mean_tokens, '.1f')} | {r['error']} |||||")
                continue
            base_img_s = r["img_s"] if ratio == 0 else base_img_s
            speed = r["img_s"] / base_img_s if base_img_s else None
            print(f"| {dtype} | {ratio} | {mean_tokens:.1f} | {r['img_s']:.0f} | {r['batch_ms']:.1f} "
                  f"| {_fmt(speed, '.2f')}x | {_fmt(r['merge_share'], '.1%')} | {_fmt(r['peak_mb'], '.0f')} |")
            if dev.cuda:
                torch.cuda.empty_cache()
    vimerge.remove(model)


# ---- 4: re-training step -------------------------------------------------------------------

def train_section(dev: Device, args, budget: Budget, rows: list) -> None:
    batch = 2 if args.smoke else args.batch
    amp = "bf16" if (not dev.cuda or torch.cuda.is_bf16_supported()) else "fp16"
    print(f"\n## One re-training step of vim_small, batch {batch}, rmeeto:{'r=2' if args.smoke else 'r=11'} "
          f"(AdamW, cross-entropy, random data; median of {max(3, args.repeats // 2)} steps)\n")
    print("| precision | img/s | s / step | peak MiB |")
    print("|---|---|---|---|")
    for dtype in (amp, "fp32"):
        if budget.over(f"training step {dtype} and after"):
            return
        try:
            r = train_row(args, dev, batch, dtype)
        except Exception as exc:
            r = dict(error=_error(exc))
        rows.append(dict(section="train", dtype=dtype, batch=batch, **r))
        if "error" in r:
            print(f"| {dtype} | {r['error']} |||")
        else:
            print(f"| {dtype} autocast | {r['img_s']:.0f} | {r['step_s']:.3f} | {_fmt(r['peak_mb'], '.0f')} |"
                  if dtype != "fp32" else
                  f"| fp32 | {r['img_s']:.0f} | {r['step_s']:.3f} | {_fmt(r['peak_mb'], '.0f')} |")
        if dev.cuda:
            torch.cuda.empty_cache()


def train_row(args, dev: Device, batch: int, dtype: str) -> dict:
    model = _model(args, dev).train()
    r = "r=2" if args.smoke else "r=11"
    vimerge.apply(model, f"rmeeto:{r}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(dev.dev.type) if dtype == "fp16" else None
    images = torch.randn(batch, 3, *model.img_size, device=dev.dev)
    labels = torch.randint(0, model.num_classes, (batch,), device=dev.dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _amp(dtype, dev):
            loss = F.cross_entropy(model(images).float(), labels)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    step()                                     # compile, AdamW state
    base = dev.reset_peak()
    step()
    peak = dev.peak(base)
    sec = dev.median_s(step, max(3, args.repeats // 2), warmup=0)
    return dict(img_s=batch / sec, step_s=sec, peak_mb=peak)


# ---- without CUDA ---------------------------------------------------------------------------

CPU_CHECK = """
import time, torch
from vimerge.ops import selective_scan
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)
x = dict(u=r(2, 4, 45), delta=r(2, 4, 45) * 0.5, A=-(torch.rand(4, 4, generator=g) * 4 + 0.1),
         B=r(2, 4, 45), C=r(2, 4, 45), D=r(4), z=r(2, 4, 45), delta_bias=r(4))
xs = [{k: v.clone().requires_grad_() for k, v in x.items()} for _ in range(2)]
start = time.perf_counter()
outs = [selective_scan(**xi, delta_softplus=True, backend=b) for xi, b in zip(xs, ("triton", "reference"))]
for o in outs:
    o.square().sum().backward()
err = (outs[0] - outs[1]).abs().max() / outs[1].abs().max()
gerr = max(((xs[0][k].grad - xs[1][k].grad).abs().max() / xs[1][k].grad.abs().max()).item() for k in x)
print(f"triton (interpreter) vs reference at b2 d4 n4 L45: output {err:.1e}, gradients {gerr:.1e} "
      f"(max relative error), {time.perf_counter() - start:.1f} s")
assert err < 1e-5 and gerr < 1e-4
"""


def cpu_check() -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", CPU_CHECK], env=env, capture_output=True, text=True)
    print(proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])
    return proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds after which the remaining sections are skipped")
    p.add_argument("--skip-sweep", action="store_true", help="no Triton block-size sweep")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the available device (CUDA or CPU): checks the script itself")
    p.add_argument("--cpu-check", action="store_true",
                   help="without CUDA: run the Triton kernels in the interpreter on a tiny problem")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA: GPU benchmarks skipped (run on a machine with a CUDA GPU; "
              "--smoke checks the script on this device, --cpu-check the Triton kernels)")
        return cpu_check() if args.cpu_check else 0
    dev = Device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 rows are fp32
    torch.backends.cudnn.allow_tf32 = False
    budget = Budget(args.budget)
    name = torch.cuda.get_device_name(dev.dev) if dev.cuda else "CPU (smoke run)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    print(f"# vimerge GPU benchmark: {name}, torch {torch.__version__}, triton {triton_version}, "
          f"vimerge {vimerge.__version__} (fp32 without TF32)")
    rows: list = []
    torch.manual_seed(0)
    scan_section(dev, args, budget, rows)
    sweep_section(dev, args, budget, rows)
    infer_section(dev, args, budget, rows)
    train_section(dev, args, budget, rows)
    print(f"\n(total {time.perf_counter() - budget.start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, rows=rows), f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
