"""The bottom of the package: the token state, the merge plan and the written protocols.

Everything a backbone (``vimerge.models``) and a reduction method (``vimerge.reduce``) share
lives here, so that the two never import each other:

* :class:`TokenState`: what flows between blocks (hidden and residual streams, per-token
  ``size``, optional ``source`` map, the class token's index), as in ToMe's ``size``/``source``.
* :class:`MergePlan`, :func:`merge_tokens`, :func:`merge_state`: one reduction step as an
  index map, applied to every stream at once (size-weighted average, R-MeeTo/ToMe).
* :func:`ratio_from_counts`: THE reduction ratio, ``1 - mean tokens per block / initial
  tokens`` (R-MeeTo Table 10); every method's ``ratio`` means this.
* :class:`ScanRecord`, :class:`BlockRecord`: what a Mamba block hands to a reducer that asks
  for its scan inputs (R-MeeTo's B/C/delta/y metrics, STM's hidden-state protection).
* :class:`Reducer` and :class:`TokenModel`: the two protocols. A reducer is installed as
  ``model.reduction`` and called before the token mixer of every block; a model exposes its
  token layout and, on request, its blocks' scan records.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

SITES = ("before_mixer", "after_attention")
"""Where a backbone calls its reducer in block ``i`` (``TokenModel.reduction_site``):
``"before_mixer"`` (Vim, VideoMamba: before the block's token mixer; block 0 never reduces,
its tokens are not mixed yet) or ``"after_attention"`` (DeiT: between the block's attention and
its MLP, as in ToMe and R-MeeTo's DeiT code; every block may reduce, block 0 included)."""

CONVENTIONS = ("paper", "full")
"""FLOPs conventions: ``"paper"`` counts a multiply-add as one FLOP and one scan direction
(R-MeeTo's ``calc_flops``, Table 2); ``"full"`` counts every arithmetic operation."""


def check_convention(convention: str) -> int:
    """Raise ValueError for an unknown FLOPs convention; returns FLOPs per multiply-add (1 or 2)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; use 'paper' or 'full'")
    return 1 if convention == "paper" else 2


def ratio_from_counts(counts: Sequence[int], num_tokens: int) -> float:
    """Mean-token reduction ratio: ``1 - mean(counts) / num_tokens`` (R-MeeTo Table 10).

    ``counts``: tokens each block's mixer sees; ``num_tokens``: tokens after the embedding.
    """
    return 1.0 - sum(counts) / (len(counts) * num_tokens) if counts else 0.0


# --------------------------------------------------------------------------------- the state


@dataclass
class TokenState:
    """What flows between blocks (shapes for B images, N tokens, width E).

    Attributes:
        hidden: (B, N, E) the previous block's mixer output (the embedded tokens before block 0).
        residual: (B, N, E) fp32 residual stream, or None before block 0 (or for backbones
            whose blocks keep no separate residual stream).
        size: (B, N, 1) how many original tokens each token stands for.
        cls_index: position of the class token (the same for every image).
        source: (B, N, N0) optional 0/1 map of which original tokens each token holds
            (only when source tracking is on; N0 = tokens after embedding).
        layer: the index of the block about to run.
        coords: (B, N, 2) optional long ``(frame, cell)`` of every token, given by backbones
            whose tokens form frames (VideoMamba; None elsewhere): the token's frame (0 for an
            image) and its cell of the patch grid (row-major); ``(-1, -1)`` for the class
            token. Reducers read it to merge only within a frame or only across time
            (R-MeeTo's ``scope``). :func:`merge_state` carries it: a merged token keeps the
            coordinates of its first (lowest-index) member, which under such a scoped merge
            share the scoped coordinate with all other members.
        protected: the sorted positions of every token no reducer may merge, absorb into or
            drop: the class token and any other read-out tokens (Mamba-Reg's registers), the
            same for every image; None means ``(cls_index,)`` (one class token). Reducers plan
            on the other tokens only and put the protected ones back in order
            (:func:`protected_slots`); :func:`merge_state` carries the plan's new positions.
        gaps: (B, N, 2) optional float: how many original positions were pruned right before
            each token in the forward scan (``[..., 0]``, between it and the previous token) and
            right after it (``[..., 1]``, the backward scan), for a method that keeps the pruned
            positions' decay in the scan (ToP-ViM's hidden-state alignment); a Mamba block
            passes it to its mixer (:class:`~vimerge.models.mamba.BiMambaMixer`). None: no gaps.
            Set by that method after each of its steps; :func:`merge_state` leaves it None.
    """
    hidden: Tensor
    residual: Tensor | None
    size: Tensor
    cls_index: int
    source: Tensor | None = None
    layer: int = 0
    coords: Tensor | None = None
    protected: tuple[int, ...] | None = None
    gaps: Tensor | None = None

    @classmethod
    def start(cls, tokens: Tensor, cls_index: int, track_source: bool = False,
              coords: Tensor | None = None, protected: Sequence[int] | None = None) -> TokenState:
        """The state entering block 0; ``coords`` (N, 2) or (B, N, 2) and ``protected`` (sorted
        positions, ``cls_index`` among them), see the class docstring.

        Raises:
            ValueError: ``protected`` unsorted, out of range or without ``cls_index``.
        """
        b, n, _ = tokens.shape
        source = None
        if track_source:
            source = torch.eye(n, device=tokens.device, dtype=tokens.dtype).expand(b, n, n)
        if coords is not None:
            coords = coords.to(tokens.device, torch.long).expand(b, n, 2)
        if protected is not None:
            protected = tuple(int(p) for p in protected)
            if list(protected) != sorted(set(protected)) or not 0 <= protected[0] <= protected[-1] < n \
                    or cls_index not in protected:
                raise ValueError(f"protected positions must be sorted, distinct, within the {n} tokens and hold "
                                 f"the class token's {cls_index}; got {protected}")
        return cls(tokens, None, tokens.new_ones(b, n, 1), cls_index, source, coords=coords, protected=protected)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def kept(self) -> tuple[int, ...]:
        """The protected positions (``(cls_index,)`` when ``protected`` is None)."""
        return (self.cls_index,) if self.protected is None else self.protected

    def replace(self, **changes) -> TokenState:
        """A copy with some fields changed (the tensors are shared, not copied)."""
        fields = dict(hidden=self.hidden, residual=self.residual, size=self.size,
                      cls_index=self.cls_index, source=self.source, layer=self.layer, coords=self.coords,
                      protected=self.protected, gaps=self.gaps)
        fields.update(changes)
        return TokenState(**fields)


def protected_slots(positions: Sequence[int], num_in: int, num_out: int) -> tuple[int, ...]:
    """Where the protected tokens go when ``num_in`` tokens become ``num_out``.

    Each keeps its proportional place, ``p * num_out // num_in`` (R-MeeTo's rule for Vim's
    middle class token, official ``RMeeTo_vim.py``), moved just enough that the protected
    tokens stay distinct and in order and each keeps as many slots after it as protected
    tokens follow it; one class token goes exactly to ``p * num_out // num_in``.
    """
    k, out, low = len(positions), [], 0
    for j, p in enumerate(positions):
        slot = min(max(p * num_out // num_in, low), num_out - (k - j))
        out.append(slot)
        low = slot + 1
    return tuple(out)


# --------------------------------------------------------------------------------- merge plans

MERGE_MODES = {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}


@dataclass
class MergePlan:
    """How one reduction step maps N tokens to N - r (indices into the N input tokens).

    Attributes:
        slot: (B, N) output position of every input token; -1 for dropped (pruned) tokens.
        num_out: N - r.
        cls_index: the class token's output position.

    The other protected tokens (:attr:`TokenState.protected`) go where ``slot`` sends them;
    :func:`merge_state` checks that each keeps a slot of its own.
    """
    slot: Tensor
    num_out: int
    cls_index: int
    gather: object = None   # cached fast-path indices (see _gather_plan)


def _gather_plan(plan: MergePlan) -> tuple[Tensor, Tensor, Tensor] | None:
    """(first token of every slot (B, N - r), the other kept tokens (B, k), their slots (B, k)).

    The fast path: each output is one gathered token plus the k tokens merged into it, when
    every image merges the same number of tokens (always true for the built-in methods).
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
    """Apply a plan to (B, N, C) -> (B, N - r, C), combining the tokens of one slot by ``mode``
    ("sum", "mean", "max" or "min"). Tokens the plan drops (slot -1, pruning) do not reach
    the output."""
    bsz, n, c = x.shape
    fast = _gather_plan(plan)
    if fast is not None:       # whole rows of the (B N, C) matrix: index_select / index_add (3x faster than gather)
        first, others, other_slot = fast
        base = torch.arange(bsz, device=x.device)[:, None]
        flat = x.reshape(bsz * n, c)
        out = flat.index_select(0, (first + base * n).flatten())
        if others.shape[1]:
            extra = flat.index_select(0, (others + base * n).flatten())
            rows = (other_slot + base * plan.num_out).flatten()
            if mode in ("sum", "mean"):
                out = out.index_add(0, rows, extra)
            else:                  # max / min (rare): scatter_reduce (index_reduce is a beta API)
                idx = other_slot.unsqueeze(-1).expand(-1, -1, c)
                out = out.view(bsz, plan.num_out, c).scatter_reduce(
                    1, idx, extra.view(bsz, -1, c), MERGE_MODES[mode], include_self=True).view(-1, c)
            if mode == "mean":
                count = torch.ones_like(out[:, :1]).index_add(0, rows, torch.ones_like(extra[:, :1]))
                out = out / count
        return out.view(bsz, plan.num_out, c)
    slot = torch.where(plan.slot >= 0, plan.slot, plan.num_out).unsqueeze(-1)
    out = x.new_zeros(bsz, plan.num_out + 1, c)
    if mode in ("sum", "mean"):
        out.scatter_add_(1, slot.expand(-1, -1, c), x)
        if mode == "mean":
            count = x.new_zeros(bsz, plan.num_out + 1, 1).scatter_add_(1, slot, x.new_ones(bsz, n, 1))
            out = out / count.clamp_min(1)
    else:
        out = out.scatter_reduce(1, slot.expand(-1, -1, c), x, MERGE_MODES[mode], include_self=False)
    return out[:, :plan.num_out]


def merge_state(state: TokenState, plan: MergePlan, mode: str = "sum", weight: Tensor | None = None) -> TokenState:
    """Reduce every stream of the state with one plan, weighting tokens by their size.

    As in the official R-MeeTo code: x' = merge(x * w) / merge(w) with w = size and
    size' = merge(size), the same ``mode`` for all ("sum" and "mean" give the size-weighted
    average). ``weight`` (B, N, 1) >= 0 multiplies the sizes in the average (STM's HSP: w =
    size * weight); sizes keep counting original tokens. The hidden and residual streams go
    through one scatter, in fp32 (each is returned in its own dtype); sources are or-ed.
    """
    protected = None if state.protected is None else _protected_after(state, plan)
    size = merge_tokens(state.size, plan, mode)
    w = state.size if weight is None else state.size * weight
    norm = size if weight is None else merge_tokens(w, plan, mode)
    streams = [state.hidden.float()] if state.residual is None else [state.hidden.float(), state.residual.float()]
    merged = merge_tokens(torch.cat(streams, dim=-1) * w, plan, mode) / norm
    hidden, residual = merged.split(state.hidden.shape[-1], dim=-1) if len(streams) == 2 else (merged, None)
    source = None if state.source is None else merge_tokens(state.source, plan, "max")
    coords = None if state.coords is None else state.coords.gather(
        1, first_members(plan).unsqueeze(-1).expand(-1, -1, state.coords.shape[-1]))
    return state.replace(hidden=hidden.to(state.hidden.dtype),
                         residual=None if residual is None else residual.to(state.residual.dtype),
                         size=size, cls_index=plan.cls_index, source=source, coords=coords,
                         protected=protected, gaps=None)


def _protected_after(state: TokenState, plan: MergePlan) -> tuple[int, ...]:
    """The protected tokens' output positions under ``plan``.

    Raises:
        RuntimeError: the plan drops a protected token, merges anything into one, or sends
            it to different places in different images (a reduction method that does not
            honour :attr:`TokenState.protected`).
    """
    kept = list(state.protected)
    slots = plan.slot[:, kept]                                             # (B, P)
    shared = (plan.slot.unsqueeze(-1) == slots.unsqueeze(1)).sum(1)        # tokens in each protected slot
    if (slots < 0).any() or (shared != 1).any() or (slots != slots[:1]).any() \
            or int(slots[0, kept.index(state.cls_index)]) != plan.cls_index:
        raise RuntimeError(f"a reduction plan at block {state.layer} drops or merges a protected token (class "
                           f"token or register at positions {tuple(kept)}); reduction methods must keep "
                           f"TokenState.protected tokens, each in a slot of its own (see tokens.protected_slots)")
    return tuple(int(v) for v in slots[0].tolist())


def first_members(plan: MergePlan) -> Tensor:
    """(B, N - r): the index of the first (lowest-index) input token of every output slot."""
    fast = _gather_plan(plan)
    if fast is not None:
        return fast[0]
    bsz, n = plan.slot.shape
    slot = torch.where(plan.slot >= 0, plan.slot, plan.num_out)
    first = torch.full((bsz, plan.num_out + 1), n, device=slot.device, dtype=torch.long)
    first.scatter_reduce_(1, slot, torch.arange(n, device=slot.device).expand(bsz, n), "amin")
    return first[:, :plan.num_out]


# --------------------------------------------------------------------------------- scan records


@dataclass
class ScanRecord:
    """One direction of a Mamba block's selective scan, recorded for a reducer, in token order.

    Attributes:
        delta: (B, D, N) raw time steps, before ``delta_bias`` and softplus.
        B, C: (B, n, N) input and output projections.
        A: (D, n) the (negative) state matrix, ``-exp(A_log)``.
        delta_bias: (D,) added to ``delta`` before softplus.
    """
    delta: Tensor
    B: Tensor
    C: Tensor
    A: Tensor
    delta_bias: Tensor

    @property
    def num_tokens(self) -> int:
        return self.delta.shape[-1]

    def dt(self, columns: Tensor | None = None) -> Tensor:
        """Time steps as the scan uses them, ``softplus(delta + delta_bias)``, fp32, (B, D, N)
        or (B, D, len(columns)) for the selected token positions only."""
        delta = self.delta if columns is None else self.delta.index_select(-1, columns)
        return F.softplus(delta.float() + self.delta_bias.float()[None, :, None])


@dataclass
class AttentionRecord:
    """What an attention block recorded in its last forward: the head-averaged queries, keys
    and values, each (B, N, head_dim), in token order (R-MeeTo's DeiT metrics Q, K, V, as
    ``q.mean(dim=1)`` in its official ``vit.py``; ToMe matches on the keys), and ``attn`` (B, N, N),
    the head-averaged attention probabilities (row: the query; EViT's class-token attentiveness is
    the class token's row), detached."""
    q: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor | None = None


@dataclass
class BlockRecord:
    """What a bidirectional Mamba block recorded in its last forward (all in token order).

    Attributes:
        forward: the scan from the first token to the last.
        backward: the scan from the last token to the first (tensors flipped back).
        output: (B, D, N) the mixer's output before its output projection.
    """
    forward: ScanRecord
    backward: ScanRecord
    output: Tensor


# --------------------------------------------------------------------------------- protocols


@runtime_checkable
class TokenModel(Protocol):
    """What a backbone offers token-reduction methods.

    Attributes:
        num_tokens: tokens after the embedding (patches + class token).
        depth: number of blocks; a reducer is called once in each, at ``reduction_site``.
        reduction_site: one of :data:`SITES`: where block ``i`` calls the reducer.
        cls_index: the class token's position after the embedding (a model with several
            read-out tokens names the one STM sweeps toward: Mamba-Reg's middle register).
        protected (optional): the sorted positions of every token a reducer must keep in a
            slot of its own, ``cls_index`` among them (Mamba-Reg: its registers); read it
            with :func:`protected_positions` (default ``(cls_index,)``).
        embed_dim: token width E.
        reduction: the installed :class:`Reducer`, or None.
        in_chans, img_size: the input (B, in_chans, *img_size); grid_size: the patch grid
            (rows, columns); num_classes: the head's outputs.

    Video backbones (VideoMamba) also have ``num_frames`` (T: the input is (B, in_chans, T,
    *img_size), see :func:`input_shape`) and ``token_frames`` (frames of patch tokens, T /
    tubelet; the patch tokens are ``token_frames`` grids of ``grid_size``, frame-major); an
    image model has neither (read them with ``getattr(model, "num_frames", None)``) or has
    ``num_frames = None``.
    """
    num_tokens: int
    depth: int
    cls_index: int
    embed_dim: int
    reduction_site: str
    reduction: Reducer | None
    # what the layers above reductions also read (measure, data, viz, train, cli): the input
    # geometry, the head size and the patch grid of the tokens after the class token
    in_chans: int
    img_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_classes: int

    def record_blocks(self, layers: Collection[int]) -> None:
        """Record :class:`BlockRecord` s in the next forwards of exactly these blocks (empty: none)."""

    def block_record(self, layer: int) -> BlockRecord | AttentionRecord | None:
        """What block ``layer`` recorded in the last forward: a Mamba block's scans
        (:class:`BlockRecord`), an attention block's queries/keys/values
        (:class:`AttentionRecord`), or None (nothing recorded)."""


def input_shape(model: TokenModel, batch: int = 1) -> tuple[int, ...]:
    """The input a model takes: ``(batch, in_chans, *img_size)`` for images, ``(batch,
    in_chans, num_frames, *img_size)`` for a video model (``num_frames`` not None)."""
    frames = getattr(model, "num_frames", None)
    return (batch, model.in_chans, *(() if frames is None else (frames,)), *model.img_size)


def protected_positions(model: TokenModel) -> tuple[int, ...]:
    """The positions after the embedding of the tokens no reduction may merge or drop:
    ``model.protected`` (Mamba-Reg: its registers) or, for a backbone without that attribute,
    ``(model.cls_index,)``."""
    return tuple(getattr(model, "protected", None) or (model.cls_index,))


def token_frames(model: TokenModel) -> int:
    """Frames of patch tokens: ``model.token_frames`` for a video model, else 1."""
    return int(getattr(model, "token_frames", None) or 1)


class Reducer(Protocol):
    """A token-reduction method, called by the model once in every block (at the model's
    ``reduction_site``: before a Mamba mixer, after a Transformer's attention).

    Implementations are dataclasses registered with ``vimerge.reduce.register_method``;
    their fields are the method's options. A method with random options may also offer
    ``rng_state() -> Tensor | None`` and ``set_rng_state(state)`` (re-training saves and
    restores them for an exact resume). A method defined only on some backbones offers
    ``unsupported(model) -> str | None``: the reason it refuses ``model`` (None: it runs there);
    ``vimerge.apply`` raises ValueError with that reason.
    """
    name: str

    def prepare(self, model: TokenModel, num_tokens: int) -> None:
        """Called at the start of every forward (e.g. to ask blocks to record their scans)."""

    def reduce(self, state: TokenState, model: TokenModel) -> TokenState:
        """Map the state entering block ``state.layer`` to a (possibly) smaller one."""

    def token_counts(self, num_tokens: int, depth: int, cls_index: int | None = None,
                     site: str = "before_mixer") -> list[int]:
        """Tokens left after each block's reduction, for ``num_tokens`` tokens after the
        embedding: the tokens block ``i``'s mixer sees (``site="before_mixer"``), or its MLP
        sees (``"after_attention"``; its attention sees entry ``i - 1``).

        On a model with more protected tokens than the class token (Mamba-Reg's registers),
        ``vimerge.token_counts`` also passes ``protected=`` (their positions, sorted, the class
        token's among them); a method that supports such models accepts that keyword."""

    def flops(self, token_counts: Sequence[int], num_tokens: int, width: int,
              convention: str = "paper", site: str = "before_mixer") -> float:
        """FLOPs per image the method itself adds (e.g. the matching), for these counts, on a
        model whose reduction runs at ``site`` (``model.reduction_site``: a Mamba's
        ``"before_mixer"``, a Transformer's ``"after_attention"``), for a method whose cost
        differs between the two (``evit`` scores by the scan on a Mamba); the others ignore it."""


def unsupported_reason(reducer: Reducer, model: TokenModel) -> str | None:
    """Why ``reducer`` is not defined on ``model`` (None: it is): the reducer's optional
    ``unsupported(model)`` (e.g. a method scoring tokens by the selective scan refuses a DeiT)."""
    check = getattr(reducer, "unsupported", None)
    return None if check is None else check(model)


def prepare_reduction(reducer: Reducer, model: TokenModel, num_tokens: int) -> None:
    """What a backbone calls at the start of a reduced forward: refuse a reducer not defined on
    it (ValueError with its ``unsupported`` reason: also when it was assigned to
    ``model.reduction`` without ``vimerge.apply``), then ``reducer.prepare(model, num_tokens)``."""
    reason = unsupported_reason(reducer, model)
    if reason is not None:
        raise ValueError(reason)
    reducer.prepare(model, num_tokens)
