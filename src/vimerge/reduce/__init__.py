"""Token reduction: one reducer object per method, installed with :func:`apply`.

>>> import vimerge
>>> vimerge.apply(model, "rmeeto:r=11")        # or apply(model, "rmeeto", ratio=0.31)
>>> model.reduction.r = 13                     # change it at run time
>>> vimerge.token_counts(model)                # tokens each block's mixer sees
>>> vimerge.remove(model)                      # back to the unreduced model

Methods (one file each, registered with :func:`register_method`): ``rmeeto`` (R-MeeTo
merging), ``prune`` (its pruning baseline), ``stm`` (Sequential Token Merging), ``topvim``
(ToP-ViM pruning with hidden-state alignment), ``mtr`` (MTR, merging scored by the scan's time
step), ``evit`` (token recognition: EViT's keep-the-attentive-and-fuse-the-rest). A reduction is
written as one spec string everywhere (:func:`parse_spec`, :func:`format_spec`,
:func:`spec_of`). ``ratio`` is the mean-token reduction ratio for every method.
"""

from __future__ import annotations

from typing import Any

from ..tokens import (
    Reducer,
    TokenModel,
    TokenState,
    protected_positions,
    ratio_from_counts,
    unsupported_reason,
)
from . import evit, mtr, prune, rmeeto, stm, topvim  # noqa: F401  (each registers its method)
from .evit import EViT
from .mtr import MTR
from .prune import Prune
from .registry import (
    METHODS,
    NONE,
    build,
    format_spec,
    list_methods,
    option,
    options_of,
    parse_spec,
    register_method,
    spec_of,
    stored_spec,
)
from .rmeeto import RMeeTo
from .schedule import r_for_ratio, reduction_ratio
from .stm import STM
from .topvim import ToPViM


def apply(model: TokenModel, method: str | Reducer, **options: Any) -> Reducer | None:
    """Install a token-reduction method on a model in place; returns the reducer.

    Args:
        model: a backbone offering the :class:`~vimerge.tokens.TokenModel` protocol (every
            model of ``vimerge.create_model``).
        method: a spec (``"rmeeto:r=11,interval=2"``), a registered name (``"rmeeto"``,
            ``"prune"``, ``"stm"``) built with ``options``, ``"none"`` (removes the
            reduction; returns None) or a reducer object.
        **options: options of the method (they override those of a spec).

    Raises:
        TypeError: ``model`` is not a token model.
        ValueError: an unknown method or option, a value the method refuses (the message
            names it and what is allowed), or a method not defined on this backbone (the
            reducer's ``unsupported(model)`` reason, e.g. a scan-based score on a DeiT).
    """
    if not isinstance(model, TokenModel):
        raise TypeError(f"vimerge.apply needs a vimerge token model (create_model), got {type(model).__name__}")
    if isinstance(method, str):
        reducer = build(method, **options)
    else:
        if options:
            raise ValueError("options go to the reducer's constructor; pass them there")
        reducer = method
    if reducer is None:
        remove(model)
        return None
    reason = unsupported_reason(reducer, model)
    if reason is not None:
        raise ValueError(reason)
    model.record_blocks(())
    model.reduction = reducer
    return reducer


def remove(model: TokenModel) -> None:
    """Take the reduction off: the model computes exactly what it did before :func:`apply`."""
    model.reduction = None
    model.record_blocks(())


def token_counts(model: TokenModel, num_tokens: int | None = None) -> list[int]:
    """Tokens left after each block's reduction under the model's active reduction: what block
    ``i``'s mixer sees on a Mamba model, its MLP on a DeiT (``model.reduction_site``).

    ``num_tokens``: tokens after the embedding (default: the model's, ``model.num_tokens``).
    """
    n = model.num_tokens if num_tokens is None else num_tokens
    if model.reduction is None:
        return [n] * model.depth
    protected = protected_positions(model)
    if len(protected) > 1:       # registers: only methods that know protected tokens are asked
        return model.reduction.token_counts(n, model.depth, model.cls_index, model.reduction_site,
                                            protected=protected)
    return model.reduction.token_counts(n, model.depth, model.cls_index, model.reduction_site)


__all__ = ["apply", "remove", "token_counts", "unsupported_reason", "register_method", "option", "options_of", "list_methods",
           "parse_spec", "format_spec", "spec_of", "stored_spec", "build", "METHODS", "NONE", "reduction_ratio", "r_for_ratio",
           "ratio_from_counts", "RMeeTo", "Prune", "STM", "ToPViM", "MTR", "EViT", "TokenState", "Reducer"]
