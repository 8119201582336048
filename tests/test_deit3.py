"""DeiT III: the official layouts (facebookresearch/deit models_v2.py, timm deit3_*), strict loads of
both name layouts, the forward against a float64 reference from the equations, the published
sizes, the refusals of other ViT families, position-embedding grids, reduction."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import vimerge
from vimerge.models import CheckpointError
from vimerge.models.checkpoint import load_checkpoint

# README_revenge.md (facebookresearch/deit), ImageNet-1k pre-training: embed dim, depth, heads,
# resolution (models_v2.py deit_{size}_patch16_LS), then #params (M), GFLOPs, top-1.
DEIT3 = {
    "deit3_small": (384, 12, 6, 224, 22.0, 4.6, 81.4),
    "deit3_small_384": (384, 12, 6, 384, 22.0, 15.5, 83.4),
    "deit3_medium": (512, 12, 8, 224, 38.8, 8.0, 83.0),
    "deit3_base": (768, 12, 12, 224, 86.6, 17.5, 83.8),
    "deit3_base_384": (768, 12, 12, 384, 86.9, 55.5, 85.0),
    "deit3_large": (1024, 24, 16, 224, 304.4, 61.6, 84.9),
    "deit3_large_384": (1024, 24, 16, 384, 304.8, 191.2, 85.8),
}


def deit3_layout(embed: int, depth: int, patches: int, layer_scale: str = "timm", classes: int = 1000,
                 patch: int = 16, chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Every parameter of a DeiT III checkpoint by name and shape, written from models_v2.py
    (``vit_models`` + ``Layer_scale_init_Block``: ``gamma_1``/``gamma_2``) and timm's
    ``VisionTransformer(no_embed_class=True, init_values=...)`` (``ls1.gamma``/``ls2.gamma``):
    the position embedding has one row per patch, no class row."""
    ls1, ls2 = ("ls1.gamma", "ls2.gamma") if layer_scale == "timm" else ("gamma_1", "gamma_2")
    layout = {"cls_token": (1, 1, embed), "pos_embed": (1, patches, embed),
              "patch_embed.proj.weight": (embed, chans, patch, patch), "patch_embed.proj.bias": (embed,),
              "norm.weight": (embed,), "norm.bias": (embed,), "head.weight": (classes, embed), "head.bias": (classes,)}
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": (embed,), b + "norm1.bias": (embed,),
                       b + "attn.qkv.weight": (3 * embed, embed), b + "attn.qkv.bias": (3 * embed,),
                       b + "attn.proj.weight": (embed, embed), b + "attn.proj.bias": (embed,),
                       b + ls1: (embed,), b + ls2: (embed,),
                       b + "norm2.weight": (embed,), b + "norm2.bias": (embed,),
                       b + "mlp.fc1.weight": (4 * embed, embed), b + "mlp.fc1.bias": (4 * embed,),
                       b + "mlp.fc2.weight": (embed, 4 * embed), b + "mlp.fc2.bias": (embed,)})
    return layout


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(shape, generator=g) for k, shape in layout.items()}


def to_timm(key: str) -> str:
    return re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)


@pytest.mark.parametrize("name", list(DEIT3))
def test_presets_have_the_official_layout_and_sizes(name):
    embed, depth, heads, img, params, gflops, _ = DEIT3[name]
    model = vimerge.create_model(name)
    patches = (img // 16) ** 2
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == deit3_layout(embed, depth, patches)
    assert model.blocks[0].attn.num_heads == heads and model.img_size == (img, img)
    assert model.num_tokens == patches + 1 and model.cls_index == 0          # the class token is a token
    # models_v2.py: LayerScale starts at init_scale = 1e-4, LayerNorm eps 1e-6
    assert all(torch.equal(b.ls1.gamma, torch.full((embed,), 1e-4)) for b in model.blocks)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    # the published table: #params (M) and GFLOPs (a multiply-add once); the README gives 22.0 M
    # for ViT-S at 384 px as well, where its 24x24 position embedding adds 0.15 M
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - params) <= (0.25 if name == "deit3_small_384" else 0.06)
    assert vimerge.count_flops(model) / 1e9 == pytest.approx(gflops, rel=5e-3)


def test_timm_and_facebookresearch_names_resolve_to_the_presets():
    for alias, name, img in (("deit3_small_patch16_224", "deit3_small", 224), ("deit_small_patch16_LS", "deit3_small", 224),
                             ("deit3_base_patch16_384", "deit3_base_384", 384), ("deit_large_patch16_LS", "deit3_large", 224)):
        model = vimerge.create_model(alias, depth=1)
        assert model.preset_name == name and model.img_size == (img, img)
    assert vimerge.models.pretrained_uri("deit3_base_384") == "https://dl.fbaipublicfiles.com/deit/deit_3_base_384_1k.pth"


@pytest.mark.parametrize("names", ["facebookresearch", "timm"])
def test_both_name_layouts_load_strictly_into_the_same_model(names, tmp_path):
    source = random_state(deit3_layout(384, 2, 16, layer_scale=names))
    path = tmp_path / "deit3.pth"
    torch.save({"model": source}, path)                                  # the official container
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # nothing adapted, nothing to say
        model = vimerge.create_model("deit3_small", depth=2, img_size=64, checkpoint=str(path))
    loaded = model.state_dict()
    assert set(loaded) == {to_timm(k) for k in source}
    assert all(torch.equal(loaded[to_timm(k)], v) for k, v in source.items())


def ln(t, w, b, eps=1e-6):
    mu = t.mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b


def reference_deit3(sd: dict, x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """DeiT III in float64 from the equations, on a facebookresearch state dict (no vimerge module):
    z0 = [cls; patches + pos]; z += gamma_1 * MSA(LN(z)); z += gamma_2 * MLP(LN(z)); head(LN(z)[0])."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    p = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    p = p.flatten(2).transpose(1, 2) + sd["pos_embed"]                    # the patches only
    z = torch.cat([sd["cls_token"].expand(x.shape[0], 1, -1), p], 1)
    d = z.shape[2]
    hd = d // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = ln(z, g("norm1.weight"), g("norm1.bias"))
        qkv = h @ g("attn.qkv.weight").T + g("attn.qkv.bias")
        out = torch.zeros_like(z)
        for hh in range(heads):
            q, k, v = (qkv[..., j * d + hh * hd: j * d + (hh + 1) * hd] for j in range(3))
            out[..., hh * hd:(hh + 1) * hd] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v
        z = z + g("gamma_1") * (out @ g("attn.proj.weight").T + g("attn.proj.bias"))
        h = ln(z, g("norm2.weight"), g("norm2.bias")) @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        z = z + g("gamma_2") * (h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias"))
    return ln(z[:, 0], sd["norm.weight"], sd["norm.bias"]) @ sd["head.weight"].T + sd["head.bias"]


def test_forward_matches_the_equations(tmp_path):
    sd = random_state(deit3_layout(96, 3, 16, layer_scale="facebookresearch", classes=7))
    for k in sd:                                       # LayerNorm weights near 1, gammas of order 1
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            sd[k] = sd[k] + 1
        if "gamma_" in k:
            sd[k] = sd[k] * 5
    torch.save({"model": sd}, tmp_path / "w.pth")
    model = vimerge.create_model("deit3_small", embed_dim=96, num_heads=4, depth=3, img_size=64,
                                 num_classes=7, checkpoint=str(tmp_path / "w.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x).double()
        tokens = model.embed(x)
    torch.testing.assert_close(ours, reference_deit3(sd, x, heads=4, patch=16), rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens[:, 0], sd["cls_token"].expand(2, -1, -1)[:, 0])   # no position on the class token


def test_matches_timm_where_timm_imports():
    timm = pytest.importorskip("timm", exc_type=ImportError)
    ref = timm.create_model("deit3_small_patch16_224", pretrained=False, depth=2).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    ours = vimerge.create_model("deit3_small", depth=2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), rtol=1e-4, atol=1e-4)


def save(tmp_path, state, name="ckpt.pth"):
    torch.save({"model": state}, tmp_path / name)
    return str(tmp_path / name)


def test_the_reported_case_deit3_into_deit_names_the_family_and_the_preset(tmp_path):
    # issue 25: a DeiT III file at 224 px into deit_small was refused as "195 patches ...
    # build the model with the checkpoint's img_size"
    path = save(tmp_path, random_state(deit3_layout(384, 12, 196, layer_scale="facebookresearch")))
    with pytest.raises(CheckpointError) as err:
        vimerge.create_model("deit_small", checkpoint=path)
    msg = str(err.value)
    assert "DeiT III" in msg and "196 rows = 196 = 14x14 patches, no class row" in msg
    assert "create_model('deit3_small')" in msg and "195" not in msg
    assert isinstance(vimerge.create_model("deit3_small", checkpoint=path), torch.nn.Module)   # the fix works
    # and the reverse: a DeiT file into a DeiT III model
    deit = vimerge.create_model("deit_base", depth=2).state_dict()
    with pytest.raises(CheckpointError, match=r"is DeiT / ViT .*197 rows, a class row and 196 = 14x14 patches.*"
                                              r"create_model\('deit_base', depth=2\)"):
        vimerge.create_model("deit3_base", depth=2, checkpoint=save(tmp_path, deit))
    # another width of DeiT III: the key check's hint names the DeiT III preset
    with pytest.raises(CheckpointError, match=r"build the model with create_model\('deit3_base', depth=2\)"):
        vimerge.create_model("deit3_small", depth=2, checkpoint=save(tmp_path, random_state(deit3_layout(768, 2, 196))))


def test_non_strict_loads_what_fits_with_the_reason(tmp_path):
    path = save(tmp_path, random_state(deit3_layout(384, 2, 196)))
    model = vimerge.create_model("deit_small", depth=2)
    with pytest.warns(UserWarning, match="DeiT III.*loading only what fits"):
        report = load_checkpoint(model, path, strict=False)
    assert report["mismatched"] == ["pos_embed"] and len(report["unexpected"]) == 4     # 2 blocks x ls1, ls2


def deit_state(embed=192, depth=2, tokens=17, patch=16):
    return vimerge.create_model("deit_tiny", embed_dim=embed, depth=depth, img_size=patch * math.isqrt(tokens - 1),
                                patch_size=patch).state_dict()


def family_cases():
    """Checkpoints of other ViT families, each with the keys its public code has: (name, state,
    words the message must have: the family and the remedy)."""
    d3 = random_state(deit3_layout(192, 2, 16))
    deit = deit_state()
    beit = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in d3.items()
            if not k.endswith("attn.qkv.bias")}
    for i in range(2):              # timm beit.py: qkv without bias, q_bias / v_bias, a relative position table
        beit.update({f"blocks.{i}.attn.q_bias": torch.zeros(192), f"blocks.{i}.attn.v_bias": torch.zeros(192),
                     f"blocks.{i}.attn.relative_position_bias_table": torch.zeros(7 * 7 + 3, 3)})
    eva = {k: v for k, v in d3.items() if ".attn.qkv." not in k}
    for i in range(2):              # timm eva.py: separate q/k/v projections, q/v biases, SwiGLU fc1_g/fc1_x
        eva.update({f"blocks.{i}.attn.q_proj.weight": torch.zeros(192, 192), f"blocks.{i}.attn.k_proj.weight":
                    torch.zeros(192, 192), f"blocks.{i}.attn.v_proj.weight": torch.zeros(192, 192),
                    f"blocks.{i}.attn.q_bias": torch.zeros(192), f"blocks.{i}.attn.v_bias": torch.zeros(192)})
    clip = {"visual.class_embedding": torch.zeros(192), "visual.positional_embedding": torch.zeros(17, 192),
            "visual.conv1.weight": torch.zeros(192, 3, 16, 16), "visual.ln_pre.weight": torch.zeros(192),
            "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(576, 192),
            "visual.transformer.resblocks.0.attn.out_proj.weight": torch.zeros(192, 192),
            "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(768, 192),
            "visual.ln_post.weight": torch.zeros(192), "visual.proj": torch.zeros(192, 512),
            "token_embedding.weight": torch.zeros(100, 512), "logit_scale": torch.tensor(4.6)}
    gap = {k: v for k, v in deit.items() if k not in ("cls_token", "norm.weight", "norm.bias")}
    gap.update({"fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192), "pos_embed": torch.zeros(1, 16, 192)})
    return [
        ("distilled", {**deit, "dist_token": torch.zeros(1, 1, 192), "head_dist.weight": torch.zeros(1000, 192),
                       "head_dist.bias": torch.zeros(1000)}, ["distilled DeiT", "non-distilled"]),
        ("registers", {**d3, "reg_token": torch.zeros(1, 4, 192)},
         ["4 register tokens", "no registers", "create_model('deit3_small')"]),
        ("dinov2", {**{k: v for k, v in deit.items()}, "mask_token": torch.zeros(1, 192)},
         ["masked-image-modelling", "DINOv2", "use a DeiT or DeiT III checkpoint"]),
        ("openai_clip", clip, ["OpenAI CLIP", "no CLIP backbone", "create_model('deit_small')"]),
        ("hugging_face", {"vit.embeddings.cls_token": torch.zeros(1, 1, 192),   # transformers ViTModel names
                          "vit.embeddings.position_embeddings": torch.zeros(1, 17, 192),
                          "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(192, 3, 16, 16),
                          "vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(192, 192),
                          "vit.encoder.layer.0.layernorm_before.weight": torch.zeros(192),
                          "classifier.weight": torch.zeros(1000, 192)},
         ["Hugging Face transformers", "timm / facebookresearch names", "deit_3_small_224_1k.pth"]),
        ("timm_clip", {**deit, "norm_pre.weight": torch.ones(192), "norm_pre.bias": torch.zeros(192)},
         ["CLIP-style", "norm_pre", "no pre-norm"]),
        ("beit", beit, ["BEiT", "relative position bias", "absolute position embeddings only"]),
        ("eva", eva, ["EVA", "fused qkv", "create_model('deit3_small')"]),
        ("global_pool", gap, ["global average pooling", "no class token", "classifies from the class token"]),
    ]


@pytest.mark.parametrize("case", family_cases(), ids=lambda c: c[0])
def test_other_vit_families_are_refused_naming_the_family_and_the_fix(case, tmp_path):
    _, state, words = case
    path = save(tmp_path, state)
    for name in ("deit_tiny", "deit3_small"):
        with pytest.raises(CheckpointError) as err:
            vimerge.create_model(name, depth=2, img_size=64, embed_dim=192, num_heads=3, checkpoint=path)
        assert all(w in str(err.value) for w in words), str(err.value)


def test_another_patch_size_is_refused_with_the_call_that_fits(tmp_path):
    vit32 = deit_state(embed=768, depth=2, tokens=50, patch=32)          # timm vit_base_patch32_224: 7x7 + class
    with pytest.raises(CheckpointError, match=r"patch size is 32 \(patch_embed.proj 32x32, a 7x7 grid made at "
                                              r"img_size 224\), the model's 16.*create_model\('deit_base', "
                                              r"patch_size=32, depth=2\)"):
        vimerge.create_model("deit_base", depth=2, checkpoint=save(tmp_path, vit32))
    d3 = random_state(deit3_layout(384, 2, 576, patch=8))                # 24x24 patches of 8 px: 192 px
    with pytest.raises(CheckpointError, match=r"patch size is 8 .*24x24 grid made at img_size 192.*"
                                              r"create_model\('deit3_small', patch_size=8, depth=2, img_size=192\)"):
        vimerge.create_model("deit3_small", depth=2, checkpoint=save(tmp_path, d3))


def test_deit3_grids_are_resampled_on_the_patches_only(tmp_path):
    src = random_state(deit3_layout(192, 1, 16))                          # 4x4 grid (64 px)
    path = save(tmp_path, src)
    old = src["pos_embed"][0].T.reshape(1, 192, 4, 4)
    for img, grid in ((128, (8, 8)), ((32, 128), (2, 8))):                 # (2, 8): as many patches, another shape
        model = vimerge.create_model("deit3_small", embed_dim=192, num_heads=3, depth=1, img_size=img)
        with pytest.warns(UserWarning, match=rf"4x4 patch grid .* to the model's {grid[0]}x{grid[1]} grid"):
            report = load_checkpoint(model, path)
        assert report["resized_pos_embed"] and report["pos_embed_grid"] == ((4, 4), grid)
        expected = F.interpolate(old, size=grid, mode="bicubic", align_corners=False).reshape(192, -1).T
        torch.testing.assert_close(model.pos_embed.detach()[0], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.cls_token.detach(), src["cls_token"])
    with pytest.raises(CheckpointError, match="position embedding for 15 patches"):
        bad = {**src, "pos_embed": src["pos_embed"][:, :15]}                 # neither 15 nor 14 rows is a grid
        vimerge.create_model("deit3_small", embed_dim=192, num_heads=3, depth=1, img_size=64,
                             checkpoint=save(tmp_path, bad, "bad.pth"))


def test_a_deit_grid_with_as_many_patches_but_another_shape_is_resampled(tmp_path):
    src = deit_state(depth=1)                                              # DeiT: class row + 4x4
    model = vimerge.create_model("deit_tiny", depth=1, img_size=(32, 128))   # 2x8: 16 patches too
    with pytest.warns(UserWarning, match="4x4 patch grid .* 2x8 grid .as many patches, another shape"):
        report = load_checkpoint(model, save(tmp_path, src))
    assert report["pos_embed_grid"] == ((4, 4), (2, 8))
    new, old = model.pos_embed.detach()[0], src["pos_embed"][0]
    assert torch.equal(new[0], old[0])                                     # the class row, not interpolated
    expected = F.interpolate(old[1:].T.reshape(1, 192, 4, 4), size=(2, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[1:], expected.reshape(192, 16).T, rtol=1e-5, atol=1e-6)


def tiny_deit3(**kw):
    torch.manual_seed(0)
    model = vimerge.create_model("deit3_small", embed_dim=48, num_heads=3, img_size=64, **{"depth": 4, **kw}).eval()
    with torch.no_grad():
        for b in model.blocks:                        # LayerScale of order 1, so the branches matter
            b.ls1.gamma.uniform_(0.5, 1.5)
            b.ls2.gamma.uniform_(0.5, 1.5)
    return model


def test_reduction_after_the_attention_of_every_deit3_block():
    model = tiny_deit3()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    vimerge.apply(model, "rmeeto:r=3")
    counts = [17 - 3 * (i + 1) for i in range(4)]                          # 16 patches + the class token
    seen = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        reduced = model(x)
    for h in hooks:
        h.remove()
    assert vimerge.token_counts(model) == seen == counts and not torch.allclose(reduced, before)
    with torch.no_grad():
        vimerge.apply(model, "rmeeto:r=0")
        assert torch.equal(model(x), before)
        vimerge.remove(model)
        assert torch.equal(model(x), before)
    for spec in ("prune:r=2", "stm:ratio=0.25"):
        model.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "STM: hidden-state protection runs as plain BNNM")
            reducer = vimerge.apply(model, spec)
            model(x).logsumexp(-1).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.blocks[0].ls1.gamma.grad.abs().sum() > 0
        model.zero_grad()
    assert reducer.fallbacks and "no selective scan" in reducer.fallbacks[0][1]     # STM: plain BNNM on a Transformer


def test_proportional_attention_makes_a_merged_duplicate_count_twice():
    # two identical patches (same pixels, same position rows) merged after block 0's attention:
    # with log(size) in block 1's attention the class token sees exactly what it saw unreduced
    model = tiny_deit3(depth=2)
    with torch.no_grad():
        model.pos_embed[0, 1] = model.pos_embed[0, 0]
    x = torch.randn(1, 3, 64, 64)
    x[..., 0:16, 16:32] = x[..., 0:16, 0:16]                               # patch (0, 1) = patch (0, 0)
    with torch.no_grad():
        full = model.forward_features(x)
        vimerge.apply(model, "rmeeto:r=[1,0]")
        state = model.forward_tokens(x, track_source=True)
        merged = model.forward_features(x)
    assert state.num_tokens == 16 and state.size.max() == 2
    assert state.source[0].sum(-1).max() == 2 and set(state.source[0][state.size[0, :, 0] == 2].nonzero()[:, 1].tolist()) == {1, 2}
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
