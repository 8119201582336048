"""Compiled CPU selective scan (numba): fused forward and a recomputing backward.

On a CPU the scan is bound by its L*d*n exponentials. These kernels:

* run one (batch, channel) sequence per task, in parallel over tasks (``prange``);
* keep the n-dimensional state in registers and vectorise the inner loop over n, with an
  exponential written as a polynomial (Cody-Waite range reduction, then a degree-6
  polynomial, then a multiply by 2**k built from its bits), so the compiler can emit SIMD
  code without a vector math library;
* fuse ``delta_bias``, softplus (a vectorisable log1p series), the ``D`` skip and the
  ``silu(z)`` gate, and their gradients, into the kernels;
* save only the inputs for backward: the backward task re-runs its sequence
  forward into small per-task buffers (L x n), then walks it in reverse. Gradients of
  the tensors shared across tasks (B, C over channels; A, D, delta_bias over the batch)
  are accumulated per task block and summed afterwards, so there are no write races.

Compilation happens on first use (seconds) and is cached on disk by numba; the time it
took is in :func:`jit_stats` and logged on the ``vimerge`` logger.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from .registry import Backend, register_backend

try:
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import carray, njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where numba is missing
    _IMPORT_ERROR = f"numba is not importable ({type(exc).__name__}: {exc}); pip install numba"

log = logging.getLogger("vimerge")
_STATS: dict[str, float] = {}
D_BLOCK = 64  # channels per backward task (bounds the partial-gradient buffers)
N_STATE = 16  # d_state of every Vim / VideoMamba preset: the kernels compile a fixed-size path for it

if _IMPORT_ERROR is None:

    @intrinsic
    def _int_bits_as_float(typingctx, bits):
        """Reinterpret an int32 bit pattern as float32 (vectorisable, unlike ldexp)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen

    @intrinsic
    def _stack_f32x16(typingctx):
        """Pointer to 16 float32 on the stack: one alloca per call site, in the entry block of
        the function the call is compiled into (a kernel's outlined ``prange`` body).

        An array over it that is indexed by constants once the fixed-size state loop is
        unrolled is kept in a vector register by LLVM (checked in the fused forward kernel's
        assembly, 2026-12-04), where a heap array (``np.empty``) is stored and reloaded every
        time step. Kernels alone, interleaved against the heap version (2026-12-04,
        docs/benchmarks.md): fused forward 1.11-1.14x, numba forward 1.06-1.08x, backward
        1.10-1.29x; through ``fused_bimamba_v2`` / ``selective_scan`` (``python
        benchmarks/kernels.py --against f2e34ee``) 1.01-1.21x.
        """
        sig = types.CPointer(types.float32)()

        def codegen(context, builder, signature, args):
            buf = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), N_STATE))
            return builder.bitcast(buf, ir.PointerType(ir.FloatType()))

        return sig, codegen

    @njit(inline="always")
    def _state(n):
        """A zeroed float32 buffer of n states: on the stack when n is ``N_STATE`` (see
        :func:`_stack_f32x16`), else on the heap. Must stay ``inline="always"`` and be
        used only inside the kernel that calls it: the stack buffer dies with that function.
        The kernels in ``fused_mixer.py`` inline this (and ``_exp``); numba's disk cache checks
        only the file that defines a cached kernel, so after editing these helpers clear
        ``__pycache__`` (or set a fresh ``NUMBA_CACHE_DIR``) before timing the fused kernels.
        """
        h = carray(_stack_f32x16(), N_STATE) if n == N_STATE else np.empty(n, dtype=np.float32)
        for k in range(n):
            h[k] = 0.0
        return h

    @njit(inline="always", fastmath=True)
    def _exp(x):
        """exp(x) in float32 for x <= 0 (inputs below -87 give ~0); about 1 ulp."""
        x = max(x, np.float32(-87.0))
        k = np.floor(x * np.float32(1.44269504) + np.float32(0.5))   # float32, not int64
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

    @njit(inline="always", fastmath=True)
    def _sigmoid(x):
        """1 / (1 + exp(-x)) through the vectorisable exponential of a non-positive number."""
        e = _exp(-abs(x))
        return np.float32(1.0) / (np.float32(1.0) + e) if x >= 0 else e / (np.float32(1.0) + e)

    @njit(inline="always", fastmath=True)
    def _softplus(x):
        """log(1 + exp(x)) (torch's threshold 20), vectorisable: max(x, 0) + log1p(exp(-|x|)).

        log1p(e) for e in [0, 1] is 2 atanh(s) with s = e / (2 + e) <= 1/3, summed to s**13.
        """
        e = _exp(-abs(x))
        s = e / (np.float32(2.0) + e)
        s2 = s * s
        p = np.float32(2.0 / 13.0)
        p = p * s2 + np.float32(2.0 / 11.0)
        p = p * s2 + np.float32(2.0 / 9.0)
        p = p * s2 + np.float32(2.0 / 7.0)
        p = p * s2 + np.float32(2.0 / 5.0)
        p = p * s2 + np.float32(2.0 / 3.0)
        p = p * s2 + np.float32(2.0)
        return x if x > 20.0 else max(x, np.float32(0.0)) + s * p

    @njit(inline="always", fastmath=True)
    def _time_steps(delta, bias, softplus, bi, di, out):
        """out[t] = softplus(delta[bi, di, t] + bias[di]) (or without softplus), over the row."""
        for t in range(out.shape[0]):
            x = delta[bi, di, t] + bias[di]
            out[t] = _softplus(x) if softplus else x

    @njit(inline="always", fastmath=True)
    def _forward_row(u, dt, A, Bt, Ct, D, bi, di, out, n):
        """One (batch, channel) sequence of the forward kernel, ``n`` states (a literal 16 from
        the kernel lets the compiler unroll the state loop into whole vectors)."""
        h = _state(n)
        a_row = A[di]
        for t in range(u.shape[2]):
            dtt = dt[t]
            ut = u[bi, di, t]
            dtu = dtt * ut
            y = D[di] * ut
            for k in range(n):
                hk = _exp(dtt * a_row[k]) * h[k] + dtu * Bt[bi, t, k]
                h[k] = hk
                y += hk * Ct[bi, t, k]
            out[bi, di, t] = y

    @njit(parallel=True, fastmath=True, cache=True)
    def _forward_kernel(u, delta, bias, softplus, A, Bt, Ct, D, z, has_z, out):
        """out = (scan(u, dt, A, B, C) + D * u) * silu(z) with dt = softplus(delta + bias).

        u, delta, z, out: (b, d, L); bias, D: (d,); A: (d, n); Bt, Ct: (b, L, n).
        """
        b, d, L = u.shape
        n = A.shape[1]
        for task in prange(b * d):
            bi = task // d
            di = task % d
            dt = np.empty(L, dtype=np.float32)
            _time_steps(delta, bias, softplus, bi, di, dt)
            if n == N_STATE:
                _forward_row(u, dt, A, Bt, Ct, D, bi, di, out, N_STATE)
            else:
                _forward_row(u, dt, A, Bt, Ct, D, bi, di, out, n)
            if has_z:                                     # gate, vectorised over the sequence
                for t in range(L):
                    zt = z[bi, di, t]
                    out[bi, di, t] *= zt * _sigmoid(zt)

    @njit(inline="always", fastmath=True)
    def _states_and_sweep(u, dt, a_row, Bt, Ct, D, z, gout, gy, sg, hs, da, GH, gz, has_z, bi, di, n):
        """The sequential passes of one channel's backward (``n`` states; a literal ``N_STATE``
        keeps the running state and dL/dh in registers, :func:`_state`).

        Recomputes hs[t + 1] (the state after step t, hs[0] = 0) and da[t] = exp(dt_t A); with
        ``has_z`` also y_t and gz = dL/dz; then sweeps t = L-1 .. 0 for GH[t] = dL/dh_t from
        gy (dL/dy_t before the gate). hs (L + 1, n), da and GH (L, n), gy, sg (L,)
        (sigmoid(z_t) when ``has_z``).
        """
        L = dt.shape[0]
        h = _state(n)
        gh = _state(n)
        for k in range(n):
            hs[0, k] = 0.0
        if has_z:                                         # the states, and y for dL/dz
            Dd = D[di]
            for t in range(L):
                dtt = dt[t]
                ut = u[bi, di, t]
                dtu = dtt * ut
                y = Dd * ut
                for k in range(n):
                    a = _exp(dtt * a_row[k])
                    da[t, k] = a
                    hk = a * h[k] + dtu * Bt[bi, t, k]
                    h[k] = hk
                    hs[t + 1, k] = hk
                    y += hk * Ct[bi, t, k]
                zt = z[bi, di, t]
                gz[bi, di, t] = gout[bi, di, t] * y * sg[t] * (
                    np.float32(1.0) + zt * (np.float32(1.0) - sg[t]))
        else:                                             # the states only
            for t in range(L):
                dtt = dt[t]
                dtu = dtt * u[bi, di, t]
                for k in range(n):
                    a = _exp(dtt * a_row[k])
                    da[t, k] = a
                    hk = a * h[k] + dtu * Bt[bi, t, k]
                    h[k] = hk
                    hs[t + 1, k] = hk
        for t in range(L - 1, -1, -1):                    # sequential sweep for dL/dh_t
            g = gy[t]
            for k in range(n):
                ghk = gh[k] + g * Ct[bi, t, k]
                GH[t, k] = ghk
                gh[k] = ghk * da[t, k]

    @njit(parallel=True, fastmath=True, cache=True)
    def _backward_kernel(u, delta, bias, softplus, A, Bt, Ct, D, z, has_z, gout,
                         gu, gdelta, gz, gA_part, gB_part, gC_part, gD_part, gbias_part):
        """Gradients of the forward kernel for the incoming gradient ``gout`` (b, d, L).

        The time steps dt = softplus(delta + bias) are recomputed per row; with ``softplus``
        the delta gradient is multiplied by softplus'(x) = sigmoid(x) = 1 - exp(-dt).
        Per-task partial sums:
        gA_part (b, d, n), gD_part and gbias_part (b, d) are summed over b by the caller,
        gB_part / gC_part (b, blocks, L, n) over blocks. Only the recompute of the states and
        the sweep for dL/dh are sequential (:func:`_states_and_sweep`, with register-resident
        state when n is ``N_STATE``: 1.10-1.29x, 2026-12-04); the other passes are flat loops
        the compiler can vectorise. Without the
        gate (``has_z`` False: the fused mixer) the recompute pass skips y; in both paths
        softplus' and the per-step scalar gradients (delta, u, D, bias) run in their own loops
        over t. Kernel 1.37-1.38x at vim_small / vim_fmnist shapes without the gate, 1.03x with
        it (2026-12-03, interleaved against the previous kernel; docs/benchmarks.md).
        """
        b, d, L = u.shape
        n = A.shape[1]
        nblk = gB_part.shape[1]
        blk = (d + nblk - 1) // nblk
        for task in prange(b * nblk):
            bi = task // nblk
            ci = task % nblk
            hs = np.empty((L + 1, n), dtype=np.float32)   # hs[t + 1] = state after step t
            da = np.empty((L, n), dtype=np.float32)       # exp(dt_t * A), then dL/d(dt_t * A)
            GH = np.empty((L, n), dtype=np.float32)       # dL/dh_t
            gy = np.empty(L, dtype=np.float32)            # dL/dy_t before the gate
            sg = np.empty(L, dtype=np.float32)
            dt = np.empty(L, dtype=np.float32)
            sp = np.empty(L, dtype=np.float32)            # softplus'(delta + bias) per step
            sa = np.empty(L, dtype=np.float32)            # sum_k dL/d(dt A)_k A_k per step
            sb = np.empty(L, dtype=np.float32)            # sum_k dL/dh_k B_k per step
            gAl = np.empty(n, dtype=np.float32)
            gB = gB_part[bi, ci]
            gC = gC_part[bi, ci]
            for di in range(ci * blk, min(d, (ci + 1) * blk)):
                a_row = A[di]
                _time_steps(delta, bias, softplus, bi, di, dt)
                if has_z:
                    for t in range(L):
                        zt = z[bi, di, t]
                        sg[t] = _sigmoid(zt)
                        gy[t] = gout[bi, di, t] * zt * sg[t]
                else:
                    for t in range(L):
                        gy[t] = gout[bi, di, t]
                if n == N_STATE:
                    _states_and_sweep(u, dt, a_row, Bt, Ct, D, z, gout, gy, sg, hs, da, GH, gz, has_z, bi, di,
                                      N_STATE)
                else:
                    _states_and_sweep(u, dt, a_row, Bt, Ct, D, z, gout, gy, sg, hs, da, GH, gz, has_z, bi, di, n)
                for t in range(L):                        # per-step sums over the states
                    s_a = np.float32(0.0)
                    s_b = np.float32(0.0)
                    for k in range(n):
                        gaa = GH[t, k] * hs[t, k] * da[t, k]
                        da[t, k] = gaa
                        s_a += gaa * a_row[k]
                        s_b += GH[t, k] * Bt[bi, t, k]
                    sa[t] = s_a
                    sb[t] = s_b
                if softplus:                              # softplus'(x) = sigmoid(x) = 1 - exp(-dt)
                    for t in range(L):
                        sp[t] = np.float32(1.0) - _exp(-dt[t])
                else:
                    for t in range(L):
                        sp[t] = np.float32(1.0)
                gD = np.float32(0.0)
                gbias = np.float32(0.0)
                Dd = D[di]
                for t in range(L):                        # per-step gradients, flat over t
                    ut = u[bi, di, t]
                    gdtt = (sa[t] + sb[t] * ut) * sp[t]
                    gdelta[bi, di, t] = gdtt
                    gbias += gdtt
                    gu[bi, di, t] = gy[t] * Dd + sb[t] * dt[t]
                    gD += gy[t] * ut
                gD_part[bi, di] = gD
                gbias_part[bi, di] = gbias
                for k in range(n):
                    gAl[k] = 0.0
                for t in range(L):                        # shared-parameter gradients
                    dtt = dt[t]
                    dtu = dtt * u[bi, di, t]
                    g = gy[t]
                    for k in range(n):
                        gAl[k] += da[t, k] * dtt
                    for k in range(n):
                        gC[t, k] += g * hs[t + 1, k]
                    for k in range(n):
                        gB[t, k] += GH[t, k] * dtu
                gA = gA_part[bi, di]
                for k in range(n):
                    gA[k] += gAl[k]


def _check() -> str | None:
    return _IMPORT_ERROR


def _np(t: Tensor):
    return t.detach().contiguous().numpy()


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
    """The scan with the compiled kernels; saves only its inputs for backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool):
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.softplus = softplus
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        zeros = u.new_zeros(u.shape[1])
        Dv = zeros if D is None else D.contiguous()
        bias = zeros if delta_bias is None else delta_bias.contiguous()
        zv = u.new_zeros(1, 1, 1) if z is None else z.contiguous()
        out = torch.empty_like(u)
        _run("forward", _forward_kernel, _np(u), _np(delta), _np(bias), softplus, _np(A), _np(Bt),
             _np(Ct), _np(Dv), _np(zv), z is not None, out.numpy())
        ctx.save_for_backward(u, delta, bias, A, Bt, Ct, Dv, zv)
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, bias, A, Bt, Ct, Dv, zv = ctx.saved_tensors
        has_D, has_z, has_bias = ctx.has
        gu, gdelta, gA, gB, gC, gD, gbias, gz = scan_backward(u, delta, bias, ctx.softplus, A, Bt, Ct, Dv,
                                                              gout, zv if has_z else None)
        return (gu, gdelta, gA, gB.transpose(1, 2), gC.transpose(1, 2), gD if has_D else None, gz,
                gbias if has_bias else None, None)


def scan_backward(u: Tensor, delta: Tensor, bias: Tensor, softplus: bool, A: Tensor, Bt: Tensor,
                  Ct: Tensor, D: Tensor, gout: Tensor, z: Tensor | None = None) -> tuple[Tensor, ...]:
    """Gradients of ``(scan(u, dt, A, B, C) + D u) [* silu(z)]`` for ``gout``, with the compiled kernel.

    dt = softplus(delta + bias) (or ``delta + bias`` without softplus). u, delta, gout, z (b, d, L);
    bias, D (d,); A (d, n); Bt, Ct (b, L, n) (B and C token-major), all fp32 CPU. Returns
    (gu, gdelta (b, d, L), gA (d, n), gB, gC (b, L, n), gD, gbias (d,), gz (b, d, L) or None).
    The states are recomputed per channel from the inputs (nothing saved from the forward).
    """
    b, d, L = u.shape
    n = A.shape[1]
    nblk = (d + D_BLOCK - 1) // D_BLOCK
    gu, gdelta = torch.empty_like(u), torch.empty_like(u)
    gz = torch.empty_like(u) if z is not None else u.new_zeros(1, 1, 1)
    zv = z if z is not None else u.new_zeros(1, 1, 1)
    gA = u.new_zeros(b, d, n)
    gB, gC = u.new_zeros(b, nblk, L, n), u.new_zeros(b, nblk, L, n)
    gD, gbias = u.new_zeros(b, d), u.new_zeros(b, d)
    _run("backward", _backward_kernel, _np(u), _np(delta), _np(bias), softplus, _np(A),
         _np(Bt), _np(Ct), _np(D), _np(zv), z is not None, _np(gout.float()),
         *[t.numpy() for t in (gu, gdelta, gz, gA, gB, gC, gD, gbias)])
    return (gu, gdelta, gA.sum(0), gB.sum(1), gC.sum(1), gD.sum(0), gbias.sum(0),
            gz if z is not None else None)


def selective_scan_numba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor | None = None, z: Tensor | None = None,
                         delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """Selective scan with the compiled CPU kernels (fp32 CPU tensors in and out)."""
    return _NumbaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def jit_stats() -> dict[str, float]:
    """Seconds the first call of each kernel took in this process (compile or cache load)."""
    return dict(_STATS)


register_backend(Backend("numba", selective_scan_numba, frozenset({"cpu"}), check=_check,
                             auto_priority={"cpu": 2}))

