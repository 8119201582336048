"""FLOPs of a (token-reduced) Vim, computed from the per-block token counts.

Two conventions:

``"paper"`` -- the R-MeeTo paper's (and its code's) count, which reproduces its Table 2
(Vim-Ti/S/B: 1.45 / 5.08 / 18.87 GFLOPs; with R-MeeTo r = 5 / 11 / 11: 1.28 / 3.58 / 13.21).
A multiply-add counts as one FLOP and only one scan direction is counted. Per block with N
tokens, width C, d_inner = 2C, state size n and dt rank R:

    in_proj  N * C * 4C            out_proj  N * 2C * C
    conv1d   (N + 3) * 2C * 4      x_proj    N * 2C * (R + 2n)     dt_proj  N * R * 2C
    scan     9 * N * 2C * n  +  N * 2C (D term)  +  N * 2C (z gate)

plus the patch embedding ``(num_patches + 1) * C * p * p * in_chans``, the head ``C * classes``
and, at every merging block, the matching cost ``6 N C`` (normalisation) ``+ 2C (N/2)^2``
(similarities) ``+ r C`` (merging), with N the tokens entering that block.

``"full"`` -- every arithmetic operation counted once (a multiply-add is 2 FLOPs, an exp or
a division 1), both scan directions. Per block, with the same symbols:

    in_proj 2 N C 4C, out_proj 2 N 2C C, direction average 2 N 2C, RMSNorm 4 N C,
    residual add N C, and for EACH of the two directions:
    conv1d 2 N 2C 4 + bias N 2C;  SiLU 4 N 2C;  x_proj 2 N 2C (R + 2n);  dt_proj 2 N R 2C;
    bias + softplus 3 N 2C;  dt u  N 2C;  dt A and its exp 2 N 2C n;
    (dt u) B and a h + b  3 N 2C n;  y = C . h  2 N 2C n;  + D u  2 N 2C;  * silu(z)  5 N 2C

plus the patch embedding 2 (num_patches + 1) C p^2 in_chans (counted, as in the paper, for
the class token too), position embedding (num_patches + 1) C, final norm 4C (class token
only), head 2 C classes, and twice the paper's matching cost at each merging block.
Counts follow the token schedule of the active reduction (STM included); R-MeeTo's cost of
matching is added for every block where tokens disappear.
"""

from __future__ import annotations

import math

from ..reduce import token_counts


def _block_paper(N: int, C: int, n: int, R: int, d_conv: int) -> float:
    di = 2 * C
    return (N * C * 4 * C + N * di * C + (N + d_conv - 1) * di * d_conv + N * di * (R + 2 * n)
            + N * R * di + 9 * N * di * n + 2 * N * di)


def _block_full(N: int, C: int, n: int, R: int, d_conv: int) -> float:
    di = 2 * C
    per_direction = (2 * N * di * d_conv + N * di       # depthwise causal conv + bias
                     + 4 * N * di                        # SiLU
                     + 2 * N * di * (R + 2 * n)          # x_proj
                     + 2 * N * R * di                    # dt_proj
                     + 3 * N * di                        # + bias, softplus (exp, log1p)
                     + N * di                            # dt * u
                     + 2 * N * di * n                    # dt * A and exp
                     + 2 * N * di * n                    # (dt u) * B, a * h + that: 1 mul + 1 fma
                     + N * di * n                        # (the multiply of a * h)
                     + 2 * N * di * n                    # y = C . h
                     + 2 * N * di                        # + D u
                     + 5 * N * di)                       # * silu(z)
    return (2 * N * C * 4 * C + 2 * N * di * C + 2 * per_direction + 2 * N * di   # average
            + 4 * N * C + N * C)                                                   # norm, residual


def _merge_cost(N: int, C: int, r: int) -> float:
    return 6 * N * C + 2 * C * (N / 2) ** 2 + r * C


def count_flops(model, convention: str = "paper", num_tokens: int | None = None) -> float:
    """FLOPs of one image through ``model`` with its active reduction (``model.reduction``).

    Returns FLOPs per image (a float; divide by 1e9 for GFLOPs).
    """
    if convention not in ("paper", "full"):
        raise ValueError(f"unknown FLOPs convention {convention!r}; use 'paper' or 'full'")
    mixer = model.layers[0].mixer
    C, n, R, d_conv = model.embed_dim, mixer.d_state, mixer.dt_rank, mixer.d_conv
    N0 = model.num_patches + 1 if num_tokens is None else num_tokens
    conv = model.patch_embed.proj
    patch = conv.in_channels * math.prod(conv.kernel_size)
    counts = token_counts(model, N0)
    block = _block_paper if convention == "paper" else _block_full
    mult = 1 if convention == "paper" else 2
    head = C * model.num_classes
    total = mult * (N0 * C * patch + head)
    if convention == "full":
        total += N0 * C + 4 * C                          # position embedding, final norm
    prev = N0
    for N in counts:
        if N < prev:
            total += mult * _merge_cost(prev, C, prev - N)
        total += block(N, C, n, R, d_conv)
        prev = N
    return float(total)
