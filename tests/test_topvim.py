"""ToP-ViM (``topvim``): importance, selection, schedule, gap bookkeeping and the aligned scan,
each against a reference written here (loops, hand values, the paper's token counts)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import vimerge
from vimerge.ops import selective_scan
from vimerge.reduce import build, ratio_from_counts
from vimerge.reduce.select import keep_plan, scaled_layers
from vimerge.reduce.topvim import ToPViM, carry_gaps, ssm_importance
from vimerge.tokens import TokenState, merge_state

# ------------------------------------------------------------------ importance and selection


def test_importance_is_the_clipped_channel_sum():
    y = torch.tensor([[[1.0, -2.0, 0.5], [3.0, 4.0, -1.0]]])           # (B=1, d=2, N=3)
    assert ssm_importance(y).tolist() == [[4.0, 4.0, 0.5]]             # max(0, .) summed over d
    assert ssm_importance(y, clip=False).tolist() == [[4.0, 2.0, -0.5]]


def slow_keep(score: list[float], cls: int, k: int) -> tuple[list[int], int]:
    """The released selection, written out: drop the class token, take the k best (ties to the
    lower position), sort them, put the class token at (k + 1) * cls // N of the k + 1 tokens."""
    n = len(score)
    others = [i for i in range(n) if i != cls]
    best = sorted(sorted(others, key=lambda i: (-score[i], i))[:k])
    new_cls = cls * (k + 1) // n
    return best[:new_cls] + [cls] + best[new_cls:], new_cls


@pytest.mark.parametrize("seed", range(5))
def test_keep_plan_matches_the_slow_selection(seed):
    g = torch.Generator().manual_seed(seed)
    n, cls, k = 11, 5, 6
    score = torch.randn(3, n, generator=g)
    score[1, 2] = score[1, 3]                                          # a tie
    plan = keep_plan(score, cls, (cls,), k)
    x = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(3, n, 1)
    state = TokenState(x.clone(), x.clone(), torch.ones(3, n, 1), cls)
    out = merge_state(state, plan)
    for b in range(3):
        order, new_cls = slow_keep(score[b].tolist(), cls, k)
        assert out.hidden[b, :, 0].tolist() == [float(i) for i in order]
        assert out.cls_index == new_cls
    assert torch.equal(out.size, torch.ones(3, k + 1, 1))


# ------------------------------------------------------------------ schedule (paper token counts)


def test_the_released_schedule_gives_the_papers_token_counts():
    """Vim-S, prune after blocks 5, 10, 15 keeping 0.8 (ToP-ViM HEAD code): 197 x 5, 157 x 5,
    125 x 5, 101 x 9 tokens, mean-token ratio 0.30 (released logs: 78.37 top-1)."""
    counts = ToPViM().token_counts(197, 24)
    assert counts == [197] * 5 + [157] * 5 + [125] * 5 + [101] * 9
    assert round(ratio_from_counts(counts, 197), 2) == 0.30
    # Vim-T after 10 and 20 (the paper's 75.1 @ 1.29 G): 197 x 10, 157 x 10, 125 x 4
    assert build("topvim:at=[10,20]").token_counts(197, 24) == [197] * 10 + [157] * 10 + [125] * 4


def test_scaled_layers_and_ratio():
    assert scaled_layers((5, 10, 15), 24, 8, 1) == [2, 3, 5]
    assert scaled_layers((5, 10, 15), 24, 24, 1) == [5, 10, 15]
    assert scaled_layers((5, 10, 15), 24, 2, 1) == [1]
    counts = build("topvim:ratio=0.3").token_counts(50, 8)
    assert abs(ratio_from_counts(counts, 50) - 0.3) < 0.02
    assert build("topvim:r=[0,2,2,0,0,0,0,0]").token_counts(50, 8) == [50, 48, 46, 46, 46, 46, 46, 46]


@pytest.mark.parametrize("spec, message", [
    ("topvim:keep=1.5", "in (0, 1]"), ("topvim:ratio=0.3,keep=0.5", "not both"),
    ("topvim:r=3,ratio=0.2", "not several"), ("topvim:at=[]", "at lists"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(spec)


def test_impossible_requests_name_the_limit():
    with pytest.raises(ValueError, match="outside 1..7"):
        build("topvim:at=[0,3]").token_counts(50, 8)
    with pytest.raises(ValueError, match="more than the 48 tokens"):
        build("topvim:r=[0,49,0,0,0,0,0,0]").token_counts(50, 8)
    with pytest.raises(ValueError, match="out of reach"):
        build("topvim:ratio=0.9,at=[7]").token_counts(50, 8)


# ------------------------------------------------------------------ gaps


def test_carry_gaps_hand_case():
    # 7 tokens, keep 0, 3, 4, 6: forward gaps 0, 2, 0, 1; backward gaps 2, 0, 1, 0
    keep = torch.tensor([[True, False, False, True, True, False, True]])
    assert carry_gaps(None, keep)[0].tolist() == [[0, 2], [2, 0], [0, 1], [1, 0]]
    # a second step hands the pruned tokens' gaps on: drop the token with gaps (2, 0)
    again = carry_gaps(carry_gaps(None, keep), torch.tensor([[True, False, True, True]]))
    assert again[0].tolist() == [[0, 3], [3, 1], [1, 0]]        # survivors 0, 4, 6: 1..3 and 5 missing


def original_positions(state: TokenState) -> torch.Tensor:
    """(B, N) the original position of every token (pruning only: one per token)."""
    assert torch.equal(state.source.sum(-1), torch.ones_like(state.source.sum(-1)))
    return state.source.argmax(-1)


@pytest.mark.parametrize("name, kwargs", [("videomamba_tiny", dict(img_size=64, num_frames=2, depth=6)),
                                          ("vim_tiny", dict(img_size=64, depth=6))])
def test_gaps_count_the_original_positions_between_neighbours(name, kwargs):
    """After several pruning steps, every patch token's gaps are the original patch positions
    missing between it and its neighbouring patch tokens; protected tokens have none."""
    model = vimerge.create_model(name, **kwargs).eval()
    vimerge.apply(model, "topvim:r=[0,3,4,0,5,0]")
    x = torch.randn((2, 3, 2, 64, 64) if "video" in name else (2, 3, 64, 64))
    with torch.no_grad():
        state = model.forward_tokens(x, track_source=True)
    pos = original_positions(state)
    protected = set(model.protected)
    for b in range(2):
        p = pos[b].tolist()
        patches = [t for t in p if t not in protected]              # their order is kept
        assert patches == sorted(patches)
        for i, t in enumerate(p):
            if t in protected:
                assert state.gaps[b, i].tolist() == [0, 0]
                continue
            j = patches.index(t)
            lo = patches[j - 1] if j else -1
            hi = patches[j + 1] if j + 1 < len(patches) else model.num_tokens
            before = sum(1 for q in range(lo + 1, t) if q not in protected)
            after = sum(1 for q in range(t + 1, hi) if q not in protected)
            assert state.gaps[b, i].tolist() == [before, after], (b, i)


# ------------------------------------------------------------------ the aligned scan


def dummy_scan(u, dt, A, B, C, D, z, scale):
    """Reference: insert scale - 1 positions with no input and the token's own time step before
    every token, run the plain reference scan, read the real positions."""
    bsz, d, n = u.shape
    reps = scale[0, 0].long().tolist()
    idx = torch.tensor([t for t in range(n) for _ in range(reps[t])])
    real = torch.tensor([r for t in range(n) for r in [False] * (reps[t] - 1) + [True]])
    u2 = u[..., idx] * real                                          # the dummies give no input
    y = selective_scan(u2, dt[..., idx], A, B[..., idx], C[..., idx], backend="reference")[..., real]
    return (y + u * D[:, None]) * F.silu(z)


@pytest.mark.parametrize("backend", ["reference", "numba", "chunked"])
def test_decay_scale_equals_pruned_positions_without_input(backend):
    if backend not in vimerge.available_backends():
        pytest.skip(f"{backend} not available")
    g = torch.Generator().manual_seed(0)
    b, d, n, s = 1, 3, 6, 4
    u, z = torch.randn(b, d, n, generator=g), torch.randn(b, d, n, generator=g)
    dt = torch.rand(b, d, n, generator=g) * 0.5 + 0.2
    A = -torch.rand(d, s, generator=g) - 0.5
    B, C = torch.randn(b, s, n, generator=g), torch.randn(b, s, n, generator=g)
    D = torch.randn(d, generator=g)
    scale = torch.tensor([[[1.0, 3.0, 1.0, 2.0, 1.0, 4.0]]])
    want = dummy_scan(u, dt, A, B, C, D, z, scale)
    got = selective_scan(u, dt, A, B, C, D, z, decay_scale=scale, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = selective_scan(u, dt, A, B, C, D, z, backend=backend)
    assert (got - plain).abs().max() > 1e-2                           # the scale changes the output
    with pytest.raises(ValueError, match="decay_scale must be"):
        selective_scan(u, dt, A, B, C, D, z, decay_scale=scale[..., :3])


def silenced_mixer(direction: str):
    """A mixer whose other direction outputs zero (no B, C, D there) and whose time steps are
    about 0.3 (a stretched decay changes the state a lot)."""
    from vimerge.models.mamba import BiMambaMixer
    torch.manual_seed(0)
    mixer = BiMambaMixer(8, d_state=4).eval()
    mixer.fused = False
    off = "_b" if direction == "forward" else ""
    with torch.no_grad():
        getattr(mixer, "x_proj" + off).weight.zero_()
        getattr(mixer, "D" + off).zero_()
        for sfx in ("", "_b"):
            getattr(mixer, "dt_proj" + sfx).bias.fill_(-1.0)        # dt about 0.3
        mixer.out_proj.weight.mul_(100.0)                              # outputs of order 1
    return mixer


@pytest.mark.parametrize("direction, side", [("forward", 0), ("backward", 1)])
def test_each_scan_direction_reads_its_own_gaps(direction, side):
    """gaps[..., 0] stretch the forward scan, gaps[..., 1] the backward one (in token order)."""
    mixer = silenced_mixer(direction)
    h = torch.randn(1, 5, 8)
    mine, other = torch.zeros(1, 5, 2), torch.zeros(1, 5, 2)
    mine[0, 1:4, side] = torch.tensor([2.0, 1.0, 3.0])
    other[0, 1:4, 1 - side] = torch.tensor([2.0, 1.0, 3.0])
    with torch.no_grad():
        plain = mixer(h)
        torch.testing.assert_close(mixer(h, other), plain, rtol=0, atol=1e-5)   # the other side's gaps: no effect
        assert (mixer(h, mine) - plain).abs().max() > 1e-2
        # in the scan's own order the first token has no predecessor: its gap changes nothing
        first = torch.zeros(1, 5, 2)
        first[0, 0 if side == 0 else 4, side] = 5.0
        torch.testing.assert_close(mixer(h, first), plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(mixer(h, torch.zeros(1, 5, 2)), plain, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ on models


def test_topvim_refuses_a_transformer():
    model = vimerge.create_model("deit_small", depth=2, img_size=64)
    with pytest.raises(ValueError, match="topvim scores tokens by the selective scan"):
        vimerge.apply(model, "topvim")
    assert model.reduction is None


def test_align_false_is_plain_pruning_and_align_changes_the_output():
    model = vimerge.create_model("vim_tiny", img_size=64, depth=6).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vimerge.apply(model, "topvim:r=[0,3,3,3,3,0],align=false")
        plain, s_plain = model(x), model.forward_tokens(x, track_source=True)
        vimerge.apply(model, "topvim:r=[0,3,3,3,3,0]")
        aligned, s_aligned = model(x), model.forward_tokens(x, track_source=True)
    assert s_plain.gaps is None and s_aligned.gaps is not None
    assert (plain - aligned).abs().max() > 0
    assert torch.isfinite(aligned).all()
    counts = vimerge.token_counts(model)
    assert counts == [17, 14, 11, 8, 5, 5]
    assert s_aligned.num_tokens == s_plain.num_tokens == 5
    assert math.isclose(vimerge.count_flops(model), model.flops(counts) + model.reduction.flops(
        counts, model.num_tokens, model.embed_dim), rel_tol=1e-12)


def test_flops_hand_count():
    # 10 tokens, width 4 (d_inner 8), prune 2 at block 1, then nothing: importance 10 * 8 adds;
    # alignment 2 * 8 * 8 in blocks 1 and 2 (8 tokens each)
    r = build("topvim:r=[0,2,0]")
    assert r.flops([10, 8, 8], 10, 4) == 10 * 8 + 2 * (2 * 8 * 8)
    assert r.flops([10, 8, 8], 10, 4, "full") == 2 * (10 * 8 + 2 * (2 * 8 * 8))
    assert build("topvim:r=[0,2,0],align=false").flops([10, 8, 8], 10, 4) == 10 * 8
