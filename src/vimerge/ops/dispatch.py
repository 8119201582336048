"""One entry point for the selective scan, and the registry of its backends.

Every backend has the signature of :func:`selective_scan` (without ``backend``),
receives fp32 tensors and returns an fp32 tensor; the dispatcher validates shapes,
casts and picks the backend. A new backend (e.g. a Triton kernel) is one module that
calls :func:`register_backend`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

ScanFn = Callable[..., Tensor]


class ScanBackendNotice(UserWarning):
    """Emitted (once per reason) when ``auto`` cannot use the preferred backend."""


@dataclass
class Backend:
    """A selective-scan implementation.

    Attributes:
        name: the name users pass as ``backend=``.
        fn: the implementation, same signature as :func:`selective_scan` minus ``backend``.
        devices: device types it runs on (``{"cpu"}``, ``{"cuda"}``, ...).
        check: returns ``None`` when usable on this machine, else a one-line reason.
        auto_priority: higher is preferred by ``auto`` on a device; ``None`` = never auto.
    """
    name: str
    fn: ScanFn
    devices: frozenset[str]
    check: Callable[[], str | None] = field(default=lambda: None)
    auto_priority: dict[str, int] = field(default_factory=dict)


_BACKENDS: dict[str, Backend] = {}
_NOTICED: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _BACKENDS[backend.name] = backend


def _unavailable_reason(backend: Backend) -> str | None:
    try:
        return backend.check()
    except Exception as exc:  # a broken optional dependency must not break dispatch
        return f"{type(exc).__name__}: {exc}"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends usable on this machine (optionally: on this device type)."""
    _ensure_loaded()
    dev = None if device is None else torch.device(device).type
    return [name for name, be in _BACKENDS.items()
            if (dev is None or dev in be.devices) and _unavailable_reason(be) is None]


def resolve_backend(backend: str, device: torch.device | str) -> Backend:
    """The backend ``backend`` names for tensors on ``device`` (``"auto"`` picks one)."""
    _ensure_loaded()
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
                   backend: str = "auto") -> Tensor:
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
    Returns:
        (batch, d, L) in the dtype of ``u``; computed in fp32 whatever the input dtype.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    be = resolve_backend(backend, u.device)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    out = be.fn(f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), f32(z),
                f32(delta_bias), delta_softplus)
    return out.to(u.dtype)


_LOADED = False


def _ensure_loaded() -> None:
    """Import the backend modules (each registers itself) on first use."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import reference, recompute, chunked, numba_cpu  # noqa: F401
