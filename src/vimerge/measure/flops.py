"""FLOPs of a (token-reduced) model, from its per-block token counts.

``count_flops(model, convention)`` = the backbone's cost at the token counts its reduction
leaves (``model.flops``: for the Mamba backbones the block formula of :meth:`MambaTrunk.flops
<vimerge.models.mamba.MambaTrunk.flops>` plus each backbone's ``outer_flops``; DeiT's in its
file) + what the reduction method itself computes
(``reducer.flops``: R-MeeTo's matching, STM's weighted averages).

Conventions: ``"paper"``, R-MeeTo's (a multiply-add is one FLOP, one scan direction), which
reproduces its Table 2 (Vim-Ti/S/B: 1.45 / 5.08 / 18.87 GFLOPs; with R-MeeTo r = 5 / 11 / 11:
1.28 / 3.58 / 13.21); ``"full"``, every arithmetic operation of the model.
"""

from __future__ import annotations

from ..reduce import token_counts
from ..tokens import check_convention, ratio_from_counts


def count_flops(model, convention: str = "paper", num_tokens: int | None = None) -> float:
    """FLOPs of one image through ``model`` with its active reduction (``model.reduction``).

    Args:
        model: a backbone of ``vimerge.create_model`` (any model with ``flops(counts,
            convention)`` and the token-model protocol).
        convention: ``"paper"`` or ``"full"`` (see the module docstring).
        num_tokens: tokens after the embedding (default: the model's).

    Returns:
        FLOPs per image (a float; divide by 1e9 for GFLOPs).

    Raises:
        ValueError: an unknown convention, or a reduction the model cannot reach.
    """
    check_convention(convention)
    n0 = model.num_tokens if num_tokens is None else num_tokens
    counts = token_counts(model, n0)
    return float(model.flops(counts, convention) + reduction_flops(model, counts, convention, n0))


def reduction_flops(model, counts, convention: str = "paper", num_tokens: int | None = None) -> float:
    """What the active reduction itself computes per image at these token counts (0 without one):
    ``reducer.flops(counts, num_tokens, embed_dim, convention, site=model.reduction_site)``."""
    if model.reduction is None:
        return 0.0
    n0 = model.num_tokens if num_tokens is None else num_tokens
    return float(model.reduction.flops(counts, n0, model.embed_dim, convention, site=model.reduction_site))


def model_cost(model) -> dict:
    """``{"gflops_paper", "gflops_full", "reduction_ratio", "token_counts"}`` of a model with its
    active reduction (GFLOPs per image; the mean-token reduction ratio)."""
    counts = token_counts(model)
    return {"gflops_paper": count_flops(model, "paper") / 1e9,
            "gflops_full": count_flops(model, "full") / 1e9,
            "reduction_ratio": ratio_from_counts(counts, model.num_tokens),
            "token_counts": counts}
