"""Memory-lean selective scan in pure PyTorch: checkpoint states, recompute in backward.

Autograd through the reference loop keeps every per-step state (b, d, n) for the backward
pass: L of them. Here the forward runs without autograd and keeps only the state at the
start of each chunk of ``chunk_size`` steps; the backward walks the chunks in reverse,
re-runs each chunk's loop under autograd from its saved state, and back-propagates through
that chunk alone (the gradient of the chunk's first state is carried to the chunk before).
Peak memory is one chunk's states plus L / chunk_size saved states, instead of L states.
This is the strategy of mamba_ssm's CUDA kernel, written with PyTorch ops so it trains on
any machine, compiler or not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import prepare_delta, scan_loop, skip_and_gate
from .registry import Backend, register_backend

DEFAULT_CHUNK = 16


class _CheckpointedScan(torch.autograd.Function):
    """y = scan_loop(u, delta, A, B, C) with chunk-wise recomputation in backward."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                chunk: int) -> Tensor:
        b, d, L = u.shape
        starts = list(range(0, L, chunk))
        states, ys = [], []
        h = u.new_zeros(b, d, A.shape[1])
        for s in starts:
            states.append(h)
            y, h = scan_loop(u[..., s:s + chunk], delta[..., s:s + chunk], A,
                             B[..., s:s + chunk], C[..., s:s + chunk], h)
            ys.append(y)
        ctx.chunk = chunk
        ctx.save_for_backward(u, delta, A, B, C, *states)
        return torch.cat(ys, dim=-1) if ys else u.new_zeros(b, d, 0)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        u, delta, A, B, C, *states = ctx.saved_tensors
        chunk = ctx.chunk
        grads = [torch.zeros_like(t) for t in (u, delta, A, B, C)]
        grad_h = None
        for i in reversed(range(len(states))):
            s = i * chunk
            sl = slice(s, s + chunk)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in
                          (u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], states[i])]
                y, h_end = scan_loop(*leaves)
                outputs, grad_outputs = [y], [grad_y[..., sl]]
                if grad_h is not None:
                    outputs.append(h_end)
                    grad_outputs.append(grad_h)
                g = torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True)
            for acc, gi, view in zip(grads, g[:5], (sl, sl, None, sl, sl)):
                if gi is None:
                    continue
                if view is None:
                    acc += gi
                else:
                    acc[..., view] += gi
            grad_h = g[5]
        return (*grads, None)


def selective_scan_recompute(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Selective scan whose backward recomputes states chunk by chunk (fp32 in/out)."""
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    y = _CheckpointedScan.apply(u, delta, A, B, C, chunk_size)
    return skip_and_gate(y, u, D, z)


register_backend(Backend("recompute", selective_scan_recompute,
                             frozenset({"cpu", "cuda", "mps", "xpu"}),
                             auto_priority={"cpu": 1}))

