"""Mamba-Reg (wangf3014/Mamba-Reg): the official key/shape table, the register placement of the
official ``get_cls_idx``, a float64 reference forward written here from the equations, the
registers kept by every reduction method, and the command line on a tiny Mamba-Reg."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vimerge
from vimerge.cli import main
from vimerge.models import create_backbone, model_defaults
from vimerge.models.mambar import register_positions
from vimerge.reduce import list_methods

# ----------------------------------------------------------------------------- the official table

OFFICIAL = {   # models_mamba.py: mambar_*_patch16_224 -> (embed_dim, depth, num_cls_tokens, cls_reduce)
    "mambar_tiny": (192, 24, 12, 1), "mambar_small": (384, 24, 12, 2),
    "mambar_base": (768, 24, 12, 4), "mambar_large": (1024, 48, 16, 8),
}


def official_keys(embed_dim: int, depth: int, regs: int, reduce: int, patches: int = 196, classes: int = 1000):
    """Every parameter of the official VisionMamba(rms_norm, residual_in_fp32, fused_add_norm,
    num_cls_tokens=regs, cls_reduce=reduce) with its shape, from models_mamba.py / mamba_custom.py
    (Mamba(biscan=True): d_inner = 2 E, dt_rank = ceil(E / 16), d_state 16, d_conv 4, conv bias,
    no in/out projection bias)."""
    E, di, R = embed_dim, 2 * embed_dim, math.ceil(embed_dim / 16)
    keys = {"cls_token": (1, regs, E), "pos_embed_cls": (1, regs, E), "pos_embed": (1, patches, E),
            "patch_embed.proj.weight": (E, 3, 16, 16), "patch_embed.proj.bias": (E,),
            "head.weight": (classes, E * (regs // reduce)), "head.bias": (classes,), "norm_f.weight": (E,)}
    if reduce > 1:
        keys.update({"neck.weight": (E // reduce, E), "norm_neck.weight": (E * regs // reduce,)})
    for i in range(depth):
        p = f"layers.{i}."
        keys[p + "norm.weight"] = (E,)
        keys[p + "mixer.in_proj.weight"] = (2 * di, E)
        keys[p + "mixer.out_proj.weight"] = (E, di)
        for s in ("", "_b"):
            keys[p + f"mixer.conv1d{s}.weight"] = (di, 1, 4)
            keys[p + f"mixer.conv1d{s}.bias"] = (di,)
            keys[p + f"mixer.x_proj{s}.weight"] = (R + 32, di)
            keys[p + f"mixer.dt_proj{s}.weight"] = (di, R)
            keys[p + f"mixer.dt_proj{s}.bias"] = (di,)
            keys[p + f"mixer.D{s}"] = (di,)
        keys[p + "mixer.A_log"] = (di, 16)
        keys[p + "mixer.A_b_log"] = (di, 16)
    return keys


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_presets_have_the_official_keys_and_shapes(name):
    with torch.device("meta"):                         # shapes only: mambar_large has 341M parameters
        model = create_backbone(name)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert mine == official_keys(*OFFICIAL[name])
    assert model.num_tokens == 196 + OFFICIAL[name][2]


def test_parameter_counts_match_the_paper():
    """The paper's model sizes (arXiv 2405.14858 abstract: the large model has 341M parameters)."""
    with torch.device("meta"):
        large = create_backbone("mambar_large")
    assert round(sum(p.numel() for p in large.parameters()) / 1e6) == 341


def test_an_official_checkpoint_layout_loads_strictly(tmp_path):
    """A file shaped like the released ones ({"model": state_dict}, the official names) at two blocks."""
    keys = official_keys(384, 2, 12, 2)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in keys.items()}
    torch.save({"model": state, "epoch": 19}, tmp_path / "mambar_small_patch16_224.pth")
    model = create_backbone("mambar_small", depth=2, checkpoint=str(tmp_path / "mambar_small_patch16_224.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(vimerge.CheckpointError, match="not a Mamba-Reg checkpoint"):
        create_backbone("mambar_small", depth=2, checkpoint=vimerge.save_checkpoint(
            create_backbone("vim_small", depth=2), tmp_path / "vim.pth"))


# ----------------------------------------------------------------------------- register placement


def official_cls_idx(H: int, W: int, n_cls: int):
    """utils.get_cls_idx of the official repository, rewritten: the gather order into
    [patches, registers] and the registers' positions."""
    n_tokens = H * W
    L = n_tokens // (n_cls + 1)
    grouped = torch.cat([torch.arange(L * n_cls).view(n_cls, -1),
                         torch.arange(n_tokens, n_tokens + n_cls).unsqueeze(-1)], dim=1).reshape(-1)
    token_idx = torch.cat([grouped, torch.arange(L * n_cls, n_tokens)])
    cls_pos = torch.arange(L, L * (n_cls + 1) + n_cls, L + 1)
    return token_idx.tolist(), cls_pos.tolist()


@pytest.mark.parametrize("grid,regs", [((14, 14), 12), ((14, 14), 16), ((4, 4), 3), ((3, 5), 14), ((2, 2), 4)])
def test_registers_sit_where_the_official_code_puts_them(grid, regs):
    order, positions = register_positions(grid[0] * grid[1], regs)
    assert (order, positions) == official_cls_idx(*grid, regs)
    if grid == (14, 14) and regs == 12:                  # 15 patches, a register, ..., 16 patches at the end
        assert positions == [15 + 16 * i for i in range(12)]


# ----------------------------------------------------------------------------- reference forward


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_direction(x, z, p, sfx):
    """One direction of the official Mamba mixer, token by token (x, z: (L, d_inner), float64)."""
    L, d = x.shape
    w, b = p[f"conv1d{sfx}.weight"][:, 0], p[f"conv1d{sfx}.bias"]            # (d, 4), (d,)
    k = w.shape[1]
    u = torch.zeros_like(x)
    for t in range(L):                                  # causal depthwise conv: taps t-3 .. t
        acc = b.clone()
        for j in range(k):
            s = t - (k - 1) + j
            if s >= 0:
                acc = acc + w[:, j] * x[s]
        u[t] = acc * torch.sigmoid(acc)
    R = p[f"dt_proj{sfx}.weight"].shape[1]
    n = p["A_log"].shape[1]
    A = -torch.exp(p["A_b_log" if sfx else "A_log"])
    h = torch.zeros(d, n, dtype=x.dtype)
    y = torch.zeros_like(x)
    for t in range(L):
        dbc = p[f"x_proj{sfx}.weight"] @ u[t]
        dt, Bt, Ct = dbc[:R], dbc[R:R + n], dbc[R + n:]
        delta = F.softplus(p[f"dt_proj{sfx}.weight"] @ dt + p[f"dt_proj{sfx}.bias"])      # (d,)
        h = torch.exp(delta[:, None] * A) * h + (delta * u[t])[:, None] * Bt[None, :]
        out = h @ Ct + p[f"D{sfx}"] * u[t]
        y[t] = out * (z[t] * torch.sigmoid(z[t]))
    return y


def reference_logits(state, image, patch, regs, reduce, depth):
    """The Mamba-Reg forward of one image (C, H, W) from its state dict, float64, loops only."""
    p64 = {k: v.double() for k, v in state.items()}
    conv_w, conv_b = p64["patch_embed.proj.weight"], p64["patch_embed.proj.bias"]
    C, H, W = image.shape
    patches = []
    for r in range(H // patch):                          # row-major patches through the conv kernel
        for c in range(W // patch):
            tile = image[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].double()
            patches.append((conv_w * tile).sum(dim=(1, 2, 3)) + conv_b)
    x = torch.stack(patches) + p64["pos_embed"][0]
    registers = p64["cls_token"][0] + p64["pos_embed_cls"][0]
    P = x.shape[0]
    every = P // (regs + 1)
    seq, where = [], []
    for i in range(regs):                                # the paper: registers evenly among the patches
        seq += list(x[i * every:(i + 1) * every])
        where.append(len(seq))
        seq.append(registers[i])
    seq += list(x[regs * every:])
    hidden, residual = torch.stack(seq), None
    for i in range(depth):
        q = {k[len(f"layers.{i}.mixer."):]: v for k, v in p64.items() if k.startswith(f"layers.{i}.mixer.")}
        residual = hidden if residual is None else residual + hidden
        normed = rms(residual, p64[f"layers.{i}.norm.weight"])
        xz = normed @ q["in_proj.weight"].T
        xs, z = xz.chunk(2, dim=-1)
        y_f = ref_direction(xs, z, q, "")
        y_b = ref_direction(xs.flip(0), z.flip(0), q, "_b").flip(0)
        hidden = ((y_f + y_b) / 2) @ q["out_proj.weight"].T
    out = rms(residual + hidden, p64["norm_f.weight"])[where]                  # (R, E)
    if reduce > 1:
        feat = rms((out @ p64["neck.weight"].T).reshape(-1), p64["norm_neck.weight"])
    else:
        feat = out.reshape(-1)
    return feat @ p64["head.weight"].T + p64["head.bias"]


@pytest.mark.parametrize("regs,reduce", [(3, 2), (4, 1)])
def test_forward_matches_the_reference(regs, reduce):
    torch.manual_seed(3)
    model = create_backbone("mambar_small", img_size=32, patch_size=8, embed_dim=16, depth=2, num_registers=regs,
                            cls_reduce=reduce, num_classes=5, scan_backend="reference").eval()
    with torch.no_grad():                               # make every parameter matter (zero init elsewhere)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(x).double()
    want = torch.stack([reference_logits(model.state_dict(), img, 8, regs, reduce, 2) for img in x])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- registers and reduction

SMALL = dict(depth=6, img_size=128, embed_dim=32)           # 64 patches + 12 registers = 76 tokens


@pytest.mark.parametrize("spec", [*(f"{m}:ratio=0.25" for m in list_methods()), "rmeeto:r=[0,31,0,0,0,0]",
                                  "prune:r=[0,31,0,0,0,0]", "rmeeto:ratio=0.3,grouping=random,shuffle_ratio=0.5",
                                  "rmeeto:ratio=0.25,metric=delta"])
def test_no_method_merges_or_drops_a_register(spec):
    model = create_backbone("mambar_small", **SMALL).eval()
    x = torch.randn(2, 3, 128, 128)
    vimerge.apply(model, spec)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = model.forward_tokens(x, track_source=True)
    assert state.num_tokens == vimerge.token_counts(model)[-1] < model.num_tokens
    start = model.protected
    assert len(state.kept) == 12 and list(state.kept) == sorted(state.kept)
    for reg, now in zip(start, state.kept):            # each register alone, in order, in its own slot
        assert torch.equal(state.source[:, now], F.one_hot(torch.tensor(reg), model.num_tokens).float().expand(2, -1))
    assert torch.equal(state.size[:, list(state.kept)], torch.ones(2, 12, 1))


def test_the_head_reads_the_registers_where_they_went():
    """A reduced model's logits: the head of the registers' final outputs, wherever merges moved them."""
    model = create_backbone("mambar_small", **SMALL, num_classes=4).eval()
    x = torch.randn(2, 3, 128, 128)
    vimerge.apply(model, "rmeeto:r=[0,31,0,0,0,0]")
    with torch.no_grad():
        state = model.forward_tokens(x)
        final = model.norm_f(state.residual + state.hidden)[:, list(state.kept)]
        want = model.head(model.norm_neck(model.neck(final).flatten(1)))
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert state.kept == (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 31, 34)   # protected_slots of (4, 9, ..., 59), 76 -> 45


def test_flops_count_the_registers_read_out():
    model = create_backbone("mambar_small", img_size=224)            # 196 + 12 tokens, E 384, head 2304
    blocks = model.flops([208] * 24) - model.flops([])
    vim = create_backbone("vim_small")                                # the same blocks, per token
    per_token = (vim.flops([197] * 24) - vim.flops([])) / 197
    assert blocks == pytest.approx(per_token * 208, rel=1e-3)         # conv1d's (N + 3) term differs only
    outer = 196 * 384 * 3 * 256 + 12 * 384 * 192 + 2304 * 1000           # patch embed, neck, head (paper)
    assert model.flops([]) == outer
    assert model.flops([], "full") == 2 * outer + 208 * 384 + 4 * 12 * 384 + 4 * 2304


# ----------------------------------------------------------------------------- the command line

TINY = ["--model", "mambar_small", "--set", "depth=4", "--set", "embed_dim=16", "--set", "num_registers=3",
        "--img-size", "32", "--set", "patch_size=8", "--num-classes", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and val/ image folders of two classes (dark, bright), 32 x 32 RGB, and tiny weights."""
    root = tmp_path_factory.mktemp("mambar")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label, name in enumerate(("dark", "bright")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = (torch.rand(32, 32, 3, generator=g) * 80 + 150 * label).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    torch.manual_seed(0)
    model = create_backbone("mambar_small", depth=4, embed_dim=16, num_registers=3, img_size=32, patch_size=8,
                            num_classes=2)
    vimerge.save_checkpoint(model, root / "tiny.pth")
    return root


def test_every_command_takes_a_mambar(folder, tmp_path, capsys):
    assert main(["flops", *TINY, "--reduce", "rmeeto:r=3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    model = create_backbone("mambar_small", depth=4, embed_dim=16, num_registers=3, img_size=32, patch_size=8,
                            num_classes=2)
    vimerge.apply(model, "rmeeto:r=3")
    assert row["token_counts"] == [19, 19, 16, 16] == vimerge.token_counts(model)
    assert row["gflops_paper"] * 1e9 == pytest.approx(vimerge.count_flops(model, "paper"), rel=1e-12)
    assert main(["eval", *TINY, "--checkpoint", str(folder / "tiny.pth"), "--data", str(folder / "val"),
                 "--reduce", "stm:final_ratio=0.2", "--no-progress", "--workers", "0", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["images"] == 4 and row["token_counts"][-1] < 19
    assert main(["bench", *TINY, "--ratios", "0,0.1", "--batch-size", "1", "--repeats", "1", "--device", "cpu",
                 "--json"]) == 0
    assert [r["ratio"] for r in json.loads(capsys.readouterr().out)] == [0.0, 0.1]
    out = tmp_path / "run"
    assert main(["retrain", *TINY, "--checkpoint", str(folder / "tiny.pth"), "--data", str(folder),
                 "--reduce", "rmeeto:r=3", "--epochs", "1", "--batch-size", "2", "--effective-batch", "2",
                 "--lr", "1e-3", "--output", str(out), "--no-progress", "--workers", "0", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "finished"
    assert main(["eval", "--checkpoint", str(out / "final.pth"), "--data", str(folder / "val"), "--no-progress",
                 "--workers", "0", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "mambar_small" and row["reduce"] == "rmeeto:r=3" and row["token_counts"] == [19, 19, 16, 16]
    png = tmp_path / "groups.png"
    assert main(["visualize", *TINY, "--reduce", "rmeeto:r=3", "--image", str(folder / "val" / "dark" / "0.png"),
                 "-o", str(png)]) == 0
    assert png.stat().st_size > 0
    assert model_defaults("mambar_small")["num_registers"] == 12
