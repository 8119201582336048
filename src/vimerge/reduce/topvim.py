"""ToP-ViM: token pruning for Vision Mamba with its SSM-output importance and pruning-aware
hidden-state alignment (Zhan, Kong et al., "Exploring Token Pruning in Vision State Space
Models", NeurIPS 2024, arXiv 2409.18962; code ZLKong/ToP-ViM).

**Importance** (the paper's clipped channel sum): after block ``l - 1`` the mixer's SSM output
``y`` (B, d_inner, N), both directions combined, after the ``silu(z)`` gate and before
``out_proj`` (:attr:`vimerge.tokens.BlockRecord.output`), gives every token

    s_m = sum_d max(0, y[d, m])          (clip=false: sum_d y[d, m], the paper's ablation)

**Selection** (the released code, ``vim/models_mamba.py``): at block ``l`` of ``at`` the
``N_p`` unprotected tokens become the ``K`` best, ``K = ceil(keep * N_p)`` rounded down to an
even number (the code's ``k = ceil(...)``, made odd with the class token, so that the class token
sits exactly in the middle), kept in their original order; the class token (and Mamba-Reg's
registers) go back at their proportional slots (:func:`~vimerge.tokens.protected_slots`: for
Vim's middle class token that is the exact middle, as in the code). Hidden and residual streams
are gathered alike; pruned tokens are gone.

**Alignment** (``align=true``; the paper's kernel is not public, this is our form of "keep the
position gap from pruned tokens during the scan"): every kept token remembers how many original
positions were pruned between it and its predecessor in each scan direction
(:attr:`vimerge.tokens.TokenState.gaps`, accumulated over steps: a pruned token hands its own gap
on); in the following blocks each direction's scan decays the state of token ``t`` over
``1 + gap_t`` of its own time steps, ``h_t = exp((1 + g_t) dt_t A) h_{t-1} + dt_t B_t x_t``,
so the state reaching a kept token has faded as far as it did over the full sequence (the pruned
positions give no input). ``align=false`` is plain pruning with the same scores.

Defaults are the released schedule: prune after blocks 5, 10 and 15 of 24 (0-based: before
blocks 5, 10, 15; scaled to other depths), keep 0.8 (Vim-S: 197 -> 157 -> 125 -> 101 tokens,
ratio 0.30). Published (ImageNet-1K, fine-tuned 30 epochs): Vim-T 75.1 @ 1.29 GFLOPs, Vim-S
78.8 @ 3.60 GFLOPs (the released logs of that schedule: 78.37), PlainMamba-L3 81.7 @ -41.6 %
FLOPs; without / with alignment: Vim-S 75.4 / 78.8 (paper ablation).

Where the released code differs from the paper, this follows the paper (the code's behaviour in
brackets): scores in token order (it reads the backward branch's output in flipped order, so it
keeps the mirror images of the best tokens), the class token excluded in every image (in the first
image of the batch only), the scores clipped (the clip is commented out), both directions'
output (the backward branch only).

Defined on Mamba models (Vim, VideoMamba images and clips, Mamba-Reg); a DeiT has no scan and is
refused (:meth:`ToPViM.unsupported`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..tokens import BlockRecord, TokenModel, TokenState, check_convention, merge_state, protected_positions
from .registry import option, register_method
from .schedule import removals
from .select import KeepSchedule, ceil_keep, keep_plan, unprotected_positions


def ssm_importance(output: Tensor, clip: bool = True) -> Tensor:
    """(B, d_inner, N) SSM output -> (B, N) token importance ``sum_d max(0, y)`` (``clip``) or
    ``sum_d y``, in fp32 (ToP-ViM Sec. 4.2)."""
    y = output.float()
    return (y.clamp_min(0) if clip else y).sum(dim=1)


def carry_gaps(gaps: Tensor | None, keep: Tensor, protected: Sequence[int] = ()) -> Tensor:
    """The gaps after a pruning step.

    ``keep`` (B, N) bool marks the surviving tokens, ``gaps`` (B, N, 2) their gaps before the step
    (None: zeros), ``protected`` the positions of the protected tokens (never pruned). The gaps
    run over the unprotected tokens only: a survivor's forward gap is its own plus, for every
    pruned token since the previous unprotected survivor, one plus that token's forward gap (so
    it counts the original unprotected positions in between); the backward gap alike toward the
    next one. Protected tokens get zero gaps (the class token moves, ToP-ViM re-centres it).

    Returns (B, K, 2) for the K survivors, in their input order.
    """
    bsz, n = keep.shape
    g = keep.new_zeros(bsz, n, 2, dtype=torch.float32) if gaps is None else gaps.float()
    free = unprotected_positions(n, protected, keep.device)
    k, g_free = keep[:, free], g[:, free]                               # (B, m), (B, m, 2)
    count = int(k[0].sum())
    new_free = []
    for side in (0, 1):
        flip = side == 1
        kk, gs = (k.flip(1), g_free[..., side].flip(1)) if flip else (k, g_free[..., side])
        cum = ((~kk).float() * (1 + gs)).cumsum(1)                      # pruned weight up to each position
        at = cum[kk].view(bsz, count)                                   # at each survivor, in scan order
        before = torch.cat([at.new_zeros(bsz, 1), at[:, :-1]], dim=1)
        new = gs[kk].view(bsz, count) + at - before
        new_free.append(new.flip(1) if flip else new)
    survivors_free = torch.stack(new_free, dim=-1)                      # (B, count, 2)
    full = torch.zeros(bsz, n, 2, device=keep.device)
    mask = torch.zeros(bsz, n, dtype=torch.bool, device=keep.device)
    mask[:, free] = k
    full[mask] = survivors_free.reshape(-1, 2)
    return full[keep].view(bsz, int(keep[0].sum()), 2)


@register_method("topvim")
@dataclass
class ToPViM(KeepSchedule):
    """ToP-ViM pruning (``vimerge.apply(model, "topvim")``, ``"topvim:ratio=0.28"``,
    ``"topvim:align=false"``); see the module docstring. Schedule options (``r``, ``ratio``,
    ``keep``, ``at``): :class:`~vimerge.reduce.select.KeepSchedule`."""
    align: bool = option(True, "keep the pruned positions' decay in later scans (the paper's hidden-state alignment; "
                               "false: plain pruning)", flag="--no-align", action="store_false")
    clip: bool = option(True, "importance = sum of the clipped SSM output (false: unclipped, the paper's ablation)",
                        flag="--no-clip", action="store_false")
    track_source: bool = option(False, "keep the map of original tokens per token (for pictures)", cli=False)

    published_keep: ClassVar[float] = 0.8
    published_at: ClassVar[tuple[int, ...]] = (5, 10, 15)
    published_depth: ClassVar[int] = 24

    def __post_init__(self) -> None:
        self.check_schedule()

    # ------------------------------------------------------------------ schedule
    def kept_tokens(self, m: int, keep: float) -> int:
        """``ceil(keep m)`` rounded down to even (the released code's odd total with the class token)."""
        return 2 * (ceil_keep(m, keep) // 2)

    def token_counts(self, num_tokens: int, depth: int, cls_index: int | None = None,
                     site: str = "before_mixer", protected: Sequence[int] | None = None) -> list[int]:
        return self.schedule_counts(num_tokens, depth, site, 1 if protected is None else len(protected))

    def flops(self, counts: Sequence[int], num_tokens: int, width: int, convention: str = "paper",
              site: str = "before_mixer") -> float:
        """Per image: the importance, one add per SSM output channel (d_inner = 2 x width) and
        token at every reducing block (its input count); with ``align``, in every block after
        the first pruning, two multiplies per token and channel (the time step and the input
        scaled by ``1 + gap``), for one scan direction: the paper convention counts one; "full"
        doubles everything (both directions; the clip and the add)."""
        mult = check_convention(convention)
        d_inner, total, prev, pruned = 2 * width, 0.0, num_tokens, False
        for n in counts:
            if n < prev:
                total += prev * d_inner                       # sum of clip(y): N d_inner adds
                pruned = True
            if pruned and self.align:
                total += 2 * n * d_inner
            prev = n
        return mult * total

    # ------------------------------------------------------------------ reducer protocol
    def unsupported(self, model: TokenModel) -> str | None:
        if model.reduction_site != "before_mixer":
            return (f"topvim scores tokens by the selective scan's output and aligns the scan's hidden state; "
                    f"{type(model).__name__} is a Transformer without a scan: use evit (EViT, the Transformer "
                    f"method ToP-ViM starts from), rmeeto or prune")
        return None

    def prepare(self, model: TokenModel, num_tokens: int) -> None:
        protected = len(protected_positions(model))
        counts = self.schedule_counts(num_tokens, model.depth, model.reduction_site, protected)
        self._removed = removals(counts, num_tokens)
        model.record_blocks([i - 1 for i, r in enumerate(self._removed) if r > 0])

    def reduce(self, state: TokenState, model: TokenModel) -> TokenState:
        remove = self._removed[state.layer]
        if remove <= 0:
            return state
        rec = model.block_record(state.layer - 1)
        if not isinstance(rec, BlockRecord):
            raise RuntimeError(f"topvim needs the scan output of block {state.layer - 1}, which "
                               f"{type(model).__name__} did not record")
        kept = state.kept
        score = ssm_importance(rec.output, self.clip)
        plan = keep_plan(score, state.cls_index, kept, state.num_tokens - len(kept) - remove, ordered=True)
        new = merge_state(state, plan)
        if self.align:
            survive = plan.slot >= 0
            gaps = carry_gaps(state.gaps, survive, kept)             # survivors in input order
            # each survivor's gaps to its output slot (the class token may move to the middle)
            slots = plan.slot[survive].view(survive.shape[0], plan.num_out)
            new.gaps = torch.empty_like(gaps).scatter_(1, slots.unsqueeze(-1).expand(-1, -1, 2), gaps)
        return new


__all__ = ["ToPViM", "ssm_importance", "carry_gaps"]
