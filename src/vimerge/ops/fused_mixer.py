"""Fused CPU path of the bidirectional ("v2") Mamba mixer: numba kernels over channel-last tensors.

The step-by-step mixer (``BiMambaMixer`` in :mod:`vimerge.models.vim`, after hustvl/Vim's
``mamba_simple.py``, ``bimamba_type="v2"``) runs, per direction, a depthwise causal conv1d,
silu, ``x_proj``, ``dt_proj``, the selective scan with ``D`` skip and ``silu(z)`` gate, and for
the backward direction flips ``x``/``z`` before and the output after; every step is a separate
op on (B, d_inner, L) tensors, with transposes, ``flip`` and ``contiguous`` copies between them.
Here the same arithmetic is three steps over the (B, L, 2 d_inner) tensor ``xz = in_proj(h)``:

1. :class:`_ConvSilu` (numba): both directions' conv1d (``d_conv`` taps) + bias + silu, the
   backward direction read in reverse (anti-causal taps, kernel reversed), outputs in token order
   (B, L, d_inner);
2. ``x_proj`` in torch, as three matmuls on those channel-last tensors giving contiguous
   dt rows (B, R, L), B and C (B, L, n) (no slicing copies);
3. :class:`_ScanGate` (numba): per (batch, channel) task, ``dt_proj`` + ``delta_bias`` +
   softplus, both directions' scan with the ``D`` skip (the backward one walking the tokens from
   last to first), their sum times ``scale``; then a second kernel, per (batch, token) row over
   contiguous channels, multiplies by ``silu(z)`` (z read from ``xz``): the (B, L, d_inner)
   input of ``out_proj``. No (B, d_inner, L) ``delta`` tensor is built. Without autograd
   (inference) the output is written over the forward conv output. With d_state 16 the scan
   loops compile with a fixed state count (``numba_cpu.N_STATE``).

In token order the backward direction is: conv ``p_b[t] = b_b + sum_k w_b[k] x[t + K-1-k]``,
scan ``h_b[t] = exp(dt_b[t] A_b) h_b[t+1] + dt_b[t] B_b[t] u_b[t]``; this is the flipped
sequence's causal conv and forward scan read back in token order, so the forward builds no ``flip``.
The conv has a numba backward kernel. The scan's backward (training) is the numba scan
backend's per-channel kernel (:func:`vimerge.ops.numba_cpu.scan_backward`, states recomputed from
the saved inputs), run per direction on channel-major copies (the backward direction flipped),
with ``dt_proj``'s gradients as two matmuls; the forward saves the gate's input
``scale * (y_fwd + y_bwd)`` (B, L, d_inner) for dL/dz. A first fused backward kernel that walked
the channel-last layout was 2-2.5x slower than this (2026-12-03, vim_fmnist shapes: 170-190 ms
against 93-97 ms per block at batch 64; ``benchmarks/mixer.py`` has the model-level numbers).
The kernels use the thread count torch uses (``torch.get_num_threads()``). Results
match the step-by-step mixer within float32 rounding (tests/test_fused_mixer.py: 1e-5 forward,
1e-4 gradients).

Which path runs: ``BiMambaMixer.forward`` takes this one when ``mixer.fused`` (default True) and
:func:`fused_mixer_reason` is None (CPU tensors, numba importable, scan backend ``"numba"`` or an
``"auto"`` resolving to it); ``mixer.fused = False`` or any other backend keeps the step-by-step
mixer. With ToP-ViM's ``gaps`` (a per-token decay stretch) it runs only without autograd
(the scan kernel multiplies the exponent by the stretch; there is no backward for it).
Recording the scans for a reducer (``record_blocks``) works on both paths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import resolve_backend
from .numba_cpu import _IMPORT_ERROR, N_STATE, _run, scan_backward

if _IMPORT_ERROR is None:
    import numpy as np
    from numba import njit, prange

    from .numba_cpu import _exp, _sigmoid, _softplus, _state


class Direction(NamedTuple):
    """One scan direction's parameters, as the mixer holds them (``_b`` ones for backward).

    conv_weight (d, 1, K) and conv_bias (d,) of the depthwise ``conv1d``; x_proj_weight
    (R + 2n, d); dt_proj_weight (d, R) and dt_proj_bias (d,); A_log (d, n); D (d,).
    """
    conv_weight: Tensor
    conv_bias: Tensor
    x_proj_weight: Tensor
    dt_proj_weight: Tensor
    dt_proj_bias: Tensor
    A_log: Tensor
    D: Tensor


class FusedScans(NamedTuple):
    """Scan inputs of one direction in token order, for a reducer that records them:
    delta (B, d, L) before bias and softplus, B and C (B, n, L) (views), A (d, n)."""
    delta: Tensor
    B: Tensor
    C: Tensor
    A: Tensor


def fused_mixer_reason(x: Tensor, scan_backend: str) -> str | None:
    """Why the fused path does not apply to the mixer input ``x`` with this scan backend, or None.

    It applies to CPU tensors when numba is importable and ``scan_backend`` is ``"numba"`` or an
    ``"auto"`` that resolves to it; other backends keep the step-by-step mixer.
    """
    if x.device.type != "cpu":
        return f"tensors are on {x.device.type}, the fused kernels run on cpu"
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if scan_backend not in ("auto", "numba"):
        return f"scan backend {scan_backend!r} is not numba"
    if resolve_backend(scan_backend, x.device).name != "numba":
        return f"scan backend {scan_backend!r} does not resolve to numba here"
    return None


if _IMPORT_ERROR is None:

    @njit(parallel=True, fastmath=True, cache=True)
    def _conv_forward_kernel(xz, wT, bias, wbT, biasb, xc, xcb):
        """xc = silu(causal conv), xcb = silu(anti-causal conv, taps reversed), token order.

        xz (b, L, >= d) (x in its first d channels); wT, wbT (K, d); bias, biasb (d,);
        xc, xcb (b, L, d). One task per (batch, token) row, vectorised over channels.
        """
        b, L, d = xc.shape
        K = wT.shape[0]
        for task in prange(b * L):
            bi = task // L
            t = task % L
            out = xc[bi, t]
            outb = xcb[bi, t]
            for c in range(d):
                out[c] = bias[c]
                outb[c] = biasb[c]
            for k in range(K):
                j = t + k - (K - 1)
                if j >= 0:
                    xr = xz[bi, j]
                    wr = wT[k]
                    for c in range(d):
                        out[c] += wr[c] * xr[c]
                j = t + (K - 1) - k
                if j < L:
                    xr = xz[bi, j]
                    wr = wbT[k]
                    for c in range(d):
                        outb[c] += wr[c] * xr[c]
            for c in range(d):
                p = out[c]
                out[c] = p * _sigmoid(p)
                p = outb[c]
                outb[c] = p * _sigmoid(p)

    @njit(parallel=True, fastmath=True, cache=True)
    def _conv_backward_kernel(xz, wT, bias, wbT, biasb, g, gb, gp, gpb, gxz, gw_part, gwb_part,
                              gbias_part, gbiasb_part):
        """Gradients of :func:`_conv_forward_kernel` for incoming g, gb (b, L, d).

        gp, gpb (b, L, d) are scratch (gradients of the pre-activations); gxz (b, L, 2d) gets
        dL/dx in its first d channels and zeros in the others (z's, filled by the scan's
        backward); per-batch partials gw_part, gwb_part (b, K, d), gbias_part, gbiasb_part (b, d)
        are summed over b by the caller.
        """
        b, L, d = g.shape
        K = wT.shape[0]
        for task in prange(b * L):                     # pre-activation gradients, recomputed
            bi = task // L
            t = task % L
            p = np.empty(d, dtype=np.float32)
            pb = np.empty(d, dtype=np.float32)
            for c in range(d):
                p[c] = bias[c]
                pb[c] = biasb[c]
            for k in range(K):
                j = t + k - (K - 1)
                if j >= 0:
                    for c in range(d):
                        p[c] += wT[k, c] * xz[bi, j, c]
                j = t + (K - 1) - k
                if j < L:
                    for c in range(d):
                        pb[c] += wbT[k, c] * xz[bi, j, c]
            for c in range(d):
                s = _sigmoid(p[c])
                gp[bi, t, c] = g[bi, t, c] * s * (np.float32(1.0) + p[c] * (np.float32(1.0) - s))
                s = _sigmoid(pb[c])
                gpb[bi, t, c] = gb[bi, t, c] * s * (np.float32(1.0) + pb[c] * (np.float32(1.0) - s))
        for bi in prange(b):                           # input and weight gradients
            gw = gw_part[bi]
            gwb = gwb_part[bi]
            for t in range(L):
                out = gxz[bi, t]
                for c in range(2 * d):
                    out[c] = 0.0
                for k in range(K):
                    s = t - k + (K - 1)                # forward rows that read x[t] with tap k
                    if s < L:
                        for c in range(d):
                            out[c] += wT[k, c] * gp[bi, s, c]
                    s = t + k - (K - 1)                # backward rows that read x[t] with tap k
                    if s >= 0:
                        for c in range(d):
                            out[c] += wbT[k, c] * gpb[bi, s, c]
                for k in range(K):
                    j = t + k - (K - 1)
                    if j >= 0:
                        for c in range(d):
                            gw[k, c] += gp[bi, t, c] * xz[bi, j, c]
                    j = t + (K - 1) - k
                    if j < L:
                        for c in range(d):
                            gwb[k, c] += gpb[bi, t, c] * xz[bi, j, c]
                for c in range(d):
                    gbias_part[bi, c] += gp[bi, t, c]
                    gbiasb_part[bi, c] += gpb[bi, t, c]

    @njit(inline="always", fastmath=True)
    def _time_steps(dtr, W, bias, bi, c, dt):
        """dt[t] = softplus(W[c] . dtr[bi, :, t] + bias[c]): dt_proj and the scan's delta_bias,
        softplus fused; dtr (b, R, L), W (d, R). Vectorised over t."""
        L = dt.shape[0]
        for t in range(L):
            dt[t] = 0.0
        for r in range(W.shape[1]):
            w = W[c, r]
            for t in range(L):
                dt[t] += w * dtr[bi, r, t]
        for t in range(L):
            dt[t] = _softplus(dt[t] + bias[c])

    @njit(inline="always", fastmath=True)
    def _scan_row(u, dtr, W, bias, A, Bm, Cm, D, st, has_st, bi, c, reverse, dt, y, add, n):
        """One direction of channel c: y[t] (+)= C_t . h_t + D u_t.

        dt from :func:`_time_steps`. u (b, L, d); dtr (b, R, L); W (d, R); Bm, Cm (b, L, n);
        with ``has_st`` the state decays over st[bi, t] time steps (st (b, L), token order:
        ``h_t = exp(st_t dt_t A) h_{t-1} + dt_t B_t u_t``, ToP-ViM's alignment);
        ``reverse`` walks t = L-1 .. 0; ``n`` states (a literal ``N_STATE`` from the kernel
        compiles a fixed-size state loop).
        """
        L = dt.shape[0]
        _time_steps(dtr, W, bias, bi, c, dt)
        t0, step = (L - 1, -1) if reverse else (0, 1)
        h = _state(n)
        a_row = A[c]
        Dc = D[c]
        for s in range(L):
            t = t0 + step * s
            dtt = dt[t]
            ut = u[bi, t, c]
            dtu = dtt * ut
            acc = Dc * ut
            de = dtt * st[bi, t] if has_st else dtt
            for k in range(n):
                hk = _exp(de * a_row[k]) * h[k] + dtu * Bm[bi, t, k]
                h[k] = hk
                acc += hk * Cm[bi, t, k]
            if add:
                y[t] += acc
            else:
                y[t] = acc

    @njit(parallel=True, fastmath=True, cache=True)
    def _scan_forward_kernel(u, ub, dtr, dtrb, Bm, Bmb, Cm, Cmb, W, Wb, A, Ab, D, Db, bias,
                             biasb, scale, st, stb, has_st, out):
        """out[b, t, c] = scale * (y_fwd + y_bwd)[t], the gate's input (:func:`_gate_kernel`
        applies silu(z)).

        u, ub, out (b, L, d) (out may be u: each task reads its channel of u before writing
        it); dtr, dtrb (b, R, L) (x_proj's dt rows, dt_proj applied here); Bm, Cm, Bmb, Cmb
        (b, L, n); W, Wb (d, R); A, Ab (d, n); with ``has_st``, st and stb (b, L): each
        direction's decay stretch in token order (else any 2-d arrays).
        One task per (batch, channel), the n states vectorised.
        """
        b, L, d = out.shape
        for task in prange(b * d):
            bi = task // d
            c = task % d
            dt = np.empty(L, dtype=np.float32)
            y = np.empty(L, dtype=np.float32)
            if A.shape[1] == N_STATE:
                _scan_row(u, dtr, W, bias, A, Bm, Cm, D, st, has_st, bi, c, False, dt, y, False, N_STATE)
                _scan_row(ub, dtrb, Wb, biasb, Ab, Bmb, Cmb, Db, stb, has_st, bi, c, True, dt, y, True, N_STATE)
            else:
                _scan_row(u, dtr, W, bias, A, Bm, Cm, D, st, has_st, bi, c, False, dt, y, False, A.shape[1])
                _scan_row(ub, dtrb, Wb, biasb, Ab, Bmb, Cmb, Db, stb, has_st, bi, c, True, dt, y, True,
                          A.shape[1])
            for t in range(L):
                out[bi, t, c] = scale * y[t]

    @njit(parallel=True, fastmath=True, cache=True)
    def _gate_kernel(xz, out, ysum, keep):
        """out[b, t] *= silu(z[b, t]) with z = xz[..., d:], one task per (batch, token) row
        (contiguous channels; the scan kernel's per-channel walk reads z with a stride). With
        ``keep``, ysum (b, L, d) first gets out's values (the gate's input, for dL/dz);
        without, ysum is not touched (any array)."""
        b, L, d = out.shape
        for task in prange(b * L):
            bi = task // L
            t = task % L
            o = out[bi, t]
            zr = xz[bi, t]
            if keep:
                ys = ysum[bi, t]
                for c in range(d):
                    ys[c] = o[c]
            for c in range(d):
                zt = zr[d + c]
                o[c] = o[c] * zt * _sigmoid(zt)


def _np(t: Tensor):
    return t.detach().contiguous().numpy()


def _scan_and_gate(tensors: list[Tensor], scale: float, out: Tensor, ysum: Tensor | None = None,
                   stretch: Tensor | None = None) -> Tensor:
    """Run the scan kernel and the gate kernel into ``out`` (b, L, d) for the contiguous inputs
    ``[xz, u, ub, ...]`` (:class:`_ScanGate`'s order); with ``ysum`` also keep the gate's input
    there (for the backward); ``stretch`` (b, 2, L): the directions' decay stretch (inference
    only). ``out`` may be ``u`` (inference writes over the conv output)."""
    if stretch is None:
        st = stb = np.ones((1, 1), dtype=np.float32)
    else:
        st, stb = _np(stretch[:, 0].float()), _np(stretch[:, 1].float())
    _run("fused scan forward", _scan_forward_kernel, *[_np(t) for t in tensors[1:]],
         np.float32(scale), st, stb, stretch is not None, out.numpy())
    keep = ysum is not None
    _run("fused gate", _gate_kernel, _np(tensors[0]), out.numpy(), (ysum if keep else out).numpy(), keep)
    return out


class _ConvSilu(torch.autograd.Function):
    """(xc, xcb) = silu(conv1d) of both directions from xz (b, L, 2d); see the module docstring."""

    @staticmethod
    def forward(ctx, xz: Tensor, w: Tensor, bias: Tensor, wb: Tensor, biasb: Tensor):
        b, L, d2 = xz.shape
        d = d2 // 2
        wT, wbT = w[:, 0, :].t().contiguous(), wb[:, 0, :].t().contiguous()
        xc, xcb = xz.new_empty(b, L, d), xz.new_empty(b, L, d)
        _run("fused conv forward", _conv_forward_kernel, _np(xz), _np(wT), _np(bias), _np(wbT),
             _np(biasb), xc.numpy(), xcb.numpy())
        ctx.save_for_backward(xz, wT, bias, wbT, biasb)
        ctx.weight_shape = w.shape
        return xc, xcb

    @staticmethod
    def backward(ctx, g: Tensor, gb: Tensor):
        xz, wT, bias, wbT, biasb = ctx.saved_tensors
        b, L, d2 = xz.shape
        d, K = d2 // 2, wT.shape[0]
        g = torch.zeros_like(xz[..., :d]) if g is None else g.float()
        gb = torch.zeros_like(xz[..., :d]) if gb is None else gb.float()
        gp, gpb = xz.new_empty(b, L, d), xz.new_empty(b, L, d)
        gxz = torch.empty_like(xz)
        gw, gwb = xz.new_zeros(b, K, d), xz.new_zeros(b, K, d)
        gbias, gbiasb = xz.new_zeros(b, d), xz.new_zeros(b, d)
        _run("fused conv backward", _conv_backward_kernel, _np(xz), _np(wT), _np(bias), _np(wbT),
             _np(biasb), _np(g), _np(gb), *[t.numpy() for t in (gp, gpb, gxz, gw, gwb, gbias, gbiasb)])
        shape = ctx.weight_shape
        return (gxz, gw.sum(0).t().reshape(shape), gbias.sum(0),
                gwb.sum(0).t().reshape(shape), gbiasb.sum(0))


class _ScanGate(torch.autograd.Function):
    """out (b, L, d) = scale * (scan_fwd + scan_bwd) * silu(z); see the module docstring.

    Inputs: xz, then u, ub, dtr, dtrb, Bm, Bmb, Cm, Cmb, W, Wb, A, Ab, D, Db, bias, biasb (as
    :func:`_scan_forward_kernel`), then scale."""

    @staticmethod
    def forward(ctx, *args):
        *tensors, scale = args
        tensors = [t.contiguous() for t in tensors]
        u = tensors[1]
        out, ysum = u.new_empty(u.shape), u.new_empty(u.shape)
        _scan_and_gate(tensors, scale, out, ysum)
        ctx.save_for_backward(*tensors, ysum)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, gout):
        xz, u, ub, dtr, dtrb, Bm, Bmb, Cm, Cmb, W, Wb, A, Ab, D, Db, bias, biasb, ysum = ctx.saved_tensors
        d = u.shape[-1]
        z = xz[..., d:]
        sg = torch.sigmoid(z)
        gout = gout.float()
        gxz = torch.cat([torch.zeros_like(u), gout * ysum * sg * (1 + z * (1 - sg))], dim=-1)   # dL/dz
        gy = (ctx.scale * gout * z * sg).transpose(1, 2).contiguous()   # dL/dy of either scan, (b, d, L)
        grads = []
        for uu, dr, Bx, Cx, Wx, Ax, Dx, bx, rev in ((u, dtr, Bm, Cm, W, A, D, bias, False),
                                                    (ub, dtrb, Bmb, Cmb, Wb, Ab, Db, biasb, True)):
            # this direction's scan in its own order (the backward one flipped), channel-major
            ut, delta = uu.transpose(1, 2), torch.matmul(Wx, dr)   # (b, d, L)
            g, Bt, Ct = gy, Bx, Cx
            if rev:
                ut, delta, g, Bt, Ct = ut.flip(-1), delta.flip(-1), g.flip(-1), Bt.flip(1), Ct.flip(1)
            gu, gdelta, gA, gB, gC, gD, gbias, _ = scan_backward(ut, delta, bx, True, Ax, Bt, Ct, Dx, g)
            if rev:
                gu, gdelta, gB, gC = gu.flip(-1), gdelta.flip(-1), gB.flip(1), gC.flip(1)
            grads.append((gu.transpose(1, 2), torch.matmul(Wx.t(), gdelta), gB, gC,
                          torch.einsum("bdl,brl->dr", gdelta, dr), gA, gD, gbias))
        (gu, gdtr, gB, gC, gW, gA, gD, gbias), (gub, gdtrb, gBb, gCb, gWb, gAb, gDb, gbiasb) = grads
        return (gxz, gu, gub, gdtr, gdtrb, gB, gBb, gC, gCb, gW, gWb, gA, gAb, gD, gDb, gbias, gbiasb, None)


def fused_bimamba_v2(xz: Tensor, fwd: Direction, bwd: Direction, d_state: int, scale: float = 0.5,
                     record: bool = False, stretch: Tensor | None = None
                     ) -> tuple[Tensor, tuple[FusedScans, FusedScans] | None]:
    """The bidirectional mixer between ``in_proj`` and ``out_proj``, fused on the CPU.

    Args:
        xz: ``in_proj(hidden)``, (B, L, 2 d_inner): x in the first d_inner channels, z after.
        fwd, bwd: the two directions' parameters (:class:`Direction`); R = dt_proj's input width.
        d_state: n, the state size (``x_proj`` gives R + 2n features: dt, B, C).
        scale: 0.5 averages the directions (Vim's "div2"), 1.0 sums them (VideoMamba).
        record: also return each direction's :class:`FusedScans` (token order, detached).
        stretch: (B, 2, L) >= 1, optional, inference only: token t's state decays over
            ``stretch[:, 0, t]`` (forward scan) / ``stretch[:, 1, t]`` (backward scan) time
            steps, the input term keeping one (``selective_scan``'s ``decay_scale``; the
            mixer's ``1 + gaps``, ToP-ViM's alignment).
    Returns:
        (B, L, d_inner) ``scale * (y_fwd + flip(y_bwd))`` gated by ``silu(z)``, in ``xz``'s
        dtype (computed in fp32), and the scans (None unless ``record``).
    Raises:
        ValueError: xz is not (B, L, 2 d_inner) for the parameters' d_inner, x_proj's
            output is not R + 2 d_state wide, ``stretch`` is not (B, 2, L), or ``stretch``
            is given where gradients are needed (the step-by-step mixer has them).
    """
    d = fwd.D.shape[0]
    if xz.dim() != 3 or xz.shape[-1] != 2 * d:
        raise ValueError(f"fused_bimamba_v2: xz must be (batch, tokens, {2 * d}) for d_inner {d}, "
                         f"got {tuple(xz.shape)}")
    R, n = fwd.dt_proj_weight.shape[1], d_state
    if fwd.x_proj_weight.shape[0] != R + 2 * n:
        raise ValueError(f"fused_bimamba_v2: x_proj gives {fwd.x_proj_weight.shape[0]} features, "
                         f"expected dt_rank + 2 d_state = {R} + 2 * {n}")
    # every kernel input derives from xz and the two directions' parameters
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (xz, *fwd, *bwd))
    if stretch is not None:
        if stretch.shape != (xz.shape[0], 2, xz.shape[1]):
            raise ValueError(f"fused_bimamba_v2: stretch must be (batch, 2, tokens) = ({xz.shape[0]}, 2, "
                             f"{xz.shape[1]}), got {tuple(stretch.shape)}")
        if grad:
            raise ValueError("fused_bimamba_v2: stretch is inference only (no backward kernel for it); "
                             "run under torch.no_grad() or use the step-by-step mixer")
    x32 = xz.float()
    xc, xcb = _ConvSilu.apply(x32, fwd.conv_weight.float(), fwd.conv_bias.float(),
                              bwd.conv_weight.float(), bwd.conv_bias.float())
    inputs: list[Tensor] = [x32, xc, xcb]
    per_dir = []
    for p, u in ((fwd, xc), (bwd, xcb)):
        w = p.x_proj_weight.float()       # three products: dt (B, R, L), B, C (B, L, n), contiguous
        per_dir.append([torch.matmul(w[:R], u.transpose(1, 2)).float(),      # .float(): under autocast
                        F.linear(u, w[R:R + n]).float(), F.linear(u, w[R + n:]).float(),
                        p.dt_proj_weight.float(), -torch.exp(p.A_log.float()), p.D.float(),
                        p.dt_proj_bias.float()])
    for a, b in zip(*per_dir):            # kernel order: forward's, backward's of each input
        inputs += [a, b]
    if grad:
        out = _ScanGate.apply(*inputs, float(scale))
    else:                                 # inference: no graph; the output overwrites xc
        out = _scan_and_gate([t.contiguous() for t in inputs], scale, xc, stretch=stretch)
    records = None
    if record:
        records = tuple(FusedScans(torch.matmul(w_dt, dtr).detach(),   # (B, d, L)
                                   Bm.transpose(1, 2).detach(), Cm.transpose(1, 2).detach(), A.detach())
                        for dtr, Bm, Cm, w_dt, A, _, _ in per_dir)
    return out.to(xz.dtype), records
