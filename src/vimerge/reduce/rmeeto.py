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

On a clip (VideoMamba) the sequence is one flat sequence, class token first, as in the
official video code (``scope="flat"``); ``scope="frame"`` / ``"time"`` (not in the paper) let a
token merge only with tokens of its own frame / of its own grid cell in other frames, from the
``(frame, cell)`` coordinates the backbone puts in the token state (:func:`scoped_plan`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tokens import (
    MERGE_MODES,
    SITES,
    AttentionRecord,
    BlockRecord,
    MergePlan,
    TokenModel,
    TokenState,
    check_convention,
    merge_state,
    protected_positions,
    ratio_from_counts,
    token_frames,
)
from .registry import option, register_method
from .schedule import bipartite_capacity, check_r, r_for_ratio, token_counts
from .select import insert_protected, without_protected

DISTANCES = ("cosine", "l1", "l2")
GROUPINGS = ("odd-even", "front-behind", "random")
METRICS = ("X", "B", "C", "delta", "y", "Q", "K", "V")
SCAN_METRICS = ("B", "C", "delta", "y")          # a Mamba block's scan, from the previous block
ATTENTION_METRICS = ("Q", "K", "V")              # an attention block's, from the same block
SCOPES = ("flat", "frame", "time")
"""Which tokens may merge: any two (``flat``, the paper's: a clip is one sequence), only tokens
of the same frame (``frame``), or only tokens of the same grid cell in different frames
(``time``); the last two read ``TokenState.coords`` (video backbones)."""
DEFAULT_INTERVAL = {"before_mixer": 2, "after_attention": 1}
"""R-MeeTo's schedules: every 2nd block of a Vim / VideoMamba (blocks 2, 4, ...), every block
of a DeiT (its official ``RMeeTo_deit.py``, as ToMe)."""


def _first_layer(site: str) -> int:
    if site not in SITES:
        raise ValueError(f"unknown reduction site {site!r}; one of {', '.join(SITES)}")
    return 0 if site == "after_attention" else 1


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


def _full_precision(device: torch.device):
    """A context with autocast off on ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return nullcontext()


def bipartite_plan(metric: Tensor, cls_index: int, r: int, *, distance: str = "cosine", kth: int = 1,
                   grouping: str = "odd-even", select: str = "top", pair: str = "best",
                   ordered: bool = True, prune: bool = False,
                   generator: torch.Generator | None = None, protected: Sequence[int] | None = None) -> MergePlan:
    """Plan one R-MeeTo step on ``metric`` (B, N, C) with the class token at ``cls_index``.

    Args:
        r: tokens to remove (at most ``(N - P) // 2``, P protected tokens).
        protected: the positions of every token kept out of the matching (sorted, the class
            token's among them; default ``(cls_index,)``): Mamba-Reg's registers. They are
            neither merged nor absorb anything and go back at their proportional places
            (:func:`~vimerge.tokens.protected_slots`).
        distance: "cosine", "l1" or "l2" (Table 7), on L2-normalised features.
        kth: match every A token to its k-th closest B token (Table 15; 1 = closest).
        grouping: "odd-even", "front-behind" or "random" split of the positions (Table 20).
        select: "top" merges the r best-matched A tokens, "random" r random ones (App. D.4).
        pair: "best" merges into the matched partner, "random" into a random B token (D.4).
        ordered: restore the original token order (default); False gives the odd-even
            shuffle of Table 4: the kept A tokens, then the B tokens.
        prune: drop the r selected tokens instead of merging them (Tables 1a, 18).

    The matching runs in fp32 (fp64 stays fp64) whatever the dtype of ``metric`` and the
    autocast context: bf16/fp16 similarities of close tokens tie or swap, and a reduced model
    would merge other tokens than in fp32 on the same features (the plan is small: its cost
    does not matter).
    """
    bsz, n, _ = metric.shape
    guarded = (cls_index,) if protected is None else tuple(protected)
    m = n - len(guarded)
    r = min(r, bipartite_capacity(n, len(guarded)))
    dev = metric.device
    A, B = _groups(m, grouping, generator, dev)
    with torch.no_grad(), _full_precision(dev):
        metric = metric.to(torch.promote_types(metric.dtype, torch.float32))   # fp64 stays fp64
        rest = without_protected(metric, guarded)
        if grouping == "odd-even":       # strided views: no gather of the two halves (VideoMamba: 1568 tokens)
            scores = _scores(rest[:, 0::2], rest[:, 1::2], distance)        # (B, |A|, |B|)
        else:
            scores = _scores(rest[:, A], rest[:, B], distance)
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
        slot, new_cls = insert_protected(slot_rest, cls_index, guarded, n, n - r)
    return MergePlan(slot, n - r, new_cls)


def scoped_plan(metric: Tensor, groups: Tensor, cls_index: int, r: int, *, distance: str = "cosine",
                kth: int = 1, prune: bool = False, protected: Sequence[int] | None = None) -> MergePlan:
    """Plan one R-MeeTo step in which a token merges only into a token of its own group.

    ``groups`` (B, N): a group id per token (the class token's is ignored), e.g. the frame of
    every token (R-MeeTo's ``scope="frame"``) or its grid cell (``scope="time"``). Inside each
    group the tokens alternate between the sets A and B in sequence order (the odd-even split
    of :func:`bipartite_plan`, applied per group, so that a group always has both when it has
    two tokens); every A token is matched to its most similar (``kth``: k-th) B token of the same
    group, the r best-matched A tokens merge into their partners (or are dropped, ``prune``),
    the order is kept and the class token is re-inserted at ``cls * (N - r) // N``. The score
    matrix is padded to the largest A and B sets of the batch, so it costs what the flat
    matching does.

    Raises:
        ValueError: some image has fewer than r A tokens with a partner in their group.
    """
    bsz, n, _ = metric.shape
    guarded = (cls_index,) if protected is None else tuple(protected)
    m = n - len(guarded)
    dev = metric.device
    with torch.no_grad(), _full_precision(dev):
        metric = metric.to(torch.promote_types(metric.dtype, torch.float32))
        rest = without_protected(metric, guarded)
        g = without_protected(groups.unsqueeze(-1), guarded).squeeze(-1).to(dev, torch.long)
        pos = torch.arange(m, device=dev).expand(bsz, m)
        order = (g * m + pos).argsort(dim=1)                                # by group, then position
        sorted_g = g.gather(1, order)
        starts = torch.ones_like(sorted_g, dtype=torch.bool)
        starts[:, 1:] = sorted_g[:, 1:] != sorted_g[:, :-1]
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
        rank = torch.empty_like(pos).scatter_(1, order, pos - first)        # place inside the group
        in_a = rank % 2 == 0
        n_a = in_a.sum(1)
        a_max, b_max = int(n_a.max()), int((m - n_a).max())
        a_idx = ((~in_a).long() * m + pos).argsort(dim=1)[:, :a_max]       # A tokens first, in order
        b_idx = (in_a.long() * m + pos).argsort(dim=1)[:, :b_max]
        a_ok = torch.arange(a_max, device=dev) < n_a[:, None]
        b_ok = torch.arange(b_max, device=dev) < (m - n_a)[:, None]
        pick = lambda idx: rest.gather(1, idx.unsqueeze(-1).expand(-1, -1, rest.shape[-1]))  # noqa: E731
        scores = _scores(pick(a_idx), pick(b_idx), distance)                # (B, a_max, b_max)
        allowed = (g.gather(1, a_idx)[:, :, None] == g.gather(1, b_idx)[:, None, :]) & a_ok[:, :, None] & b_ok[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        k = min(kth, b_max)
        if k == 1:
            best, partner = scores.max(dim=-1)
        else:
            top = scores.topk(k, dim=-1)
            best, partner = top.values[..., -1], top.indices[..., -1]
        src = best.argsort(dim=-1, descending=True)[:, :r]                 # indices into a_idx
        if not torch.isfinite(best.gather(1, src)).all():
            have = int(torch.isfinite(best).sum(1).min())
            raise ValueError(f"a scoped merge needs {r} tokens with a partner in their group, but an image has "
                             f"only {have} ({m} tokens; kth={kth}); lower r or kth")
        src_pos = a_idx.gather(1, src)
        dst_pos = b_idx.gather(1, partner.gather(1, src))
        kept = torch.ones(bsz, m, dtype=torch.bool, device=dev)
        kept.scatter_(1, src_pos, False)
        slot_rest = torch.where(kept, kept.long().cumsum(1) - 1, torch.full_like(pos, -1))
        if not prune:
            slot_rest.scatter_(1, src_pos, slot_rest.gather(1, dst_pos))
        slot, new_cls = insert_protected(slot_rest, cls_index, guarded, n, n - r)
    return MergePlan(slot, n - r, new_cls)


def scope_capacity(num_tokens: int, groups: int) -> int:
    """Tokens a scoped step can always remove from ``num_tokens`` tokens (class token included)
    whose patch tokens fall in at most ``groups`` groups: every group of s >= 2 tokens offers
    ceil(s / 2) A tokens with a partner, so at least ceil((N - 1 - groups) / 2) in all."""
    return max(0, (num_tokens - 1 - groups + 1) // 2)


def shuffle_tokens(state: TokenState, fraction: float, generator: torch.Generator | None) -> TokenState:
    """Permute a random ``fraction`` of the positions of the tokens that are not protected (the
    class token, registers) among themselves (Table 5)."""
    n = state.num_tokens
    others = [i for i in range(n) if i not in state.kept]
    count = int(round(fraction * len(others)))
    if count < 2:
        return state
    chosen = torch.tensor(others)[torch.randperm(len(others), generator=generator)[:count]]
    perm = torch.arange(n)
    perm[chosen] = chosen[torch.randperm(count, generator=generator)]
    perm = perm.to(state.hidden.device)
    pick = lambda t: None if t is None else t[:, perm]  # noqa: E731
    return state.replace(hidden=pick(state.hidden), residual=pick(state.residual), size=pick(state.size),
                         source=pick(state.source), coords=pick(state.coords))


def matching_flops(num_in: int, width: int, r: int) -> float:
    """Multiply-adds of one bipartite matching step on ``num_in`` tokens of width ``width``
    that removes ``r``: normalisation ``6 N C``, similarities ``2 C (N/2)^2``, merging ``r C``
    (R-MeeTo's ``calc_flops``; Table 2 reproduces with it)."""
    return 6 * num_in * width + 2 * width * (num_in / 2) ** 2 + r * width


@register_method("rmeeto")
@dataclass
class RMeeTo:
    """R-MeeTo merging as a reducer (``vimerge.apply(model, "rmeeto:r=11")``).

    Give ``r`` (tokens per reducing block, or an explicit per-block list) or ``ratio``
    (the mean-token reduction ratio; the nearest r is used). Every field can be changed on
    ``model.reduction`` at run time. Options map to the paper's ablations (R-MeeTo tables
    named in each help text).
    """
    r: int | list[int] | None = option(None, "tokens removed per reducing block, or one value per block (flag: 0,4,4,...; spec: [0,4,4,...])")
    ratio: float | None = option(None, "mean-token reduction ratio (1 - mean tokens per block / initial "
                                       "tokens, R-MeeTo Table 10), instead of r (STM: instead of final_ratio)")
    interval: int | None = option(None, "reduce every k blocks (default: 2 on Mamba models, from block 2, "
                                        "as R-MeeTo; 1 on DeiT, every block)")
    odd: bool = option(False, "reduce blocks 1, 3, ... instead of 2, 4, ... (R-MeeTo Table 16)")
    distance: str = option("cosine", "similarity of the matching (Table 7)", choices=DISTANCES)
    mode: str = option("sum", "how merged tokens combine (Table 17)", choices=tuple(MERGE_MODES))
    kth: int = option(1, "merge into the k-th closest partner (Table 15)")
    grouping: str = option("odd-even", "how tokens split into the two sets (Table 20)", choices=GROUPINGS)
    metric: str = option("X", "features compared (Table 6): X; on Mamba models the previous block's B, C, "
                              "delta, y; on DeiT the block's Q, K, V (head means)", choices=METRICS)
    ordered: bool = option(True, "keep the token order (--shuffle: Table 4's odd-even shuffle, ordered=false)",
                           flag="--shuffle", action="store_false")
    shuffle_ratio: float = option(0.0, "permute this fraction of tokens before each step (Table 5)")
    select: str = option("top", "which matched tokens merge (App. D.4)", choices=("top", "random"))
    pair: str = option("best", "merge into the matched or a random partner (App. D.4)", choices=("best", "random"))
    scope: str = option("flat", "which tokens may merge on a video model: any (flat, the paper's), only within "
                                "a frame (frame) or only across time at one grid cell (time)", choices=SCOPES)
    track_source: bool = option(False, "keep the map of original tokens per token (for pictures)", cli=False)
    seed: int | None = option(None, "seed of the random options")

    drop = False   # Prune sets True: selected tokens are dropped instead of merged

    def __post_init__(self) -> None:
        if self.r is not None and self.ratio is not None:
            raise ValueError("give either r (tokens per reducing block) or ratio, not both")
        if isinstance(self.r, tuple):
            self.r = list(self.r)
        for value, allowed, what in ((self.distance, DISTANCES, "distance"), (self.mode, tuple(MERGE_MODES), "mode"),
                                     (self.grouping, GROUPINGS, "grouping"), (self.metric, METRICS, "metric"),
                                     (self.select, ("top", "random"), "select"),
                                     (self.pair, ("best", "random"), "pair"), (self.scope, SCOPES, "scope")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.scope != "flat":
            other = [f"{k}={v}" for k, v, default in (("grouping", self.grouping, "odd-even"), ("select", self.select, "top"),
                                                      ("pair", self.pair, "best"), ("ordered", self.ordered, True))
                     if v != default]
            if other:
                raise ValueError(f"scope={self.scope!r} splits every group odd-even and merges the best pairs in "
                                 f"order; it does not combine with {', '.join(other)}")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.kth < 1:
            raise ValueError(f"kth must be >= 1, got {self.kth}")
        if not 0.0 <= self.shuffle_ratio <= 1.0:
            raise ValueError(f"shuffle_ratio must be in [0, 1], got {self.shuffle_ratio}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio is the mean-token reduction ratio and must be in [0, 1), got {self.ratio}")
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ schedule
    def layer_r(self, num_tokens: int, depth: int, site: str = "before_mixer", protected: int = 1) -> list[int]:
        """Requested r of every block (before the per-block cap), for a model that reduces at
        ``site`` (see :data:`vimerge.tokens.SITES`) and keeps ``protected`` tokens out of the
        matching (1: the class token; Mamba-Reg: its registers)."""
        if self.r is not None and self.ratio is not None:    # both set at run time
            raise ValueError(f"this reducer has r={self.r} and ratio={self.ratio}; set the other one to None")
        first = _first_layer(site)
        interval = DEFAULT_INTERVAL[site] if self.interval is None else self.interval
        capacity = functools.partial(bipartite_capacity, protected=protected)
        if self.ratio is not None:
            r = r_for_ratio(self.ratio, num_tokens, depth, interval, self.odd, capacity=capacity, first=first)
        else:
            r = 0 if self.r is None else self.r
        return check_r(r, num_tokens, depth, interval, self.odd, capacity=capacity, first=first)

    def token_counts(self, num_tokens: int, depth: int, cls_index: int | None = None,
                     site: str = "before_mixer", protected: Sequence[int] | None = None) -> list[int]:
        """Tokens left after each block's reduction (the class token's place does not matter;
        ``protected``: the positions kept out of the matching, which caps every step at half
        of the others)."""
        k = 1 if protected is None else len(protected)
        capacity = functools.partial(bipartite_capacity, protected=k)
        return token_counts(self.layer_r(num_tokens, depth, site, k), num_tokens, capacity)

    def reduction_ratio(self, num_tokens: int, depth: int, site: str = "before_mixer") -> float:
        return ratio_from_counts(self.token_counts(num_tokens, depth, site=site), num_tokens)

    def flops(self, counts, num_tokens: int, width: int, convention: str = "paper",
              site: str = "before_mixer") -> float:
        """The matching at every block where tokens disappear (:func:`matching_flops`), counted
        as in the paper (a multiply-add is one FLOP) or twice that for ``"full"``. A scoped
        merge (``scope`` frame/time) computes the same padded score matrix: the same count."""
        mult, total, prev = check_convention(convention), 0.0, num_tokens
        for n in counts:
            if n < prev:
                total += mult * matching_flops(prev, width, prev - n)
            prev = n
        return total

    # ------------------------------------------------------------------ reducer protocol
    def prepare(self, model: TokenModel, num_tokens: int) -> None:
        self._r = self.layer_r(num_tokens, model.depth, model.reduction_site, len(protected_positions(model)))
        if self.scope != "flat":
            self._check_scope(model, num_tokens)
        attention = model.reduction_site == "after_attention"
        if self.metric in (SCAN_METRICS if attention else ATTENTION_METRICS):
            offered = "X, Q, K, V" if attention else "X, B, C, delta, y"
            raise ValueError(f"metric {self.metric!r} does not exist on {type(model).__name__} "
                             f"({'an attention model' if attention else 'a Mamba model'}); use one of {offered}")
        if self.metric in ATTENTION_METRICS:     # the reducing block's own attention
            model.record_blocks([i for i in range(model.depth) if self._r[i] > 0])
        else:                                    # the previous block's scan (none for X)
            needs = self.metric in SCAN_METRICS
            model.record_blocks([i for i in range(model.depth - 1) if needs and self._r[i + 1] > 0])
        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def _check_scope(self, model: TokenModel, num_tokens: int) -> None:
        """A scoped merge needs token coordinates and, at every step, r within its capacity."""
        if getattr(model, "token_frames", None) is None:
            raise ValueError(f"scope={self.scope!r} needs a model whose tokens form frames (a video backbone such "
                             f"as VideoMamba); {type(model).__name__} has none: use scope='flat'")
        cells = model.grid_size[0] * model.grid_size[1]
        groups = token_frames(model) if self.scope == "frame" else cells
        n = num_tokens
        for layer, r in enumerate(self._r):
            cap = scope_capacity(n, groups)
            if r > cap:
                raise ValueError(f"scope={self.scope!r}: block {layer} gets {n} tokens in up to {groups} groups, of "
                                 f"which a merge can always remove {cap}; r={r} is more: lower r (or the ratio)")
            n -= min(r, bipartite_capacity(n))

    def rng_state(self) -> Tensor | None:
        """The state of the random options' generator (None until a seeded forward made one);
        saved with re-training checkpoints so that a resumed run draws the same numbers."""
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        if self._generator is None:
            self._generator = torch.Generator()
        self._generator.set_state(state)

    def _metric(self, state: TokenState, model: TokenModel) -> Tensor:
        if self.metric == "X":
            return state.hidden
        if self.metric in ATTENTION_METRICS:
            rec = model.block_record(state.layer)
            if not isinstance(rec, AttentionRecord):
                raise ValueError(f"metric {self.metric!r} needs the attention of block {state.layer}; "
                                 f"{type(model).__name__} has none (Mamba models offer X, B, C, delta, y)")
            return getattr(rec, self.metric.lower())
        rec = model.block_record(state.layer - 1)
        if not isinstance(rec, BlockRecord):
            raise ValueError(f"metric {self.metric!r} needs the scan of block {state.layer - 1}, which "
                             f"{type(model).__name__} did not record (a backbone without a selective scan "
                             f"offers X, and attention models Q, K, V)")
        if self.metric == "y":
            return rec.output.transpose(1, 2)
        fwd, bwd = getattr(rec.forward, self.metric), getattr(rec.backward, self.metric)
        return ((fwd + bwd) / 2).transpose(1, 2)

    def reduce(self, state: TokenState, model: TokenModel) -> TokenState:
        r = min(self._r[state.layer], bipartite_capacity(state.num_tokens, len(state.kept)))
        if r <= 0:
            return state
        if self.metric in SCAN_METRICS and state.layer == 0:
            raise ValueError(f"metric {self.metric!r} comes from the previous block; block 0 cannot reduce")
        if self.shuffle_ratio > 0:
            state = shuffle_tokens(state, self.shuffle_ratio, self._generator)
        metric = self._metric(state, model)
        if self.scope != "flat":
            if state.coords is None:
                raise ValueError(f"scope={self.scope!r} needs the tokens' (frame, cell) coordinates, which "
                                 f"{type(model).__name__} does not provide; use scope='flat'")
            groups = state.coords[..., 0 if self.scope == "frame" else 1]
            plan = scoped_plan(metric, groups, state.cls_index, r, distance=self.distance, kth=self.kth,
                               prune=self.drop, protected=state.protected)
            return merge_state(state, plan, self.mode)
        plan = bipartite_plan(metric, state.cls_index, r, distance=self.distance, kth=self.kth,
                              grouping=self.grouping, select=self.select, pair=self.pair,
                              ordered=self.ordered, prune=self.drop, generator=self._generator,
                              protected=state.protected)
        return merge_state(state, plan, self.mode)
