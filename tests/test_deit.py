"""DeiT: timm/official layout, the forward against an independent implementation, position
embeddings, token reduction after the attention, proportional attention, FLOPs, metrics."""

import math

import pytest
import torch
import torch.nn.functional as F

import vimerge
from vimerge.models import CheckpointError
from vimerge.models.deit import Attention

DEIT = {"deit_tiny": (192, 3), "deit_small": (384, 6), "deit_base": (768, 12)}


def timm_layout(embed: int, depth: int = 12, classes: int = 1000, patch: int = 16, chans: int = 3,
                tokens: int = 197) -> dict[str, tuple[int, ...]]:
    """Every parameter of timm's VisionTransformer / the official DeiT checkpoints, by name and
    shape (written from the ViT paper's structure and timm's names, not from our module)."""
    layout = {"cls_token": (1, 1, embed), "pos_embed": (1, tokens, embed),
              "patch_embed.proj.weight": (embed, chans, patch, patch), "patch_embed.proj.bias": (embed,),
              "norm.weight": (embed,), "norm.bias": (embed,), "head.weight": (classes, embed), "head.bias": (classes,)}
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": (embed,), b + "norm1.bias": (embed,),
                       b + "attn.qkv.weight": (3 * embed, embed), b + "attn.qkv.bias": (3 * embed,),
                       b + "attn.proj.weight": (embed, embed), b + "attn.proj.bias": (embed,),
                       b + "norm2.weight": (embed,), b + "norm2.bias": (embed,),
                       b + "mlp.fc1.weight": (4 * embed, embed), b + "mlp.fc1.bias": (4 * embed,),
                       b + "mlp.fc2.weight": (embed, 4 * embed), b + "mlp.fc2.bias": (embed,)})
    return layout


@pytest.mark.parametrize("name", list(DEIT))
def test_presets_have_the_timm_layout_and_load_official_containers(name, tmp_path):
    embed, heads = DEIT[name]
    model = vimerge.create_model(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == timm_layout(embed)
    assert model.blocks[0].attn.num_heads == heads and model.num_tokens == 197 and model.cls_index == 0
    path = tmp_path / "deit.pth"
    torch.save({"model": model.state_dict()}, path)            # the facebookresearch/deit container
    again = vimerge.create_model(name, checkpoint=str(path))     # strict
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def reference_vit(sd: dict, x: torch.Tensor, heads: int, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """A ViT forward in float64 from the paper's equations, on a state dict (no vimerge module)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b = x.shape[0]
    p = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    z = torch.cat([sd["cls_token"].expand(b, 1, -1), p.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    d = z.shape[2]
    hd = d // heads

    def ln(t, w, bias):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * w + bias

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = ln(z, g("norm1.weight"), g("norm1.bias"))
        qkv = h @ g("attn.qkv.weight").T + g("attn.qkv.bias")
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        out = torch.zeros_like(z)
        for hh in range(heads):
            s = slice(hh * hd, (hh + 1) * hd)
            a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)
            out[..., s] = a @ v[..., s]
        z = z + out @ g("attn.proj.weight").T + g("attn.proj.bias")
        h = ln(z, g("norm2.weight"), g("norm2.bias"))
        h = h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        z = z + h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    cls = ln(z[:, 0], sd["norm.weight"], sd["norm.bias"])
    return cls @ sd["head.weight"].T + sd["head.bias"]


def test_forward_matches_an_independent_implementation():
    torch.manual_seed(0)
    model = vimerge.create_model("deit_small", depth=3, img_size=64, num_classes=7).eval()
    with torch.no_grad():          # non-trivial norms and biases
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x).double()
    ref = reference_vit(model.state_dict(), x, heads=6, patch=16)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_matches_timm_where_timm_imports():
    timm = pytest.importorskip("timm", exc_type=ImportError)
    ref = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    ours = vimerge.create_model("deit_small", checkpoint=None)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), rtol=1e-4, atol=1e-4)


def test_position_embedding_is_resampled_with_the_class_row_first(tmp_path):
    src = vimerge.create_model("deit_tiny", depth=1, img_size=64)            # 4x4 grid
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    with pytest.warns(UserWarning, match="resampled its position embedding"):
        dst = vimerge.create_model("deit_tiny", depth=1, img_size=128, checkpoint=str(path))   # 8x8
    old, new = src.pos_embed.detach(), dst.pos_embed.detach()
    assert new.shape == (1, 65, 192)
    assert torch.equal(new[:, 0], old[:, 0])                                  # class row kept, at 0
    grid = old[0, 1:].T.reshape(1, 192, 4, 4)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).reshape(192, 64).T
    torch.testing.assert_close(new[0, 1:], expected, rtol=1e-5, atol=1e-6)


def test_foreign_and_distilled_checkpoints_are_refused_with_the_reason(tmp_path):
    vim = vimerge.create_model("vim_tiny", depth=2)
    torch.save({"model": vim.state_dict()}, tmp_path / "vim.pth")
    with pytest.raises(CheckpointError, match="not a DeiT/ViT checkpoint"):
        vimerge.create_model("deit_tiny", checkpoint=str(tmp_path / "vim.pth"))
    sd = vimerge.create_model("deit_tiny", depth=2).state_dict()
    sd["dist_token"] = torch.zeros(1, 1, 192)
    torch.save({"model": sd}, tmp_path / "dist.pth")
    with pytest.raises(CheckpointError, match="distilled DeiT"):
        vimerge.create_model("deit_tiny", depth=2, checkpoint=str(tmp_path / "dist.pth"))


def test_proportional_attention_counts_a_merged_token_as_its_size():
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).double().eval()
    a, b = torch.randn(1, 1, 8).double(), torch.randn(1, 1, 8).double()
    with torch.no_grad():
        three = attn(torch.cat([a, b, b], 1))                           # b twice, no sizes
        two = attn(torch.cat([a, b], 1), log_size=torch.tensor([[0.0, math.log(2.0)]]).double())
        plain = attn(torch.cat([a, b], 1))
    torch.testing.assert_close(two, three[:, :2])                       # size 2 == two copies
    assert not torch.allclose(plain[:, 0], three[:, 0])                 # and the size matters


def test_reduction_runs_after_the_attention_of_every_block():
    model = vimerge.create_model("deit_small").eval()
    vimerge.apply(model, "rmeeto:r=11")                      # R-MeeTo's DeiT-S setting
    counts = [197 - 11 * (i + 1) for i in range(12)]           # every block, block 0 included
    assert vimerge.token_counts(model) == counts
    seen = {"attn": [], "mlp": []}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: seen["attn"].append(a[0].shape[1])) for b in model.blocks]
    hooks += [b.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen["mlp"] == counts and seen["attn"] == [197] + counts[:-1]
    # ratio keeps its meaning: 1 - mean tokens per block / 197
    assert vimerge.reduce.ratio_from_counts(counts, 197) == pytest.approx(1 - (197 - 11 * 6.5) / 197)
    vimerge.apply(model, "rmeeto:r=5,interval=2")            # blocks 0, 2, ..., 10
    assert vimerge.token_counts(model)[:4] == [192, 192, 187, 187]


def test_apply_remove_and_gradients_on_deit():
    torch.manual_seed(0)
    model = vimerge.create_model("deit_tiny", depth=4, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        vimerge.apply(model, "rmeeto:r=0")
        assert torch.equal(model(x), before)                   # r = 0: bit-identical
        vimerge.apply(model, "rmeeto:r=3")
        reduced = model(x)
        vimerge.remove(model)
        assert torch.equal(model(x), before)                   # remove: bit-identical
    assert not torch.allclose(reduced, before)
    model.train()
    vimerge.apply(model, "prune:r=3")
    model(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("metric", ["X", "Q", "K", "V"])
def test_rmeeto_metrics_on_deit(metric):
    torch.manual_seed(0)
    model = vimerge.create_model("deit_tiny", depth=3, img_size=64).eval()
    vimerge.apply(model, f"rmeeto:r=3,metric={metric}")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out).all()
    if metric != "X":
        rec = model.block_record(0)
        assert rec.k.shape == (2, 17, 64)                      # head mean: (B, N, head_dim)
    vimerge.apply(model, "rmeeto:r=3,metric=B")
    with pytest.raises(ValueError, match="Q, K, V"):
        model(torch.randn(1, 3, 64, 64))


def test_unordered_merge_is_the_odd_even_shuffle_on_deit():
    torch.manual_seed(0)
    model = vimerge.create_model("deit_tiny", depth=1, img_size=64).eval()       # one merging step
    x = torch.randn(2, 3, 64, 64)
    vimerge.apply(model, "rmeeto:r=4")
    with torch.no_grad():
        ordered = model.forward_tokens(x, track_source=True)
        vimerge.apply(model, "rmeeto:r=4,ordered=false")
        shuffled = model.forward_tokens(x, track_source=True)
    # the same tokens are merged; only their order differs
    key = lambda s: sorted(tuple(row.nonzero().flatten().tolist()) for row in s.source[0])  # noqa: E731
    assert key(ordered) == key(shuffled) and not torch.equal(ordered.source, shuffled.source)


def test_deit_flops_reproduce_the_published_counts():
    # DeiT paper Table 1: 1.3 / 4.6 / 17.6 GFLOPs (a multiply-add counted once)
    got = [vimerge.count_flops(vimerge.create_model(n)) / 1e9 for n in DEIT]
    assert [round(g, 1) for g in got] == [1.3, 4.6, 17.6]
    # hand count of deit_small at 197 tokens, C = 384: per block qkv 197*384*1152, attention
    # 2*197^2*384, proj 197*384^2, MLP 2*197*384*1536; patch embedding 196*384*768; head 384*1000
    per_block = 197 * 384 * 1152 + 2 * 197 ** 2 * 384 + 197 * 384 ** 2 + 2 * 197 * 384 * 1536
    assert got[1] * 1e9 == 12 * per_block + 196 * 384 * 768 + 384 * 1000
    model = vimerge.create_model("deit_small")
    vimerge.apply(model, "rmeeto:r=11")
    assert vimerge.count_flops(model) < vimerge.count_flops(vimerge.create_model("deit_small"))
    assert vimerge.count_flops(model, "full") > 2 * vimerge.count_flops(model, "paper")
