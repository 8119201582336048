"""The fused CPU Mamba mixer (issue 24, item 1) against the step-by-step one, and Vim against DeiT.

Usage:  python benchmarks/mixer.py [--rounds 5] [--threads 2] [--fmnist-batch 256]
                                   [--small-batch 8] [--train-batch 8] [--json OUT]
                                   [--against REV] [--skip-paths]

Three comparisons, each timed in interleaved rounds (every configuration once per round, so a
busy spell of another process slows all of them alike; the order within a round turns every
round, so that no configuration always runs first); the tables give the fastest round, the
median in brackets, and ratios taken within a round (best and median over rounds):

1. forward img/s at ``--fmnist-batch`` of ``vim_fmnist`` (shipped weights) with the fused mixer
   (``mixer.fused = True``, the default on CPU), the step-by-step one, and ``deit_fmnist``
   (shipped weights) on the same 50 tokens;
2. ``vim_small`` (random weights, 224 px, 197 tokens) forward at ``--small-batch``, both paths;
3. one training step of ``vim_small`` at ``--train-batch`` (forward, cross-entropy, backward,
   AdamW step), both paths.

With ``--against REV`` (a git revision of this repository, e.g. ``38a3723``, the code on which
issue 24 was measured), a fourth table: the same workloads (vim_fmnist and deit_fmnist forward,
vim_small forward and training step, each model's default path) run by two worker processes,
one importing REV's ``src`` (from ``git archive``), one this checkout's ``src``, alternating
call by call in interleaved rounds (REV first in even rounds, second in odd ones); the speed-up
is taken within a round. This is the
comparison with the issue's "today's img/s": the same-round step-by-step path of tables 1-3
runs this checkout's (faster) scan kernels too. ``--skip-paths`` leaves out tables 1-3.

fp32, CPU, the default scan backend (numba). Peak memory: the rise of the resident set's
high-water mark above the resident set before the timed call, in the fastest round (Linux).
Compilation (numba, cached on disk after the first run) happens in an untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import vimerge
from vimerge.measure.memory import reset_peak, rss_mb, trim_heap


def set_fused(model, fused: bool) -> None:
    """Choose the mixer path of every block (True: the fused kernels)."""
    for block in model.layers:
        block.mixer.fused = fused


def timed(fn: Callable[[], None]) -> tuple[float, float | None]:
    """Seconds one call of ``fn`` takes, and its peak memory rise in MiB (None if unknown)."""
    trim_heap()
    base = rss_mb("VmRSS")
    exact = reset_peak()
    start = time.perf_counter()
    fn()
    sec = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    return sec, (peak - base) if exact and base is not None and peak is not None else None


def forward_fn(model, batch: int, fused: bool | None) -> Callable[[], None]:
    images = torch.randn(batch, model.in_chans, *model.img_size)

    def run() -> None:
        if fused is not None:
            set_fused(model, fused)
        with torch.inference_mode():
            model(images)
    return run


def train_fn(model, batch: int, fused: bool | None) -> Callable[[], None]:
    images = torch.randn(batch, model.in_chans, *model.img_size)
    labels = torch.randint(0, model.num_classes, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def run() -> None:
        if fused is not None:
            set_fused(model, fused)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    return run


def interleaved(configs: dict[str, Callable[[], None]], rounds: int,
                measure: Callable[[Callable], tuple[float, float | None]] = timed
                ) -> dict[str, list[tuple[float, float | None]]]:
    """``measure(fn)`` (seconds, peak MB) of every configuration once per round after one untimed
    call each; the order turns every round. ``measure`` defaults to :func:`timed` (this
    process); for a worker's call that times itself, pass ``lambda fn: fn()``."""
    for fn in configs.values():              # warm-up: compilation, allocator growth
        fn()
    runs: dict[str, list[tuple[float, float | None]]] = {k: [] for k in configs}
    names = list(configs)
    for i in range(rounds):                  # the order turns every round
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(measure(configs[name]))
    return runs


def summary(runs, batch: int) -> dict[str, dict]:
    out = {}
    for name, rs in runs.items():
        secs = [s for s, _ in rs]
        best = min(range(len(rs)), key=lambda i: secs[i])
        out[name] = dict(img_s=batch / secs[best], img_s_median=batch / statistics.median(secs),
                         ms=secs[best] * 1e3, peak_mb=rs[best][1], secs=secs)
    return out


def ratio(s: dict, num: str, den: str) -> tuple[float, float]:
    """Speed of ``num`` over ``den`` per round (time of den / time of num): best and median."""
    per = [b / a for a, b in zip(s[num]["secs"], s[den]["secs"])]
    return max(per), statistics.median(per)


def mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# ------------------------------------------------------------------ --against: another revision

WORKLOADS = ("vim_fmnist forward", "deit_fmnist forward", "vim_small forward", "vim_small training step")
REPO = Path(__file__).resolve().parents[1]


def worker() -> int:
    """``--worker``: build the workloads with the vimerge on ``sys.path`` (first stdin line: JSON
    with fmnist_batch, small_batch, train_batch, threads), then answer each workload name read
    from stdin with one timed call as a JSON line ``{"sec", "peak_mb"}``; "" ends."""
    opts = json.loads(sys.stdin.readline())
    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    small = vimerge.create_model("vim_small")
    fns = {"vim_fmnist forward": forward_fn(vimerge.create_model("vim_fmnist", pretrained=True).eval(),
                                            opts["fmnist_batch"], None),
           "deit_fmnist forward": forward_fn(vimerge.create_model("deit_fmnist", pretrained=True).eval(),
                                             opts["fmnist_batch"], None)}
    small_forward, small_train = forward_fn(small, opts["small_batch"], None), train_fn(small, opts["train_batch"], None)

    def forward() -> None:
        small.eval()
        small_forward()

    def train() -> None:
        small.train()
        small_train()
    fns |= {"vim_small forward": forward, "vim_small training step": train}
    print(json.dumps({"vimerge": vimerge.__file__}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        sec, peak = timed(fns[name])
        print(json.dumps({"sec": sec, "peak_mb": peak}), flush=True)
    return 0


class Worker:
    """A ``--worker`` process importing vimerge from ``src`` (a directory holding ``vimerge/``)."""

    def __init__(self, src: Path, opts: dict):
        env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=src,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(opts) + "\n")
        self.proc.stdin.flush()
        imported = Path(self._answer()["vimerge"]).resolve()
        if src.resolve() not in imported.parents:
            self.close()
            raise RuntimeError(f"the worker for {src} imported vimerge from {imported}")

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def time(self, name: str) -> tuple[float, float | None]:
        time.sleep(0.3)        # the other worker's idle threads stop spinning first
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        r = self._answer()
        return r["sec"], r["peak_mb"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def export_src(rev: str, into: str) -> Path:
    """``src`` of git revision ``rev`` of this repository, written under ``into``; raises
    SystemExit naming the problem when git cannot read the revision."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--against {rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return Path(into) / "src"


def against(rev: str, args) -> dict[str, dict]:
    """Table 4: every workload, revision ``rev`` against this checkout, interleaved call by call."""
    opts = dict(fmnist_batch=args.fmnist_batch, small_batch=args.small_batch, train_batch=args.train_batch,
                threads=args.threads)
    batches = dict(zip(WORKLOADS, (args.fmnist_batch, args.fmnist_batch, args.small_batch, args.train_batch)))
    with tempfile.TemporaryDirectory(prefix="vimerge-rev-") as tmp:
        workers = {rev: Worker(export_src(rev, tmp), opts), "this checkout": Worker(REPO / "src", opts)}
        try:
            out = {}
            for name in WORKLOADS:                # REV first in even rounds, second in odd ones
                runs = interleaved({k: partial(w.time, name) for k, w in workers.items()}, args.rounds,
                                   measure=lambda fn: fn())
                out[name] = summary(runs, batches[name])
        finally:
            for w in workers.values():
                w.close()
    print(f"\n| workload (each model's default path) | {rev} img/s | this checkout img/s | speed-up (same round): "
          f"best (median) | peak MB {rev} | peak MB this checkout |")
    print("|---|---|---|---|---|---|")
    for name, s in out.items():
        old, new = s[rev], s["this checkout"]
        print(f"| {name}, batch {batches[name]} | {old['img_s']:.3g} ({old['img_s_median']:.3g}) | "
              f"{new['img_s']:.3g} ({new['img_s_median']:.3g}) | "
              f"{'{:.2f}x ({:.2f}x)'.format(*ratio(s, 'this checkout', rev))} | {mb(old['peak_mb'])} | "
              f"{mb(new['peak_mb'])} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fmnist-batch", type=int, default=256)
    p.add_argument("--small-batch", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--against", metavar="REV", help="also time REV's code against this checkout (table 4)")
    p.add_argument("--skip-paths", action="store_true", help="leave out tables 1-3 (fused vs step-by-step)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"# fp32, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds; best round (median)")

    results: dict[str, dict] = {}
    if not args.skip_paths:
        vim = vimerge.create_model("vim_fmnist", pretrained=True).eval()
        deit = vimerge.create_model("deit_fmnist", pretrained=True).eval()
        b = args.fmnist_batch
        s1 = summary(interleaved({"vim_fmnist fused": forward_fn(vim, b, True),
                                  "vim_fmnist step-by-step": forward_fn(vim, b, False),
                                  "deit_fmnist": forward_fn(deit, b, None)}, args.rounds), b)
        print(f"\n| forward, batch {b}, {vim.num_tokens} tokens | img/s | ms/batch | vs deit_fmnist (same round): "
              "best (median) | peak MB |")
        print("|---|---|---|---|---|")
        for name, r in s1.items():
            rel = "1" if name == "deit_fmnist" else "{:.2f}x ({:.2f}x)".format(*ratio(s1, name, "deit_fmnist"))
            print(f"| {name} | {r['img_s']:.0f} ({r['img_s_median']:.0f}) | {r['ms']:.0f} | {rel} | {mb(r['peak_mb'])} |")
        del vim, deit

        small = vimerge.create_model("vim_small").eval()
        s2 = summary(interleaved({"fused": forward_fn(small, args.small_batch, True),
                                  "step-by-step": forward_fn(small, args.small_batch, False)}, args.rounds),
                     args.small_batch)
        small.train()
        s3 = summary(interleaved({"fused": train_fn(small, args.train_batch, True),
                                  "step-by-step": train_fn(small, args.train_batch, False)}, args.rounds),
                     args.train_batch)
        print(f"\n| vim_small ({small.num_tokens} tokens) | step-by-step img/s | fused img/s | speed-up "
              "(same round): best (median) | peak MB step-by-step | peak MB fused |")
        print("|---|---|---|---|---|---|")
        for label, s in ((f"forward, batch {args.small_batch}", s2),
                         (f"training step, batch {args.train_batch}", s3)):
            old, new = s["step-by-step"], s["fused"]
            print(f"| {label} | {old['img_s']:.3g} ({old['img_s_median']:.3g}) | {new['img_s']:.3g} "
                  f"({new['img_s_median']:.3g}) | {'{:.2f}x ({:.2f}x)'.format(*ratio(s, 'fused', 'step-by-step'))} "
                  f"| {mb(old['peak_mb'])} | {mb(new['peak_mb'])} |")
        results |= {"fmnist": s1, "vim_small_forward": s2, "vim_small_train": s3}
    if args.against:
        results["against"] = against(args.against, args)
    print(f"\n# {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
