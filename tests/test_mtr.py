"""MTR (``mtr``): the time-step score, the three groups, the merge and the schedule, each against a
reference written here (hand values, a slow loop, R-MeeTo's token counts)."""

import math

import pytest
import torch

import vimerge
from vimerge.reduce import build, ratio_from_counts
from vimerge.reduce.mtr import MTR, delta_importance, group_sizes, mtr_plan
from vimerge.reduce.rmeeto import RMeeTo
from vimerge.tokens import BlockRecord, ScanRecord, TokenState, merge_state


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def record(delta_f, delta_b, bias) -> BlockRecord:
    """A BlockRecord with the given raw time steps (B, D, N) for both directions."""
    def one(delta):
        d = torch.tensor(delta)
        bsz, dim, n = d.shape
        return ScanRecord(d, torch.zeros(bsz, 1, n), torch.zeros(bsz, 1, n), -torch.ones(dim, 1), torch.tensor(bias))
    f = one(delta_f)
    return BlockRecord(f, one(delta_b), torch.zeros_like(f.delta))


def test_score_is_the_channel_mean_time_step_of_both_scans():
    rec = record([[[0.0, 1.0, -2.0], [2.0, -1.0, 0.5]]], [[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]], [0.5, -0.5])
    fwd = [(softplus(0.0 + 0.5) + softplus(2.0 - 0.5)) / 2, (softplus(1.5) + softplus(-1.5)) / 2,
           (softplus(-1.5) + softplus(0.0)) / 2]
    bwd = [(softplus(1.5) + softplus(-0.5)) / 2, (softplus(0.5) + softplus(-0.5)) / 2,
           (softplus(0.5) + softplus(2.5)) / 2]
    got = delta_importance(rec)
    assert got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx([a + b for a, b in zip(fwd, bwd)], rel=1e-6)


@pytest.mark.parametrize("m, r, frac, expected", [
    (10, 3, 0.5, (3, 4, 3)),        # 7 survivors: floor(3.5) Keep, 4 Targets
    (10, 4, 0.5, (3, 3, 4)),
    (5, 3, 0.5, (1, 1, 3)),
    (5, 3, 0.9, (1, 1, 3)),         # Keep capped so that one Target stays
    (10, 2, 0.0, (0, 8, 2)),        # every survivor a Target
    (10, 0, 0.3, (3, 7, 0)),
])
def test_group_sizes(m, r, frac, expected):
    assert group_sizes(m, r, frac) == expected


def slow_mtr(score, x, size, cls, r, frac, weighted=True):
    """The MTR step written out for one image: rank the non-class tokens (ties to the lower
    position), Keep / Target / Source, each Source into its most cosine-similar Target (ties to the
    more important Target), survivors in order, class token at cls * (N - r) // N; merged values
    are the size-weighted (or plain) mean of their members. Returns (values, sizes)."""
    n = len(score)
    others = [i for i in range(n) if i != cls]
    ranked = sorted(others, key=lambda i: (-score[i], i))
    keep, target, _ = group_sizes(len(others), r, frac)
    targets, sources = ranked[keep:keep + target], ranked[keep + target:]
    members = {i: [i] for i in others if i not in sources}

    def cos(a, b):
        dot = sum(p * q for p, q in zip(x[a], x[b]))
        return dot / (math.sqrt(sum(p * p for p in x[a])) * math.sqrt(sum(q * q for q in x[b])))

    for s in sources:
        best = max(range(len(targets)), key=lambda j: (cos(s, targets[j]), -j))
        members[targets[best]].append(s)
    out = [i for i in others if i not in sources]
    new_cls = cls * (n - r) // n
    out = out[:new_cls] + [cls] + out[new_cls:]
    members[cls] = [cls]
    values, sizes = [], []
    for i in out:
        w = [size[j] if weighted else 1.0 for j in members[i]]
        values.append([sum(wj * x[j][c] for wj, j in zip(w, members[i])) / sum(w) for c in range(len(x[0]))])
        sizes.append(sum(size[j] for j in members[i]))
    return values, sizes


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("seed, cls, r, frac", [(0, 6, 4, 0.5), (1, 0, 3, 0.3), (2, 12, 6, 0.0), (3, 6, 1, 0.8)])
def test_step_matches_the_slow_reference(seed, cls, r, frac, weighted):
    g = torch.Generator().manual_seed(seed)
    bsz, n, c = 3, 13, 4
    x = torch.randn(bsz, n, c, generator=g)
    score = torch.randn(bsz, n, generator=g)
    score[0, 1] = score[0, 2]                                           # a tie
    size = torch.randint(1, 4, (bsz, n, 1), generator=g).float()
    state = TokenState(x.clone(), x.clone() * 2, size, cls)
    plan = mtr_plan(score, x, cls, (cls,), r, frac)
    out = merge_state(state, plan) if weighted else merge_state(state, plan, weight=1.0 / size)
    assert out.num_tokens == n - r and out.cls_index == cls * (n - r) // n
    for b in range(bsz):
        values, sizes = slow_mtr(score[b].tolist(), x[b].tolist(), size[b, :, 0].tolist(), cls, r, frac, weighted)
        torch.testing.assert_close(out.hidden[b], torch.tensor(values), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.residual[b], 2 * torch.tensor(values), rtol=1e-5, atol=1e-6)
        assert out.size[b, :, 0].tolist() == sizes


def test_hand_case_weighted_and_plain_average():
    """5 tokens, class token first; scores rank 1 > 2 > 3 > 4; r = 1, keep_frac 0.5 (3 survivors:
    Keep {1}, Targets {2, 3}); token 4 = (1, 0) is nearest to token 3 = (1, 0.1), not 2 = (0, 1)."""
    x = torch.tensor([[[9.0, 9.0], [5.0, 5.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0]]])
    score = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [3.0], [1.0]]])
    plan = mtr_plan(score, x, 0, (0,), 1, 0.5)
    assert plan.slot.tolist() == [[0, 1, 2, 3, 3]]
    weighted = merge_state(TokenState(x, None, size, 0), plan)
    assert weighted.hidden[0, 3].tolist() == pytest.approx([1.0, (3 * 0.1 + 0.0) / 4])
    plain = merge_state(TokenState(x, None, size, 0), plan, weight=1.0 / size)
    assert plain.hidden[0, 3].tolist() == pytest.approx([1.0, 0.05])
    assert plain.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 4.0]            # sizes still count tokens


def test_the_least_important_are_merged_and_the_order_is_kept():
    """Scores ascending with the position, class token at 4: the 3 lowest (0, 1, 2) are Sources,
    Keep {8, 7}, Targets {6, 5, 3}; survivors 3, 5, 6, 7, 8 in order with the class token at
    4 * 6 // 9 = 2 (R-MeeTo's proportional slot)."""
    n, r = 9, 3
    x = torch.randn(1, n, 4)
    plan = mtr_plan(torch.arange(n, dtype=torch.float32)[None], x, 4, (4,), r, 0.5)
    slot = plan.slot[0].tolist()
    assert plan.cls_index == 2 and plan.num_out == 6
    assert [slot[i] for i in (3, 5, 4, 6, 7, 8)] == [0, 1, 2, 3, 4, 5]
    assert all(slot[i] in (slot[3], slot[5], slot[6]) for i in (0, 1, 2))     # into Targets only


# ------------------------------------------------------------------ schedule


def test_default_schedule_is_rmeetos_blocks_and_counts():
    for r in (5, 10, 13):
        assert MTR(r=r).token_counts(197, 24) == RMeeTo(r=r).token_counts(197, 24)
    counts = MTR(ratio=0.28).token_counts(197, 24)
    assert abs(ratio_from_counts(counts, 197) - 0.28) < 0.01
    assert counts == RMeeTo(r=10).token_counts(197, 24)


def test_explicit_lists_and_the_one_target_cap():
    r = [0, 4, 0, 4, 0, 4]
    assert MTR(r=r).token_counts(20, 6) == [20, 16, 16, 12, 12, 8]
    # the cap: 5 tokens (4 unprotected) can lose 3, one Target stays
    assert MTR(r=[0, 3, 3], interval=1).token_counts(5, 3) == [5, 2, 2]
    assert MTR(r=2, interval=1).token_counts(5, 3) == [5, 3, 2]


@pytest.mark.parametrize("spec, message", [
    ("mtr:r=4,ratio=0.2", "either r"),
    ("mtr:keep_frac=1.0", "no Target"),
    ("mtr:ratio=1.2", "ratio"),
    ("mtr:interval=0", "interval"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        build(spec)


def test_impossible_requests_name_the_limit():
    with pytest.raises(ValueError, match="r\\[0\\] must be 0"):
        MTR(r=[1, 0, 0]).token_counts(20, 3)
    with pytest.raises(ValueError, match="more than the 18"):
        MTR(r=19).token_counts(20, 3)
    with pytest.raises(ValueError, match="out of reach"):
        MTR(ratio=0.95).token_counts(20, 4)
    with pytest.raises(ValueError, match="at most 2"):
        mtr_plan(torch.randn(1, 4), torch.randn(1, 4, 2), 0, (0,), 3)


def test_flops_hand_count():
    """197 -> 187 at one block, width 384: score 2 * 197 * 768, cosine 6 (10 + T) 384 +
    2 * 384 * 10 * T with T = 187 - floor(0.5 * 186) = 93 Targets... of the 186 unprotected survivors."""
    counts = [197, 187, 187]
    keep, t, r = group_sizes(196, 10, 0.5)
    assert (keep, t, r) == (93, 93, 10)
    expected = 2 * 197 * 768 + 6 * (10 + 93) * 384 + 2 * 384 * 10 * 93 + 10 * 384
    assert MTR(r=[0, 10, 0]).flops(counts, 197, 384) == expected
    assert MTR(r=[0, 10, 0]).flops(counts, 197, 384, "full") == 2 * expected


# ------------------------------------------------------------------ on the models


def test_deit_is_refused_with_the_reason():
    model = vimerge.create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    with pytest.raises(ValueError, match="time step"):
        vimerge.apply(model, "mtr:r=2")


def test_on_a_vim_the_step_uses_the_previous_blocks_time_steps(tiny_model):
    """The reduced forward equals the blocks run by hand with one MTR step before block 2: the
    plan from block 1's recorded time steps and the hidden states entering block 2."""
    model = tiny_model(depth=3)
    x = torch.randn(2, 3, 32, 32)
    vimerge.apply(model, "mtr:r=[0,0,5],keep_frac=0.25")
    with torch.no_grad():
        reduced = model.forward_tokens(x)
    vimerge.remove(model)
    model.record_blocks([1])
    with torch.no_grad():
        state = TokenState.start(model.embed(x), model.cls_index)
        for i, block in enumerate(model.layers):
            if i == 2:
                rec = model.block_record(1)
                plan = mtr_plan(delta_importance(rec), state.hidden, state.cls_index, state.kept, 5, 0.25)
                state = merge_state(state, plan)
            state.hidden, state.residual = block(state.hidden, state.residual)
    assert reduced.num_tokens == model.num_tokens - 5 == state.num_tokens
    torch.testing.assert_close(reduced.hidden, state.hidden)
    torch.testing.assert_close(reduced.residual, state.residual)


def test_retrains_through_the_cli_spec():
    """The spec a checkpoint stores round-trips (what ``vimerge retrain --method`` writes)."""
    reducer = build("mtr:r=[0,2,0,2],keep_frac=0.3,weighted=false")
    assert vimerge.reduce.spec_of(reducer) == "mtr:r=[0,2,0,2],keep_frac=0.3,weighted=false"
