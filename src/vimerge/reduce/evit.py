"""Token recognition (EViT): keep the tokens the class token attends to most, fuse the rest into
one token (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations", ICLR 2022; code youweiliang/evit). On Vision Mamba it is the "Token
Recognition" baseline of R-MeeTo Table 2 (the EViT port of ToP-ViM).

**Score** (``score="attention"``): the class token's attentiveness to every token.

* DeiT: the head-averaged attention probabilities of the block's class-token row,
  ``a_j = mean_h softmax(q_cls k^T / sqrt(d))_j`` (EViT Eq. 1-2), from the block whose MLP
  follows the reduction (:attr:`vimerge.tokens.AttentionRecord.attn`).
* Mamba: a Mamba block has no attention matrix; its scan is a data-controlled linear map whose
  coefficients are the "hidden attention" (Ali, Zimerman, Wolf, "The Hidden Attention of Mamba
  Models", 2024; the form ToP-ViM uses to port EViT). For query ``c`` (the class token) and the
  forward scan of block ``l - 1``, in token order (``dt = softplus(delta + bias)``, A (D, n), B, C
  (n, N)),

      alpha^fwd[d, j] = sum_n C_c[n] exp(A[d, n] sum_{t=j+1..c} dt_t[d]) dt_j[d] B_j[n]     (j <= c)

  and the backward scan mirrored (``j >= c``, decay over ``t = c..j-1``). The token score is the
  channel mean of the two magnitudes, ``s_j = mean_d (|alpha^fwd[d, j]| + |alpha^bwd[d, j]|)``
  (:func:`hidden_attention`, :func:`cls_attention`). ``score="y"``: ToP-ViM's clipped SSM output
  instead (:func:`~vimerge.reduce.topvim.ssm_importance`; Mamba only).

**Rule** (EViT Sec. 3): at a reducing block the ``m`` unprotected tokens become the ``k =
ceil(keep m)`` best plus one fused token (the rest, averaged with their scores and sizes as
weights: ``x_f = sum_j a_j s_j x_j / sum_j a_j s_j``, s = size; EViT sums ``a_j x_j`` without
normalising, which keeps the scale of the attention mass, not of a token: we normalise so that
the fused token is a token); nothing happens when ``k >= m - 1``. The kept tokens are in
descending score (EViT's ``topk`` order; ``ordered=true``: their sequence order, which matters to a
scan), the fused token after them, the class token at R-MeeTo's proportional slot
(:func:`~vimerge.reduce.select.insert_protected`; on DeiT the class token stays first).

**Schedule**: EViT's DeiT-S: keep 0.7 at blocks 3, 6, 9 of 12 (0-based: before the MLPs of
blocks 3, 6, 9), scaled to other depths (Vim-S: blocks 6, 12, 18 of 24);
``ratio``/``keep``/``at``/``r`` as for every keep-rate method
(:class:`~vimerge.reduce.select.KeepSchedule`; with ``r``, a step keeps ``m - r - 1`` tokens and
fuses ``r + 1``).

**Published**: DeiT-S 79.5 top-1 @ 3.0 GFLOPs at keep 0.7 (EViT Table 1, fine-tuned 300 epochs);
on Vim as R-MeeTo Table 2's Token Recognition (fine-tuned): Vim-T 71.3 @ 1.28 GFLOPs, Vim-S
74.8 @ 3.57 GFLOPs (against R-MeeTo's 75.3 and 79.9 at similar FLOPs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..ops.hidden_attention import hidden_attention as ops_hidden_attention
from ..tokens import (
    AttentionRecord,
    BlockRecord,
    ScanRecord,
    TokenModel,
    TokenState,
    check_convention,
    merge_state,
    protected_positions,
)
from .registry import option, register_method
from .schedule import removals
from .select import KeepSchedule, ceil_keep, keep_plan
from .topvim import ssm_importance

SCORES = ("attention", "y")


def hidden_attention(record: ScanRecord, query: int, reverse: bool = False) -> Tensor:
    """(B, D, N) fp32: the coefficients ``alpha[d, j]`` with which token ``j``'s input reaches
    token ``query``'s output in one direction of a selective scan (the "hidden attention" row of
    ``query``; zero where the scan does not reach: ``j > query`` forward, ``j < query``
    backward). ``record`` is in token order; ``reverse`` marks the backward scan (which runs from
    the last token to the first). The skip term ``D`` and the gate are left out (they touch
    the query's own input only, or scale the row). Computed by
    :func:`vimerge.ops.hidden_attention.hidden_attention` (a numba kernel on the CPU)."""
    return ops_hidden_attention(record.dt(), record.B, record.C, record.A, query, reverse)


def cls_attention(record: BlockRecord, cls_index: int) -> Tensor:
    """(B, N): the class token's hidden attention to every token over both scan directions,
    ``mean_d |alpha^fwd| + |alpha^bwd|`` (see the module docstring)."""
    fwd = hidden_attention(record.forward, cls_index).abs().mean(dim=1)
    bwd = hidden_attention(record.backward, cls_index, reverse=True).abs().mean(dim=1)
    return fwd + bwd


@register_method("evit")
@dataclass
class EViT(KeepSchedule):
    """Token recognition (``vimerge.apply(model, "evit")``, ``"evit:ratio=0.28"``, ``"evit:keep=0.7"``);
    see the module docstring. Schedule options (``r``, ``ratio``, ``keep``, ``at``):
    :class:`~vimerge.reduce.select.KeepSchedule`."""
    ordered: bool = option(False, "keep the kept tokens in sequence order (default: descending score, EViT's topk)",
                           flag="--ordered", action="store_true")
    score: str = option("attention", "token score: 'attention' (class-token attention; on Mamba its hidden "
                                     "attention) or 'y' (ToP-ViM's clipped SSM output, Mamba only)")
    track_source: bool = option(False, "keep the map of original tokens per token (for pictures)", cli=False)

    published_keep: ClassVar[float] = 0.7
    published_at: ClassVar[tuple[int, ...]] = (3, 6, 9)
    published_depth: ClassVar[int] = 12
    d_state: ClassVar[int] = 16        # the state size of every Vim / VideoMamba preset (FLOPs of the score)

    def __post_init__(self) -> None:
        self.check_schedule()
        if self.score not in SCORES:
            raise ValueError(f"evit: score must be one of {', '.join(SCORES)}, got {self.score!r}")

    # ------------------------------------------------------------------ schedule
    def kept_tokens(self, m: int, keep: float) -> int:
        """``ceil(keep m)`` kept plus the fused token; unchanged when at most one would be fused."""
        k = ceil_keep(m, keep)
        return m if k >= m - 1 else k + 1

    def token_counts(self, num_tokens: int, depth: int, cls_index: int | None = None,
                     site: str = "before_mixer", protected: Sequence[int] | None = None) -> list[int]:
        return self.schedule_counts(num_tokens, depth, site, 1 if protected is None else len(protected))

    def flops(self, counts: Sequence[int], num_tokens: int, width: int, convention: str = "paper",
              site: str = "before_mixer") -> float:
        """Per image, at every block where the count drops from ``N`` to ``N'``: the fused token,
        one multiply-add per fused token and channel (``(N - N' + 1) C``); on a Mamba model with
        ``score="attention"`` also the class token's hidden attention, ``(n + 1) D`` per position
        and direction over the ``N + 1`` positions the two scans reach (``D = 2 C`` channels, ``n =
        16`` states: the decay-weighted ``C_c B_j`` sum and the ``dt_j`` factor), with
        ``score="y"`` ``N D`` adds. A DeiT's attention row is already computed. "paper" counts a
        multiply-add once, "full" twice. ``site``: the model's reduction site (``count_flops``
        passes it)."""
        mult, total, prev = check_convention(convention), 0.0, num_tokens
        d_inner = 2 * width
        for n in counts:
            if n < prev:
                total += (prev - n + 1) * width
                if site == "before_mixer":
                    total += ((prev + 1) * (self.d_state + 1) * d_inner if self.score == "attention"
                              else prev * d_inner)
            prev = n
        return mult * total

    # ------------------------------------------------------------------ reducer protocol
    def unsupported(self, model: TokenModel) -> str | None:
        if self.score == "y" and model.reduction_site != "before_mixer":
            return (f"evit with score=y reads the selective scan's output; {type(model).__name__} is a "
                    f"Transformer without a scan: use evit with score=attention (the class-token attention)")
        return None

    def prepare(self, model: TokenModel, num_tokens: int) -> None:
        counts = self.schedule_counts(num_tokens, model.depth, model.reduction_site,
                                      len(protected_positions(model)))
        self._removed = removals(counts, num_tokens)
        self._mamba = model.reduction_site == "before_mixer"
        shift = 1 if self._mamba else 0          # Mamba: block l - 1's scan; DeiT: block l's attention
        model.record_blocks([i - shift for i, r in enumerate(self._removed) if r > 0])

    def _score(self, state: TokenState, model: TokenModel) -> Tensor:
        layer = state.layer - 1 if self._mamba else state.layer
        rec = model.block_record(layer)
        if self._mamba:
            if not isinstance(rec, BlockRecord):
                raise RuntimeError(f"evit needs the scans of block {layer}, which {type(model).__name__} did not record")
            return cls_attention(rec, state.cls_index) if self.score == "attention" else ssm_importance(rec.output)
        if not isinstance(rec, AttentionRecord) or rec.attn is None:
            raise RuntimeError(f"evit needs the attention of block {layer}, which {type(model).__name__} did not record")
        return rec.attn[:, state.cls_index, :].float()

    def reduce(self, state: TokenState, model: TokenModel) -> TokenState:
        remove = self._removed[state.layer]
        if remove <= 0:
            return state
        score = self._score(state, model)
        k = state.num_tokens - len(state.kept) - remove - 1
        plan = keep_plan(score, state.cls_index, state.kept, k, ordered=self.ordered, fuse=True)
        weight = score.clamp_min(1e-12).unsqueeze(-1)
        return merge_state(state, plan, weight=weight.to(state.size.dtype))


__all__ = ["EViT", "hidden_attention", "cls_attention"]
