"""A chunked selective scan in pure PyTorch, for accelerators without a scan kernel.

The sequence is split into chunks of (at most) ``chunk_size`` steps. Inside every
chunk all states are computed at once by a Hillis-Steele (inclusive, log-depth)
scan over the pairs ``(a_t, b_t) = (exp(delta_t * A), delta_t * B_t * u_t)`` with the
associative combine ``(a1, b1) then (a2, b2) -> (a2 * a1, a2 * b1 + b2)``; all chunks
are scanned in parallel. The state is then carried from chunk to chunk by a short
sequential loop (``L / chunk_size`` small steps). Gradients come from autograd.

Numerical safety: ``delta >= 0`` (after softplus) and ``A <= 0`` give ``a_t`` in
``[0, 1]``, and the scan only ever multiplies such numbers together (the cumulative
decays stay in ``[0, 1]``) or adds the products to ``b`` terms. There is no
``exp(-cumsum(delta * A))`` and no division by a decay, so nothing can overflow: a
huge ``delta`` just underflows ``a`` to 0 (the state is reset, as in the loop) and a
tiny one leaves ``a`` near 1. The result equals the sequential loop up to fp32
rounding (only the order of the additions differs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import prepare_delta, skip_and_gate
from .registry import Backend, register_backend


def _scan_chunks(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive Hillis-Steele scan along dim -2 of ``a``, ``b`` (..., T, n).

    Returns the cumulative decays ``prod_{s<=t} a_s`` and the states started from zero.
    """
    T = a.shape[-2]
    k = 1
    while k < T:
        # element t combines with element t - k (which holds the span before it);
        # the first k elements combine with the identity (1, 0)
        b = a * F.pad(b[..., :-k, :], (0, 0, k, 0)) + b
        a = a * F.pad(a[..., :-k, :], (0, 0, k, 0), value=1.0)
        k *= 2
    return a, b


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None,
                           delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           chunk_size: int = 16) -> Tensor:
    """Selective scan by chunked parallel scans (fp32 inputs, fp32 output).

    Args:
        u, delta, z: (b, d, L).  A: (d, n).  B, C: (b, n, L).  D, delta_bias: (d,).
        chunk_size: the most steps scanned in parallel; L is split into
            ``ceil(L / chunk_size)`` chunks of equal length (the last padded).
    Returns:
        (b, d, L), the same as :func:`vimerge.ops.reference.selective_scan_reference`.
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    bsz, d, L = u.shape
    n = A.shape[1]
    if L == 0:
        return skip_and_gate(u.new_zeros(bsz, d, 0), u, D, z)
    n_chunks = -(-L // max(1, chunk_size))
    T = -(-L // n_chunks)                     # balanced chunks: little padding
    pad = n_chunks * T - L
    dA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))                # (b, d, L, n)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)    # (b, d, L, n)
    if pad:  # identity elements (a, b) = (1, 0) at the end
        dA = torch.cat([dA, dA.new_ones(bsz, d, pad, n)], dim=2)
        dBu = torch.cat([dBu, dBu.new_zeros(bsz, d, pad, n)], dim=2)
    decay, h_local = _scan_chunks(dA.view(bsz, d, n_chunks, T, n),
                                  dBu.view(bsz, d, n_chunks, T, n))
    # state at the start of every chunk, carried sequentially
    carry = [u.new_zeros(bsz, d, n)]
    for dec, hl in zip(decay[:, :, :-1, -1].unbind(2), h_local[:, :, :-1, -1].unbind(2)):
        carry.append(dec * carry[-1] + hl)
    h0 = torch.stack(carry, dim=2).unsqueeze(3)                          # (b, d, nc, 1, n)
    h = (h_local + decay * h0).view(bsz, d, n_chunks * T, n)[:, :, :L]
    y = torch.einsum("bdln,bnl->bdl", h, C)
    return skip_and_gate(y, u, D, z)


register_backend(Backend("chunked", selective_scan_chunked,
                             frozenset({"cpu", "cuda", "mps", "xpu"}),
                             auto_priority={"cuda": 1}))

