"""STM (Sequential Token Merging): BNNM token selection with HSP merge weights.

Two parts, both described in ``docs/stm.md``:

* **BNNM** (bidirectional nearest-neighbour merging) decides *which* tokens go and *where* they
  go, without looking at the data. Each side of the middle class token gives up ``per_side``
  tokens per reducing block, at fixed positions that sweep from the far end of the side toward
  the class token (distance fading: far tokens are merged first). A removed token is merged into
  the nearest token that remains, on its class-token side. Token order is preserved; the class
  token is never removed and never absorbs anything.
* **HSP** (hidden-state protection) decides *how much* each absorbed token counts. The weight
  is derived from the Mamba recurrence of the scan that carries the removed token toward the
  class token, using the time steps, ``B`` and ``C`` that the *previous* block recorded at
  those positions (``hsp=False`` gives the size-weighted average of R-MeeTo).

Two ways to set the amount, like every method of vimerge: ``ratio`` is the mean-token
reduction ratio (``1 - mean tokens per block / initial tokens``, R-MeeTo Table 10), for which
the schedule whose mean is nearest is searched (:func:`settings_for_mean_ratio`);
``final_ratio`` is STM's own setting (its Tables 1-3: 15 / 20 / 30 / 40 %), the fraction of
the tokens gone after the last reducing block.

Sweep positions (the BNNM schedule). With ``N`` tokens, the class token at ``c`` and
``T = floor(final_ratio * N + 1/2)`` tokens to remove in total, the left side (``L = c`` tokens) gives
``T_L`` tokens and the right side (``R = N - 1 - c``) gives ``T_R = T - T_L``; the odd token
goes to the longer side, to the left on a tie. Side ``s`` of length ``S`` removes, in this
order, the tokens at distance ``floor(k * S / T_s)`` from its far end, ``k = 0 .. T_s - 1``
(left: original position ``floor(k L / T_L)``; right: ``N - 1 - floor(k R / T_R)``). The
stride ``S / T_s >= 1`` spreads the removed tokens evenly over the side, so the sweep reaches
its nearest position, ``S / T_s`` tokens from the class token, exactly when the target is met;
the token next to the class token is never removed (at most ``S - 1`` per side). Blocks
``start_layer, start_layer + 1, ...`` each take the next ``per_side`` positions of every side
(fewer in the last one), and reduction stops once ``T`` tokens are gone.

A class token at position 0 (DeiT, VideoMamba): the left side is empty (``L = 0``), so the
right side gives all ``T`` tokens, swept from the last token toward the class token, each merged
into its nearest remaining left neighbour (the backward scan, which carries the right side to
the class token, supplies its HSP weights). On a clip the sweep runs over the flat sequence,
from the last frame's last patch backwards; this is also STM's "one side" setting. ``sides=
"left"``/``"right"`` (STM Table 3) asks for that on any backbone: every removal on one side.
"""

from __future__ import annotations

import functools
import math
import warnings
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
    ratio_from_counts,
)
from .registry import option, register_method

COLLAPSES = ("attention", "decay")
SIDES = ("both", "left", "right")
"""Where BNNM merges (STM Table 3, "one side" vs "both sides"): both sides of the class token
(the default), or only its left / right side, which then gives every removed token."""


# ---------------------------------------------------------------------------- BNNM schedule
@dataclass(frozen=True)
class MergeStep:
    """What one reducing block does, in the indices of the sequence entering it.

    Attributes:
        layer: the block.
        num_in: tokens before the step; ``num_out`` after it.
        cls_in / cls_out: the class token's index before / after.
        removed: indices of the removed tokens (left side, then right side, each far to near).
        target: for each removed token, the index of the remaining token it merges into.
        side: -1 for a left-side token (forward scan carries it to the class token), +1 right.
        origin: the original (block-0) position of each removed token.
    """
    layer: int
    num_in: int
    cls_in: int
    removed: tuple[int, ...]
    target: tuple[int, ...]
    side: tuple[int, ...]
    origin: tuple[int, ...]

    @property
    def num_out(self) -> int:
        return self.num_in - len(self.removed)

    @property
    def cls_out(self) -> int:
        return self.cls_in - sum(1 for s in self.side if s < 0)

    def slot(self) -> list[int]:
        """Output index of every input token (removed tokens get their target's)."""
        gone = set(self.removed)
        slot, k = [0] * self.num_in, 0
        for t in range(self.num_in):
            if t not in gone:
                slot[t] = k
                k += 1
        for j, i in zip(self.removed, self.target):
            slot[j] = slot[i]
        return slot

    def plan(self, batch: int, device) -> MergePlan:
        slot = torch.tensor(self.slot(), dtype=torch.long, device=device)
        return MergePlan(slot.expand(batch, -1), self.num_out, self.cls_out)


def target_tokens(final_ratio: float, num_tokens: int) -> int:
    """Tokens gone at the end: ``final_ratio`` of all ``num_tokens`` (class token included), rounded."""
    return math.floor(final_ratio * num_tokens + 0.5)


def default_per_side(final_ratio: float) -> int:
    """The paper's setting: 1 token per side per block up to 15 % reduction, 2 above."""
    return 1 if final_ratio <= 0.15 else 2


def side_targets(total: int, left: int, right: int, sides: str = "both") -> tuple[int, int]:
    """Split ``total`` removals between the sides; the odd one to the longer side (left on a tie).

    A class token at an end (position 0, as in DeiT or VideoMamba, or the last position) leaves
    one side empty: every removal is then on the other side, whose tokens merge toward the
    class token in the scan that carries them to it. ``sides="left"`` / ``"right"`` (STM's
    one-side ablation) puts every removal on that side, whatever the other holds.
    """
    if sides not in SIDES:
        raise ValueError(f"unknown sides {sides!r}; choose one of {', '.join(SIDES)}")
    if sides != "both":
        return (total, 0) if sides == "left" else (0, total)
    if left == 0 or right == 0:
        return (total, 0) if right == 0 else (0, total)
    small, big = total // 2, total - total // 2
    return (big, small) if left >= right else (small, big)


def sweep_offsets(side_len: int, count: int) -> list[int]:
    """Distances from the far end of a side of the tokens it gives up, in removal order."""
    return [(k * side_len) // count for k in range(count)]


def side_positions(num_tokens: int, cls_index: int, protected: Sequence[int] | None = None
                   ) -> tuple[list[int], list[int]]:
    """The positions each side of the class token can give up, each from its far end toward
    the class token: left ``[0, 1, ...]``, right ``[N - 1, N - 2, ...]``, without the
    ``protected`` ones (Mamba-Reg's registers; the class token is never on a side)."""
    skip = {cls_index} if protected is None else set(protected) | {cls_index}
    left = [p for p in range(cls_index) if p not in skip]
    right = [p for p in range(num_tokens - 1, cls_index, -1) if p not in skip]
    return left, right


def _plan_sides(num_tokens: int, depth: int, final_ratio: float, per_side: int | None,
                start_layer: int, cls_index: int | None, sides: str = "both",
                protected: Sequence[int] | None = None) -> tuple[int, int, int, int, int, int, int]:
    """Validate a BNNM request; returns (c, left, right, t_left, t_right, per_side, need), with
    ``left`` / ``right`` the tokens each side can give (protected ones not counted)."""
    check_final_ratio(final_ratio)
    if per_side is None:
        per_side = default_per_side(final_ratio)
    if per_side < 1:
        raise ValueError(f"per_side must be >= 1, got {per_side}")
    if not 0 <= start_layer:
        raise ValueError(f"start_layer must be >= 0, got {start_layer}")
    c = (num_tokens - 1) // 2 if cls_index is None else cls_index
    if not 0 <= c < num_tokens:
        raise ValueError(f"class token index {c} is outside a sequence of {num_tokens} tokens")
    left, right = (len(side) for side in side_positions(num_tokens, c, protected))
    total = target_tokens(final_ratio, num_tokens)
    t_left, t_right = side_targets(total, left, right, sides)
    cap = max(left - 1, 0), max(right - 1, 0)   # the class token's neighbours stay
    if total and per_side > max(cap):
        raise ValueError(f"per_side={per_side} is more than the {max(cap)} tokens one side of the class "
                         f"token can give ({left} left, {right} right of it, its neighbours stay)")
    if t_left > cap[0] or t_right > cap[1]:
        raise ValueError(f"final_ratio {final_ratio} asks for {total} of {num_tokens} tokens ({t_left} left, "
                         f"{t_right} right of the class token) but a side can give at most its length minus "
                         f"one ({cap[0]} left, {cap[1]} right); lower the ratio")
    need = math.ceil(max(t_left, t_right) / per_side) if total else 0
    if start_layer + need > depth:
        raise ValueError(f"final_ratio {final_ratio} with per_side={per_side} needs {need} reducing blocks from "
                         f"block {start_layer}, but the model has {depth} blocks; raise per_side to "
                         f"{math.ceil(max(t_left, t_right) / max(depth - start_layer, 1))} or lower "
                         f"start_layer/ratio")
    return c, left, right, t_left, t_right, per_side, need


def bnnm_counts(num_tokens: int, depth: int, final_ratio: float, per_side: int | None = None,
                start_layer: int = 1, cls_index: int | None = None, sides: str = "both",
                protected: Sequence[int] | None = None) -> list[int]:
    """Tokens each block's mixer sees under the BNNM schedule, without building it (the same
    numbers as ``schedule_counts(bnnm_schedule(...))``: block ``start_layer + k`` removes
    ``min(per_side, T_s - k per_side)`` tokens from each side ``s`` that has some left)."""
    _, _, _, t_left, t_right, p, need = _plan_sides(num_tokens, depth, final_ratio, per_side, start_layer,
                                                    cls_index, sides, protected)
    counts, n = [], num_tokens
    for layer in range(depth):
        k = layer - start_layer
        if 0 <= k < need:
            n -= max(0, min(p, t_left - k * p)) + max(0, min(p, t_right - k * p))
        counts.append(n)
    return counts


def bnnm_schedule(num_tokens: int, depth: int, final_ratio: float, per_side: int | None = None,
                  start_layer: int = 1, cls_index: int | None = None, sides: str = "both",
                  protected: Sequence[int] | None = None) -> list[MergeStep | None]:
    """The BNNM step of every block (None where a block does not reduce).

    ``cls_index`` defaults to the Vim layout, ``(num_tokens - 1) // 2``; ``sides`` (see
    :data:`SIDES`) restricts the merging to one side. ``protected`` (sorted positions, the
    class token's among them: Mamba-Reg's registers) are swept over and never absorb a token:
    a side's sweep runs over its other tokens, and a removed token merges into the nearest
    remaining token toward the class token that is not protected (past a register if one is
    in between). Raises ValueError for requests that cannot be met (see the module docstring
    for the positions).
    """
    c, left, right, t_left, t_right, per_side, need = _plan_sides(
        num_tokens, depth, final_ratio, per_side, start_layer, cls_index, sides, protected)
    left_pos, right_pos = side_positions(num_tokens, c, protected)
    keep = {c} if protected is None else set(protected)
    queues = ([left_pos[d] for d in sweep_offsets(left, t_left)],
              [right_pos[d] for d in sweep_offsets(right, t_right)])
    alive = list(range(num_tokens))       # original positions of the current tokens
    steps: list[MergeStep | None] = [None] * depth
    for layer in range(start_layer, start_layer + need):
        k = layer - start_layer
        take_left = queues[0][k * per_side:(k + 1) * per_side]
        take_right = queues[1][k * per_side:(k + 1) * per_side]
        gone = set(take_left) | set(take_right)
        index = {p: i for i, p in enumerate(alive)}
        pairs = []                # (removed, target, side) in original positions
        for p in take_left:       # merge rightward into the nearest remaining token
            pairs.append((p, next(a for a in alive[index[p] + 1:] if a not in gone and a not in keep), -1))
        for p in take_right:      # merge leftward
            pairs.append((p, next(a for a in reversed(alive[:index[p]]) if a not in gone and a not in keep), 1))
        removed = [index[p] for p, _, _ in pairs]
        target = [index[q] for _, q, _ in pairs]
        side = [s for _, _, s in pairs]
        steps[layer] = MergeStep(layer, len(alive), alive.index(c), tuple(removed), tuple(target),
                                 tuple(side), tuple(take_left + take_right))
        alive = [a for a in alive if a not in gone]
    return steps


def schedule_counts(steps: list[MergeStep | None], num_tokens: int) -> list[int]:
    """Tokens each block's mixer sees under a schedule."""
    counts, n = [], num_tokens
    for step in steps:
        if step is not None:
            n = step.num_out
        counts.append(n)
    return counts


@functools.lru_cache(maxsize=256)
def settings_for_mean_ratio(mean_ratio: float, num_tokens: int, depth: int, start_layer: int = 1,
                            max_error: float = 0.03, per_side: int | None = None,
                            cls_index: int | None = None, sides: str = "both",
                            protected: tuple[int, ...] | None = None) -> dict[str, float | int]:
    """STM settings (``final_ratio``, ``per_side``) whose mean-token reduction ratio is nearest
    ``mean_ratio``.

    Searches every final ratio ``k / num_tokens`` and every ``per_side`` (or only the given
    one) for the schedule whose mean-token ratio (:func:`vimerge.tokens.ratio_from_counts`)
    is closest to the request (ties: the smaller ``per_side``, then the smaller final ratio),
    so that STM shares R-MeeTo's x-axis. Raises ValueError when nothing comes within
    ``max_error``.
    """
    if not 0.0 <= mean_ratio < 1.0:
        raise ValueError(f"a mean-token reduction ratio must be in [0, 1), got {mean_ratio}")
    best: tuple[float, int, int] | None = None
    widths = range(1, num_tokens // 2 + 1) if per_side is None else (per_side,)
    for p in widths:
        for k in range(num_tokens):
            try:
                counts = bnnm_counts(num_tokens, depth, k / num_tokens, p, start_layer, cls_index, sides, protected)
            except ValueError:
                break                      # larger k needs more tokens or blocks than exist
            got = ratio_from_counts(counts, num_tokens)
            key = (round(abs(got - mean_ratio), 9), p, k)
            if best is None or key < best:
                best = key
    if best is None or best[0] > max_error:
        reach = "nothing" if best is None else f"{best[0]:.3f} away at best"
        raise ValueError(f"STM cannot reach a mean-token ratio of {mean_ratio} with {num_tokens} tokens "
                         f"and {depth} blocks from block {start_layer} ({reach}); lower the ratio")
    return {"final_ratio": best[2] / num_tokens, "per_side": best[1]}


def check_final_ratio(final_ratio: float) -> None:
    if not 0.0 <= final_ratio < 1.0:
        raise ValueError(f"final_ratio is the fraction of tokens removed by the end and must be in [0, 1), "
                         f"got {final_ratio}")


# ---------------------------------------------------------------------------- HSP weights
def merge_coefficients(dt: Tensor, B: Tensor, C: Tensor, A: Tensor, removed: Tensor, target: Tensor,
                       level: str = "token", collapse: str = "attention") -> Tensor:
    """HSP coefficients of removed tokens merging into later tokens of a forward scan.

    The scan runs over increasing index; every ``removed[p] < target[p]``, and the tokens
    strictly between them are removed too (so only ``target[p]`` remains after them). For the
    backward scan flip the tensors and the indices first (see :func:`direction_weights`).

    Args:
        dt: (b, D, N) positive time steps (after bias and softplus).
        B, C: (b, n, N) input and output projections; A: (D, n), negative.
        removed, target: (P,) long indices j and i.
        level: "state" gives the merging function's coefficient per (channel, state),
            ``exp(A S) dt_j B_j / (dt_i B_i)``, shape (b, D, n, P) (exact for the state h_i);
            "channel" contracts the state with ``C_i`` (exact for the output y_i),
            ``sum_n C_i exp(A S) B_j dt_j / (dt_i C_i . B_i)``, shape (b, D, P);
            "token" collapses the channels, ratio of channel sums, shape (b, P).
        collapse: "attention" (the formulas above) or "decay" (B and C set to ones: only the
            time steps and A, i.e. the weight of a token whose B, C equal the target's).

    ``S = dt_{j+1} + ... + dt_i`` is the decay exponent from j to i.
    """
    if collapse not in COLLAPSES:
        raise ValueError(f"unknown collapse {collapse!r}; choose one of {', '.join(COLLAPSES)}")
    if collapse == "decay":
        B = torch.ones_like(B)
        C = torch.ones_like(C)
    cs = dt.cumsum(-1)
    S = cs[..., target] - cs[..., removed]                             # (b, D, P)
    decay = torch.exp(A[None, :, :, None] * S[:, :, None, :])           # (b, D, n, P)
    dt_j, dt_i = dt[..., removed], dt[..., target]                      # (b, D, P)
    B_j, B_i, C_i = B[..., removed], B[..., target], C[..., target]    # (b, n, P)
    if level == "state":
        return decay * (dt_j / dt_i)[:, :, None] * (B_j / B_i)[:, None]
    num = dt_j * torch.einsum("bnp,bdnp->bdp", C_i * B_j, decay)       # alpha(i, j) per channel
    den = dt_i * (C_i * B_i).sum(1)[:, None]                           # alpha(i, i) per channel
    if level == "channel":
        return num / den
    if level != "token":
        raise ValueError(f"level must be 'state', 'channel' or 'token', got {level!r}")
    return num.sum(1) / den.sum(1)


def direction_weights(dt: Tensor, B: Tensor, C: Tensor, A: Tensor, removed: list[int], target: list[int],
                      backward: bool, collapse: str = "attention") -> Tensor:
    """Token-level HSP coefficients (b, P) for one scan direction, in token order.

    ``backward`` scans from the last token to the first (right side of the class token:
    ``removed > target``); it is handled by flipping the sequence.
    """
    n = dt.shape[-1]
    if backward:
        dt, B, C = dt.flip(-1), B.flip(-1), C.flip(-1)
        removed, target = [n - 1 - j for j in removed], [n - 1 - i for i in target]
    dev = dt.device
    return merge_coefficients(dt, B, C, A, torch.tensor(removed, device=dev), torch.tensor(target, device=dev),
                              "token", collapse)


def clean_weights(w: Tensor, max_weight: float) -> Tensor:
    """Clip coefficients to [0, max_weight] (negative / undefined -> 0, overflow -> max_weight)."""
    w = torch.nan_to_num(w, nan=0.0, posinf=max_weight, neginf=0.0)
    return w.clamp(0.0, max_weight)


# ---------------------------------------------------------------------------- the reducer
@register_method("stm")
@dataclass
class STM:
    """Sequential Token Merging as a reducer (``vimerge.apply(model, "stm:ratio=0.28")``).

    Args:
        ratio: the mean-token reduction ratio (1 - mean tokens per block / initial tokens),
            as for every method; the nearest BNNM schedule is searched
            (:func:`settings_for_mean_ratio`, within 0.03).
        final_ratio: STM's own setting instead of ``ratio``: the fraction of the tokens (class
            token included) gone after the last reducing block, e.g. 0.2 removes
            ``round(0.2 N)`` tokens (STM Tables 1-3). Default 0.2 when neither is given.
        per_side: tokens removed per side of the class token per reducing block; default as in
            the paper, 1 for ``final_ratio <= 0.15`` and 2 above.
        start_layer: first reducing block (default 1: HSP needs the previous block's records).
        hsp: weight absorbed tokens by the hidden-state-protection coefficients; False gives
            plain BNNM with the size-weighted average of R-MeeTo.
        collapse: how HSP's per-(channel, state) coefficients become one weight per token:
            "attention" (contract the states with the target's C, ratio of channel sums;
            default) or "decay" (ignore B and C). See docs/stm.md.
        max_weight: HSP weights are clipped to [0, max_weight]; the default 1 lets no absorbed
            token outweigh the token it merges into (measured best of 1, 2, 4, none).
        sides: "both" (default) merges on both sides of the class token; "left" or "right"
            merges on that side only (STM Table 3's one-side ablation), which gives every
            removed token. A class token at position 0 (DeiT, VideoMamba) has only a right
            side: "both" and "right" are the same there, "left" cannot remove anything.
        track_source: keep the (B, N, N0) map of original tokens per token.

    After a forward, ``weights`` maps each reducing block to its (B, P) HSP weights (in the
    order of ``MergeStep.removed``) and ``fallbacks`` lists ``(block, reason)`` where HSP fell
    back to BNNM's plain average.
    """
    ratio: float | None = option(None, "mean-token reduction ratio (1 - mean tokens per block / initial tokens)")
    final_ratio: float | None = option(None, "STM: fraction of tokens gone after the last block (STM's 15/20/30/40 %)")
    per_side: int | None = option(None, "STM: tokens merged per side of the class token per block")
    start_layer: int = option(1, "STM: first reducing block")
    hsp: bool = option(True, "STM: plain BNNM without hidden-state protection", flag="--no-hsp",
                       action="store_false")
    collapse: str = option("attention", "STM: HSP coefficients per token (docs/stm.md)", choices=COLLAPSES)
    max_weight: float = option(1.0, "STM: clip HSP weights to [0, max_weight]")
    sides: str = option("both", "STM: merge on both sides of the class token, or on one (Table 3)", choices=SIDES)
    track_source: bool = option(False, "keep the map of original tokens per token (for pictures)", cli=False)

    def __post_init__(self) -> None:
        if self.ratio is not None and self.final_ratio is not None:
            raise ValueError("give either ratio (mean-token reduction ratio) or final_ratio (STM's tokens gone "
                             "at the end), not both")
        if self.ratio is None and self.final_ratio is None:
            self.final_ratio = 0.2
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio is the mean-token reduction ratio and must be in [0, 1), got {self.ratio}")
        if self.final_ratio is not None:
            check_final_ratio(self.final_ratio)
        if self.per_side is not None and self.per_side < 1:
            raise ValueError(f"per_side must be >= 1, got {self.per_side}")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")
        if self.collapse not in COLLAPSES:
            raise ValueError(f"unknown collapse {self.collapse!r}; choose one of {', '.join(COLLAPSES)}")
        if not self.max_weight > 0:
            raise ValueError(f"max_weight must be > 0, got {self.max_weight}")
        if self.sides not in SIDES:
            raise ValueError(f"unknown sides {self.sides!r}; choose one of {', '.join(SIDES)}")
        self._steps: list[MergeStep | None] = []
        self.weights: dict[int, Tensor] = {}
        self.fallbacks: list[tuple[int, str]] = []
        self._plain = not self.hsp

    # ------------------------------------------------------------------ schedule
    def settings(self, num_tokens: int, depth: int, cls_index: int | None = None,
                 protected: Sequence[int] | None = None) -> tuple[float, int]:
        """(final_ratio, per_side) of the schedule: as given, or searched for ``ratio``."""
        if self.final_ratio is not None:
            return self.final_ratio, self.per_side or default_per_side(self.final_ratio)
        found = settings_for_mean_ratio(self.ratio, num_tokens, depth, self.start_layer,
                                        per_side=self.per_side, cls_index=cls_index, sides=self.sides,
                                        protected=None if protected is None else tuple(protected))
        return found["final_ratio"], found["per_side"]

    def schedule(self, num_tokens: int, depth: int, cls_index: int | None = None,
                 protected: Sequence[int] | None = None) -> list[MergeStep | None]:
        """The BNNM step of every block (see :func:`bnnm_schedule`)."""
        final, per_side = self.settings(num_tokens, depth, cls_index, protected)
        return bnnm_schedule(num_tokens, depth, final, per_side, self.start_layer, cls_index, self.sides, protected)

    def token_counts(self, num_tokens: int, depth: int, cls_index: int | None = None,
                     site: str = "before_mixer", protected: Sequence[int] | None = None) -> list[int]:
        """Tokens each block's mixer sees (class token by default at ``(num_tokens - 1) // 2``, as
        in Vim; ``protected``: the registers too, see :func:`bnnm_schedule`)."""
        final, per_side = self.settings(num_tokens, depth, cls_index, protected)
        return bnnm_counts(num_tokens, depth, final, per_side, self.start_layer, cls_index, self.sides, protected)

    def reduction_ratio(self, num_tokens: int, depth: int) -> float:
        """1 - mean tokens per block / initial tokens."""
        return ratio_from_counts(self.token_counts(num_tokens, depth), num_tokens)

    def flops(self, counts, num_tokens: int, width: int, convention: str = "paper",
              site: str = "before_mixer") -> float:
        """The weighted averages of the merged tokens: ``removed x width`` multiply-adds per
        reducing block (twice that for ``"full"``). BNNM matches nothing (its positions are
        fixed); HSP's weights (about 3 d_inner d_state operations per removed token, under
        0.3 % of a Vim block per token) are not counted."""
        mult, total, prev = check_convention(convention), 0.0, num_tokens
        for n in counts:
            total += mult * (prev - n) * width
            prev = n
        return total

    # ------------------------------------------------------------------ reducer protocol
    def prepare(self, model: TokenModel, num_tokens: int) -> None:
        depth = model.depth
        protected = protected_positions(model)
        self._steps = self.schedule(num_tokens, depth, model.cls_index, protected if len(protected) > 1 else None)
        self.weights, self.fallbacks = {}, []
        self._plain = not self.hsp or model.reduction_site != "before_mixer"
        if self.hsp and self._plain:
            reason = (f"{type(model).__name__} has no selective scan (its blocks reduce "
                      f"{model.reduction_site.replace('_', ' ')}), and HSP is derived from the Mamba recurrence")
            self.fallbacks.append((-1, reason))
            if not getattr(self, "_told", False):
                warnings.warn(f"STM: hidden-state protection runs as plain BNNM here: {reason}", stacklevel=2)
                self._told = True
        model.record_blocks([i for i in range(depth - 1) if not self._plain and self._steps[i + 1] is not None])

    def reduce(self, state: TokenState, model: TokenModel) -> TokenState:
        step = self._steps[state.layer] if state.layer < len(self._steps) else None
        if step is None:
            return state
        if state.num_tokens != step.num_in or state.cls_index != step.cls_in:
            raise RuntimeError(f"block {state.layer}: STM planned {step.num_in} tokens with the class token at "
                               f"{step.cls_in}, got {state.num_tokens} at {state.cls_index}; something else "
                               f"changed the sequence")
        plan = step.plan(state.hidden.shape[0], state.hidden.device)
        if self._plain:
            return merge_state(state, plan)
        omega = self._omega(state, model, step)
        if omega is None:
            return merge_state(state, plan)
        return merge_state(state, plan, weight=omega)

    def _omega(self, state: TokenState, model: TokenModel, step: MergeStep) -> Tensor | None:
        """(b, N, 1) merge weights: 1 for kept tokens, the HSP weight for removed ones."""
        if state.layer == 0:
            self.fallbacks.append((0, "block 0 has no previous block to estimate dt, B, C from"))
            return None
        rec = model.block_record(state.layer - 1)
        reason = None
        if not isinstance(rec, BlockRecord):
            reason = f"block {state.layer - 1} recorded no scan (it was not asked to, or it has no selective scan)"
        elif rec.forward.num_tokens != state.num_tokens or rec.forward.delta.shape[0] != state.hidden.shape[0]:
            reason = f"block {state.layer - 1}'s records do not match the sequence (stale)"
        if reason is not None:
            warnings.warn(f"STM: HSP falls back to plain BNNM at block {state.layer}: {reason}", stacklevel=2)
            self.fallbacks.append((state.layer, reason))
            return None
        b = state.hidden.shape[0]
        omega = torch.ones(b, state.num_tokens, 1, device=state.hidden.device, dtype=torch.float32)
        w_all = torch.zeros(b, len(step.removed), device=omega.device)
        with torch.no_grad():
            for sgn, scan in ((-1, rec.forward), (1, rec.backward)):
                idx = [k for k, s in enumerate(step.side) if s == sgn]
                if not idx:
                    continue
                removed, target = [step.removed[k] for k in idx], [step.target[k] for k in idx]
                # only the positions from a removed token to its target enter the weights: keep
                # those columns (in order, so that cumulative sums along them stay exact)
                cols = sorted({p for j, i in zip(removed, target) for p in range(min(j, i), max(j, i) + 1)})
                at = {p: q for q, p in enumerate(cols)}
                take = torch.tensor(cols, device=scan.delta.device)
                w = direction_weights(scan.dt(take), scan.B.index_select(-1, take).float(),
                                      scan.C.index_select(-1, take).float(), scan.A.float(),
                                      [at[j] for j in removed], [at[i] for i in target],
                                      backward=sgn > 0, collapse=self.collapse)
                w = clean_weights(w, self.max_weight).to(omega.device)
                w_all[:, idx] = w
            omega[:, list(step.removed), 0] = w_all
        self.weights[state.layer] = w_all
        return omega
