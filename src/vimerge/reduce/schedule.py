"""Which blocks reduce tokens, how many, and the reduction ratio that results.

R-MeeTo reduces before the mixer of every ``interval``-th block except block 0
(blocks 2, 4, ..., 22 of a 24-block Vim by default; ``odd=True`` gives blocks 1, 3, ...),
removing ``r`` tokens each time, capped by what bipartite matching allows: with the class
token kept out, ``(N - 1) // 2`` tokens can be matched at most. The reduction ratio is
``1 - mean(tokens entering each block) / initial tokens``; with 197 tokens and 24 blocks this
reproduces Table 10 of the R-MeeTo paper (r = 5, 10, 11, 13, 15, 20 -> 0.14, 0.28, 0.31, 0.36,
0.42, 0.54; r = 20 needs the cap in the last blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..tokens import ratio_from_counts

Capacity = Callable[[int], int]


def bipartite_capacity(num_tokens: int, protected: int = 1) -> int:
    """Most tokens one bipartite matching step can remove: half of those that may merge, the
    ``protected`` ones (the class token; Mamba-Reg: its registers) kept out."""
    return max(0, (num_tokens - protected) // 2)


def reduction_layers(depth: int, interval: int = 2, odd: bool = False, first: int = 1) -> list[int]:
    """Blocks that reduce: ``i >= first`` with ``i % interval == 0`` (or ``(i + 1) % interval == 0``).

    ``first`` is 1 where the reduction runs before a block's mixer (Vim: block 0's tokens are
    not mixed yet) and 0 where it runs inside the block after the attention (DeiT)."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return [i for i in range(first, depth) if (i + 1 if odd else i) % interval == 0]


def per_layer_r(r: int | Sequence[int], depth: int, interval: int = 2, odd: bool = False,
                first: int = 1) -> list[int]:
    """The requested r of every block: ``r`` on the reducing blocks, or an explicit list."""
    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise ValueError(f"an explicit r list needs one entry per block ({depth}), got {len(r)}")
        values = [int(v) for v in r]
    else:
        layers = set(reduction_layers(depth, interval, odd, first))
        values = [int(r) if i in layers else 0 for i in range(depth)]
    if any(v < 0 for v in values):
        raise ValueError(f"r must be >= 0, got {r}")
    return values


def token_counts(r_per_layer: Sequence[int], num_tokens: int,
                 capacity: Capacity = bipartite_capacity) -> list[int]:
    """Tokens each block's mixer sees, after that block's reduction."""
    counts, n = [], num_tokens
    for r in r_per_layer:
        n -= min(r, capacity(n))
        counts.append(n)
    return counts


def removals(counts: Sequence[int], num_tokens: int) -> list[int]:
    """Tokens removed at each block from its token counts (the inverse of :func:`token_counts`):
    ``[num_tokens, *counts[:-1]] - counts``; gives any method another's tokens per block as an
    explicit ``r`` list."""
    return [p - c for p, c in zip([num_tokens, *counts[:-1]], counts)]


def check_r(r: int | Sequence[int], num_tokens: int, depth: int, interval: int = 2, odd: bool = False,
            capacity: Capacity = bipartite_capacity, first: int = 1) -> list[int]:
    """Validate a request and return the per-block r (errors name the limit and the fix)."""
    values = per_layer_r(r, depth, interval, odd, first)
    first = next((i for i, v in enumerate(values) if v > 0), None)
    if first is not None:
        limit = capacity(token_counts(values[:first], num_tokens, capacity)[-1] if first else num_tokens)
        if values[first] > limit:
            raise ValueError(f"r={values[first]} at block {first} is more than the {limit} tokens one "
                             f"merging step can remove from {num_tokens} tokens; use r <= {limit}")
    return values


def reduction_ratio(r: int | Sequence[int], num_tokens: int = 197, depth: int = 24, interval: int = 2,
                    odd: bool = False, capacity: Capacity = bipartite_capacity, first: int = 1) -> float:
    """Reduction ratio of removing ``r`` tokens per reducing block (R-MeeTo Table 10)."""
    values = check_r(r, num_tokens, depth, interval, odd, capacity, first)
    return ratio_from_counts(token_counts(values, num_tokens, capacity), num_tokens)


def r_for_ratio(ratio: float, num_tokens: int = 197, depth: int = 24, interval: int = 2,
                odd: bool = False, capacity: Capacity = bipartite_capacity, first: int = 1) -> int:
    """The r whose reduction ratio is nearest to ``ratio`` (inverse of :func:`reduction_ratio`)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"a reduction ratio must be in [0, 1), got {ratio}")
    r_max = capacity(num_tokens)
    ratios = [reduction_ratio(r, num_tokens, depth, interval, odd, capacity, first) for r in range(r_max + 1)]
    if ratio > ratios[-1] + 0.005:
        raise ValueError(f"ratio {ratio} is out of reach: with {num_tokens} tokens, {depth} blocks and "
                         f"interval {interval} the most is {ratios[-1]:.3f} (r={r_max}); lower the "
                         f"ratio or the interval")
    return min(range(r_max + 1), key=lambda r: (abs(ratios[r] - ratio), r))
