"""The Vim model: architecture against an independent functional forward, presets, knobs."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from scan_cases import scan_loop_float64
from vimerge.models import create_backbone, list_models, model_defaults


def official_forward(sd: dict, images: torch.Tensor, stride: int, eps: float = 1e-5) -> torch.Tensor:
    """Vim forward written from the hustvl/Vim equations, straight from a state dict, in float64.

    patch conv -> class token at M // 2 -> + pos_embed -> [Add -> RMSNorm -> BiMamba v2] x depth
    -> Add -> RMSNorm -> head(class token).
    """
    sd = {k: v.double() for k, v in sd.items()}
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    M = x.shape[1]
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :M // 2], cls, x[:, M // 2:]], 1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    hidden, residual = x, None
    for i in range(depth):
        p = lambda name: sd[f"layers.{i}.mixer.{name}"]  # noqa: E731
        residual = hidden if residual is None else residual + hidden
        h = rms(residual, sd[f"layers.{i}.norm.weight"])
        xz = (h @ p("in_proj.weight").t()).transpose(1, 2)
        outs = []
        for sfx, A_name in (("", "A_log"), ("_b", "A_b_log")):
            xz_dir = xz if not sfx else xz.flip(-1)
            xs, z = xz_dir.chunk(2, dim=1)
            L, di = xs.shape[-1], xs.shape[1]
            xs = F.conv1d(xs, p(f"conv1d{sfx}.weight"), p(f"conv1d{sfx}.bias"), padding=3, groups=di)[..., :L]
            xs = xs * torch.sigmoid(xs)
            dbc = xs.transpose(1, 2) @ p(f"x_proj{sfx}.weight").t()
            n = p(A_name).shape[1]
            r = dbc.shape[-1] - 2 * n
            delta = (dbc[..., :r] @ p(f"dt_proj{sfx}.weight").t()).transpose(1, 2)
            y = scan_loop_float64(xs, delta, -torch.exp(p(A_name)), dbc[..., r:r + n].transpose(1, 2),
                                  dbc[..., r + n:].transpose(1, 2), p(f"D{sfx}"), z,
                                  p(f"dt_proj{sfx}.bias"), delta_softplus=True)
            outs.append(y if not sfx else y.flip(-1))
        hidden = ((outs[0] + outs[1]) / 2).transpose(1, 2) @ p("out_proj.weight").t()
    final = rms(residual + hidden, sd["norm_f.weight"])
    return final[:, M // 2] @ sd["head.weight"].t() + sd["head.bias"]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_matches_independent_official_forward(backend):
    model = create_backbone("vim_tiny", depth=3, img_size=32, patch_size=8, stride=8, embed_dim=32,
                         num_classes=7, scan_backend=backend).eval()
    # perturb every parameter so no structure hides behind the initialisation (ones, zeros)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(images)
    expected = official_forward(model.state_dict(), images, stride=8)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_overlapping_patches_stride():
    model = create_backbone("vim_tiny", depth=1, img_size=32, patch_size=8, stride=4, embed_dim=16).eval()
    assert model.patch_embed.grid_size == (7, 7) and model.num_patches == 49 and model.cls_index == 24
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images).double(), official_forward(model.state_dict(), images, 4),
                                   rtol=1e-4, atol=1e-5)


def test_presets_match_the_official_models():
    expected = {"vim_tiny": 192, "vim_small": 384, "vim_base": 768}
    assert set(expected) <= set(list_models())
    for name, dim in expected.items():
        cfg = model_defaults(name)
        assert (cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg["stride"], cfg["d_state"]) == \
            (dim, 24, 16, 16, 16)
    # parameter counts reported by the Vim paper: 7M (Ti) and 26M (S); base is 98M
    counts = {name: sum(p.numel() for p in create_backbone(name).parameters()) / 1e6
              for name in ("vim_tiny", "vim_small")}
    assert round(counts["vim_tiny"]) == 7 and round(counts["vim_small"]) == 26
    # an official long name is an alias of the preset
    long = create_backbone("vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                        depth=1)
    assert long.embed_dim == 384


@pytest.mark.parametrize("name,depth", [("vim_tiny", 24), ("vim_small", 4), ("vim_base", 2)])
def test_presets_forward_and_backward_end_to_end(name, depth):
    model = create_backbone(name, depth=depth, num_classes=10)
    model.train()
    images = torch.randn(2, 3, 224, 224)
    logits = model(images)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # the gradient reaches the first block's backward-direction parameters too
    assert model.layers[0].mixer.A_b_log.grad.abs().sum() > 0


def test_knobs_and_token_layout():
    model = create_backbone("vim_tiny", depth=8, img_size=64, patch_size=8, stride=8, embed_dim=48,
                         d_state=8, in_chans=1, num_classes=3, drop_path_rate=0.1)
    assert len(model.layers) == 8 and model.num_patches == 64 and model.cls_index == 32
    assert model.pos_embed.shape == (1, 65, 48)
    assert model.layers[0].mixer.A_log.shape == (96, 8)
    assert model.layers[0].drop_path.p == 0.0 and math.isclose(model.layers[-1].drop_path.p, 0.1 * 6 / 7, rel_tol=1e-6)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    # the class token sits in the middle of the embedded sequence
    tokens = model.embed(torch.zeros(1, 1, 64, 64))
    conv_bias = model.patch_embed.proj.bias
    torch.testing.assert_close(tokens[0, 32], (model.cls_token + model.pos_embed[:, 32])[0, 0])
    torch.testing.assert_close(tokens[0, 31], conv_bias + model.pos_embed[0, 31])


def test_wrong_image_size_names_the_fix():
    model = create_backbone("vim_tiny", depth=1, img_size=32, patch_size=8, stride=8)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 32, 32\).*img_size=\(48, 48\)"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="unknown model 'vim_huge'"):
        create_backbone("vim_huge")


def test_wrong_channel_count_names_the_channels_and_the_fix():
    rgb = create_backbone("vim_tiny", depth=1, img_size=32, patch_size=8, stride=8)
    with pytest.raises(ValueError) as info:
        rgb(torch.randn(2, 1, 32, 32))
    msg = str(info.value)
    assert "1-channel" in msg and "3 channels" in msg and "in_chans=1" in msg and "RGB" in msg
    assert "img_size" not in msg                       # the size is right: do not suggest it
    gray = create_backbone("vim_fmnist", depth=1)
    with pytest.raises(ValueError) as info:
        gray(torch.randn(2, 3, 28, 28))
    msg = str(info.value)
    assert "3-channel" in msg and "1 channel" in msg and "in_chans=3" in msg and "grayscale" in msg
    assert "img_size" not in msg
    with pytest.raises(ValueError, match=r"1-channel.*in_chans=1.*img_size=\(48, 48\)"):
        rgb(torch.randn(2, 1, 48, 48))                 # both wrong: both named
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\).*got \(3, 32, 32\).*batch dimension"):
        rgb(torch.randn(3, 32, 32))


@pytest.mark.parametrize("size,dropped", [(30, "6 pixel rows and 6 columns"), ((32, 30), "6 columns")])
def test_img_size_not_covered_by_patches_warns(size, dropped):
    with pytest.warns(UserWarning, match=f"border.*{dropped}.*img_size="):
        model = create_backbone("vim_tiny", depth=1, img_size=size, patch_size=8, stride=8)
    assert model.grid_size[1] == 3
    with pytest.warns(UserWarning, match="last 1 pixel row"):
        create_backbone("vim_tiny", depth=1, img_size=(29, 32), patch_size=4, stride=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # whole patches, overlapping ones too: silent
        create_backbone("vim_tiny", depth=1, img_size=32, patch_size=8, stride=4)
        create_backbone("vim_fmnist", depth=1)


def test_scan_backend_switch_gives_same_outputs():
    model = create_backbone("vim_tiny", depth=2, img_size=32, patch_size=8, stride=8, scan_backend="reference").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(images)
        model.scan_backend = "recompute"
        assert all(b.mixer.scan_backend == "recompute" for b in model.layers)
        torch.testing.assert_close(model(images), ref, rtol=1e-5, atol=1e-6)


def test_low_precision_autocast_runs():
    model = create_backbone("vim_tiny", depth=2, img_size=32, patch_size=8, stride=8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_fashion_mnist_preset():
    model = create_backbone("vim_fmnist")
    assert (model.num_patches + 1, model.num_classes, model.patch_embed.img_size) == (50, 10, (28, 28))
    assert model.patch_embed.proj.in_channels == 1 and len(model.layers) == 8 and model.embed_dim == 96
    assert create_backbone("vim_fmnist", num_classes=3).num_classes == 3
    assert create_backbone("vim_tiny", depth=1).num_classes == 1000    # the ImageNet presets keep 1000
