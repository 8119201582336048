"""MTR: training-free token reduction for Vision Mamba scored by the scan's time step
(Ma, Zhang, Su, Chen, Song, Zheng, Gao, "Training-free Token Reduction for Vision Mamba",
arXiv 2507.14042; no public code).

**Score** (the paper's Mamba structure-aware importance): the time step ``Delta`` of a selective
scan sets how much of a token enters the hidden state (``h_t = exp(Delta_t A) h_{t-1} +
Delta_t B_t x_t``), the role attention weights play in a Transformer. At the input of block ``l``
every token ``m`` gets, from block ``l - 1``'s two scans (forward and backward, both in token
order; ``Delta = softplus(dt_proj(x) + bias)``, :meth:`vimerge.tokens.ScanRecord.dt`),

    s_m = (1 / D) sum_d Delta^fwd[d, m] + (1 / D) sum_d Delta^bwd[d, m]      (D = d_inner)

**Rule**: the unprotected tokens sorted by ``s`` (descending) form three groups: **Keep** (the
most important, untouched), **Target** (the middle) and **Source** (the ``r`` least important).
Every Source token is merged into its most cosine-similar Target token (the hidden states,
``merge_state``: a size-weighted average of hidden and residual streams, ``weighted=false``: the
plain average of the merged tokens, the paper's "average"); the survivors keep their original
order (a merged token takes its Target's place) and the class token (Mamba-Reg's registers)
goes back at its proportional slot (:func:`~vimerge.reduce.select.insert_protected`).

**Open in the paper, options here** (ours where not given): ``r`` Source tokens per reducing
block (or ``ratio``, the mean-token reduction ratio, as for every method), Keep = ``keep_frac``
of the survivors (default 0.5; Target the rest, at least one token), the reducing blocks
(default: every 2nd block from block 2, R-MeeTo's schedule, so that both methods see the same
token counts; ``interval``, ``odd``), the size weighting (``weighted``).

**Published** (ImageNet-1K, training-free, ViM-B at -40 % FLOPs): MTR -1.6 top-1, against UTR
-3.9 and ToP-ViM's alignment (HSA) -4.2; also ViM-S, VideoMamba-S/B at -20/-30/-40 % FLOPs.

Defined on Mamba models (Vim, VideoMamba images and clips, Mamba-Reg); a DeiT has no time step
and is refused (:meth:`MTR.unsupported`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tokens import (
    BlockRecord,
    MergePlan,
    TokenModel,
    TokenState,
    check_convention,
    merge_state,
    protected_positions,
)
from .registry import option, register_method
from .schedule import check_r, r_for_ratio, token_counts
from .select import insert_protected, without_protected


def delta_importance(record: BlockRecord) -> Tensor:
    """(B, N) fp32: the channel-mean time step of the forward plus that of the backward scan of
    one block (MTR's score; both records in token order)."""
    return record.forward.dt().mean(dim=1) + record.backward.dt().mean(dim=1)


def mtr_capacity(num_tokens: int, protected: int = 1) -> int:
    """Most tokens one MTR step can remove: all unprotected tokens but one (a Target)."""
    return max(0, num_tokens - protected - 1)


def group_sizes(m: int, r: int, keep_frac: float) -> tuple[int, int, int]:
    """(Keep, Target, Source) sizes for ``m`` unprotected tokens of which ``r`` merge away:
    Keep = floor(keep_frac (m - r)), at most m - r - 1 (one Target at least)."""
    survivors = m - r
    keep = min(math.floor(round(keep_frac * survivors, 9)), survivors - 1)
    return keep, survivors - keep, r


def mtr_plan(score: Tensor, metric: Tensor, cls_index: int, kept: Sequence[int], r: int,
             keep_frac: float = 0.5) -> MergePlan:
    """Plan one MTR step.

    Args:
        score: (B, N) importance (higher: more important); protected entries ignored.
        metric: (B, N, C) features compared by cosine similarity (the hidden states).
        cls_index, kept: the class token's position and every protected position (sorted).
        r: Source tokens, ``0 <= r <= N - P - 1``.
        keep_frac: the Keep group's share of the ``N - P - r`` survivors.

    Returns (B, N) -> (B, N - r): Source tokens in the slot of their most similar Target
    token (ties: the more important Target), survivors in their original order, protected
    tokens at their proportional slots. Ties in ``score`` go to the lower position.
    """
    bsz, n = score.shape
    m = n - len(kept)
    if not 0 <= r <= max(0, m - 1):
        raise ValueError(f"MTR cannot merge {r} of {m} unprotected tokens (at most {max(0, m - 1)}: one Target "
                         f"must stay)")
    dev = score.device
    with torch.no_grad():
        rest_s = without_protected(score.unsqueeze(-1), kept).squeeze(-1).float()          # (B, m)
        rest_x = without_protected(metric, kept).float()                                   # (B, m, C)
        n_keep, n_target, _ = group_sizes(m, r, keep_frac)
        order = torch.sort(rest_s, dim=1, descending=True, stable=True).indices
        target = order[:, n_keep:n_keep + n_target]
        source = order[:, n_keep + n_target:]
        pick = lambda idx: rest_x.gather(1, idx.unsqueeze(-1).expand(-1, -1, rest_x.shape[-1]))  # noqa: E731
        unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)                       # noqa: E731
        sim = unit(pick(source)) @ unit(pick(target)).transpose(1, 2)                           # (B, r, T)
        dst = target.gather(1, sim.argmax(dim=-1)) if r else source
        survive = torch.ones(bsz, m, dtype=torch.bool, device=dev)
        survive.scatter_(1, source, False)
        slot_rest = torch.where(survive, survive.long().cumsum(1) - 1, torch.full((bsz, m), -1, device=dev))
        slot_rest.scatter_(1, source, slot_rest.gather(1, dst))
        slot, new_cls = insert_protected(slot_rest, cls_index, kept, n, n - r)
    return MergePlan(slot, n - r, new_cls)


@register_method("mtr")
@dataclass
class MTR:
    """MTR merging (``vimerge.apply(model, "mtr:ratio=0.28")``, ``"mtr:r=8,keep_frac=0.3"``); see
    the module docstring."""
    r: int | list[int] | None = option(None, "Source tokens merged per reducing block, or one value per block "
                                             "(spec: [0,4,4,...])")
    ratio: float | None = option(None, "mean-token reduction ratio (1 - mean tokens per block / initial tokens), "
                                       "instead of r")
    interval: int = option(2, "reduce every k blocks, from block k (default 2: R-MeeTo's blocks)")
    odd: bool = option(False, "reduce blocks 1, 3, ... instead of 2, 4, ...")
    keep_frac: float = option(0.5, "share of the surviving tokens in the Keep group (the rest are Targets)")
    weighted: bool = option(True, "size-weighted average of merged tokens (false: their plain average)",
                            flag="--unweighted", action="store_false")
    track_source: bool = option(False, "keep the map of original tokens per token (for pictures)", cli=False)

    def __post_init__(self) -> None:
        if self.r is not None and self.ratio is not None:
            raise ValueError("mtr: give either r (Source tokens per reducing block) or ratio, not both")
        if isinstance(self.r, tuple):
            self.r = list(self.r)
        if self.interval < 1:
            raise ValueError(f"mtr: interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.keep_frac < 1.0:
            raise ValueError(f"mtr: keep_frac is the Keep group's share of the survivors, in [0, 1); got "
                             f"{self.keep_frac} (1 would leave no Target to merge into)")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mtr: ratio is the mean-token reduction ratio and must be in [0, 1), got {self.ratio}")

    # ------------------------------------------------------------------ schedule
    def layer_r(self, num_tokens: int, depth: int, protected: int = 1) -> list[int]:
        """Requested Source size of every block (before the per-block cap of one Target)."""
        if self.r is not None and self.ratio is not None:
            raise ValueError(f"mtr: this reducer has r={self.r} and ratio={self.ratio}; set the other one to None")
        capacity = functools.partial(mtr_capacity, protected=protected)
        if self.ratio is not None:
            r = r_for_ratio(self.ratio, num_tokens, depth, self.interval, self.odd, capacity=capacity)
        else:
            r = 0 if self.r is None else self.r
        values = check_r(r, num_tokens, depth, self.interval, self.odd, capacity=capacity)
        if values and values[0]:
            raise ValueError("mtr: block 0 cannot reduce (its time steps come from the previous block); r[0] must be 0")
        return values

    def token_counts(self, num_tokens: int, depth: int, cls_index: int | None = None,
                     site: str = "before_mixer", protected: Sequence[int] | None = None) -> list[int]:
        """Tokens left after each block's reduction (each step keeps one Target at least)."""
        k = 1 if protected is None else len(protected)
        return token_counts(self.layer_r(num_tokens, depth, k), num_tokens,
                            functools.partial(mtr_capacity, protected=k))

    def flops(self, counts: Sequence[int], num_tokens: int, width: int, convention: str = "paper",
              site: str = "before_mixer") -> float:
        """Per image, at every block where the count drops from ``N`` to ``N - r`` (one class
        token assumed): the score, one add per token and channel of both scans' time steps
        (``2 N d_inner``, d_inner = 2 x width); the cosine similarities as R-MeeTo counts them
        (normalisation ``6 (r + T) C``, ``2 C r T`` for the r x T products, T Targets); the
        merge ``r C``. "paper" counts a multiply-add once, "full" twice."""
        mult, total, prev = check_convention(convention), 0.0, num_tokens
        for n in counts:
            if n < prev:
                r = prev - n
                _, t, _ = group_sizes(prev - 1, r, self.keep_frac)
                total += 2 * prev * 2 * width + 6 * (r + t) * width + 2 * width * r * t + r * width
            prev = n
        return mult * total

    # ------------------------------------------------------------------ reducer protocol
    def unsupported(self, model: TokenModel) -> str | None:
        if model.reduction_site != "before_mixer":
            return (f"mtr scores tokens by the selective scan's time step Delta; {type(model).__name__} is a "
                    f"Transformer without a scan: use evit (attention-based), rmeeto or prune")
        return None

    def prepare(self, model: TokenModel, num_tokens: int) -> None:
        self._r = self.layer_r(num_tokens, model.depth, len(protected_positions(model)))
        model.record_blocks([i - 1 for i, r in enumerate(self._r) if r > 0 and i > 0])

    def reduce(self, state: TokenState, model: TokenModel) -> TokenState:
        r = min(self._r[state.layer], mtr_capacity(state.num_tokens, len(state.kept)))
        if r <= 0:
            return state
        rec = model.block_record(state.layer - 1)
        if not isinstance(rec, BlockRecord):
            raise RuntimeError(f"mtr needs the time steps of block {state.layer - 1}, which "
                               f"{type(model).__name__} did not record")
        plan = mtr_plan(delta_importance(rec), state.hidden, state.cls_index, state.kept, r, self.keep_frac)
        if self.weighted:
            return merge_state(state, plan)
        return merge_state(state, plan, weight=1.0 / state.size.float())


__all__ = ["MTR", "delta_importance", "mtr_plan", "group_sizes", "mtr_capacity"]
