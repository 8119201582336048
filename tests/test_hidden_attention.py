"""The hidden-attention row (vimerge.ops.hidden_attention): the numba kernel and the torch closed
form against a float64 loop written here (the definition term by term), and against each other."""

import math

import pytest
import torch

from vimerge.ops import numba_cpu
from vimerge.ops.hidden_attention import hidden_attention, hidden_attention_numba, hidden_attention_torch

needs_numba = pytest.mark.skipif(numba_cpu._IMPORT_ERROR is not None, reason="numba not importable")
IMPLS = [hidden_attention_torch, pytest.param(hidden_attention_numba, marks=needs_numba)]


def definition(dt, B, C, A, query, reverse):
    """alpha[b, d, j] = dt_j sum_n C_q[n] B_j[n] prod over the tokens between of exp(dt_t A[d, n]),
    float64, one product per term."""
    bsz, d, N = dt.shape
    out = torch.zeros(bsz, d, N, dtype=torch.float64)
    dt, B, C, A = dt.double(), B.double(), C.double(), A.double()
    for b in range(bsz):
        for c in range(d):
            for j in range(N):
                if (j > query and not reverse) or (j < query and reverse):
                    continue
                between = range(j + 1, query + 1) if not reverse else range(query, j)
                total = 0.0
                for s in range(A.shape[1]):
                    decay = 1.0
                    for t in between:
                        decay *= math.exp(dt[b, c, t].item() * A[c, s].item())
                    total += C[b, s, query].item() * B[b, s, j].item() * decay
                out[b, c, j] = dt[b, c, j].item() * total
    return out


def inputs(g, bsz=2, d=3, n=4, N=7):
    dt = torch.nn.functional.softplus(torch.randn(bsz, d, N, generator=g))
    return (dt, torch.randn(bsz, n, N, generator=g), torch.randn(bsz, n, N, generator=g),
            -torch.rand(d, n, generator=g) * 3 - 0.1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [4, 16])          # 16: the kernel's fixed-size state loop
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("query", [0, 3, 6])
def test_row_matches_the_definition(impl, n, reverse, query):
    args = inputs(torch.Generator().manual_seed(query + 10 * reverse + n), n=n)
    torch.testing.assert_close(impl(*args, query, reverse).double(), definition(*args, query, reverse),
                               rtol=1e-5, atol=1e-6)


def test_hand_case():
    """One channel, one state, 3 tokens, query 2, dt = (0.5, 1, 2), A = -0.4, C_2 = 0.5, B = (1, 2, 3)."""
    dt = torch.tensor([[[0.5, 1.0, 2.0]]])
    B, C, A = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[0.0, 0.0, 0.5]]]), torch.tensor([[-0.4]])
    want = [0.5 * 1.0 * math.exp(-0.4 * 3.0) * 0.5, 0.5 * 2.0 * math.exp(-0.4 * 2.0) * 1.0, 0.5 * 3.0 * 2.0]
    assert hidden_attention(dt, B, C, A, 2)[0, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert hidden_attention(dt, B, C, A, 2, reverse=True)[0, 0].tolist() == pytest.approx([0, 0, 3.0], rel=1e-6)


@needs_numba
def test_kernel_matches_torch_form_at_vim_fmnist_shapes():
    """Batch 4, d_inner 192, 16 states, 50 tokens, real-looking steps (A down to -20)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.nn.functional.softplus(torch.randn(4, 192, 50, generator=g) - 2)
    B, C = torch.randn(4, 16, 50, generator=g), torch.randn(4, 16, 50, generator=g)
    A = -torch.exp(torch.rand(192, 16, generator=g) * 3)
    for query, reverse in ((25, False), (25, True), (0, True), (49, False)):
        want = hidden_attention_torch(dt.double(), B.double(), C.double(), A.double(), query, reverse)
        got = hidden_attention_numba(dt, B, C, A, query, reverse)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_refuses_a_query_outside_the_tokens():
    with pytest.raises(IndexError, match="query 7 outside the 7 tokens"):
        hidden_attention(*inputs(torch.Generator().manual_seed(0)), 7)
