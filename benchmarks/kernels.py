"""The CPU scan kernels of another revision against this checkout's, in one process.

Usage:  python benchmarks/kernels.py --against REV [--rounds 15] [--threads 2] [--json OUT]

REV is a git revision of this repository (e.g. ``f2e34ee``, the commit before the register-held
scan state of 2026-12-04). Its ``vimerge`` is imported beside this checkout's (as
``vimerge_rev``, see ``benchmarks/mixer.py``'s :func:`import_revision`); each kernel call of
the two sides alternates (``mixer.interleaved``: the order turns every round), on the same
random fp32 inputs.
Timed, at vim_small's shapes (batch 8, 197 tokens, d_inner 768, d_state 16, dt_rank 24) and
vim_fmnist's (batch 256, 50 tokens, d_inner 192, dt_rank 6):

* ``fused mixer``: ``vimerge.ops.fused_bimamba_v2`` without autograd (both directions' conv,
  scan and gate; the fused scan kernel is most of it);
* ``scan forward``: ``selective_scan(..., backend="numba")`` without autograd, with D, z,
  delta_bias and softplus (one direction, the step-by-step mixer's call);
* ``scan fwd+bwd``: the same with gradients, ``backward`` of a fixed random output gradient,
  with the gate ``z`` and without it.

The table gives each side's fastest call (median in brackets) in ms, the median of the
same-round speed-ups (REV's time over this checkout's), whether the two sides' outputs and
gradients (of u, delta, A, B, C, D, z and delta_bias) are bit-identical, and their largest
difference relative to the larger magnitude. A workload the revision lacks prints "-".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import vimerge
from mixer import finish, import_revision, interleaved

SHAPES = {"vim_small": (8, 197, 768, 24), "vim_fmnist": (256, 50, 192, 6)}   # batch, L, d_inner, dt_rank
N_STATE = 16
GRAD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(batch: int, L: int, d: int, gate: bool, grad: bool, seed: int = 0) -> dict:
    """Random inputs of one ``selective_scan`` call (shapes of its docstring)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale   # noqa: E731
    x = dict(u=r(batch, d, L), delta=r(batch, d, L, scale=0.5) - 1.0, A=-torch.exp(r(d, N_STATE, scale=0.5)),
             B=r(batch, N_STATE, L), C=r(batch, N_STATE, L), D=r(d), z=r(batch, d, L) if gate else None,
             delta_bias=r(d, scale=0.3))
    if grad:
        for k in GRAD_INPUTS:
            if x[k] is not None:
                x[k].requires_grad_(True)
    return x


def scan_call(package, x: dict, grad: bool, gout: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """One numba ``selective_scan`` of ``package`` (forward, or forward and backward)."""
    def run() -> list[torch.Tensor]:
        for t in x.values():
            if t is not None and t.grad is not None:
                t.grad = None
        if not grad:
            with torch.inference_mode():
                return [package.ops.selective_scan(**x, delta_softplus=True, backend="numba")]
        y = package.ops.selective_scan(**x, delta_softplus=True, backend="numba")
        y.backward(gout)
        return [y.detach()] + [x[k].grad for k in GRAD_INPUTS if x[k] is not None]
    return run


def mixer_call(package, batch: int, L: int, d: int, R: int, seed: int = 0) -> Callable[[], list[torch.Tensor]] | None:
    """One inference ``fused_bimamba_v2`` of ``package`` on random parameters, or None if it has none."""
    ops = package.ops
    if not hasattr(ops, "fused_bimamba_v2"):
        return None
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale   # noqa: E731
    xz = r(batch, L, 2 * d)

    def direction():
        return ops.Direction(r(d, 1, 4, scale=0.5), r(d, scale=0.1), r(R + 2 * N_STATE, d, scale=d ** -0.5),
                             r(d, R, scale=R ** -0.5), r(d, scale=0.3) - 2.0, r(d, N_STATE, scale=0.5), r(d))
    fwd, bwd = direction(), direction()

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [ops.fused_bimamba_v2(xz, fwd, bwd, d_state=N_STATE)[0]]
    return run


def workloads(package) -> dict[str, Callable[[], list[torch.Tensor]] | None]:
    out: dict[str, Callable | None] = {}
    for model, (batch, L, d, R) in SHAPES.items():
        out[f"fused mixer, {model}"] = mixer_call(package, batch, L, d, R)
        gout = torch.randn(batch, d, L, generator=torch.Generator().manual_seed(1))
        out[f"scan forward, {model}"] = scan_call(package, scan_inputs(batch, L, d, True, False), False, gout)
        for gate in (False, True):
            out[f"scan fwd+bwd {'with' if gate else 'without'} gate, {model}"] = scan_call(
                package, scan_inputs(batch, L, d, gate, True), True, gout)
    return out


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, float]:
    """(every tensor bit-identical, the largest |a - b| over max(|a|, |b|) of any tensor; NaN if any is NaN)."""
    same = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    diffs = [(x - y).abs().max() / torch.maximum(x.abs().max(), y.abs().max()).clamp_min(1e-30) for x, y in zip(a, b)]
    return same, float(torch.stack(diffs).max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", metavar="REV", required=True, help="git revision to time against this checkout")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"# fp32, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds; "
          f"{args.against} against this checkout, one process")
    print(f"\n| workload | {args.against} ms | this checkout ms | speed-up (median of same-round ratios) | "
          "bit-identical | max rel. difference |")
    print("|---|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory(prefix="vimerge-rev-") as tmp:
        sides = (workloads(import_revision(args.against, tmp)), workloads(vimerge))
        for name, new in sides[1].items():
            old = sides[0].get(name)
            if old is None or new is None:
                print(f"| {name} | - | - | - | - | - |")
                continue
            same, diff = compare(old(), new())     # first calls: compilation
            runs = interleaved({"rev": old, "this": new}, args.rounds)   # order turns every round
            secs = ([t for t, _ in runs["rev"]], [t for t, _ in runs["this"]])
            speed = statistics.median(o / n for o, n in zip(*secs))
            results[name] = dict(rev_s=secs[0], this_s=secs[1], speed_up=speed, bit_identical=same, max_rel_diff=diff)
            print(f"| {name} | {min(secs[0]) * 1e3:.2f} ({statistics.median(secs[0]) * 1e3:.2f}) | "
                  f"{min(secs[1]) * 1e3:.2f} ({statistics.median(secs[1]) * 1e3:.2f}) | {speed:.2f}x | {'yes' if same else 'no'} | {diff:.1e} |",
                  flush=True)
    finish(start, results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
