"""VideoMamba: the official layout of every preset, the forward against an independent float64
implementation (image and video), checkpoint adaptation (containers, inflation, temporal and
spatial resampling, the distillation head), R-MeeTo Table 13 FLOPs and token counts, and
token reduction on clips (STM with the class token at 0, R-MeeTo's scopes)."""

import math

import pytest
import torch
import torch.nn.functional as F

import vimerge
from vimerge.models import VideoMamba
from vimerge.models.videomamba import resample_temporal
from vimerge.reduce.stm import bnnm_schedule
from vimerge.tokens import input_shape

# preset -> (embed_dim, depth, frames or None, classes, published parameters in millions)
PRESETS = {"videomamba_tiny": (192, 24, None, 1000, 7), "videomamba_small": (384, 24, None, 1000, 26),
           "videomamba_middle": (576, 32, None, 1000, 74), "videomamba_base": (768, 24, None, 1000, 98),
           "videomamba_tiny_k400": (192, 24, 8, 400, 7), "videomamba_small_k400": (384, 24, 8, 400, 26),
           "videomamba_middle_k400": (576, 32, 8, 400, 74)}

# a small VideoMamba for the numerical tests: 2x2 patches of 8 px, width 16, 2 blocks, 5 classes
SMALL = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_classes=5)


def official_layout(embed: int, depth: int, frames: int | None, classes: int, patch: int = 16,
                    chans: int = 3, grid: int = 196, d_state: int = 16) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official VideoMamba checkpoint by name and shape, written from the
    official model description (mamba_simple.Mamba with bimamba v2, RMSNorm blocks), not from our
    module. Video models: a Conv3d of one frame and the temporal embedding."""
    di, rank = 2 * embed, math.ceil(embed / 16)
    kernel = (embed, chans, patch, patch) if frames is None else (embed, chans, 1, patch, patch)
    layout = {"cls_token": (1, 1, embed), "pos_embed": (1, grid + 1, embed), "patch_embed.proj.weight": kernel,
              "patch_embed.proj.bias": (embed,), "norm_f.weight": (embed,), "head.weight": (classes, embed),
              "head.bias": (classes,)}
    if frames is not None:
        layout["temporal_pos_embedding"] = (1, frames, embed)
    for i in range(depth):
        m = f"layers.{i}.mixer."
        layout[f"layers.{i}.norm.weight"] = (embed,)
        layout.update({m + "in_proj.weight": (2 * di, embed), m + "out_proj.weight": (embed, di)})
        for sfx in ("", "_b"):
            layout.update({m + f"conv1d{sfx}.weight": (di, 1, 4), m + f"conv1d{sfx}.bias": (di,),
                           m + f"x_proj{sfx}.weight": (rank + 2 * d_state, di),
                           m + f"dt_proj{sfx}.weight": (di, rank), m + f"dt_proj{sfx}.bias": (di,),
                           m + ("A_log" if not sfx else "A_b_log"): (di, d_state), m + f"D{sfx}": (di,)})
    return layout


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_official_layout(name):
    embed, depth, frames, classes, millions = PRESETS[name]
    model = vimerge.create_model(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_layout(embed, depth, frames, classes)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
    assert model.cls_index == 0 and model.reduction_site == "before_mixer"
    assert model.num_tokens == (1569 if frames else 197)
    assert input_shape(model, 2) == ((2, 3, 8, 224, 224) if frames else (2, 3, 224, 224))


@pytest.mark.parametrize("container", ["bare", "model", "module"])
@pytest.mark.parametrize("name", ["videomamba_small", "videomamba_tiny_k400"])
def test_official_containers_load_strictly(name, container, tmp_path):
    model = vimerge.create_model(name, depth=2)
    sd = model.state_dict()
    obj = sd if container == "bare" else {container: sd, "epoch": 3}
    torch.save(obj, tmp_path / "w.pth")
    again = vimerge.create_model(name, depth=2, checkpoint=str(tmp_path / "w.pth"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())


# ------------------------------------------------------------------------- the reference


def reference_videomamba(sd: dict, x: torch.Tensor, patch: int, eps: float = 1e-5) -> torch.Tensor:
    """The VideoMamba forward in float64 from its description, on a state dict: class token at
    0, frames in order, spatial embedding on every frame (row 0 on the class token), temporal
    embedding on the patches only, blocks Add -> RMSNorm -> mixer with the two scan directions
    summed (no /2), final Add -> RMSNorm, head on token 0. The scan is a plain loop."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    if x.dim() == 4:
        x = x[:, :, None]                                           # an image: one frame
    b, _, t = x.shape[:3]
    w = sd["patch_embed.proj.weight"]
    frames = []
    for f in range(t):                                              # tubelet 1: each frame alone
        kernel = w if w.dim() == 4 else w[:, :, 0]
        p = F.conv2d(x[:, :, f], kernel, sd["patch_embed.proj.bias"], stride=patch)   # (b, E, h, w)
        p = p.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
        if "temporal_pos_embedding" in sd:
            p = p + sd["temporal_pos_embedding"][:, f]
        frames.append(p)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(b, 1, -1)
    hidden = torch.cat([cls, *frames], dim=1)
    residual = None

    def rms(v, weight):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * weight

    def scan(xs, zs, g, sfx):                                       # xs, zs (b, L, D)
        L, d = xs.shape[1], xs.shape[2]
        conv_w, conv_b = g(f"conv1d{sfx}.weight")[:, 0], g(f"conv1d{sfx}.bias")
        k = conv_w.shape[1]
        padded = torch.cat([xs.new_zeros(b, k - 1, d), xs], 1)
        u = torch.stack([(padded[:, i:i + k] * conv_w.T).sum(1) for i in range(L)], 1) + conv_b
        u = u * torch.sigmoid(u)
        dbc = u @ g(f"x_proj{sfx}.weight").T
        rank, n = g(f"dt_proj{sfx}.weight").shape[1], g("A_log").shape[1]
        dt = F.softplus(dbc[..., :rank] @ g(f"dt_proj{sfx}.weight").T + g(f"dt_proj{sfx}.bias"))
        Bm, Cm = dbc[..., rank:rank + n], dbc[..., rank + n:]
        A = -torch.exp(g("A_log" if not sfx else "A_b_log"))
        h = xs.new_zeros(b, d, n)
        ys = []
        for i in range(L):
            h = torch.exp(dt[:, i, :, None] * A) * h + (dt[:, i] * u[:, i])[..., None] * Bm[:, i, None, :]
            ys.append((h * Cm[:, i, None, :]).sum(-1) + g(f"D{sfx}") * u[:, i])
        y = torch.stack(ys, 1)
        return y * (zs * torch.sigmoid(zs))

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        normed = rms(residual, sd[f"layers.{i}.norm.weight"])
        g = lambda k: sd[f"layers.{i}.mixer.{k}"]  # noqa: E731
        xz = normed @ g("in_proj.weight").T
        xs, zs = xz.chunk(2, dim=-1)
        y = scan(xs, zs, g, "") + scan(xs.flip(1), zs.flip(1), g, "_b").flip(1)
        hidden = y @ g("out_proj.weight").T
    final = rms(residual + hidden, sd["norm_f.weight"])
    return final[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def _perturbed(model: VideoMamba) -> VideoMamba:
    with torch.no_grad():                # non-trivial norms, class token, temporal embedding
        for name, p in model.named_parameters():
            if p.ndim == 1 or name in ("cls_token", "temporal_pos_embedding"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("frames", [None, 3])
def test_forward_matches_an_independent_float64_implementation(frames):
    model = _perturbed(vimerge.create_model("videomamba_tiny", num_frames=frames, **SMALL))
    x = torch.randn(input_shape(model, 2))
    with torch.no_grad():
        ours = model(x).double()
    ref = reference_videomamba(model.state_dict(), x, patch=8)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # the reference is sensitive to what the issue pins: the directions summed, not averaged
    halved = model.state_dict()
    for i in range(2):
        halved[f"layers.{i}.mixer.out_proj.weight"] = halved[f"layers.{i}.mixer.out_proj.weight"] * 2
    assert not torch.allclose(reference_videomamba(halved, x, patch=8), ref, atol=1e-3)


def test_the_token_sequence_is_the_class_token_then_frames_in_order():
    model = _perturbed(vimerge.create_model("videomamba_tiny", num_frames=3, **SMALL))
    x = torch.randn(input_shape(model, 1))
    with torch.no_grad():
        tokens = model.embed(x)
        sd = model.state_dict()
        frame1 = F.conv2d(x[:, :, 1], sd["patch_embed.proj.weight"][:, :, 0], sd["patch_embed.proj.bias"], stride=8)
    expect = frame1.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:] + sd["temporal_pos_embedding"][:, 1]
    assert tokens.shape == (1, 1 + 3 * 4, 16)
    torch.testing.assert_close(tokens[:, 1 + 4:1 + 8], expect)                    # frame 1, row-major
    torch.testing.assert_close(tokens[:, 0], (sd["cls_token"] + sd["pos_embed"][:, 0])[0])   # no temporal term
    assert model.token_coords[:6].tolist() == [[-1, -1], [0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]


# ------------------------------------------------------------------------- checkpoints


def test_an_image_checkpoint_is_inflated_into_a_video_model(tmp_path):
    image = _perturbed(vimerge.create_model("videomamba_tiny", **SMALL))
    torch.save({"model": image.state_dict()}, tmp_path / "in1k.pth")
    with pytest.warns(UserWarning) as record:
        video = vimerge.create_model("videomamba_tiny", num_frames=4, tubelet_size=2, checkpoint=str(tmp_path / "in1k.pth"),
                                     **SMALL)
    text = " ".join(str(w.message) for w in record)
    assert "inflated" in text and "temporal position embedding" in text
    kernel = video.patch_embed.proj.weight
    assert kernel.shape == (16, 3, 2, 8, 8)
    assert torch.equal(kernel[:, :, 1], image.patch_embed.proj.weight) and not kernel[:, :, 0].any()
    assert not video.temporal_pos_embedding.any()
    # tubelet 1: a one-frame clip through the inflated model is the image through the image model
    with pytest.warns(UserWarning, match="inflated|temporal"):
        one = vimerge.create_model("videomamba_tiny", num_frames=1, checkpoint=str(tmp_path / "in1k.pth"),
                                   **SMALL).eval()
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(one(img[:, :, None]), image(img), rtol=1e-5, atol=1e-6)


def test_a_video_checkpoint_fits_another_frame_count_and_resolution(tmp_path):
    src = _perturbed(vimerge.create_model("videomamba_tiny", num_frames=8, **SMALL))
    torch.save({"module": src.state_dict()}, tmp_path / "k400.pth")
    with pytest.warns(UserWarning, match="interpolated linearly"):
        four = vimerge.create_model("videomamba_tiny", num_frames=4, checkpoint=str(tmp_path / "k400.pth"), **SMALL)
    old = src.temporal_pos_embedding.detach()[0]                      # (8, E)
    for i in range(4):              # linear, align_corners=False: source position (i + 0.5) * 2 - 0.5
        pos = (i + 0.5) * 8 / 4 - 0.5
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        want = old[lo] * (1 - frac) + old[min(lo + 1, 7)] * frac
        torch.testing.assert_close(four.temporal_pos_embedding[0, i].detach(), want)
    with pytest.warns(UserWarning, match="resampled its position embedding"):
        big = vimerge.create_model("videomamba_tiny", num_frames=8, checkpoint=str(tmp_path / "k400.pth"),
                                   **{**SMALL, "img_size": 32})
    pos, new = src.pos_embed.detach(), big.pos_embed.detach()
    assert new.shape == (1, 17, 16) and torch.equal(new[:, 0], pos[:, 0])          # the class row stays first
    grid = pos[:, 1:].reshape(1, 2, 2, 16).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 16)
    torch.testing.assert_close(new[:, 1:], want)
    # a video checkpoint in an image model: the temporal embedding is left out, with a note
    with pytest.warns(UserWarning, match="not used by this image model|loaded as an image model") as record:
        vimerge.create_model("videomamba_tiny", checkpoint=str(tmp_path / "k400.pth"), **SMALL)
    assert len(record) == 2


def test_resample_temporal_keeps_a_constant_and_its_own_length():
    emb = torch.randn(1, 5, 3)
    assert torch.equal(resample_temporal(emb, 5), emb)
    const = torch.ones(1, 8, 3) * 2.5
    torch.testing.assert_close(resample_temporal(const, 16), torch.full((1, 16, 3), 2.5))


def test_the_distillation_head_is_left_out_with_a_note(tmp_path):
    model = vimerge.create_model("videomamba_middle", depth=2)
    sd = {**model.state_dict(), "distill_head.0.weight": torch.zeros(4, 576), "distill_head.0.bias": torch.zeros(4)}
    torch.save({"model": sd}, tmp_path / "m.pth")
    with pytest.warns(UserWarning, match="self-distillation head"):
        again = vimerge.create_model("videomamba_middle", depth=2, checkpoint=str(tmp_path / "m.pth"))
    assert torch.equal(again.head.weight, model.head.weight)


def test_a_foreign_checkpoint_is_refused_and_a_wrong_size_gets_the_preset(tmp_path):
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "vit.pth")
    with pytest.raises(vimerge.CheckpointError, match="not a VideoMamba checkpoint"):
        vimerge.create_model("videomamba_tiny", checkpoint=str(tmp_path / "vit.pth"))
    torch.save(vimerge.create_model("videomamba_small", depth=2).state_dict(), tmp_path / "s.pth")
    with pytest.raises(vimerge.CheckpointError, match="videomamba_small"):
        vimerge.create_model("videomamba_tiny", depth=2, checkpoint=str(tmp_path / "s.pth"))


def test_bad_clip_shapes_say_what_to_do():
    model = vimerge.create_model("videomamba_tiny", num_frames=4, **SMALL)
    with pytest.raises(ValueError, match="frames come before the channels"):
        model(torch.randn(2, 4, 3, 16, 16))
    with pytest.raises(ValueError, match="images into a video model"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="num_frames=5"):
        model(torch.randn(2, 3, 5, 16, 16))


# ------------------------------------------------------------------------- cost and counts


TABLE_13 = {"videomamba_tiny_k400": (11.54, 9.49, 601), "videomamba_small_k400": (40.43, 30.99, 601),
            "videomamba_middle_k400": (115.33, 71.71, 249)}


@pytest.mark.parametrize("name", list(TABLE_13))
def test_rmeeto_table_13_flops_and_token_counts(name):
    full, reduced, last = TABLE_13[name]
    model = vimerge.create_model(name)
    assert round(vimerge.count_flops(model) / 1e9, 2) == full
    vimerge.apply(model, "rmeeto:r=88")
    counts = vimerge.token_counts(model)
    assert counts[0] == counts[1] == 1569 and counts[-1] == last
    assert sum(1 for a, b in zip([1569] + counts, counts) if b < a) == (15 if "middle" in name else 11)
    assert round(vimerge.count_flops(model) / 1e9, 2) == reduced
    assert vimerge.count_flops(model, "full") > 2 * vimerge.count_flops(model) > 0


def test_image_models_reproduce_table_2():
    """R-MeeTo's image VideoMambas have Vim's dimensions and counts (CKPT.md: 1.28 / 3.58 / 13.21)."""
    for name, r, want in (("videomamba_tiny", 5, 1.28), ("videomamba_small", 11, 3.58), ("videomamba_base", 11, 13.21)):
        model = vimerge.create_model(name, depth=1)         # the FLOPs formula takes 24 blocks' counts
        reducer = vimerge.reduce.build(f"rmeeto:r={r}")
        counts = reducer.token_counts(197, 24, 0)
        total = model.flops(counts) + reducer.flops(counts, 197, model.embed_dim)
        assert round(total / 1e9, 2) == want


def test_full_flops_count_the_summed_directions_and_the_temporal_embedding():
    video = vimerge.create_model("videomamba_tiny", num_frames=2, **SMALL)
    image = vimerge.create_model("videomamba_tiny", **SMALL)
    E, P = 16, 4
    # one block at N tokens differs from zero blocks by the per-block formula; the embedding part
    # of a 2-frame clip is two frames of patches plus the temporal embedding on them
    assert video.flops([], "full") - image.flops([], "full") == pytest.approx(
        2 * P * E * 3 * 64 + P * E + P * E + 2 * P * E)      # kernel, its bias, position and temporal rows
    vim = vimerge.create_model("vim_tiny", img_size=16, patch_size=8, stride=8, embed_dim=16, depth=2, num_classes=5)
    per_block = lambda m, n: m.flops([n], "full") - m.flops([], "full")  # noqa: E731
    assert per_block(vim, 5) - per_block(image, 5) == 5 * 2 * E          # Vim averages (add + divide), VideoMamba adds


# ------------------------------------------------------------------------- reduction on clips


def test_stm_on_a_clip_merges_toward_the_class_token_at_zero():
    """BNNM with the class token at position 0: the left side is empty, every removal is on the
    right, far end first, each token merged into its nearest remaining left neighbour (the
    backward scan carries it to the class token)."""
    model = vimerge.create_model("videomamba_tiny", num_frames=2, **SMALL).eval()     # 9 tokens
    steps = bnnm_schedule(9, 2, final_ratio=2 / 9, per_side=2, start_layer=1, cls_index=0)
    step = steps[1]
    assert step.removed == (8, 4) and step.target == (7, 3) and step.side == (1, 1) and step.cls_out == 0
    reducer = vimerge.apply(model, "stm:final_ratio=0.23,per_side=2")
    x = torch.randn(input_shape(model, 2))
    with torch.no_grad():
        out = model(x)
    assert vimerge.token_counts(model) == [9, 7] and torch.isfinite(out).all()
    assert set(reducer.weights) == {1} and reducer.weights[1].shape == (2, 2) and not reducer.fallbacks


def test_rmeeto_on_a_clip_keeps_the_class_token_first_and_the_coordinates():
    model = vimerge.create_model("videomamba_tiny", num_frames=4, **{**SMALL, "img_size": 32, "depth": 5}).eval()  # 65 tokens
    vimerge.apply(model, "rmeeto:r=8")
    state = model.forward_tokens(torch.randn(input_shape(model, 2)), track_source=True)
    assert state.cls_index == 0 and state.num_tokens == 65 - 8 * 2 and state.coords[:, 0].eq(-1).all()
    # every token's coordinates are those of its first original token
    first = state.source[:, 1:].argmax(-1)
    assert torch.equal(state.coords[:, 1:], model.token_coords[first])
