"""A toy reduction method written the way a user adds one: this module and nothing else.

"keepfirst" keeps the first ``k`` tokens (and the protected ones: the class token, registers) from block 1 on and drops the
rest; ``ratio`` (the mean-token ratio, as for every method) picks the ``k`` nearest it.
Imported by tests/test_architecture.py, which runs it through apply, token_counts,
count_flops, the spec parser and ``vimerge eval --reduce``.
"""

from dataclasses import dataclass

import torch

from vimerge.reduce import option, register_method
from vimerge.tokens import MergePlan, merge_state, protected_positions, ratio_from_counts


@register_method("keepfirst")
@dataclass
class KeepFirst:
    k: int | None = option(None, "toy: tokens kept from block 1 on (the class token too)")
    ratio: float | None = option(None, "mean-token reduction ratio")

    def _k(self, num_tokens: int, depth: int, protected: tuple[int, ...]) -> int:
        if self.k is not None:
            return self.k
        return min(range(1, num_tokens + 1),
                   key=lambda k: abs(ratio_from_counts(self._counts(k, num_tokens, depth, protected), num_tokens)
                                     - self.ratio))

    @staticmethod
    def _counts(k: int, num_tokens: int, depth: int, protected: tuple[int, ...]) -> list[int]:
        kept = min(k, num_tokens) + sum(1 for p in protected if p >= k)
        return [num_tokens] + [kept] * (depth - 1)

    def token_counts(self, num_tokens, depth, cls_index=None, site="before_mixer", protected=None):
        cls_index = (num_tokens - 1) // 2 if cls_index is None else cls_index
        protected = (cls_index,) if protected is None else tuple(protected)
        return self._counts(self._k(num_tokens, depth, protected), num_tokens, depth, protected)

    def flops(self, counts, num_tokens, width, convention="paper", site="before_mixer"):
        return 0.0           # dropping tokens computes nothing

    def prepare(self, model, num_tokens):
        self._keep = self._k(num_tokens, model.depth, protected_positions(model))

    def reduce(self, state, model):
        if state.layer != 1:
            return state
        n, c = state.num_tokens, state.cls_index
        keep = [i for i in range(n) if i < self._keep or i in state.kept]   # the class token, registers
        slot = torch.full((n,), -1, dtype=torch.long)
        slot[keep] = torch.arange(len(keep))
        plan = MergePlan(slot.expand(state.hidden.shape[0], n).to(state.hidden.device), len(keep), keep.index(c))
        return merge_state(state, plan)
