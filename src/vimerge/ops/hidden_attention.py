"""One row of a selective scan's "hidden attention": how much each token's input reaches one
query token's output (Ali, Zimerman, Wolf, "The Hidden Attention of Mamba Models", 2024, Eq. 12;
the form ToP-ViM uses to port EViT's class-token attention to Vim).

For one channel d of a forward scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t``
(tokens in order), the output of query ``q`` is ``y_q = sum_{j<=q} alpha[d, j] u_j`` with

    alpha[d, j] = dt_j[d] sum_n C_q[n] B_j[n] exp(A[d, n] sum_{t=j+1..q} dt_t[d])      (j <= q),

and for the backward scan (run from the last token to the first) the mirror image, ``j >= q``,
decay over ``t = q .. j-1``. Elsewhere alpha is 0. The ``D`` skip and the gate are not part of it.

Two implementations of the same row, tested against each other and against a brute-force scan
(tests/test_hidden_attention.py, tests/test_evit.py):

* :func:`hidden_attention_torch`: the closed form above with cumulative sums, one state at a
  time over (B, D, N) tensors; any device;
* a numba kernel (CPU, fp32, one task per (batch, channel)): walks outwards from the query,
  multiplying the n-vector ``C_q[n] exp(...)`` by one step's decay ``exp(dt A[d, n])`` per token,
  so each token costs n exponentials in registers instead of n passes over (B, D, N) tensors
  (vim_fmnist shapes, batch 256, d_inner 192, 16 states, query 25 of 50, both directions:
  57 ms against 190 ms for the torch form on the 2-core machine, 2026-12-03; see
  ``docs/benchmarks.md``).

:func:`hidden_attention` takes the kernel for CPU tensors when numba imports, else the torch form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numba_cpu import _IMPORT_ERROR, N_STATE, _run

if _IMPORT_ERROR is None:
    import numpy as np
    from numba import njit, prange

    from .numba_cpu import _exp

    @njit(inline="always", fastmath=True)
    def _row(dt, Bt, Cq, A, bi, c, query, step, out, n):
        """alpha of channel c for batch row bi into out (L,), walking from ``query`` by ``step``
        (-1: forward scan, +1: backward scan); ``n`` states (a literal N_STATE unrolls the loop)."""
        L = out.shape[0]
        v = np.empty(n, dtype=np.float32)       # C_q[n] exp(A[c, n] * decay so far)
        for k in range(n):
            v[k] = Cq[bi, k]
        a_row = A[c]
        for t in range(L):
            out[t] = 0.0
        j = query
        while 0 <= j < L:
            if j != query:                      # one more step of decay: dt of the token passed
                dts = dt[bi, c, j - step]
                for k in range(n):
                    v[k] *= _exp(dts * a_row[k])
            acc = np.float32(0.0)
            for k in range(n):
                acc += v[k] * Bt[bi, j, k]
            out[j] = dt[bi, c, j] * acc
            j += step

    @njit(parallel=True, fastmath=True, cache=True)
    def _hidden_attention_kernel(dt, Bt, Cq, A, query, step, out):
        """dt, out (b, d, L); Bt (b, L, n) (B token-major); Cq (b, n) (C of the query); A (d, n)."""
        b, d, L = dt.shape
        n = A.shape[1]
        for task in prange(b * d):
            bi = task // d
            c = task % d
            if n == N_STATE:
                _row(dt, Bt, Cq, A, bi, c, query, step, out[bi, c], N_STATE)
            else:
                _row(dt, Bt, Cq, A, bi, c, query, step, out[bi, c], n)


def hidden_attention_torch(dt: Tensor, B: Tensor, C: Tensor, A: Tensor, query: int,
                           reverse: bool = False) -> Tensor:
    """The closed form (see the module docstring) with cumulative sums, any device.

    dt: (batch, D, N) time steps after bias and softplus; B, C: (batch, n, N); A: (D, n);
    ``query`` in [0, N); ``reverse``: the backward scan. Returns alpha (batch, D, N), fp32
    (float64 for float64 ``dt``).
    """
    dtype = torch.promote_types(dt.dtype, torch.float32)
    dt, B, C, A = dt.to(dtype), B.to(dtype), C.to(dtype), A.to(dtype)
    n = dt.shape[-1]
    cum = dt.cumsum(-1)
    pos = torch.arange(n, device=dt.device)
    at_q = cum[..., query:query + 1]
    if reverse:   # decay over t = query .. j - 1: cum[j - 1] - cum[query - 1]
        decay = (cum - dt) - (at_q - dt[..., query:query + 1])
        reach = pos >= query
    else:         # decay over t = j + 1 .. query: cum[query] - cum[j]
        decay = at_q - cum
        reach = pos <= query
    decay = decay.clamp_min(0).masked_fill(~reach, 0.0)
    cb = C[:, :, query:query + 1] * B                                    # (batch, n, N): C_q[s] B_j[s]
    alpha = torch.zeros_like(dt)
    for s in range(A.shape[1]):                                          # one state at a time
        alpha += torch.exp(A[None, :, s:s + 1] * decay) * cb[:, s:s + 1, :]
    return (alpha * dt).masked_fill(~reach, 0.0)


def hidden_attention_numba(dt: Tensor, B: Tensor, C: Tensor, A: Tensor, query: int,
                           reverse: bool = False) -> Tensor:
    """The numba kernel; same arguments and result as :func:`hidden_attention_torch` (CPU only).

    Raises RuntimeError when numba is not importable, ValueError for tensors not on the CPU.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    if dt.device.type != "cpu":
        raise ValueError(f"hidden_attention_numba runs on cpu tensors, got {dt.device.type}")
    dt = dt.detach().float().contiguous()
    out = torch.empty_like(dt)
    Bt = B.detach().float().transpose(1, 2).contiguous()                 # (batch, N, n)
    Cq = C.detach().float()[:, :, query].contiguous()                    # (batch, n)
    _run("hidden attention", _hidden_attention_kernel, dt.numpy(), Bt.numpy(), Cq.numpy(),
         A.detach().float().contiguous().numpy(), int(query), 1 if reverse else -1, out.numpy())
    return out


def hidden_attention(dt: Tensor, B: Tensor, C: Tensor, A: Tensor, query: int, reverse: bool = False) -> Tensor:
    """alpha (batch, D, N) fp32: the query's hidden-attention row of one scan direction.

    dt: (batch, D, N) time steps after bias and softplus; B, C: (batch, n, N); A: (D, n);
    ``query`` in [0, N); ``reverse``: the backward scan. The numba kernel on CPU tensors when
    numba imports (no autograd: the row is a score), else :func:`hidden_attention_torch`.
    Raises IndexError for a query outside [0, N).
    """
    n = dt.shape[-1]
    if not 0 <= query < n:
        raise IndexError(f"hidden_attention: query {query} outside the {n} tokens")
    if dt.device.type == "cpu" and _IMPORT_ERROR is None:
        return hidden_attention_numba(dt, B, C, A, query, reverse)
    return hidden_attention_torch(dt, B, C, A, query, reverse)


__all__ = ["hidden_attention", "hidden_attention_torch", "hidden_attention_numba"]
