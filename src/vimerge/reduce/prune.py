"""The pruning baseline (R-MeeTo Tables 1a and 18): R-MeeTo's selection, selected tokens dropped.

``vimerge.apply(model, "prune:r=11")`` takes every option of :class:`~vimerge.reduce.rmeeto.RMeeTo`;
the r best-matched tokens of group A are removed instead of merged into their partners. The
FLOPs it adds are R-MeeTo's (it runs the same matching).
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import register_method
from .rmeeto import RMeeTo


@register_method("prune")
@dataclass
class Prune(RMeeTo):
    """Pruning by R-MeeTo's bipartite selection (same options as :class:`RMeeTo`)."""

    drop = True
