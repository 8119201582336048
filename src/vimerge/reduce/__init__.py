"""Token reduction for Vim: one reducer object per method, installed with :func:`apply`.

>>> import vimerge
>>> vimerge.apply(model, "rmeeto", r=11)       # or ratio=0.31
>>> model.reduction.r = 13                     # change it at run time
>>> vimerge.remove(model)                      # back to the unreduced model
"""

from __future__ import annotations

from typing import Any, Callable

from .rmeeto import Prune, RMeeTo
from .schedule import r_for_ratio, reduction_ratio
from .state import Reducer, TokenState

METHODS: dict[str, Callable[..., Any]] = {"rmeeto": RMeeTo, "prune": Prune}


def register_method(name: str, factory: Callable[..., Any]) -> None:
    """Make ``apply(model, name, **options)`` build ``factory(**options)``."""
    METHODS[name] = factory


def apply(model, method: str | Reducer, **options: Any) -> Reducer:
    """Install a token-reduction method on a Vim in place; returns the reducer.

    ``method`` is a name (``"rmeeto"``, ``"prune"``, ``"stm"``) built with ``options``, or a
    reducer object. The reducer is ``model.reduction``: change its fields at run time.
    """
    if not hasattr(model, "layers") or not hasattr(model, "reduction"):
        raise TypeError(f"vimerge.apply needs a vimerge VisionMamba, got {type(model).__name__}")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown reduction method {method!r}; available: {', '.join(sorted(METHODS))}")
        reducer = METHODS[method](**options)
    else:
        if options:
            raise ValueError("options go to the reducer's constructor; pass them there")
        reducer = method
    model.reduction = reducer
    return reducer


def remove(model) -> None:
    """Take the reduction off: the model computes exactly what it did before ``apply``."""
    model.reduction = None
    for block in model.layers:
        block.mixer.record = False
        block.mixer.recorded = {}


def token_counts(model, num_tokens: int | None = None) -> list[int]:
    """Tokens each block's mixer sees under the model's active reduction."""
    n = model.num_patches + 1 if num_tokens is None else num_tokens
    if model.reduction is None:
        return [n] * len(model.layers)
    return model.reduction.token_counts(n, len(model.layers))


__all__ = ["apply", "remove", "register_method", "token_counts", "reduction_ratio", "r_for_ratio",
           "RMeeTo", "Prune", "TokenState", "METHODS"]

from . import stm  # noqa: E402,F401  (registers "stm"; imported last: stm.py uses register_method)
from .stm import STM  # noqa: E402

__all__ += ["STM"]
