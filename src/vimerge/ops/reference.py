"""The reference selective scan: a plain sequential loop through autograd.

This is the ground truth every other backend is tested against (the role of
``selective_scan_ref`` in state-spaces/mamba). It is exact but slow, and autograd
keeps every per-step state for the backward pass.

Recurrence, per batch b, channel d and state n (one scan direction)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = sum_n C_t * h_t + D * u_t
    out_t = y_t * silu(z_t)            (when z is given)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Backend, register_backend


def prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """Add the per-channel bias (d,) to delta (b, d, L) and apply softplus if asked."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the skip term ``D * u`` and gate by ``silu(z)``; all (b, d, L), D (d,)."""
    if D is not None:
        y = y + u * D[..., None]
    if z is not None:
        y = y * F.silu(z)
    return y


def scan_loop(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The bare recurrence over the sequence, step by step.

    Args:
        u, delta: (b, d, L), delta already biased / softplus-ed.
        A: (d, n).  B, C: (b, n, L).  h0: optional initial state (b, d, n).
    Returns:
        y: (b, d, L) without the D or z terms, and the last state h_L: (b, d, n).
    """
    b, d, L = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if h0 is None else h0
    ys = []
    # step by step (cache-friendly) over unbind() views: the backward of unbind stacks the
    # step gradients once, where indexing x[..., t] would allocate a full-size gradient per step
    for dt, ut, Bt, Ct in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(dt.unsqueeze(-1) * A) * h + (dt * ut).unsqueeze(-1) * Bt.unsqueeze(1)
        ys.append(torch.matmul(h, Ct.unsqueeze(-1)).squeeze(-1))   # (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
    return y, h


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None,
                             delta_softplus: bool = False) -> Tensor:
    """Selective scan by the sequential loop (fp32 inputs). Shapes as in :func:`vimerge.ops.selective_scan`."""
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    y, _ = scan_loop(u, delta, A, B, C)
    return skip_and_gate(y, u, D, z)


register_backend(Backend("reference", selective_scan_reference,
                             frozenset({"cpu", "cuda", "mps", "xpu"})))

