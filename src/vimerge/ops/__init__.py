"""Selective-scan kernels: one signature, several backends, one reference.

>>> from vimerge.ops import selective_scan, available_backends
"""

from .dispatch import (Backend, ScanBackendNotice, available_backends, register_backend,
                             resolve_backend, selective_scan)

__all__ = ["selective_scan", "available_backends", "register_backend", "resolve_backend",
           "Backend", "ScanBackendNotice"]
