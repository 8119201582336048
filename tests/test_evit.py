"""Token recognition (``evit``): the class token's (hidden) attention, the keep-and-fuse rule, the
schedule and the fused token, each against a reference written here (a brute-force scan, hand
values, EViT's token counts, attention recomputed from the weights)."""

import math

import pytest
import torch

import vimerge
from vimerge.ops.reference import selective_scan_reference
from vimerge.reduce import build
from vimerge.reduce.evit import EViT, cls_attention, hidden_attention
from vimerge.reduce.select import keep_plan
from vimerge.tokens import BlockRecord, ScanRecord, TokenState, merge_state


def random_record(g, bsz=2, d=3, s=4, n=7) -> ScanRecord:
    return ScanRecord(torch.randn(bsz, d, n, generator=g), torch.randn(bsz, s, n, generator=g),
                      torch.randn(bsz, s, n, generator=g), -torch.rand(d, s, generator=g) * 2 - 0.1,
                      torch.randn(d, generator=g) * 0.3)


def brute_force_row(rec: ScanRecord, query: int, reverse: bool) -> torch.Tensor:
    """alpha[b, d, j] = the query's scan output for a one-hot input at token j (the scan is linear
    in its input): one reference scan per j, the backward one on the flipped sequence."""
    bsz, d, n = rec.delta.shape
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    out = torch.zeros(bsz, d, n)
    for j in range(n):
        u = torch.zeros(bsz, d, n)
        u[..., j] = 1.0
        y = selective_scan_reference(flip(u), flip(rec.delta), rec.A, flip(rec.B), flip(rec.C),
                                     delta_bias=rec.delta_bias, delta_softplus=True)
        out[..., j] = flip(y)[..., query]
    return out


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("query", [0, 3, 6])
def test_hidden_attention_is_the_scans_linear_map(query, reverse):
    rec = random_record(torch.Generator().manual_seed(query + 10 * reverse))
    torch.testing.assert_close(hidden_attention(rec, query, reverse), brute_force_row(rec, query, reverse),
                               rtol=1e-4, atol=1e-6)


def test_hidden_attention_hand_case():
    """One channel, one state, 3 tokens, query 2: alpha_j = C_2 B_j exp(A sum_{t=j+1..2} dt_t) dt_j."""
    dt = [0.5, 1.0, 2.0]
    raw = [math.log(math.expm1(v)) for v in dt]                          # softplus^-1
    B, C, A = [1.0, 2.0, 3.0], [0.0, 0.0, 0.5], -0.4
    rec = ScanRecord(torch.tensor([[raw]]), torch.tensor([[B]]), torch.tensor([[C]]), torch.tensor([[A]]),
                     torch.zeros(1))
    expected = [0.5 * 1.0 * math.exp(A * 3.0) * 0.5, 0.5 * 2.0 * math.exp(A * 2.0) * 1.0, 0.5 * 3.0 * 2.0]
    assert hidden_attention(rec, 2)[0, 0].tolist() == pytest.approx(expected, rel=1e-5)
    # backward from query 0: alpha_j = C_0 B_j exp(A sum_{t=0..j-1} dt_t) dt_j, C_0 = 0 -> all zero
    assert hidden_attention(rec, 0, reverse=True).abs().max() == 0
    assert hidden_attention(rec, 2, reverse=True)[0, 0].tolist() == pytest.approx([0.0, 0.0, 3.0], rel=1e-5)


def test_cls_attention_averages_both_directions():
    g = torch.Generator().manual_seed(3)
    f, b = random_record(g), random_record(g)
    got = cls_attention(BlockRecord(f, b, torch.zeros(2, 3, 7)), 3)
    want = brute_force_row(f, 3, False).abs().mean(1) + brute_force_row(b, 3, True).abs().mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ rule and fused token


def test_published_schedule_gives_evits_token_counts():
    """DeiT-S (197 tokens, class token first): keep 0.7 before the MLPs of blocks 3, 6, 9:
    1 + ceil(0.7 * 196) + 1 = 140, then 1 + ceil(0.7 * 139) + 1 = 100, then 1 + 70 + 1 = 72."""
    counts = EViT().token_counts(197, 12, 0, "after_attention")
    assert counts == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert EViT().layers(24) == [6, 12, 18]                                 # Vim-S: scaled
    # nothing fused when at most one token would be: keep 0.9 of 10 -> 9 kept + 1 fused = 10
    assert EViT(keep=0.9, at=[1]).token_counts(11, 2) == [11, 11]
    # r: m - r - 1 kept, r + 1 fused
    assert EViT(r=[0, 3, 0]).token_counts(11, 3) == [11, 8, 8]


def test_fused_token_hand_value():
    """5 tokens, class token 0, scores 0.4, 0.1, 0.3, 0.2 for tokens 1..4, keep 2: tokens 1, 3 kept
    (score order), 2 and 4 fused with weights score x size: (0.1 * 1 x_2 + 0.2 * 2 x_4) / 0.5."""
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [4.0]]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [1.0], [2.0]]])
    score = torch.tensor([[9.0, 0.4, 0.1, 0.3, 0.2]])
    plan = keep_plan(score, 0, (0,), 2, ordered=False, fuse=True)
    out = merge_state(TokenState(x, None, size, 0), plan, weight=score.unsqueeze(-1))
    assert out.hidden[0, :, 0].tolist() == pytest.approx([0.0, 1.0, 3.0, (0.1 * 2 + 0.4 * 4) / 0.5])
    assert out.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 3.0]
    ordered = keep_plan(torch.tensor([[9.0, 0.3, 0.1, 0.4, 0.2]]), 0, (0,), 2, ordered=True, fuse=True)
    assert ordered.slot.tolist() == [[0, 1, 3, 2, 3]]                      # 1, 3 in sequence order


def test_deit_keeps_the_tokens_the_class_token_attends_to(tiny_model):
    """DeiT, one step before block 1's MLP: the kept tokens are the top-k of the class-token row
    of block 1's head-averaged attention, recomputed here from the qkv weights."""
    model = vimerge.create_model("deit_tiny", depth=2, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.blocks[1].attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    vimerge.apply(model, "evit:at=[1],keep=0.5,track_source=true")
    with torch.no_grad():
        state = model.forward_tokens(x)
        hook.remove()
        att = model.blocks[1].attn
        b, n, c = seen["x"].shape
        q, k, _ = att.qkv(seen["x"]).view(b, n, 3, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4)
        row = ((q @ k.transpose(-2, -1)) * att.scale).softmax(-1).mean(1)[:, 0, :]      # (B, N)
    keep = math.ceil(0.5 * (n - 1))
    assert state.num_tokens == 1 + keep + 1 and state.cls_index == 0
    for i in range(b):
        top = (row[i, 1:].argsort(descending=True)[:keep] + 1).tolist()
        kept = [int(state.source[i, 1 + s].nonzero()) for s in range(keep)]
        assert kept == top                                                      # score order
        fused = set(state.source[i, -1].nonzero().flatten().tolist())
        assert fused == set(range(1, n)) - set(top)


def test_vim_keeps_the_tokens_of_the_class_tokens_hidden_attention(tiny_model):
    model = tiny_model(depth=3)
    x = torch.randn(2, 3, 32, 32)
    model.record_blocks([1])
    with torch.no_grad():
        model(x)
    score = cls_attention(model.block_record(1), model.cls_index)
    vimerge.apply(model, "evit:at=[2],keep=0.5,ordered=true,track_source=true")
    with torch.no_grad():
        state = model.forward_tokens(x)
    n, cls = model.num_tokens, model.cls_index
    others = [j for j in range(n) if j != cls]
    keep = math.ceil(0.5 * len(others))
    assert state.num_tokens == keep + 2
    for i in range(2):
        best = sorted(sorted(others, key=lambda j: (-float(score[i, j]), j))[:keep])
        order = [j for s in range(state.num_tokens) if s != state.cls_index
                 for j in state.source[i, s].nonzero().flatten().tolist()]
        assert order[:keep] == best                                            # sequence order kept
        assert sorted(order[keep:]) == sorted(set(others) - set(best))         # the fused token, last


# ------------------------------------------------------------------ errors and cost


@pytest.mark.parametrize("spec, message", [
    ("evit:score=cls", "score must be one of"),
    ("evit:keep=0", "keep is the fraction"),
    ("evit:r=3,keep=0.5", "not several"),
])
def test_bad_options_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        build(spec)


def test_deit_with_the_scan_score_is_refused():
    model = vimerge.create_model("deit_tiny", depth=2, img_size=64)
    with pytest.raises(ValueError, match="score=y reads the selective scan"):
        vimerge.apply(model, "evit:score=y")
    with pytest.raises(ValueError, match="out of reach"):
        EViT(ratio=0.9, at=[3]).token_counts(197, 4)


def test_flops_hand_count():
    """197 -> 140 at one block, width 384: fused 58 x 384; Mamba's hidden attention (198) x 17 x 768."""
    counts = [197, 140, 140]
    assert EViT().flops(counts, 197, 384, site="after_attention") == 58 * 384
    assert EViT().flops(counts, 197, 384) == 58 * 384 + 198 * 17 * 768
    assert EViT(score="y").flops(counts, 197, 384, "full") == 2 * (58 * 384 + 197 * 768)
