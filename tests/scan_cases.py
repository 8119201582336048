"""Shared helpers for the selective-scan tests."""

import torch


def make_inputs(b: int, d: int, n: int, L: int, *, delta_scale: float = 0.5, seed: int = 0,
                dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random scan inputs with the Mamba shapes; A negative as -exp(A_log) is."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, L), delta=r(b, d, L) * delta_scale, A=-(torch.rand(d, n, generator=g, dtype=dtype) * 4 + 0.1),
                B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.5)


def scan_loop_float64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """An independent, deliberately naive float64 scan written from the Mamba equations."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    b, d, L = u.shape
    out = torch.zeros(b, d, L, dtype=torch.float64)
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        out[:, :, t] = (h * C[:, None, :, t]).sum(-1)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * z.double() * torch.sigmoid(z.double())
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    denom = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / denom if denom > 0 else diff
