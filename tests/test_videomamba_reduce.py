"""Reduction options the video backbone brought: STM's one-side merging (Table 3) on every
backbone, and R-MeeTo's ``scope`` (merge any tokens / only within a frame / only across time)."""

import contextlib

import pytest
import torch

import vimerge
from vimerge.reduce import parse_spec, spec_of
from vimerge.reduce.rmeeto import bipartite_plan, scope_capacity, scoped_plan
from vimerge.reduce.stm import STM, bnnm_counts, bnnm_schedule, schedule_counts
from vimerge.tokens import input_shape

CLIP = dict(img_size=32, patch_size=8, embed_dim=16, depth=5, num_classes=5, num_frames=4)
"""A small video VideoMamba: 4 frames of 4x4 patches (65 tokens), 5 blocks."""


# ------------------------------------------------------------------------- STM: one side


def test_one_side_puts_every_removal_on_that_side():
    # 21 tokens, class token at 10 (Vim): final_ratio 0.2 -> 4 tokens; left side alone: sweep
    # distances 0, 2, 5, 7 from its far end (10 tokens, stride 10/4), merged rightward
    steps = bnnm_schedule(21, 4, 0.2, per_side=2, sides="left")
    assert [s.origin for s in steps[1:3]] == [(0, 2), (5, 7)]
    assert set(steps[1].side) == set(steps[2].side) == {-1}
    assert steps[1].target == (1, 3) and steps[2].cls_out == 6
    right = bnnm_schedule(21, 4, 0.2, per_side=2, sides="right")
    assert [s.origin for s in right[1:3]] == [(20, 18), (15, 13)] and set(right[1].side) == {1}
    assert right[2].cls_out == 10                       # nothing left of the class token moved
    for sides, counts in (("left", [21, 19, 17, 17]), ("right", [21, 19, 17, 17]), ("both", [21, 17, 17, 17])):
        assert bnnm_counts(21, 4, 0.2, 2, 1, None, sides) == schedule_counts(
            bnnm_schedule(21, 4, 0.2, 2, 1, None, sides), 21) == counts


def test_one_side_with_the_class_token_first_is_the_natural_case():
    both = bnnm_schedule(11, 4, 0.4, 2, 1, cls_index=0)
    assert bnnm_schedule(11, 4, 0.4, 2, 1, cls_index=0, sides="right") == both
    with pytest.raises(ValueError, match="at most its length minus one"):
        bnnm_schedule(11, 4, 0.4, 2, 1, cls_index=0, sides="left")
    with pytest.raises(ValueError, match="unknown sides"):
        STM(sides="middle")


@pytest.mark.parametrize("name", ["vim_tiny", "deit_tiny", "videomamba_tiny"])
def test_one_side_runs_on_every_backbone_and_round_trips(name):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_classes=5)
    if name == "vim_tiny":
        kwargs["stride"] = 8
    if name == "deit_tiny":
        kwargs["num_heads"] = 2
    model = vimerge.create_model(name, **kwargs).eval()
    x = torch.randn(input_shape(model, 2))
    with pytest.warns(UserWarning) if name == "deit_tiny" else contextlib.nullcontext():
        reducer = vimerge.apply(model, "stm:final_ratio=0.2,sides=right")
        with torch.no_grad():
            out = model(x)
    assert torch.isfinite(out).all() and spec_of(reducer) == "stm:final_ratio=0.2,sides=right"
    assert parse_spec(spec_of(reducer)) == ("stm", {"final_ratio": 0.2, "sides": "right"})
    steps = [s for s in reducer.schedule(model.num_tokens, model.depth, model.cls_index) if s is not None]
    assert steps and all(side == 1 for s in steps for side in s.side)
    if name != "deit_tiny":
        assert not reducer.fallbacks and reducer.weights          # HSP from the backward scan


# ------------------------------------------------------------------------- R-MeeTo: scope


@pytest.mark.parametrize("cls_index", [0, 7, 20])
def test_one_group_is_the_flat_matching(cls_index):
    x = torch.randn(3, 21, 8)
    groups = torch.zeros(3, 21, dtype=torch.long)
    for kth in (1, 2):
        flat = bipartite_plan(x, cls_index, 6, kth=kth)
        assert torch.equal(scoped_plan(x, groups, cls_index, 6, kth=kth).slot, flat.slot)
    assert torch.equal(scoped_plan(x, groups, cls_index, 6, prune=True).slot,
                       bipartite_plan(x, cls_index, 6, prune=True).slot)


def members_share(model, state, column: int) -> bool:
    """Whether the original tokens of every final token share coordinate ``column``."""
    coords = model.token_coords
    for b in range(state.source.shape[0]):
        for t in range(state.num_tokens):
            members = state.source[b, t].nonzero()[:, 0]
            if coords[members, column].unique().numel() != 1:
                return False
    return True


@pytest.mark.parametrize("scope,column", [("frame", 0), ("time", 1)])
def test_scoped_merges_stay_in_their_frame_or_cell(scope, column):
    model = vimerge.create_model("videomamba_tiny", **CLIP).eval()
    x = torch.randn(input_shape(model, 2))
    vimerge.apply(model, "rmeeto:r=12")
    flat = model.forward_tokens(x, track_source=True)
    assert not members_share(model, flat, 0) or not members_share(model, flat, 1)   # flat mixes
    reducer = vimerge.apply(model, f"rmeeto:r=12,scope={scope}")
    state = model.forward_tokens(x, track_source=True)
    assert state.num_tokens == 65 - 2 * 12 == vimerge.token_counts(model)[-1] and state.cls_index == 0
    assert members_share(model, state, column)
    # the coordinates that went along are those of every merged token's members
    first = state.source.argmax(-1)
    assert torch.equal(state.coords[..., column], model.token_coords[first][..., column])
    assert spec_of(reducer) == f"rmeeto:r=12,scope={scope}"
    # pruning with a scope drops tokens the same way; FLOPs as flat (the same matching)
    vimerge.apply(model, f"prune:r=12,scope={scope}")
    assert model.forward_tokens(x).num_tokens == 41
    flops = vimerge.count_flops(model)
    vimerge.apply(model, "prune:r=12")
    assert vimerge.count_flops(model) == flops


def test_scope_limits_and_combinations_are_explained():
    model = vimerge.create_model("videomamba_tiny", **CLIP).eval()
    x = torch.randn(input_shape(model, 1))
    # time: 16 cells of 4 frames; 64 patches can always give ceil((64 - 16) / 2) = 24
    assert scope_capacity(65, 16) == 24
    vimerge.apply(model, "rmeeto:r=20,scope=time")
    with pytest.raises(ValueError, match="block 4 gets 45 tokens in up to 16 groups"):
        model(x)
    vimerge.apply(model, "rmeeto:r=14,scope=time")
    assert model(x).shape == (1, 5)
    with pytest.raises(ValueError, match="does not combine with ordered=False"):
        vimerge.apply(model, "rmeeto:r=4,scope=frame,ordered=false")
    with pytest.raises(ValueError, match="unknown scope"):
        vimerge.apply(model, "rmeeto:r=4,scope=space")
    vim = vimerge.create_model("vim_tiny", img_size=32, patch_size=8, stride=8, embed_dim=16, depth=3)
    vimerge.apply(vim, "rmeeto:r=2,scope=frame")
    with pytest.raises(ValueError, match="needs a model whose tokens form frames"):
        vim(torch.randn(1, 3, 32, 32))


def test_scoped_matching_reports_too_few_pairs():
    x = torch.randn(1, 9, 4)
    groups = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6, 6]])     # one pair only (tokens 7 and 8)
    assert scoped_plan(x, groups, 0, 1).num_out == 8
    with pytest.raises(ValueError, match="only 1"):
        scoped_plan(x, groups, 0, 2)
