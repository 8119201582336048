"""The registry of selective-scan backends (a leaf: backends register here, dispatch reads here).

A new backend (e.g. a Triton kernel) is one module under ``vimerge/ops/`` that builds a
:class:`Backend` and calls :func:`register_backend` at import, plus one line in
``dispatch.py``'s import list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _BACKENDS[backend.name] = backend
