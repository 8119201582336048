"""STM (BNNM + HSP): positions, merging, schedules, model-level guarantees and the HSP formula."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import vimerge
from conftest import TINY_VIM
from vimerge.reduce.stm import (
    STM,
    bnnm_counts,
    bnnm_schedule,
    direction_weights,
    merge_coefficients,
    schedule_counts,
)
from vimerge.tokens import MergePlan, TokenState, merge_state, ratio_from_counts


def tiny(**kw):
    """The shared tiny Vim of conftest.py (65 tokens, 6 blocks) in train mode."""
    return vimerge.create_model("vim_tiny", **{**TINY_VIM, **kw})


def fake_model(depth, cls_index):
    """A token model without blocks (what run_reductions needs of the protocol)."""
    return SimpleNamespace(depth=depth, cls_index=cls_index, record_blocks=lambda layers: None,
                           block_record=lambda layer: None)


def run_reductions(reducer, state, model, depth):
    """Apply a reducer's steps for all blocks with nothing in between (no mixers)."""
    reducer.prepare(model, state.num_tokens)
    for layer in range(depth):
        state.layer = layer
        state = reducer.reduce(state, model)
    return state


# ------------------------------------------------------------------ BNNM positions and merging
def test_schedule_hand_built():
    # 21 tokens, class token at 10 (10 per side), 40 % -> 8 tokens, 4 per side, 2 per side per block
    steps = bnnm_schedule(21, 6, 0.4)
    assert [s is None for s in steps] == [True, False, False, True, True, True]
    s1, s2 = steps[1], steps[2]
    # left sweep: floor(k * 10 / 4) = 0, 2, 5, 7; right: 20 - (0, 2, 5, 7) = 20, 18, 15, 13
    assert s1.origin == (0, 2, 20, 18) and s2.origin == (5, 7, 15, 13)
    assert s1.removed == (0, 2, 20, 18) and s1.target == (1, 3, 19, 17) and s1.side == (-1, -1, 1, 1)
    assert (s1.num_in, s1.num_out, s1.cls_in, s1.cls_out) == (21, 17, 10, 8)
    # after block 1 the originals 5, 7, 15, 13 sit at 3, 5, 13, 11 and merge into 6, 8, 14, 12 (-> 4, 6, 12, 10)
    assert s2.removed == (3, 5, 13, 11) and s2.target == (4, 6, 12, 10)
    assert (s2.num_in, s2.num_out, s2.cls_in, s2.cls_out) == (17, 13, 8, 6)
    assert schedule_counts(steps, 21) == [21, 17, 13, 13, 13, 13]


def test_schedule_far_to_near_and_limits():
    steps = bnnm_schedule(197, 24, 0.4)            # ViM-Ti: 79 tokens, 40 left / 39 right, 2 per side
    origins = [s.origin for s in steps if s is not None]
    assert len(origins) == 20 and steps[0] is None and steps[1] is not None
    left = [p for o, s in zip(origins, [s for s in steps if s]) for p, d in zip(o, s.side) if d < 0]
    right = [p for o, s in zip(origins, [s for s in steps if s]) for p, d in zip(o, s.side) if d > 0]
    assert left == sorted(left) and len(left) == 40 and left[0] == 0 and max(left) < 97
    assert right == sorted(right, reverse=True) and len(right) == 39 and right[0] == 196 and min(right) > 99
    # consecutive removals are spread evenly: strides floor(98/40) or +1
    assert {b - a for a, b in zip(left, left[1:])} <= {2, 3}
    # the paper's settings: per side 1 up to 15 %, then 2; mean-token ratios (22.8 % at 40 %)
    assert STM(final_ratio=0.15).token_counts(197, 24)[-1] == 197 - 30
    assert len(bnnm_schedule(197, 24, 0.15)[1].removed) == 2
    assert abs(STM(final_ratio=0.4).reduction_ratio(197, 24) - 0.2276) < 1e-3


def test_hand_built_merge_values_order_cls_and_sizes():
    depth, n = 6, 21
    hidden = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, n, 3).clone()
    hidden[1] *= -1                                    # second image: other values, same plan
    state = TokenState.start(hidden, 10, track_source=True)
    state.residual = hidden * 2
    reducer = STM(final_ratio=0.4, hsp=False)
    out = run_reductions(reducer, state, fake_model(depth, 10), depth)
    expected = [0.5, 2.5, 4, 5.5, 7.5, 9, 10, 11, 12.5, 14.5, 16, 17.5, 19.5]
    sizes = [2, 2, 1, 2, 2, 1, 1, 1, 2, 2, 1, 2, 2]
    assert out.cls_index == 6 and out.hidden[0, 6, 0] == 10
    torch.testing.assert_close(out.hidden[0, :, 0], torch.tensor(expected))
    torch.testing.assert_close(out.hidden[1, :, 0], -torch.tensor(expected))
    torch.testing.assert_close(out.residual[0, :, 0], 2 * torch.tensor(expected))
    assert out.size[0, :, 0].tolist() == sizes
    members = [torch.nonzero(row).flatten().tolist() for row in out.source[0]]
    assert members[:3] == [[0, 1], [2, 3], [4]] and members[6] == [10] and members[-1] == [19, 20]


def test_later_merge_absorbs_merged_token_with_its_size():
    # 11 tokens, class token at 5; 8 of them gone (4 per side) -> every side keeps only the class neighbour
    steps = bnnm_schedule(11, 5, 0.73, per_side=1)
    assert [s.origin for s in steps if s] == [(0, 10), (1, 9), (2, 8), (3, 7)]
    hidden = torch.arange(11, dtype=torch.float32).view(1, 11, 1)
    out = run_reductions(STM(final_ratio=0.73, per_side=1, hsp=False), TokenState.start(hidden, 5), fake_model(5, 5), 5)
    assert out.size.flatten().tolist() == [5, 1, 5] and out.cls_index == 1
    torch.testing.assert_close(out.hidden.flatten(), torch.tensor([2.0, 5.0, 8.0]))   # means of 0..4, 6..10


@pytest.mark.parametrize("kwargs, message", [
    (dict(final_ratio=1.0), "must be in"), (dict(final_ratio=-0.1), "must be in"), (dict(ratio=1.0), "must be in"),
    (dict(ratio=0.2, final_ratio=0.2), "not both"), (dict(per_side=0), "per_side"),
    (dict(start_layer=-1), "start_layer"), (dict(collapse="nope"), "collapse"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STM(**kwargs)


def test_impossible_requests():
    with pytest.raises(ValueError, match="per_side=40 is more than"):
        STM(final_ratio=0.2, per_side=40).token_counts(65, 6)
    with pytest.raises(ValueError, match="at most its length minus one"):
        STM(final_ratio=0.99, per_side=20).token_counts(65, 6)
    with pytest.raises(ValueError, match="needs 10 reducing blocks"):
        STM(final_ratio=0.3, per_side=1).token_counts(65, 6)
    model = tiny()
    vimerge.apply(model, "stm", final_ratio=0.5, per_side=1)
    with pytest.raises(ValueError, match="raise per_side"):
        model(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------ model-level guarantees
@pytest.mark.parametrize("ratio, hsp, per_side", [(0.15, True, None), (0.3, False, None), (0.4, True, 3)])
def test_token_counts_match_what_reduce_does(ratio, hsp, per_side):
    model = tiny().eval()
    seen = []
    hooks = [b.mixer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.layers]
    reducer = vimerge.apply(model, "stm", final_ratio=ratio, hsp=hsp, per_side=per_side)
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    n = model.num_patches + 1
    assert seen == reducer.token_counts(n, 6) == vimerge.token_counts(model)
    assert reducer.reduction_ratio(n, 6) == pytest.approx(ratio_from_counts(seen, n))
    assert n - seen[-1] == math.floor(ratio * n + 0.5) and state.num_tokens == seen[-1]
    assert state.size.sum(1).flatten().tolist() == [n, n]
    assert reducer.fallbacks == []


def test_ratio_zero_and_remove_are_bit_identical():
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        vimerge.apply(model, "stm", final_ratio=0.0)
        assert torch.equal(model(x), ref)
        assert not any(b.mixer.record for b in model.layers)
        vimerge.apply(model, "stm", final_ratio=0.3)
        assert not torch.equal(model(x), ref)
        vimerge.remove(model)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("hsp", [False, True])
def test_batch_elements_are_independent(hsp):
    model = tiny().eval()
    vimerge.apply(model, "stm", final_ratio=0.3, hsp=hsp)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter_in_train_mode():
    model = tiny(drop_path_rate=0.1).train()
    reducer = vimerge.apply(model, "stm", final_ratio=0.3)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 3]))
    loss.backward()
    assert reducer.weights and reducer.fallbacks == []
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_block_zero_falls_back_to_bnnm_without_warning():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        reducer = vimerge.apply(model, "stm", final_ratio=0.3, start_layer=0)
        model(x)
    assert reducer.fallbacks[0][0] == 0 and "no previous block" in reducer.fallbacks[0][1]
    assert 0 not in reducer.weights and 1 in reducer.weights


def test_missing_records_warn_and_fall_back():
    model = tiny().eval()
    reducer = vimerge.apply(model, "stm", final_ratio=0.3)
    original = reducer.prepare

    def prepare_then_switch_off(m, n):
        original(m, n)
        m.layers[0].mixer.record = False
    reducer.prepare = prepare_then_switch_off
    with torch.no_grad(), pytest.warns(UserWarning, match="falls back to plain BNNM at block 1"):
        model(torch.randn(1, 3, 32, 32))
    assert [f[0] for f in reducer.fallbacks] == [1]


# ------------------------------------------------------------------ the HSP formula
def linear_scan(inputs, dt, A, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + inputs_t (inputs (N, D, n)), y_t = C_t . h_t; float64."""
    N, D, n = inputs.shape
    h = torch.zeros(D, n, dtype=torch.float64) if h0 is None else h0
    hs, ys = [], []
    for t in range(N):
        h = torch.exp(dt[:, t, None] * A) * h + inputs[t]
        hs.append(h)
        ys.append(h @ C[:, t])
    return torch.stack(hs), torch.stack(ys)


def random_ssm(D=3, n=4, N=9, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    u, B, C = r(D, N), r(n, N), r(n, N)
    dt = F.softplus(r(D, N) - 1)
    A = -torch.rand(D, n, generator=g, dtype=torch.float64) * 2 - 0.1
    return u, dt, A, B, C


def inputs_of(u, dt, B):      # dt_t B_t u_t as (N, D, n)
    return (dt[:, :, None] * B.t()[None] * u[:, :, None]).permute(1, 0, 2)


def test_state_level_merge_reproduces_the_hidden_state_exactly():
    # tokens 0..2 merge into 3 at the start of the scan: h_{i0} = 0, so the merging loss vanishes
    u, dt, A, B, C = random_ssm()
    hs, ys = linear_scan(inputs_of(u, dt, B), dt, A, C)
    removed, target = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3])
    coef = merge_coefficients(dt[None], B[None], C[None], A, removed, target, level="state")[0]  # (D, n, P)
    merged_in = dt[:, 3, None] * B[:, 3] * (u[:, 3, None] + (coef * u[:, None, :3]).sum(-1))  # (D, n)
    keep = inputs_of(u, dt, B)[3:].clone()
    keep[0] = merged_in
    hs2, ys2 = linear_scan(keep, dt[:, 3:], A, C[:, 3:])
    torch.testing.assert_close(hs2, hs[3:], rtol=1e-12, atol=1e-12)   # every later state too
    torch.testing.assert_close(ys2, ys[3:], rtol=1e-12, atol=1e-12)


def test_channel_level_merge_reproduces_the_output_exactly():
    u, dt, A, B, C = random_ssm(n=5, seed=1)
    _, ys = linear_scan(inputs_of(u, dt, B), dt, A, C)
    removed, target = torch.tensor([0, 1]), torch.tensor([2, 2])
    w = merge_coefficients(dt[None], B[None], C[None], A, removed, target, level="channel")[0]  # (D, P)
    u2 = u[:, 2:].clone()
    u2[:, 0] = u[:, 2] + (w * u[:, :2]).sum(-1)      # one merged input per channel
    _, ys2 = linear_scan(inputs_of(u2, dt[:, 2:], B[:, 2:]), dt[:, 2:], A, C[:, 2:])
    torch.testing.assert_close(ys2[0], ys[2], rtol=1e-12, atol=1e-12)
    # with one channel the token weight is the channel weight
    wt = merge_coefficients(dt[None, :1], B[None], C[None], A[:1], removed, target)[0]
    torch.testing.assert_close(wt, w[0])


def test_merging_loss_is_the_propagated_state_difference():
    # 2 remains, 3 and 4 merge into 5: h'_5 - h_5 = (exp(dt_5 A) - exp(A (dt_3 + dt_4 + dt_5))) h_2
    u, dt, A, B, C = random_ssm(seed=2)
    hs, _ = linear_scan(inputs_of(u, dt, B), dt, A, C)
    coef = merge_coefficients(dt[None], B[None], C[None], A, torch.tensor([3, 4]), torch.tensor([5, 5]),
                              level="state")[0]
    inp = inputs_of(u, dt, B)
    merged = dt[:, 5, None] * B[:, 5] * (u[:, 5, None] + (coef * u[:, None, 3:5]).sum(-1))
    keep_dt = torch.cat([dt[:, :3], dt[:, 5:]], 1)
    hs2, _ = linear_scan(torch.cat([inp[:3], merged[None], inp[6:]]), keep_dt, A, torch.cat([C[:, :3], C[:, 5:]], 1))
    loss = (torch.exp(dt[:, 5, None] * A) - torch.exp(A * dt[:, 3:6].sum(1, keepdim=True))) * hs[2]
    torch.testing.assert_close(hs2[3] - hs[5], loss, rtol=1e-10, atol=1e-12)


def test_backward_direction_is_the_mirrored_forward_one():
    _, dt, A, B, C = random_ssm(N=8, seed=3)
    back = direction_weights(dt[None], B[None], C[None], A, [7, 6, 4], [5, 5, 3], backward=True)
    fwd = merge_coefficients(dt.flip(-1)[None], B.flip(-1)[None], C.flip(-1)[None], A,
                             torch.tensor([0, 1, 3]), torch.tensor([2, 2, 4]))
    torch.testing.assert_close(back, fwd)
    # the backward exponent sums the steps from the target up to the token before the removed one
    S = dt[:, 5:7].sum(1)                              # j = 7 -> i = 5 passes the steps at 6 and 5
    num = (dt[:, 7] * (torch.exp(A * S[:, None]) * (C[:, 5] * B[:, 7])).sum(1)).sum()
    den = (dt[:, 5] * (C[:, 5] * B[:, 5]).sum()).sum()
    torch.testing.assert_close(back[0, 0], num / den)


def test_all_equal_time_steps_and_projections_give_exponential_distance_weights():
    D, n, N, delta = 4, 16, 6, 0.05
    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(D, 1)   # the Mamba initialisation
    dt = torch.full((1, D, N), delta, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    B = C = b[None, :, None].expand(1, n, N)
    w = merge_coefficients(dt, B, C, A, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5] * 5))[0]
    for p, k in enumerate([5, 4, 3, 2, 1]):            # distance k to the target
        decay = torch.exp(-torch.arange(1, n + 1, dtype=torch.float64) * delta * k)
        assert w[p] == pytest.approx(((b * b * decay).sum() / (b * b).sum()).item(), rel=1e-12)
    wd = merge_coefficients(dt, B, C, A, torch.tensor([4]), torch.tensor([5]), collapse="decay")[0, 0]
    assert wd == pytest.approx(torch.exp(-torch.arange(1, n + 1, dtype=torch.float64) * delta).mean().item(), rel=1e-12)
    # as the steps shrink every weight tends to 1: the plain average
    w0 = merge_coefficients(dt * 1e-9, B, C, A, torch.tensor([0]), torch.tensor([5]))[0, 0]
    assert w0 == pytest.approx(1.0, abs=1e-6)
    # the merged token with weight w: (x_i + w x_j) / (1 + w) (sizes 1), hidden and residual alike
    x = torch.tensor([[[1.0], [3.0], [7.0]]])
    st = TokenState(x, 10 * x, torch.ones(1, 3, 1), 2)
    plan = MergePlan(torch.tensor([[0, 0, 1]]), 2, 1)
    out = merge_state(st, plan, weight=torch.tensor([[[0.25], [1.0], [1.0]]]))
    torch.testing.assert_close(out.hidden[0, :, 0], torch.tensor([(3 + 0.25 * 1) / 1.25, 7.0]))
    torch.testing.assert_close(out.residual[0, :, 0], torch.tensor([10 * (3 + 0.25) / 1.25, 70.0]))
    assert out.size.flatten().tolist() == [2.0, 1.0]


def independent_token_weight(dt, B, C, A, j, i):
    """sum_d dt_j sum_n C_i B_j exp(A S) / sum_d dt_i C_i . B_i, with loops over the scan steps."""
    num = den = 0.0
    step = 1 if i > j else -1
    for d in range(dt.shape[0]):
        S = sum(dt[d, t].item() for t in range(j + step, i + step, step)) if step > 0 else \
            sum(dt[d, t].item() for t in range(i, j))
        num += dt[d, j].item() * sum(C[k, i].item() * B[k, j].item() * math.exp(A[d, k].item() * S)
                                     for k in range(B.shape[0]))
        den += dt[d, i].item() * sum(C[k, i].item() * B[k, i].item() for k in range(B.shape[0]))
    return num / den


def test_reducer_weights_match_an_independent_computation_from_the_records():
    model = tiny(depth=3, embed_dim=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reducer = vimerge.apply(model, "stm", final_ratio=0.12, per_side=2, max_weight=1e9)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    steps = reducer.schedule(model.num_patches + 1, 3)
    assert [s is not None for s in steps] == [False, True, True] and set(reducer.weights) == {1, 2}
    for layer in (1, 2):
        step, mixer = steps[layer], model.layers[layer - 1].mixer
        for k, (j, i, side) in enumerate(zip(step.removed, step.target, step.side)):
            sfx = "" if side < 0 else "_b"
            rec = model.block_record(layer - 1)
            scan = rec.forward if side < 0 else rec.backward
            for b in range(2):
                dt = F.softplus(scan.delta[b].double() + getattr(mixer, "dt_proj" + sfx).bias.double()[:, None])
                A = -torch.exp(getattr(mixer, "A_b_log" if sfx else "A_log").double())
                ref = max(independent_token_weight(dt, scan.B[b].double(), scan.C[b].double(), A, j, i), 0.0)
                assert reducer.weights[layer][b, k].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_hsp_changes_the_merge_and_weights_are_clipped():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = vimerge.apply(model, "stm", final_ratio=0.3, hsp=False)
        a = model(x)
        hsp = vimerge.apply(model, "stm", final_ratio=0.3, max_weight=2.0)
        b = model(x)
    assert plain.weights == {} and not torch.equal(a, b)
    w = torch.cat([v.flatten() for v in hsp.weights.values()])
    assert (w >= 0).all() and (w <= 2.0).all()


def test_records_are_requested_only_before_reducing_blocks():
    model = tiny().eval()
    reducer = vimerge.apply(model, "stm", final_ratio=0.2)        # 13 of 65 tokens: blocks 1-4 reduce
    assert [s is not None for s in reducer.schedule(65, 6)] == [False, True, True, True, True, False]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [b.mixer.record for b in model.layers] == [True, True, True, True, False, False]
    assert set(reducer.weights) == {1, 2, 3, 4}
    vimerge.apply(model, "stm", final_ratio=0.2, hsp=False)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert not any(b.mixer.record for b in model.layers)


# ------------------------------------------------------------------ ratio: the mean-token ratio
def test_counts_without_building_the_schedule_equal_the_schedule():
    for n, depth, cls in ((65, 6, None), (50, 8, None), (197, 24, None), (50, 8, 0), (51, 8, 10)):
        for final in (0.0, 0.1, 0.2, 0.3, 0.45):
            for per_side in (1, 2, 3, 5):
                try:
                    steps = bnnm_schedule(n, depth, final, per_side, 1, cls)
                except ValueError:
                    with pytest.raises(ValueError):
                        bnnm_counts(n, depth, final, per_side, 1, cls)
                    continue
                assert bnnm_counts(n, depth, final, per_side, 1, cls) == schedule_counts(steps, n)


def test_ratio_is_the_mean_token_ratio_and_final_ratio_the_papers_setting():
    # final_ratio 0.2 of 65 tokens = 13 gone by the end (blocks 1-4, 2 per side, 1 in the last)
    paper = STM(final_ratio=0.2)
    assert paper.token_counts(65, 6) == [65, 61, 57, 53, 52, 52]
    # the same schedule asked for by its mean-token ratio, 1 - (65+61+57+53+52+52) / 390
    mean = 1 - 340 / 390
    assert STM(ratio=mean).token_counts(65, 6) == [65, 61, 57, 53, 52, 52]
    # a ratio of 0.28 on Vim-Ti's 197 tokens x 24 blocks lands within 0.03, as for rmeeto/prune
    for method in ("rmeeto", "prune", "stm"):
        model = vimerge.create_model("vim_tiny")
        vimerge.apply(model, method, ratio=0.28)
        assert abs(ratio_from_counts(vimerge.token_counts(model), 197) - 0.28) < 0.03
    with pytest.raises(ValueError, match="cannot reach"):
        STM(ratio=0.9).token_counts(65, 6)


def test_class_token_at_position_0_takes_every_removal_from_the_right():
    # 11 tokens, class token first (DeiT / VideoMamba layout): final_ratio 0.4 -> 4 tokens, all on the
    # right (10 tokens); sweep distances 0, 2, 5, 7 from the far end: 10, 8 in block 1, 5, 3 in block 2,
    # each merged leftward (toward the class token) into its nearest remaining neighbour
    steps = bnnm_schedule(11, 4, 0.4, 2, 1, cls_index=0)
    assert steps[0] is None and steps[3] is None
    assert (steps[1].removed, steps[1].target, steps[1].side) == ((10, 8), (9, 7), (1, 1))
    assert steps[2].origin == (5, 3) and steps[2].cls_out == 0
    assert bnnm_counts(11, 4, 0.4, 2, 1, cls_index=0) == schedule_counts(steps, 11) == [11, 9, 7, 7]
    hidden = torch.arange(11, dtype=torch.float32).view(1, 11, 1)
    out = run_reductions(STM(final_ratio=0.4, per_side=2, hsp=False), TokenState.start(hidden, 0), fake_model(4, 0), 4)
    assert out.cls_index == 0 and out.size.flatten().tolist() == [1, 1, 2, 2, 1, 2, 2]
    torch.testing.assert_close(out.hidden.flatten(), torch.tensor([0.0, 1.0, 2.5, 4.5, 6.0, 7.5, 9.5]))
