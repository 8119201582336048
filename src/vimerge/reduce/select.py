"""What the score-and-select methods share: protected tokens out of the selection and back in
place, the keep-the-top-k plan (with EViT's fused token), and the keep-rate schedule.

Every method of vimerge plans on the tokens that are not protected (the class token, Mamba-Reg's
registers: :attr:`vimerge.tokens.TokenState.protected`) and puts the protected ones back at
:func:`~vimerge.tokens.protected_slots`; :func:`without_protected`, :func:`unprotected_positions`
and :func:`insert_protected` are those two steps, used by R-MeeTo, MTR, ToP-ViM and EViT.

:func:`keep_plan` keeps the ``k`` highest-scoring tokens of every image (ToP-ViM, EViT), in their
original order or in score order, and drops the rest or fuses them into one token (EViT).
:class:`KeepSchedule` is the schedule of such methods: at a few blocks (``at``) a fraction
``keep`` of the unprotected tokens stays; ``ratio`` (the mean-token reduction ratio, the one
meaning it has for every method) solves ``keep``; ``r`` instead removes exactly ``r`` tokens at
those blocks (or per block, a list), for comparisons at R-MeeTo's token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..tokens import SITES, MergePlan, protected_slots, ratio_from_counts
from .registry import option

# ------------------------------------------------------------------------ protected tokens


def unprotected_positions(n: int, kept: Sequence[int], device=None) -> Tensor:
    """(n - len(kept),) long: the positions of ``n`` tokens that are not in ``kept``, in order."""
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[list(kept)] = False
    return mask.nonzero().squeeze(1)


def without_protected(x: Tensor, kept: Sequence[int]) -> Tensor:
    """(B, N, ...) -> (B, N - len(kept), ...) without the protected tokens ``kept`` (a view for
    one protected token at the first or the last place)."""
    if len(kept) > 1:
        return x[:, unprotected_positions(x.shape[1], kept, x.device)]
    index = kept[0]
    if index == 0:
        return x[:, 1:]
    if index == x.shape[1] - 1:
        return x[:, :-1]
    return torch.cat([x[:, :index], x[:, index + 1:]], dim=1)


def insert_protected(slot_rest: Tensor, cls_index: int, kept: Sequence[int], n: int, num_out: int
                     ) -> tuple[Tensor, int]:
    """The full (B, n) slot map of a plan from the slots of the unprotected tokens among
    themselves (``slot_rest`` (B, n - P), values in ``[0, num_out - P)``, -1: dropped), with the
    P protected tokens ``kept`` put back at :func:`~vimerge.tokens.protected_slots`; also the
    class token's new index. One protected token (the class token) goes to R-MeeTo's
    ``cls * num_out // n`` (official ``RMeeTo_vim.py``)."""
    bsz, dev = slot_rest.shape[0], slot_rest.device
    if len(kept) == 1:
        new_cls = cls_index * num_out // n
        slot_rest = torch.where(slot_rest >= new_cls, slot_rest + 1, slot_rest)
        slot = torch.cat([slot_rest[:, :cls_index], torch.full((bsz, 1), new_cls, device=dev),
                          slot_rest[:, cls_index:]], dim=1)
        return slot, new_cls
    targets = protected_slots(kept, n, num_out)
    free = unprotected_positions(num_out, targets, dev)                # output places of the others
    placed = torch.where(slot_rest >= 0, free[slot_rest.clamp_min(0)], slot_rest)
    slot = torch.empty(bsz, n, dtype=torch.long, device=dev)
    slot[:, unprotected_positions(n, kept, dev)] = placed
    slot[:, list(kept)] = torch.tensor(targets, device=dev)
    return slot, targets[list(kept).index(cls_index)]


# ------------------------------------------------------------------------ the keep plan


def keep_plan(score: Tensor, cls_index: int, kept: Sequence[int], k: int, *, ordered: bool = True,
              fuse: bool = False) -> MergePlan:
    """Keep the ``k`` highest-scoring unprotected tokens of every image.

    Args:
        score: (B, N) importance of every token (the protected tokens' entries are ignored).
        cls_index, kept: the class token's position and every protected position (sorted).
        k: unprotected tokens kept, ``0 <= k <= N - P``.
        ordered: True puts the kept tokens in their original order (ToP-ViM); False in
            descending score (EViT's ``topk`` order: the sequence order is lost).
        fuse: the other tokens become one token, placed after the kept ones (EViT's fused
            token; combine them with weights through ``merge_state(..., weight=...)``); False
            drops them (slot -1). Nothing is fused when nothing is left over.

    Returns the plan (B, N) -> (B, k + P (+ 1 fused)); protected tokens at
    :func:`insert_protected`. Ties in ``score`` go to the lower position.
    """
    bsz, n = score.shape
    m = n - len(kept)
    if not 0 <= k <= m:
        raise ValueError(f"cannot keep {k} of the {m} unprotected tokens")
    dev = score.device
    with torch.no_grad():
        rest = without_protected(score.unsqueeze(-1), kept).squeeze(-1).float()    # (B, m)
        # stable descending order: ties to the lower position
        order = torch.sort(rest, dim=1, descending=True, stable=True).indices
        top = order[:, :k]
        if ordered:
            top = top.sort(dim=1).values
        slot_rest = torch.full((bsz, m), -1, dtype=torch.long, device=dev)
        slot_rest.scatter_(1, top, torch.arange(k, device=dev).expand(bsz, k))
        fused = fuse and k < m
        if fused:
            slot_rest = torch.where(slot_rest < 0, torch.full_like(slot_rest, k), slot_rest)
        num_out = k + int(fused) + len(kept)
        slot, new_cls = insert_protected(slot_rest, cls_index, kept, n, num_out)
    return MergePlan(slot, num_out, new_cls)


# ------------------------------------------------------------------------ the keep-rate schedule


def scaled_layers(published: Sequence[int], published_depth: int, depth: int, first: int) -> list[int]:
    """A published list of reducing blocks moved to a model of ``depth`` blocks: block ``l`` of a
    ``published_depth``-block model becomes ``l * depth / published_depth`` rounded half up, at least
    ``first`` and at most ``depth - 1``, duplicates removed (ToP-ViM's 5, 10, 15 of 24 blocks
    -> 2, 3, 5 of 8)."""
    out = sorted({min(depth - 1, max(first, math.floor(l * depth / published_depth + 0.5))) for l in published})
    return [l for l in out if 0 <= l < depth]


@dataclass
class KeepSchedule:
    """The schedule of a keep-rate method: the base dataclass of such methods, giving them the
    options ``r``, ``ratio``, ``keep`` and ``at``.

    A subclass sets ``published_keep`` (the paper's keep rate), ``published_at`` and
    ``published_depth`` (its reducing blocks on a model of that depth; other depths get
    :func:`scaled_layers`) and implements :meth:`kept_tokens` (its rule: unprotected tokens
    after one step at keep rate ``keep``) and :meth:`removal_limit`.

    Tokens block ``i``'s mixer sees (``site="before_mixer"``; its MLP for ``"after_attention"``):
    unchanged except at the blocks of ``at``, where the unprotected tokens ``m`` become
    ``kept_tokens(m, keep)`` (with ``ratio``: the ``keep`` on a 0.001 grid whose mean-token
    ratio is nearest), or ``m - r`` (with ``r``).
    """
    r: int | list[int] | None = option(None, "tokens removed at each reducing block (or one value per block), "
                                             "instead of keep: e.g. R-MeeTo's token counts")
    ratio: float | None = option(None, "mean-token reduction ratio (1 - mean tokens per block / initial tokens, "
                                       "R-MeeTo Table 10); solves keep at the reducing blocks")
    keep: float | None = option(None, "fraction of the unprotected tokens kept at a reducing block (default: "
                                      "the paper's rate)")
    at: list[int] | None = option(None, "reducing blocks, 0-based (default: the paper's, scaled to the model's depth)")

    published_keep: ClassVar[float] = 0.8
    published_at: ClassVar[tuple[int, ...]] = ()
    published_depth: ClassVar[int] = 24

    # ---------------------------------------------------------------- the method's rule
    def kept_tokens(self, m: int, keep: float) -> int:
        """Unprotected tokens after one step at keep rate ``keep`` from ``m``."""
        raise NotImplementedError

    def removal_limit(self, m: int) -> int:
        """The most tokens one step can remove from ``m`` unprotected tokens."""
        return max(0, m - 1)

    # ---------------------------------------------------------------- checks
    def check_schedule(self) -> None:
        """Validate the schedule options (called by ``__post_init__``)."""
        name = getattr(self, "name", type(self).__name__)
        if self.r is not None and (self.ratio is not None or self.keep is not None):
            raise ValueError(f"{name}: give r (tokens removed per reducing block), ratio or keep, not several")
        if self.ratio is not None and self.keep is not None:
            raise ValueError(f"{name}: give ratio (the mean-token reduction ratio) or keep (the keep rate), not both")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"{name}: keep is the fraction of tokens kept at a reducing block, in (0, 1]; "
                             f"got {self.keep}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"{name}: ratio is the mean-token reduction ratio and must be in [0, 1), got {self.ratio}")
        if isinstance(self.r, tuple):
            self.r = list(self.r)
        if self.r is not None and any(v < 0 for v in ([self.r] if isinstance(self.r, int) else self.r)):
            raise ValueError(f"{name}: r must be >= 0, got {self.r}")
        if isinstance(self.at, tuple):
            self.at = list(self.at)
        if self.at is not None and (not self.at or any(not isinstance(v, int) or v < 0 for v in self.at)):
            raise ValueError(f"{name}: at lists the reducing blocks (0-based ints), got {self.at}")

    # ---------------------------------------------------------------- schedule
    def layers(self, depth: int, site: str = "before_mixer") -> list[int]:
        """The reducing blocks on a model of ``depth`` blocks: ``at``, or the published ones
        scaled to this depth. Block 0 of a Mamba model cannot reduce (nothing was mixed)."""
        if site not in SITES:
            raise ValueError(f"unknown reduction site {site!r}; one of {', '.join(SITES)}")
        first = 0 if site == "after_attention" else 1
        name = getattr(self, "name", type(self).__name__)
        if self.at is None:
            return scaled_layers(self.published_at, self.published_depth, depth, first)
        bad = [l for l in self.at if not first <= l < depth]
        if bad:
            raise ValueError(f"{name}: at={self.at} names blocks outside {first}..{depth - 1} "
                             f"(the model has {depth} blocks{'; block 0 has mixed nothing yet' if first else ''})")
        return sorted(set(self.at))

    def _counts(self, num_tokens: int, depth: int, site: str, protected: int, keep: float | None) -> list[int]:
        name = getattr(self, "name", type(self).__name__)
        if isinstance(self.r, list):
            if len(self.r) != depth:
                raise ValueError(f"{name}: an explicit r list needs one entry per block ({depth}), got {len(self.r)}")
            first = 0 if site == "after_attention" else 1
            removals = dict(enumerate(self.r))
            if any(removals[i] for i in range(first)):
                raise ValueError(f"{name}: block 0 of a Mamba model cannot reduce; r[0] must be 0")
        elif self.r is not None:
            removals = {layer: self.r for layer in self.layers(depth, site)}
        else:
            removals = None
            steps = set(self.layers(depth, site))
        counts, m = [], num_tokens - protected
        for layer in range(depth):
            if removals is not None:
                r = removals.get(layer, 0)
                if r > self.removal_limit(m):
                    raise ValueError(f"{name}: r={r} at block {layer} is more than the {self.removal_limit(m)} tokens "
                                     f"one step can remove from {m + protected} ({protected} protected); lower r")
                m -= r
            elif layer in steps:
                m = self.kept_tokens(m, keep)
            counts.append(m + protected)
        return counts

    def keep_rate(self, num_tokens: int, depth: int, site: str = "before_mixer", protected: int = 1) -> float | None:
        """The keep rate in use: ``keep``, the published one, or the one solving ``ratio``
        (None with ``r``). Raises ValueError when ``ratio`` is out of reach at these blocks."""
        if self.r is not None:
            return None
        if self.ratio is None:
            return self.published_keep if self.keep is None else self.keep
        grid = [i / 1000 for i in range(1, 1001)]
        ratios = [ratio_from_counts(self._counts(num_tokens, depth, site, protected, k), num_tokens) for k in grid]
        best = min(range(len(grid)), key=lambda i: (abs(ratios[i] - self.ratio), -grid[i]))
        if abs(ratios[best] - self.ratio) > 0.02:
            name = getattr(self, "name", type(self).__name__)
            raise ValueError(f"{name}: ratio {self.ratio} is out of reach with reducing blocks "
                             f"{self.layers(depth, site)} ({num_tokens} tokens, {depth} blocks): the reachable "
                             f"ratios span {min(ratios):.3f}..{max(ratios):.3f}; change at= or the ratio")
        return grid[best]

    def schedule_counts(self, num_tokens: int, depth: int, site: str = "before_mixer", protected: int = 1) -> list[int]:
        """Tokens left after each block's reduction (see the class docstring)."""
        return self._counts(num_tokens, depth, site, protected, self.keep_rate(num_tokens, depth, site, protected))


def ceil_keep(m: int, keep: float) -> int:
    """``ceil(m * keep)`` without the float error of products like 0.7 * 10 (7.000000000000001)."""
    return min(m, math.ceil(round(m * keep, 9)))


__all__ = ["unprotected_positions", "without_protected", "insert_protected", "keep_plan", "scaled_layers",
           "KeepSchedule", "ceil_keep"]
