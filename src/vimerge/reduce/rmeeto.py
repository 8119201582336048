"""R-MeeTo token merging (and the pruning baseline): ordered bipartite matching inside a Vim.

At a reducing block, the tokens other than the middle class token are split in two groups
(odd/even positions by default); every token of group A is matched to its most similar
token of group B on a metric (the block's input features X by default); the r best-matched
A tokens are merged into their partners (size-weighted average, sizes tracked across
blocks) or, for pruning, dropped. The survivors are put back in their original order (the
merged token takes its destination's place) and the class token is re-inserted at its
proportional position ``cls * (N - r) // N``. The hidden and the residual stream of the
block are reduced with the same plan. See the table of options in the README; each maps to
an ablation of the R-MeeTo paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .schedule import bipartite_capacity, check_r, r_for_ratio, ratio_from_counts, token_counts
from .state import TokenState

DISTANCES = ("cosine", "l1", "l2")
MODES = {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}
GROUPINGS = ("odd-even", "front-behind", "random")
METRICS = ("X", "B", "C", "delta", "y")


@dataclass
class MergePlan:
    """How one reduction step maps N tokens to N - r (indices into the N input tokens).

    Attributes:
        slot: (B, N) output position of every input token; -1 for dropped (pruned) tokens.
        num_out: N - r.
        cls_index: the class token's output position.
    """
    slot: Tensor
    num_out: int
    cls_index: int
    gather: object = None   # cached fast-path indices (see _gather_plan)


def _groups(m: int, grouping: str, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
    """Positions (among the m non-class tokens) of groups A (sources) and B (destinations)."""
    if grouping == "odd-even":
        pos = torch.arange(m, device=device)
        return pos[0::2], pos[1::2]
    if grouping == "front-behind":
        pos = torch.arange(m, device=device)
        return pos[: (m + 1) // 2], pos[(m + 1) // 2:]
    perm = torch.randperm(m, generator=generator).to(device)
    return perm[: (m + 1) // 2].sort().values, perm[(m + 1) // 2:].sort().values


def _scores(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """Similarity (higher = closer) of (B, |A|, C) and (B, |B|, C) after L2 normalisation."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if distance == "cosine":
        return a @ b.transpose(-1, -2)
    return -torch.cdist(a, b, p=1.0 if distance == "l1" else 2.0)


def bipartite_plan(metric: Tensor, cls_index: int, r: int, *, distance: str = "cosine", kth: int = 1,
                   grouping: str = "odd-even", select: str = "top", pair: str = "best",
                   ordered: bool = True, prune: bool = False,
                   generator: torch.Generator | None = None) -> MergePlan:
    """Plan one R-MeeTo step on ``metric`` (B, N, C) with the class token at ``cls_index``.

    Args:
        r: tokens to remove (at most ``(N - 1) // 2``).
        distance: "cosine", "l1" or "l2" (Table 7), on L2-normalised features.
        kth: match every A token to its k-th closest B token (Table 15; 1 = closest).
        grouping: "odd-even", "front-behind" or "random" split of the positions (Table 20).
        select: "top" merges the r best-matched A tokens, "random" r random ones (App. D.4).
        pair: "best" merges into the matched partner, "random" into a random B token (D.4).
        ordered: restore the original token order (default); False gives the odd-even
            shuffle of Table 4: the kept A tokens, then the B tokens.
        prune: drop the r selected tokens instead of merging them (Tables 1a, 18).
    """
    bsz, n, _ = metric.shape
    m = n - 1
    r = min(r, bipartite_capacity(n))
    dev = metric.device
    A, B = _groups(m, grouping, generator, dev)
    with torch.no_grad():
        rest = torch.cat([metric[:, :cls_index], metric[:, cls_index + 1:]], dim=1)
        scores = _scores(rest[:, A], rest[:, B], distance)                  # (B, |A|, |B|)
        k = min(kth, B.numel())
        if k == 1:
            best, partner = scores.max(dim=-1)
        else:
            top = scores.topk(k, dim=-1)
            best, partner = top.values[..., -1], top.indices[..., -1]
        if pair == "random":
            partner = torch.randint(0, B.numel(), partner.shape, generator=generator).to(dev)
        if select == "random":
            order = torch.stack([torch.randperm(A.numel(), generator=generator) for _ in range(bsz)]).to(dev)
        else:
            order = best.argsort(dim=-1, descending=True)
        src, kept = order[:, :r], order[:, r:]                              # indices into A
        dst = partner.gather(1, src)                                         # indices into B
        # representative original position of every output token (B first, then kept A)
        kept_pos = A[kept]                                                   # (B, |A| - r)
        rep = torch.cat([B.expand(bsz, -1), kept_pos], dim=1)               # (B, m - r)
        if ordered:
            out_order = rep.argsort(dim=1)
        else:   # odd-even shuffle: kept A tokens (in position order), then B tokens
            kept_sorted = kept_pos.argsort(dim=1) + B.numel()
            out_order = torch.cat([kept_sorted, torch.arange(B.numel(), device=dev).expand(bsz, -1)], 1)
        rank = out_order.argsort(dim=1)                                      # output slot of rep j
        slot_rest = torch.full((bsz, m), -1, dtype=torch.long, device=dev)
        slot_rest[:, B] = rank[:, :B.numel()]
        slot_rest.scatter_(1, kept_pos, rank[:, B.numel():])
        if not prune:
            slot_rest.scatter_(1, A[src], slot_rest[:, B].gather(1, dst))
        new_cls = cls_index * (n - r) // n
        slot_rest = torch.where(slot_rest >= new_cls, slot_rest + 1, slot_rest)
        slot = torch.cat([slot_rest[:, :cls_index], torch.full((bsz, 1), new_cls, device=dev),
                          slot_rest[:, cls_index:]], dim=1)
    return MergePlan(slot, n - r, new_cls)


def _gather_plan(plan: MergePlan) -> tuple[Tensor, Tensor, Tensor] | None:
    """(first token of every slot (B, N - r), the other kept tokens (B, k), their slots (B, k)).

    The fast path: each output is one gathered token plus the k tokens merged into it, when
    every image merges the same number of tokens (always true for these methods).
    """
    if plan.gather is None:
        bsz, n = plan.slot.shape
        slot = torch.where(plan.slot >= 0, plan.slot, plan.num_out)
        tokens = torch.arange(n, device=slot.device).expand(bsz, n)
        first = torch.full((bsz, plan.num_out + 1), n, device=slot.device, dtype=torch.long)
        first.scatter_reduce_(1, slot, tokens, "amin")
        extra = (first.gather(1, slot) != tokens) & (plan.slot >= 0)
        counts = extra.sum(1)
        if (counts != counts[0]).any():
            plan.gather = False
        else:
            others = extra.nonzero()[:, 1].view(bsz, int(counts[0]))
            plan.gather = (first[:, :plan.num_out], others, slot.gather(1, others))
    return plan.gather or None


def merge_tokens(x: Tensor, plan: MergePlan, mode: str = "sum") -> Tensor:
    """Apply a plan to (B, N, C) -> (B, N - r, C), combining the tokens of one slot by ``mode``.

    Tokens the plan drops (slot -1, pruning) do not reach the output.
    """
    bsz, n, c = x.shape
    fast = _gather_plan(plan)
    if fast is not None:
        first, others, other_slot = fast
        out = x.gather(1, first.unsqueeze(-1).expand(-1, -1, c))
        if others.shape[1]:
            extra = x.gather(1, others.unsqueeze(-1).expand(-1, -1, c))
            idx = other_slot.unsqueeze(-1).expand(-1, -1, c)
            if mode in ("sum", "mean"):
                out = out.scatter_add(1, idx, extra)
            else:
                out = out.scatter_reduce(1, idx, extra, MODES[mode], include_self=True)
            if mode == "mean":
                count = torch.ones_like(out[..., :1]).scatter_add(1, other_slot.unsqueeze(-1),
                                                                  torch.ones_like(extra[..., :1]))
                out = out / count
        return out
    slot = torch.where(plan.slot >= 0, plan.slot, plan.num_out).unsqueeze(-1)
    out = x.new_zeros(bsz, plan.num_out + 1, c)
    if mode in ("sum", "mean"):
        out.scatter_add_(1, slot.expand(-1, -1, c), x)
        if mode == "mean":
            count = x.new_zeros(bsz, plan.num_out + 1, 1).scatter_add_(1, slot, x.new_ones(bsz, n, 1))
            out = out / count.clamp_min(1)
    else:
        out = out.scatter_reduce(1, slot.expand(-1, -1, c), x, MODES[mode], include_self=False)
    return out[:, :plan.num_out]


def merge_state(state: TokenState, plan: MergePlan, mode: str = "sum") -> TokenState:
    """Reduce every stream of the state with one plan, weighting tokens by their size.

    Like the official code: x' = merge(x * size) / merge(size) and size' = merge(size), with
    the same ``mode`` for both ("sum" and "mean" give the size-weighted average). The hidden
    and residual streams go through one scatter.
    """
    size = merge_tokens(state.size, plan, mode)
    streams = [state.hidden] if state.residual is None else [state.hidden, state.residual.to(state.hidden.dtype)]
    merged = merge_tokens(torch.cat(streams, dim=-1) * state.size, plan, mode) / size
    hidden, residual = merged.split(state.hidden.shape[-1], dim=-1) if len(streams) == 2 else (merged, None)
    if residual is not None:
        residual = residual.to(state.residual.dtype)
    source = None if state.source is None else merge_tokens(state.source, plan, "max")
    return TokenState(hidden, residual, size, plan.cls_index, source, state.layer, state.extras)


def shuffle_tokens(state: TokenState, fraction: float, generator: torch.Generator | None) -> TokenState:
    """Permute a random ``fraction`` of the non-class token positions among themselves (Table 5)."""
    n = state.num_tokens
    others = [i for i in range(n) if i != state.cls_index]
    count = int(round(fraction * len(others)))
    if count < 2:
        return state
    chosen = torch.tensor(others)[torch.randperm(len(others), generator=generator)[:count]]
    perm = torch.arange(n)
    perm[chosen] = chosen[torch.randperm(count, generator=generator)]
    perm = perm.to(state.hidden.device)
    pick = lambda t: None if t is None else t[:, perm]  # noqa: E731
    return TokenState(pick(state.hidden), pick(state.residual), pick(state.size), state.cls_index,
                      pick(state.source), state.layer, state.extras)


@dataclass
class RMeeTo:
    """R-MeeTo merging as a reducer (``vimerge.apply(model, "rmeeto", r=11)``).

    Give ``r`` (tokens per reducing block, or an explicit per-block list) or ``ratio``
    (the nearest r is used). Every field can be changed on ``model.reduction`` at run time.
    """
    r: int | Sequence[int] | None = None
    ratio: float | None = None
    interval: int = 2
    odd: bool = False
    distance: str = "cosine"
    mode: str = "sum"
    kth: int = 1
    grouping: str = "odd-even"
    metric: str = "X"
    ordered: bool = True
    shuffle_ratio: float = 0.0
    select: str = "top"
    pair: str = "best"
    prune: bool = False
    track_source: bool = False
    seed: int | None = None
    name: str = field(default="rmeeto", repr=False)

    def __post_init__(self) -> None:
        if (self.r is None) == (self.ratio is None):
            if self.r is None and self.ratio is None:
                self.r = 0
            else:
                raise ValueError("give either r (tokens per reducing block) or ratio, not both")
        for value, allowed, what in ((self.distance, DISTANCES, "distance"), (self.mode, tuple(MODES), "mode"),
                                     (self.grouping, GROUPINGS, "grouping"), (self.metric, METRICS, "metric"),
                                     (self.select, ("top", "random"), "select"),
                                     (self.pair, ("best", "random"), "pair")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.kth < 1:
            raise ValueError(f"kth must be >= 1, got {self.kth}")
        if not 0.0 <= self.shuffle_ratio <= 1.0:
            raise ValueError(f"shuffle_ratio must be in [0, 1], got {self.shuffle_ratio}")
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ schedule
    def layer_r(self, num_tokens: int, depth: int) -> list[int]:
        """Requested r of every block (before the per-block cap)."""
        r = self.r if self.ratio is None else r_for_ratio(self.ratio, num_tokens, depth, self.interval, self.odd)
        return check_r(r, num_tokens, depth, self.interval, self.odd)

    def token_counts(self, num_tokens: int, depth: int) -> list[int]:
        """Tokens each block's mixer sees."""
        return token_counts(self.layer_r(num_tokens, depth), num_tokens)

    def reduction_ratio(self, num_tokens: int, depth: int) -> float:
        return ratio_from_counts(self.token_counts(num_tokens, depth), num_tokens)

    # ------------------------------------------------------------------ reducer protocol
    def prepare(self, model, num_tokens: int) -> None:
        self._r = self.layer_r(num_tokens, len(model.layers))
        needs = self.metric != "X"
        for i, block in enumerate(model.layers):
            block.mixer.record = needs and i + 1 < len(self._r) and self._r[i + 1] > 0
        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def _metric(self, state: TokenState, model) -> Tensor:
        if self.metric == "X":
            return state.hidden
        rec = model.layers[state.layer - 1].mixer.recorded
        if self.metric == "y":
            return rec["y"].transpose(1, 2)
        return ((rec["fwd"][self.metric] + rec["bwd"][self.metric]) / 2).transpose(1, 2)

    def reduce(self, state: TokenState, model) -> TokenState:
        r = min(self._r[state.layer], bipartite_capacity(state.num_tokens))
        if r <= 0:
            return state
        if self.metric != "X" and state.layer == 0:
            raise ValueError(f"metric {self.metric!r} comes from the previous block; block 0 cannot reduce")
        if self.shuffle_ratio > 0:
            state = shuffle_tokens(state, self.shuffle_ratio, self._generator)
        metric = self._metric(state, model)
        plan = bipartite_plan(metric, state.cls_index, r, distance=self.distance, kth=self.kth,
                              grouping=self.grouping, select=self.select, pair=self.pair,
                              ordered=self.ordered, prune=self.prune, generator=self._generator)
        return merge_state(state, plan, self.mode)


def Prune(**options) -> RMeeTo:
    """The pruning baseline: R-MeeTo's selection, with the selected tokens dropped."""
    return RMeeTo(**{**options, "prune": True, "name": "prune"})
