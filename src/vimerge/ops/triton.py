"""Triton selective scan: chunked forward and a recomputing backward, no CUDA compilation step.

Triton compiles these kernels at first use from Python (``pip install triton``): no nvcc, no
build of mamba_ssm or causal-conv1d. With ``TRITON_INTERPRET=1`` in the environment *before*
this module is imported, Triton's interpreter runs the same kernels on CPU tensors (slowly:
it exists for tests; CUDA tensors are then interpreted too, as slowly), and the backend then
also registers for ``"cpu"`` (never as ``auto``'s choice there).

Layout of the work (shapes as in :func:`vimerge.ops.selective_scan`: u, delta, z (b, d, L);
A (d, n); B, C (b, n, L); D, delta_bias (d,)):

* one program per (batch row, block of ``BLOCK_D`` channels): ``grid = (ceil(d / BLOCK_D), b)``;
* each program walks the sequence in chunks of ``BLOCK_T`` steps. Inside a chunk it builds the
  pairs ``(a_t, b_t) = (exp(dt_t * A), dt_t * u_t * B_t)`` as a (BLOCK_D, n, BLOCK_T) tile and
  scans them with ``tl.associative_scan`` and the combine
  ``(a1, b1) then (a2, b2) = (a2 * a1, a2 * b1 + b2)``; the state entering the chunk is added as
  ``h_t = b_scan_t + a_scan_t * h_in``; the state leaving it is carried to the next chunk in
  registers. Any L works: the steps past L are identities ``(1, 0)``;
* ``delta_bias`` + softplus, the ``D`` skip and the ``silu(z)`` gate are fused; the state and
  every accumulation are fp32 (the dispatcher hands fp32 tensors to every backend).

Backward (the strategy of mamba_ssm's CUDA kernel, written anew): the forward saves only the
state entering every chunk, (b, d, ceil(L / BLOCK_T), n), never the (b, d, L, n) states. The
backward kernel walks the chunks in reverse, recomputes the chunk's states from its saved
entry state, and gets ``dL/dh_t`` by a reverse associative scan of
``g_t = C_t * dL/dy_t + a_{t+1} * g_{t+1}`` (``a_{t+1}`` from the time steps loaded one step
ahead). It needs ``a_t * h_{t-1}``, which is ``h_t - b_t``: a subtraction, never a division.
Gradients of the tensors shared across programs (A, D, delta_bias over the batch; B, C over
channel blocks) are written per program and summed by PyTorch afterwards: deterministic, no
atomics.

Numerical safety: after softplus ``dt >= 0`` and ``A <= 0``, so every ``exp(dt * A)`` lies in
``[0, 1]`` and the scans only multiply such numbers; a huge ``dt`` underflows a decay to 0 (the
state resets, as in the loop), nothing overflows, and no decay is ever divided by. Softplus is
``max(x, 0) + log1p(exp(-|x|))`` (torch's threshold 20 kept), sigmoids are computed from
``exp(-|x|)``.

Sources: the recurrence and its gradients are the Mamba-1 selective scan (Gu & Dao, 2023,
Algorithm 2 and ``selective_scan_ref`` in state-spaces/mamba), derived by hand here; the
reference loop in :mod:`vimerge.ops.reference` is the ground truth in the tests.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .registry import Backend, register_backend

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
"""Whether Triton's interpreter runs the kernels (read once, at import, as Triton itself does)."""

BLOCK_D = 16       # channels per program
BLOCK_T = 16       # steps per chunk (scanned in parallel)
NUM_WARPS_FWD = 4
NUM_WARPS_BWD = 8

if _IMPORT_ERROR is None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """Compose two affine steps of the recurrence: ``h -> a2 * (a1 * h + b1) + b2``."""
        return a2 * a1, a2 * b1 + b2

    @triton.jit
    def _fwd_kernel(u_ptr, x_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, hs_ptr,
                    d, L, n, n_chunks,
                    su_b, su_d, su_l, sx_b, sx_d, sx_l, sz_b, sz_d, sz_l,
                    sA_d, sA_n, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """out = (scan(u, dt, A, B, C) + D u) * silu(z), dt = softplus(x + bias); out (b, d, L)
        contiguous; hs (b, d, n_chunks, n) receives the state entering every chunk."""
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        mask_d = offs_d < d
        mask_n = offs_n < n
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
        is_last = (offs_t == BLOCK_T - 1)[None, None, :]
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(0, n_chunks):
            t = c * BLOCK_T + offs_t
            m_dt = mask_d[:, None] & (t < L)[None, :]
            m_nt = mask_n[:, None] & (t < L)[None, :]
            u = tl.load(u_ptr + pid_b * su_b + offs_d[:, None] * su_d + t[None, :] * su_l,
                        mask=m_dt, other=0.0)
            x = tl.load(x_ptr + pid_b * sx_b + offs_d[:, None] * sx_d + t[None, :] * sx_l,
                        mask=m_dt, other=0.0)
            if HAS_BIAS:
                x = x + bias[:, None]
            if SOFTPLUS:   # max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's correction
                e = tl.exp(-tl.abs(x))
                w = 1.0 + e
                lp = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
                x = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)
            dt = tl.where(m_dt, x, 0.0)                         # identity steps past L
            Bt = tl.load(B_ptr + pid_b * sB_b + offs_n[:, None] * sB_n + t[None, :] * sB_l,
                         mask=m_nt, other=0.0)
            Ct = tl.load(C_ptr + pid_b * sC_b + offs_n[:, None] * sC_n + t[None, :] * sC_l,
                         mask=m_nt, other=0.0)
            a = tl.exp(dt[:, None, :] * A[:, :, None])          # (BLOCK_D, BLOCK_N, BLOCK_T)
            bu = (dt * u)[:, None, :] * Bt[None, :, :]
            if SAVE_STATES:
                hs_off = ((pid_b * d + offs_d[:, None]) * n_chunks + c) * n + offs_n[None, :]
                tl.store(hs_ptr + hs_off, h, mask=mask_dn)
            ca, hl = tl.associative_scan((a, bu), 2, _combine)
            hh = hl + ca * h[:, :, None]
            y = tl.sum(hh * Ct[None, :, :], axis=1)              # (BLOCK_D, BLOCK_T)
            if HAS_D:
                y = y + Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_l,
                             mask=m_dt, other=0.0)
                ez = tl.exp(-tl.abs(zt))
                sig = tl.where(zt >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))
                y = y * zt * sig
            tl.store(out_ptr + (pid_b * d + offs_d[:, None]) * L + t[None, :], y, mask=m_dt)
            h = tl.sum(tl.where(is_last, hh, 0.0), axis=2)

    @triton.jit
    def _bwd_kernel(u_ptr, x_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hs_ptr, g_ptr,
                    gu_ptr, gx_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
                    d, L, n, n_chunks, n_dblocks,
                    su_b, su_d, su_l, sx_b, sx_d, sx_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
                    sA_d, sA_n, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """Gradients of ``_fwd_kernel`` for the output gradient g (b, d, L).

        Writes gu, gx (of delta before bias), gz: (b, d, L) contiguous; per program partial sums
        gA (b, d, n), gD and gbias (b, d) (summed over b by the caller), gB and gC
        (b, n_dblocks, n, L) (summed over channel blocks by the caller).
        """
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        mask_d = offs_d < d
        mask_n = offs_n < n
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
        is_first = (offs_t == 0)[None, None, :]
        g_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)   # dL/dh at the next chunk's 1st step
        gA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        gD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        gbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            t = c * BLOCK_T + offs_t
            m_dt = mask_d[:, None] & (t < L)[None, :]
            m_nt = mask_n[:, None] & (t < L)[None, :]
            m_dt1 = mask_d[:, None] & (t + 1 < L)[None, :]
            row_u = pid_b * su_b + offs_d[:, None] * su_d
            row_x = pid_b * sx_b + offs_d[:, None] * sx_d
            u = tl.load(u_ptr + row_u + t[None, :] * su_l, mask=m_dt, other=0.0)
            x = tl.load(x_ptr + row_x + t[None, :] * sx_l, mask=m_dt, other=0.0)
            x1 = tl.load(x_ptr + row_x + (t + 1)[None, :] * sx_l, mask=m_dt1, other=0.0)
            if HAS_BIAS:
                x = x + bias[:, None]
                x1 = x1 + bias[:, None]
            if SOFTPLUS:
                e = tl.exp(-tl.abs(x))
                w = 1.0 + e
                lp = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
                dsp = tl.where(x >= 0, 1.0 / w, e / w)           # softplus'(x) = sigmoid(x)
                x = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)
                e1 = tl.exp(-tl.abs(x1))
                w1 = 1.0 + e1
                lp1 = tl.where(w1 == 1.0, e1, tl.log(w1) * (e1 / tl.where(w1 == 1.0, 1.0, w1 - 1.0)))
                x1 = tl.where(x1 > 20.0, x1, tl.maximum(x1, 0.0) + lp1)
            dt = tl.where(m_dt, x, 0.0)
            dt1 = tl.where(m_dt1, x1, 0.0)                        # dt_{t+1}
            Bt = tl.load(B_ptr + pid_b * sB_b + offs_n[:, None] * sB_n + t[None, :] * sB_l,
                         mask=m_nt, other=0.0)
            Ct = tl.load(C_ptr + pid_b * sC_b + offs_n[:, None] * sC_n + t[None, :] * sC_l,
                         mask=m_nt, other=0.0)
            dtu = dt * u
            # recompute the chunk's states from the saved entry state
            a = tl.exp(dt[:, None, :] * A[:, :, None])
            bu = dtu[:, None, :] * Bt[None, :, :]
            h0 = tl.load(hs_ptr + ((pid_b * d + offs_d[:, None]) * n_chunks + c) * n + offs_n[None, :],
                         mask=mask_dn, other=0.0)
            ca, hl = tl.associative_scan((a, bu), 2, _combine)
            hh = hl + ca * h0[:, :, None]
            go = tl.load(g_ptr + pid_b * sg_b + offs_d[:, None] * sg_d + t[None, :] * sg_l,
                         mask=m_dt, other=0.0)
            out_off = (pid_b * d + offs_d[:, None]) * L + t[None, :]
            if HAS_Z:
                y = tl.sum(hh * Ct[None, :, :], axis=1)
                if HAS_D:
                    y = y + Dv[:, None] * u
                zt = tl.load(z_ptr + pid_b * sz_b + offs_d[:, None] * sz_d + t[None, :] * sz_l,
                             mask=m_dt, other=0.0)
                ez = tl.exp(-tl.abs(zt))
                sz = tl.where(zt >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))
                gy = go * zt * sz
                tl.store(gz_ptr + out_off, go * y * sz * (1.0 + zt * (1.0 - sz)), mask=m_dt)
            else:
                gy = go
            # dL/dh_t = C_t gy_t + a_{t+1} dL/dh_{t+1}: a reverse scan, plus the later chunks
            alpha = tl.exp(dt1[:, None, :] * A[:, :, None])
            cal, gl = tl.associative_scan((alpha, gy[:, None, :] * Ct[None, :, :]), 2, _combine,
                                          reverse=True)
            gh = gl + cal * g_next[:, :, None]
            g_next = tl.sum(tl.where(is_first, gh, 0.0), axis=2)
            ah = hh - bu                                          # a_t * h_{t-1}, no division
            ghB = tl.sum(gh * Bt[None, :, :], axis=1)             # (BLOCK_D, BLOCK_T)
            gdt = tl.sum(gh * ah * A[:, :, None], axis=1) + ghB * u
            gu = ghB * dt
            if HAS_D:
                gu = gu + gy * Dv[:, None]
                gD_acc += tl.sum(gy * u, axis=1)
            if SOFTPLUS:
                gdt = gdt * dsp
            gdt = tl.where(m_dt, gdt, 0.0)
            tl.store(gu_ptr + out_off, gu, mask=m_dt)
            tl.store(gx_ptr + out_off, gdt, mask=m_dt)
            gbias_acc += tl.sum(gdt, axis=1)
            gA_acc += tl.sum(gh * ah * dt[:, None, :], axis=2)
            part = ((pid_b * n_dblocks + pid_d) * n + offs_n[:, None]) * L + t[None, :]
            tl.store(gB_ptr + part, tl.sum(gh * dtu[:, None, :], axis=0), mask=m_nt)
            tl.store(gC_ptr + part, tl.sum(gy[:, None, :] * hh, axis=0), mask=m_nt)
        row = pid_b * d + offs_d
        tl.store(gA_ptr + row[:, None] * n + offs_n[None, :], gA_acc, mask=mask_dn)
        if HAS_D:
            tl.store(gD_ptr + row, gD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(gbias_ptr + row, gbias_acc, mask=mask_d)


def _pow2(x: int) -> int:
    return 1 << max(1, (int(x) - 1).bit_length())


def _blocks(d: int, n: int, L: int, block_d: int, block_t: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, BLOCK_T): powers of two, at least 2, no larger than the problem needs."""
    return min(_pow2(block_d), _pow2(d)), _pow2(n), min(_pow2(block_t), _pow2(L))


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _fwd_constexprs(has_d: bool, has_z: bool, has_bias: bool, softplus: bool, save_states: bool,
                    blocks: tuple[int, int, int]) -> dict:
    """The compile-time arguments of one ``_fwd_kernel`` launch (the launch and
    :func:`launch_configs` both build them here)."""
    BD, BN, BT = blocks
    return dict(HAS_D=bool(has_d), HAS_Z=bool(has_z), HAS_BIAS=bool(has_bias), SOFTPLUS=bool(softplus),
                SAVE_STATES=bool(save_states), BLOCK_D=BD, BLOCK_N=BN, BLOCK_T=BT)


def _bwd_constexprs(has_d: bool, has_z: bool, has_bias: bool, softplus: bool,
                    blocks: tuple[int, int, int]) -> dict:
    """The compile-time arguments of one ``_bwd_kernel`` launch."""
    BD, BN, BT = blocks
    return dict(HAS_D=bool(has_d), HAS_Z=bool(has_z), HAS_BIAS=bool(has_bias), SOFTPLUS=bool(softplus),
                BLOCK_D=BD, BLOCK_N=BN, BLOCK_T=BT)


class LaunchConfig(NamedTuple):
    """One compiled variant of a kernel: its name in this module, the compile-time arguments
    (``tl.constexpr`` values) and ``num_warps``."""
    kernel: str
    constexprs: dict
    num_warps: int


def block_shapes(max_d_state: int, block_d: int = BLOCK_D, block_t: int = BLOCK_T) -> list[tuple[int, int, int]]:
    """Every ``(BLOCK_D, BLOCK_N, BLOCK_T)`` :func:`_blocks` gives for any d, any L and a state
    size n <= ``max_d_state`` (d and L past the caps give the caps)."""
    cap_d, cap_t = _pow2(block_d), _pow2(block_t)
    return sorted({_blocks(d, n, L, block_d, block_t)
                   for d in range(1, cap_d + 1) for n in range(1, max_d_state + 1) for L in range(1, cap_t + 1)})


def launch_configs(max_d_state: int, block_d: int = BLOCK_D, block_t: int = BLOCK_T) -> list[LaunchConfig]:
    """Every kernel variant :func:`selective_scan_triton` (and so the dispatcher, which passes
    the default ``block_d``/``block_t``) can launch for a state size up to ``max_d_state``:
    :func:`block_shapes` x every combination of the optional inputs (D, z, delta_bias), softplus
    and, forward, whether the chunk states are saved for backward. Built with the same functions
    as the launches; tests/test_triton_compile.py compiles them ahead of time for sm_80/sm_90.
    """
    flags = list(itertools.product((False, True), repeat=4))
    out = []
    for blocks in block_shapes(max_d_state, block_d, block_t):
        for has_d, has_z, has_bias, softplus in flags:
            for save in (False, True):
                out.append(LaunchConfig("_fwd_kernel", _fwd_constexprs(has_d, has_z, has_bias, softplus, save, blocks),
                                        NUM_WARPS_FWD))
            out.append(LaunchConfig("_bwd_kernel", _bwd_constexprs(has_d, has_z, has_bias, softplus, blocks),
                                    NUM_WARPS_BWD))
    return out


class _TritonScan(torch.autograd.Function):
    """The fused scan (bias, softplus, D, z) with the Triton kernels; saves its inputs and the
    chunk entry states (b, d, ceil(L / BLOCK_T), n) for backward."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, softplus: bool,
                block_d: int, block_t: int) -> Tensor:
        b, d, L = u.shape
        n = A.shape[1]
        BD, BN, BT = _blocks(d, n, L, block_d, block_t)
        n_chunks = -(-L // BT)
        save = any(ctx.needs_input_grad[:8])
        out = torch.empty(b, d, L, device=u.device, dtype=torch.float32)
        hs = (torch.empty(b, d, n_chunks, n, device=u.device, dtype=torch.float32) if save
              else out)
        zz = u if z is None else z
        _fwd_kernel[(triton.cdiv(d, BD), b)](
            u, delta, A, B, C, u if D is None else D, zz, u if delta_bias is None else delta_bias,
            out, hs, d, L, n, n_chunks,
            *_strides(u), *_strides(delta), *_strides(zz), *_strides(A), *_strides(B), *_strides(C),
            **_fwd_constexprs(D is not None, z is not None, delta_bias is not None, softplus, save, (BD, BN, BT)),
            num_warps=NUM_WARPS_FWD)
        ctx.softplus = bool(softplus)
        ctx.blocks = (BD, BN, BT)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor):
        u, delta, A, B, C, D, z, delta_bias, hs = ctx.saved_tensors
        BD, BN, BT = ctx.blocks
        b, d, L = u.shape
        n = A.shape[1]
        n_chunks = hs.shape[2]
        n_dblocks = -(-d // BD)
        gout = gout.float()
        f32 = dict(device=u.device, dtype=torch.float32)
        gu, gx = torch.empty(b, d, L, **f32), torch.empty(b, d, L, **f32)
        gz = torch.empty(b, d, L, **f32) if z is not None else gu
        gA = torch.empty(b, d, n, **f32)
        gB, gC = torch.empty(b, n_dblocks, n, L, **f32), torch.empty(b, n_dblocks, n, L, **f32)
        gD = torch.empty(b, d, **f32) if D is not None else gu
        gbias = torch.empty(b, d, **f32) if delta_bias is not None else gu
        zz = u if z is None else z
        _bwd_kernel[(n_dblocks, b)](
            u, delta, A, B, C, u if D is None else D, zz, u if delta_bias is None else delta_bias,
            hs, gout, gu, gx, gz, gA, gB, gC, gD, gbias, d, L, n, n_chunks, n_dblocks,
            *_strides(u), *_strides(delta), *_strides(zz), *_strides(gout), *_strides(A),
            *_strides(B), *_strides(C),
            **_bwd_constexprs(D is not None, z is not None, delta_bias is not None, ctx.softplus, (BD, BN, BT)),
            num_warps=NUM_WARPS_BWD)
        return (gu, gx, gA.sum(0), gB.sum(1), gC.sum(1),
                gD.sum(0) if D is not None else None, gz if z is not None else None,
                gbias.sum(0) if delta_bias is not None else None, None, None, None)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          D: Tensor | None = None, z: Tensor | None = None,
                          delta_bias: Tensor | None = None, delta_softplus: bool = False,
                          block_d: int = BLOCK_D, block_t: int = BLOCK_T) -> Tensor:
    """Selective scan with the Triton kernels (fp32 tensors in, fp32 out).

    Args:
        u, delta, z: (b, d, L), any strides.  A: (d, n).  B, C: (b, n, L).  D, delta_bias: (d,).
        block_d: channels per program; block_t: steps per chunk (both rounded to powers of two
            and capped by the problem's size).
    Returns:
        (b, d, L) contiguous, the same as :func:`vimerge.ops.reference.selective_scan_reference`.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    b, d, L = u.shape
    if L == 0 or b == 0 or d == 0:
        # nothing to scan; keep the autograd graph of D and z (all gradients are empty)
        return u.new_zeros(b, d, L) + 0.0 * u
    if u.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the triton scan runs CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing vimerge")
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_d, block_t)


_CHECKED: list[str | None] = []


def _check() -> str | None:
    """None when the kernels can run here, else why not (one line; decided once per process)."""
    if not _CHECKED:
        _CHECKED.append(_usable())
    return _CHECKED[0]


def _usable() -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (and TRITON_INTERPRET is not set)"
    major, minor = torch.cuda.get_device_capability()
    if major < 7:
        return f"Triton needs a GPU of compute capability 7.0 or newer, this one is {major}.{minor}"
    return None


register_backend(Backend("triton", selective_scan_triton,
                         frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}), check=_check,
                         auto_priority={"cuda": 2}))
