"""Compiled CPU selective scan (numba): fused forward and a recomputing backward.

On a CPU the scan is bound by its L*d*n exponentials. These kernels:

* run one (batch, channel) sequence per task, in parallel over tasks (``prange``);
* keep the n-dimensional state in registers and vectorise the inner loop over n, with an
  exponential written as a polynomial (Cody-Waite range reduction, then a degree-6
  polynomial, then a multiply by 2**k built from its bits), so the compiler can emit SIMD
  code without a vector math library;
* fuse ``delta_bias``, softplus, the ``D`` skip and the ``silu(z)`` gate;
* save nothing but the inputs for backward: the backward task re-runs its sequence
  forward into a small per-task buffer (L x n), then walks it in reverse. Gradients of
  the tensors shared across tasks (B, C over channels; A, D, delta_bias over the batch)
  are accumulated per task block and summed afterwards, so there are no write races.

Compilation happens on first use (seconds) and is cached on disk by numba; the time it
took is in :func:`jit_stats` and logged on the ``vimerge`` logger.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor

try:
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where numba is missing
    _IMPORT_ERROR = f"numba is not importable ({type(exc).__name__}: {exc}); pip install numba"

log = logging.getLogger("vimerge")
_STATS: dict[str, float] = {}
D_BLOCK = 32  # channels per backward task (bounds the partial-gradient buffers)

if _IMPORT_ERROR is None:

    @intrinsic
    def _int_bits_as_float(typingctx, bits):
        """Reinterpret an int32 bit pattern as float32 (vectorisable, unlike ldexp)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    @njit(inline="always", fastmath=True)
    def _exp(x):
        """exp(x) in float32 for x <= 0 (inputs below -87 give ~0); about 1 ulp."""
        x = max(x, np.float32(-87.0))
        k = math.floor(x * np.float32(1.44269504) + np.float32(0.5))
        g = x - k * np.float32(0.693359375)
        g = g + k * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * g + np.float32(1.3981999507e-3)
        p = p * g + np.float32(8.3334519073e-3)
        p = p * g + np.float32(4.1665795894e-2)
        p = p * g + np.float32(1.6666665459e-1)
        p = p * g + np.float32(5.0000001201e-1)
        p = p * g * g + g + np.float32(1.0)
        return p * _int_bits_as_float((np.int32(k) + np.int32(127)) << np.int32(23))

    @njit(inline="always", fastmath=False)
    def _softplus(x):
        # torch.nn.functional.softplus with threshold 20
        return x if x > 20.0 else math.log1p(math.exp(x))

    @njit(parallel=True, fastmath=True, cache=True)
    def _forward_kernel(u, delta, A, Bt, Ct, D, z, bias, softplus, has_z, out):
        b, d, L = u.shape
        n = A.shape[1]
        for task in prange(b * d):
            bi = task // d
            di = task % d
            h = np.zeros(n, dtype=np.float32)
            a_row = A[di]
            for t in range(L):
                dt = delta[bi, di, t] + bias[di]
                if softplus:
                    dt = np.float32(_softplus(dt))
                ut = u[bi, di, t]
                dtu = dt * ut
                y = np.float32(0.0)
                for k in range(n):
                    h[k] = _exp(dt * a_row[k]) * h[k] + dtu * Bt[bi, t, k]
                    y += h[k] * Ct[bi, t, k]
                y += D[di] * ut
                if has_z:
                    zt = z[bi, di, t]
                    y *= zt / (np.float32(1.0) + math.exp(-zt))
                out[bi, di, t] = y

    @njit(parallel=True, fastmath=True, cache=True)
    def _backward_kernel(u, delta, A, Bt, Ct, D, z, bias, softplus, has_z, gout,
                         gu, gdelta, gz, gA_part, gB_part, gC_part, gD_part, gbias_part):
        b, d, L = u.shape
        n = A.shape[1]
        nblk = gB_part.shape[1]
        blk = (d + nblk - 1) // nblk
        for task in prange(b * nblk):
            bi = task // nblk
            ci = task % nblk
            hs = np.empty((L + 1, n), dtype=np.float32)   # hs[t + 1] = state after step t
            da = np.empty((L, n), dtype=np.float32)       # exp(dt_t * A)
            dts = np.empty(L, dtype=np.float32)
            gh = np.empty(n, dtype=np.float32)
            for di in range(ci * blk, min(d, (ci + 1) * blk)):
                a_row = A[di]
                for k in range(n):
                    hs[0, k] = 0.0
                for t in range(L):                        # recompute the states
                    dt = delta[bi, di, t] + bias[di]
                    if softplus:
                        dt = np.float32(_softplus(dt))
                    dts[t] = dt
                    dtu = dt * u[bi, di, t]
                    for k in range(n):
                        a = _exp(dt * a_row[k])
                        da[t, k] = a
                        hs[t + 1, k] = a * hs[t, k] + dtu * Bt[bi, t, k]
                for k in range(n):
                    gh[k] = 0.0
                gD = np.float32(0.0)
                gbias = np.float32(0.0)
                for t in range(L - 1, -1, -1):            # walk back
                    ut = u[bi, di, t]
                    dt = dts[t]
                    g = gout[bi, di, t]
                    if has_z:
                        y = D[di] * ut
                        for k in range(n):
                            y += hs[t + 1, k] * Ct[bi, t, k]
                        zt = z[bi, di, t]
                        sig = np.float32(1.0) / (np.float32(1.0) + math.exp(-zt))
                        gz[bi, di, t] = g * y * sig * (np.float32(1.0) + zt * (np.float32(1.0) - sig))
                        g = g * zt * sig
                    gD += g * ut
                    gut = g * D[di]
                    gdt = np.float32(0.0)
                    for k in range(n):
                        ghk = gh[k] + g * Ct[bi, t, k]
                        gC_part[bi, ci, t, k] += g * hs[t + 1, k]
                        gaa = ghk * hs[t, k] * da[t, k]       # d/d(dt*A) of a_t * h_{t-1}
                        gdt += gaa * a_row[k] + ghk * Bt[bi, t, k] * ut
                        gA_part[bi, di, k] += gaa * dt
                        gut += ghk * dt * Bt[bi, t, k]
                        gB_part[bi, ci, t, k] += ghk * dt * ut
                        gh[k] = ghk * da[t, k]
                    if softplus:
                        raw = delta[bi, di, t] + bias[di]
                        gdt *= np.float32(1.0) / (np.float32(1.0) + math.exp(-raw))
                    gdelta[bi, di, t] = gdt
                    gbias += gdt
                    gu[bi, di, t] = gut
                gD_part[bi, di] = gD
                gbias_part[bi, di] = gbias


def _check() -> str | None:
    return _IMPORT_ERROR


def _np(t: Tensor):
    return t.detach().contiguous().numpy()


def _prepare(u, delta, A, B, C, D, z, delta_bias):
    d = u.shape[1]
    zeros = u.new_zeros(d)
    dummy = u.new_zeros(1, 1, 1)
    return (u.contiguous(), delta.contiguous(), A.contiguous(),
            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            zeros if D is None else D.contiguous(), dummy if z is None else z.contiguous(),
            zeros if delta_bias is None else delta_bias.contiguous())


def _run(name: str, kernel, *args) -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    if name not in _STATS:
        start = time.perf_counter()
        kernel(*args)
        _STATS[name] = time.perf_counter() - start
        log.info("vimerge: numba %s scan kernel ready in %.1f s (first use; cached on disk "
                 "for later runs)", name, _STATS[name])
    else:
        kernel(*args)


class _NumbaScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool):
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.softplus = softplus
        tensors = _prepare(u, delta, A, B, C, D, z, delta_bias)
        out = torch.empty_like(tensors[0])
        _run("forward", _forward_kernel, *[_np(t) for t in tensors[:7]], _np(tensors[7]),
             softplus, z is not None, out.numpy())
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, A, Bt, Ct, D, z, bias = ctx.saved_tensors
        has_D, has_z, has_bias = ctx.has
        b, d, L = u.shape
        n = A.shape[1]
        nblk = (d + D_BLOCK - 1) // D_BLOCK
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(u) if has_z else u.new_zeros(1, 1, 1)
        gA = u.new_zeros(b, d, n)
        gB, gC = u.new_zeros(b, nblk, L, n), u.new_zeros(b, nblk, L, n)
        gD, gbias = u.new_zeros(b, d), u.new_zeros(b, d)
        _run("backward", _backward_kernel,
             *[_np(t) for t in (u, delta, A, Bt, Ct, D, z, bias)], ctx.softplus, has_z,
             _np(gout.float()), *[t.numpy() for t in (gu, gdelta, gz, gA, gB, gC, gD, gbias)])
        return (gu, gdelta, gA.sum(0), gB.sum(1).transpose(1, 2), gC.sum(1).transpose(1, 2),
                gD.sum(0) if has_D else None, gz if has_z else None,
                gbias.sum(0) if has_bias else None, None)


def selective_scan_numba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor | None = None, z: Tensor | None = None,
                         delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """Selective scan with the compiled CPU kernels (fp32 CPU tensors in and out)."""
    return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def jit_stats() -> dict[str, float]:
    """Seconds the first call of each kernel took in this process (compile or cache load)."""
    return dict(_STATS)


def _register() -> None:
    from .dispatch import Backend, register_backend
    register_backend(Backend("numba", selective_scan_numba, frozenset({"cpu"}), check=_check,
                             auto_priority={"cpu": 2}))


_register()
