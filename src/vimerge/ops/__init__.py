"""Selective-scan kernels: one signature, several backends, one reference.

>>> from vimerge.ops import selective_scan, available_backends
"""

from .dispatch import available_backends, resolve_backend, selective_scan
from .fused_mixer import Direction, FusedScans, fused_bimamba_v2, fused_mixer_reason
from .registry import Backend, ScanBackendNotice, register_backend

__all__ = ["selective_scan", "available_backends", "register_backend", "resolve_backend",
           "Backend", "ScanBackendNotice",
           "fused_bimamba_v2", "fused_mixer_reason", "Direction", "FusedScans"]
