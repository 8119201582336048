"""One entry point for the selective scan, and the registry of its backends.

Every backend has the signature of :func:`selective_scan` (without ``backend``),
receives fp32 tensors and returns an fp32 tensor; the dispatcher validates shapes,
casts and picks the backend. A new backend (e.g. a Triton kernel) is one module that
registers itself in :mod:`vimerge.ops.registry`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import chunked, mamba_ssm, numba_cpu, recompute, reference, triton  # noqa: F401  (each registers its backend)
from .registry import _BACKENDS, Backend, ScanBackendNotice

_NOTICED: set[str] = set()

def _unavailable_reason(backend: Backend) -> str | None:
    try:
        return backend.check()
    except Exception as exc:  # a broken optional dependency must not break dispatch
        return f"{type(exc).__name__}: {exc}"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends usable on this machine (optionally: on this device type)."""
    dev = None if device is None else torch.device(device).type
    return [name for name, be in _BACKENDS.items()
            if (dev is None or dev in be.devices) and _unavailable_reason(be) is None]


def resolve_backend(backend: str, device: torch.device | str) -> Backend:
    """The backend ``backend`` names for tensors on ``device`` (``"auto"`` picks one)."""
    dev = torch.device(device).type
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown scan backend {backend!r}; known: {sorted(_BACKENDS)}")
        be = _BACKENDS[backend]
        if dev not in be.devices:
            raise ValueError(f"scan backend {backend!r} runs on {sorted(be.devices)}, "
                             f"not on {dev!r} tensors; use backend='auto'")
        reason = _unavailable_reason(be)
        if reason is not None:
            raise RuntimeError(f"scan backend {backend!r} is not usable here: {reason}")
        return be
    ranked = sorted((be for be in _BACKENDS.values() if dev in be.auto_priority),
                    key=lambda be: -be.auto_priority[dev])
    for i, be in enumerate(ranked):
        reason = _unavailable_reason(be)
        if reason is None:
            if i > 0:
                _notice(f"vimerge: selective scan on {dev} falls back to {be.name!r} "
                        f"({ranked[0].name!r} unavailable: {_unavailable_reason(ranked[0])})")
            return be
    return _BACKENDS["reference"]


def _notice(message: str) -> None:
    if message not in _NOTICED:
        _NOTICED.add(message)
        warnings.warn(message, ScanBackendNotice, stacklevel=3)


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d, L), got shape {tuple(u.shape)}")
    b, d, L = u.shape
    n = A.shape[-1]
    expected = {"delta": (delta, (b, d, L)), "A": (A, (d, n)), "B": (B, (b, n, L)),
                "C": (C, (b, n, L)), "D": (D, (d,)), "z": (z, (b, d, L)),
                "delta_bias": (delta_bias, (d,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape} "
                             f"(u is {tuple(u.shape)}, A is {tuple(A.shape)}), got {tuple(t.shape)}")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   backend: str = "auto", decay_scale: Tensor | None = None) -> Tensor:
    """Selective scan (Mamba S6), shapes as in ``mamba_ssm.selective_scan_fn``.

    Args:
        u: input (batch, d, L).
        delta: time steps (batch, d, L), before ``delta_bias`` and softplus.
        A: state matrix (d, n), usually ``-exp(A_log)``.
        B, C: input-dependent projections (batch, n, L).
        D: skip weights (d,), optional.
        z: gate (batch, d, L), optional; the output is multiplied by ``silu(z)``.
        delta_bias: (d,) added to delta; ``delta_softplus`` applies softplus after it.
        backend: ``"auto"`` or a name from :func:`available_backends`.
        decay_scale: (batch, 1 or d, L) >= 1, optional: the state decays over ``decay_scale``
            time steps while the input term keeps one, ``h_t = exp(s_t dt_t A) h_{t-1} + dt_t B_t
            u_t`` (``s = decay_scale``, ``dt`` after bias and softplus): ``s_t - 1`` positions
            without input before ``t``, each with ``t``'s time step (ToP-ViM's hidden-state
            alignment, see ``BiMambaMixer.forward``). Any backend: it runs the plain scan on
            ``u / s`` with time steps ``s dt`` and adds the ``D`` term and the gate itself.
    Returns:
        (batch, d, L) in the dtype of ``u``; computed in fp32 whatever the input dtype.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    if decay_scale is not None:
        if decay_scale.dim() != 3 or decay_scale.shape[0] != u.shape[0] or decay_scale.shape[-1] != u.shape[-1] \
                or decay_scale.shape[1] not in (1, u.shape[1]):
            raise ValueError(f"decay_scale must be (batch, 1 or d, L) = ({u.shape[0]}, 1 or {u.shape[1]}, "
                             f"{u.shape[-1]}), got {tuple(decay_scale.shape)}")
        dt = delta.float() if delta_bias is None else delta.float() + delta_bias.float()[:, None]
        dt = (F.softplus(dt) if delta_softplus else dt) * decay_scale.float()
        uf = u.float()
        y = selective_scan(uf / decay_scale.float(), dt, A, B, C, backend=backend)
        if D is not None:
            y = y + uf * D.float()[:, None]
        return (y if z is None else y * F.silu(z.float())).to(u.dtype)
    be = resolve_backend(backend, u.device)
    out = be.fn(f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), f32(z),
                f32(delta_bias), delta_softplus)
    return out.to(u.dtype)
