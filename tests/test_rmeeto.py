"""R-MeeTo merging and the pruning baseline: hand-built cases, schedules, API behaviour."""

import pytest
import torch
import torch.nn.functional as F

import vimerge
from vimerge.reduce.rmeeto import bipartite_plan
from vimerge.tokens import TokenState, merge_state


def tiny_model(**kw):
    cfg = dict(depth=6, img_size=32, patch_size=4, stride=4, embed_dim=32, num_classes=5)
    return vimerge.create_model("vim_tiny", **{**cfg, **kw}).eval()


# --------------------------------------------------------------------------------- Table 10
def test_reduction_ratio_reproduces_table_10():
    table = {0: 0.0, 5: 0.14, 10: 0.28, 11: 0.31, 13: 0.36, 15: 0.42, 20: 0.54}
    for r, ratio in table.items():
        assert round(vimerge.reduction_ratio(r, num_tokens=197, depth=24, interval=2), 2) == ratio
        assert vimerge.r_for_ratio(ratio, num_tokens=197, depth=24, interval=2) == r


def test_reduction_ratio_by_hand():
    # 10 tokens, 4 blocks, interval 2: only block 2 reduces; r=3 -> counts 10, 10, 7, 7
    assert vimerge.reduction_ratio(3, num_tokens=10, depth=4, interval=2) == pytest.approx(1 - 34 / 40)
    # odd blocks 1 and 3 reduce: 10, 7, 7, 4 (cap (7 - 1) // 2 = 3)
    assert vimerge.reduction_ratio(3, num_tokens=10, depth=4, interval=2, odd=True) == pytest.approx(1 - 28 / 40)


@pytest.mark.parametrize("bad,match", [(dict(r=-1), "r must be >= 0"), (dict(r=99), "use r <= 98"),
                                       (dict(ratio=1.0), r"in \[0, 1\)"), (dict(ratio=-0.1), r"in \[0, 1\)"),
                                       (dict(ratio=0.95), "out of reach")])
def test_impossible_requests_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        if "r" in bad:
            vimerge.reduction_ratio(bad["r"], num_tokens=197, depth=24)
        else:
            vimerge.r_for_ratio(bad["ratio"], num_tokens=197, depth=24)


def test_apply_refuses_bad_options():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown distance 'l3'"):
        vimerge.apply(model, "rmeeto", r=2, distance="l3")
    with pytest.raises(ValueError, match="either r .* or ratio"):
        vimerge.apply(model, "rmeeto", r=2, ratio=0.2)
    with pytest.raises(ValueError, match="unknown reduction method 'tome'"):
        vimerge.apply(model, "tome", r=2)


# --------------------------------------------------------------------------------- hand-built
def _hand_state():
    """7 tokens, class token at 3; token 2 points the same way as token 4, all else orthogonal.

    Non-class positions [0, 1, 2, 4, 5, 6]; odd-even groups: A = {0, 2, 5}, B = {1, 4, 6}.
    """
    metric = torch.eye(7).unsqueeze(0)
    metric[0, 2] = metric[0, 4]
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1) * 10 + torch.tensor([0.0, 1.0])
    return metric, TokenState(x, x + 100, torch.ones(1, 7, 1), 3)


def test_hand_built_ordered_merge():
    metric, state = _hand_state()
    plan = bipartite_plan(metric, 3, r=1)
    # 2 merges into 4; class token re-inserted at 3 * (7 - 1) // 7 = 2
    assert plan.slot.tolist() == [[0, 1, 3, 2, 3, 4, 5]] and plan.cls_index == 2
    out = merge_state(state, plan)
    expected = torch.tensor([0, 10, 30, 30, 50, 60], dtype=torch.float32)
    expected[3] = (20 + 40) / 2
    assert torch.equal(out.hidden[0, :, 0], expected)
    assert torch.equal(out.residual[0, :, 0], expected + 100)
    assert out.size[0, :, 0].tolist() == [1, 1, 1, 2, 1, 1]
    assert out.cls_index == 2


def test_hand_built_shuffle_prune_and_modes():
    metric, state = _hand_state()
    shuffled = merge_state(state, bipartite_plan(metric, 3, r=1, ordered=False))
    # odd-even shuffle: kept A tokens (0, 5), then B tokens (1, 4+2, 6); class token at 2
    assert shuffled.hidden[0, :, 0].tolist() == [0, 50, 30, 10, 30, 60]
    pruned = merge_state(state, bipartite_plan(metric, 3, r=1, prune=True))
    assert pruned.hidden[0, :, 0].tolist() == [0, 10, 30, 40, 50, 60]
    assert pruned.size.flatten().tolist() == [1] * 6
    # sizes weight the average: a size-3 token 2 and a size-1 token 4 give (3*20 + 40) / 4
    state.size[0, 2] = 3
    weighted = merge_state(state, bipartite_plan(metric, 3, r=1))
    assert weighted.hidden[0, 3, 0].item() == pytest.approx((3 * 20 + 40) / 4)
    assert weighted.size[0, 3, 0].item() == 4
    maxed = merge_state(state, bipartite_plan(metric, 3, r=1), mode="max")
    assert maxed.hidden[0, 3, 0].item() == pytest.approx(max(3 * 20, 40) / 3)
    mined = merge_state(state, bipartite_plan(metric, 3, r=1), mode="min")
    assert mined.hidden[0, 3, 0].item() == pytest.approx(min(3 * 20, 40) / 1)


def test_hand_built_distances_kth_and_grouping():
    metric, _ = _hand_state()
    for distance in ("cosine", "l1", "l2"):
        assert bipartite_plan(metric, 3, r=1, distance=distance).slot.tolist() == [[0, 1, 3, 2, 3, 4, 5]]
    # front-behind groups: A = {0, 1, 2}, B = {4, 5, 6}; 2 still merges into 4
    assert bipartite_plan(metric, 3, r=1, grouping="front-behind").slot[0, 2] == \
        bipartite_plan(metric, 3, r=1, grouping="front-behind").slot[0, 4]
    # the 2nd closest partner of token 2 is not token 4 any more
    plan = bipartite_plan(metric, 3, r=1, kth=2)
    assert plan.slot[0, 2] != plan.slot[0, 4]
    # two merges: 2 -> 4 first, then a zero-score tie broken by argsort
    plan = bipartite_plan(metric, 3, r=2)
    assert plan.num_out == 5 and len(set(plan.slot[0].tolist())) == 5


def test_random_selection_and_pairs_are_seeded():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for _ in range(2):
        vimerge.apply(model, "rmeeto", r=8, select="random", pair="random", grouping="random", seed=3)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    vimerge.apply(model, "rmeeto", r=8)
    with torch.no_grad():
        assert not torch.allclose(model(x), outs[0])


# --------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("method,options", [("rmeeto", dict(r=0)), ("rmeeto", dict(ratio=0.0)),
                                            ("prune", dict(r=0))])
def test_zero_reduction_is_identical(method, options):
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        vimerge.apply(model, method, **options)
        assert torch.equal(model(x), ref)


def test_remove_restores_bit_identical_outputs_and_runtime_change():
    model = tiny_model()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        reducer = vimerge.apply(model, "rmeeto", r=8)
        a = model(x)
        assert vimerge.token_counts(model) == [65, 65, 57, 57, 49, 49]
        model.reduction.r = 16
        assert vimerge.token_counts(model) == [65, 65, 49, 49, 33, 33]
        b = model(x)
        assert model.reduction is reducer and not torch.allclose(a, b)
        vimerge.remove(model)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("method,options", [
    ("rmeeto", dict(r=8)), ("prune", dict(r=8)), ("rmeeto", dict(r=8, ordered=False)),
    ("rmeeto", dict(r=8, metric="B")), ("rmeeto", dict(r=8, metric="delta")), ("rmeeto", dict(r=8, metric="y")),
    ("rmeeto", dict(r=8, mode="max")), ("rmeeto", dict(r=6, interval=1)), ("rmeeto", dict(r=8, odd=True))])
def test_batch_elements_are_independent(method, options):
    model = tiny_model()
    vimerge.apply(model, method, **options)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [dict(r=5), dict(r=20), dict(r=3, interval=1), dict(r=9, interval=3),
                                     dict(r=7, odd=True), dict(r=[0, 4, 0, 9, 2, 1]), dict(ratio=0.3)])
def test_token_counts_match_the_schedule(options):
    model = tiny_model()
    reducer = vimerge.apply(model, "rmeeto", **options)
    seen = []
    original = reducer.reduce

    def spy(state, m):
        out = original(state, m)
        seen.append(out.num_tokens)
        return out

    reducer.reduce = spy
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == vimerge.token_counts(model)
    ratio = 1 - sum(seen) / (len(seen) * 65)
    assert ratio == pytest.approx(reducer.reduction_ratio(65, 6))
    if "ratio" not in options and not isinstance(options.get("r"), list):
        assert ratio == pytest.approx(vimerge.reduction_ratio(options["r"], num_tokens=65, depth=6,
                                                              interval=options.get("interval", 2),
                                                              odd=options.get("odd", False)))


def test_metric_features_record_only_where_needed():
    model = tiny_model()
    vimerge.apply(model, "rmeeto", r=8, metric="C")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    recording = [b.mixer.record for b in model.layers]
    assert recording == [False, True, False, True, False, False]   # blocks before 2 and 4
    assert model.block_record(1).forward.C.shape == (1, 16, 65) and model.block_record(0) is None
    vimerge.remove(model)
    assert not any(b.mixer.record for b in model.layers)


@pytest.mark.parametrize("method", ["rmeeto", "prune"])
def test_gradients_reach_every_parameter(method):
    model = tiny_model().train()
    vimerge.apply(model, method, r=8)
    logits = model(torch.randn(2, 3, 32, 32))
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_source_tracking_partitions_the_patches():
    model = tiny_model()
    vimerge.apply(model, "rmeeto", r=10, track_source=True)
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, 32, 32))
    assert state.source.shape == (2, 45, 65)
    # every original token is in exactly one final token, and sizes count them
    assert torch.equal(state.source.sum(1), torch.ones(2, 65))
    torch.testing.assert_close(state.source.sum(-1, keepdim=True), state.size)
    assert state.source[0, state.cls_index, model.cls_index] == 1     # the class token stays alone
    assert state.size[0, state.cls_index, 0] == 1


def test_shuffle_ratio_permutes_only_non_class_positions():
    from vimerge.reduce.rmeeto import shuffle_tokens
    x = torch.arange(9, dtype=torch.float32).view(1, 9, 1)
    state = TokenState(x, x + 100, torch.ones(1, 9, 1), 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(shuffle_tokens(state, 0.0, g).hidden, x)
    full = shuffle_tokens(state, 1.0, g)
    order = full.hidden.flatten().tolist()
    assert order[4] == 4 and sorted(order) == list(range(9)) and order != list(range(9))
    assert torch.equal(full.residual, full.hidden + 100)            # streams move together
    half = shuffle_tokens(state, 0.5, g).hidden.flatten().tolist()   # 4 of the 8 positions move
    assert half[4] == 4 and sum(a != b for a, b in zip(half, range(9))) <= 4


# --------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec, message", [
    ("stm:per_side=1.5", "per_side takes int or None, got 1.5"),
    ("rmeeto:seed=1.5", "seed takes int or None"),
    ("rmeeto:kth=true", "kth takes int, got True"),
    ("rmeeto:ordered=1", "ordered takes bool, got 1"),
    ("rmeeto:r=[0,2.5]", "r takes"),
    ("prune:distance=3", "distance takes str"),
])
def test_spec_values_are_type_checked(spec, message):
    with pytest.raises(ValueError, match=message):
        vimerge.reduce.build(spec)


def test_an_int_is_a_float_option_and_specs_round_trip():
    assert vimerge.reduce.spec_of(vimerge.reduce.build("stm:ratio=0")) == "stm:ratio=0.0"
    for spec in ("rmeeto:r=[0,2,2,2,2,2],interval=1", "prune:ratio=0.3,distance=l1", "rmeeto:ordered=false,r=4",
                 "stm:final_ratio=0.56,per_side=2,hsp=false", "rmeeto"):
        once = vimerge.reduce.spec_of(vimerge.reduce.build(spec))
        assert vimerge.reduce.spec_of(vimerge.reduce.build(once)) == once


def test_r_and_ratio_set_at_run_time_conflict_with_a_message():
    model = tiny_model()
    reducer = vimerge.apply(model, "rmeeto", ratio=0.2)
    reducer.r = 8                                    # both set: say so instead of ignoring r
    with pytest.raises(ValueError, match="r=8 and ratio=0.2; set the other one to None"):
        vimerge.token_counts(model)
    reducer.ratio = None
    assert vimerge.token_counts(model) == [65, 65, 57, 57, 49, 49]
    fresh = vimerge.apply(model, "rmeeto")           # no amount: r stays None and means 0
    assert fresh.r is None and vimerge.reduce.spec_of(fresh) == "rmeeto"
    fresh.ratio = 0.2                                # setting the ratio alone works
    assert vimerge.token_counts(model) != [65] * 6
