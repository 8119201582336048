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
vim_small forward and training step, each model's default path) with REV's ``vimerge`` (from
``git archive``, imported in this process as ``vimerge_rev``) and this checkout's, alternating
call by call in interleaved rounds; the speed-up is taken within a round. One process for both
sides: until 2026-12-04 the sides ran in two worker processes, and the deit_fmnist row (the same
Transformer arithmetic on both sides) read 0.91x-1.14x by median over a day's runs; in one
process 0.99x-1.03x (docs/benchmarks.md). The revision's numba kernels compile afresh in every
run (its cache lives in the temporary directory), in the untimed warm-up. This is the
comparison with the issue's "today's img/s": the same-round step-by-step path of tables 1-3
runs this checkout's (faster) scan kernels too. ``--skip-paths`` leaves out tables 1-3.

fp32, CPU, the default scan backend (numba). Peak memory: the rise of the resident set's
high-water mark above the resident set before the timed call, in the fastest round (Linux).
Compilation (numba, cached on disk after the first run) happens in an untimed warm-up.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def interleaved(configs: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[tuple[float, float | None]]]:
    """:func:`timed` (seconds, peak MB) of every configuration once per round after one untimed
    call each; the order turns every round."""
    for fn in configs.values():              # warm-up: compilation, allocator growth
        fn()
    runs: dict[str, list[tuple[float, float | None]]] = {k: [] for k in configs}
    names = list(configs)
    for i in range(rounds):                  # the order turns every round
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(timed(configs[name]))
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


def finish(start: float, results: dict, json_path: str | None) -> None:
    """Print the seconds since ``start`` (a ``time.perf_counter()``); write ``results`` as JSON
    to ``json_path`` when given."""
    print(f"\n# {time.perf_counter() - start:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


def mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# ------------------------------------------------------------------ --against: another revision

WORKLOADS = ("vim_fmnist forward", "deit_fmnist forward", "vim_small forward", "vim_small training step")
REPO = Path(__file__).resolve().parents[1]
SELF_IMPORT = re.compile(r"^\s*(from\s+vimerge[\s.]|import\s+vimerge\b)", re.MULTILINE)


def import_revision(rev: str, into: str):
    """Revision ``rev``'s ``vimerge`` package, imported under the name ``vimerge_rev`` from a
    ``git archive`` written under ``into``, beside this checkout's ``vimerge`` in this process.

    Raises SystemExit naming the problem when git cannot read ``rev``, or when a module it loads
    imports ``vimerge`` by absolute name (that would bind this checkout's code inside it; the CLI
    modules do, and are not loaded by ``import vimerge``).
    """
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/vimerge"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--against {rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    (Path(into) / "src" / "vimerge").rename(Path(into) / "vimerge_rev")
    sys.path.insert(0, into)
    try:
        module = importlib.import_module("vimerge_rev")
    finally:
        sys.path.remove(into)
    check_self_imports(rev)
    return module


def check_self_imports(rev: str) -> None:
    """SystemExit if a loaded module of the revision (``vimerge_rev.*``) imports ``vimerge`` by
    absolute name: that would bind this checkout's code inside the revision's."""
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        hit = name.startswith("vimerge_rev") and path and SELF_IMPORT.search(Path(path).read_text())
        if hit:
            raise SystemExit(f"--against {rev}: {name} imports vimerge by absolute name ({hit.group(0).strip()!r}), "
                             "which would mix this checkout's code into the revision's")


def workloads(package, fmnist_batch: int, small_batch: int, train_batch: int) -> dict[str, Callable[[], None]]:
    """The four --against workloads (:data:`WORKLOADS`) built with ``package`` (a vimerge),
    each model on its default mixer path; vim_small's random weights from seed 0."""
    torch.manual_seed(0)
    small = package.create_model("vim_small")
    small_forward, small_train = forward_fn(small, small_batch, None), train_fn(small, train_batch, None)

    def forward() -> None:
        small.eval()
        small_forward()

    def train() -> None:
        small.train()
        small_train()
    return {"vim_fmnist forward": forward_fn(package.create_model("vim_fmnist", pretrained=True).eval(),
                                             fmnist_batch, None),
            "deit_fmnist forward": forward_fn(package.create_model("deit_fmnist", pretrained=True).eval(),
                                              fmnist_batch, None),
            "vim_small forward": forward, "vim_small training step": train}


def against(rev: str, args) -> dict[str, dict]:
    """Table 4: every workload, revision ``rev`` against this checkout, alternating call by call
    in this process (one heap, one set of thread pools for both)."""
    batches = dict(zip(WORKLOADS, (args.fmnist_batch, args.fmnist_batch, args.small_batch, args.train_batch)))
    with tempfile.TemporaryDirectory(prefix="vimerge-rev-") as tmp:
        sides = {rev: import_revision(rev, tmp), "this checkout": vimerge}
        fns = {k: workloads(pkg, args.fmnist_batch, args.small_batch, args.train_batch) for k, pkg in sides.items()}
        out = {name: summary(interleaved({k: f[name] for k, f in fns.items()}, args.rounds), batches[name])
               for name in WORKLOADS}
        check_self_imports(rev)               # again: modules the workloads imported on first use
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
    args = p.parse_args(argv)
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
    finish(start, results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
