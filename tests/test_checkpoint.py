"""Checkpoint reading, adaptation (position embedding, head), errors and writing."""

from __future__ import annotations

import argparse
import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from vimerge.models import create_backbone
from vimerge.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from vimerge.models.layers import resample_pos_embed

# 32 px / 8 px patches: a 4 x 4 grid, 17 tokens, class token at index 8.
TINY = dict(depth=2, img_size=32, patch_size=8, stride=8, num_classes=5, scan_backend="reference")


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_backbone("vim_tiny", **{**TINY, **overrides}).eval()


def assert_same_weights(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in skip:
            assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def source():
    return tiny(seed=0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- round trips


def _write(kind, model, path):
    sd = model.state_dict()
    if kind == "official":
        torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
                    "args": argparse.Namespace(lr=5e-4, model="vim_tiny")}, path)
    elif kind == "plain":
        torch.save(sd, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif kind == "ddp":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)


@pytest.mark.parametrize("kind,suffix", [("official", ".pth"), ("plain", ".bin"),
                                         ("safetensors", ".safetensors"), ("ddp", ".pt")])
def test_round_trip(kind, suffix, source, images, tmp_path):
    path = tmp_path / f"ckpt{suffix}"
    _write(kind, source, path)
    torch.manual_seed(123)  # another init, so equality comes from the checkpoint
    loaded = create_backbone("vim_tiny", checkpoint=str(path), **TINY).eval()
    assert not torch.equal(tiny(seed=123).pos_embed, source.pos_embed)
    assert_same_weights(source, loaded)
    with torch.no_grad():
        assert torch.equal(source(images), loaded(images))


def test_nested_keys_preference(source, tmp_path):
    sd = source.state_dict()
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model_ema": ema, "model": sd}, tmp_path / "both.pth")
    torch.save({"model_ema": ema, "epoch": 3}, tmp_path / "ema.pth")
    torch.save({"state_dict": sd}, tmp_path / "sd.pth")
    with pytest.warns(UserWarning, match=r"online weights \('model'\) and EMA weights \('model_ema'\)"):
        assert torch.equal(read_state_dict(tmp_path / "both.pth")["pos_embed"], sd["pos_embed"])
    assert torch.equal(read_state_dict(tmp_path / "both.pth", ema=True)["pos_embed"], ema["pos_embed"])
    assert torch.equal(read_state_dict(tmp_path / "ema.pth")["pos_embed"], ema["pos_embed"])
    assert read_state_dict(tmp_path / "sd.pth").keys() == sd.keys()


def test_save_checkpoint_layouts(source, tmp_path):
    official = save_checkpoint(source, tmp_path / "a.pth", epoch=7)
    obj = torch.load(official, weights_only=True)
    assert set(obj) == {"model", "epoch"} and obj["epoch"] == 7
    plain = torch.load(save_checkpoint(source, tmp_path / "b.pth", official=False),
                       weights_only=True)
    assert plain.keys() == source.state_dict().keys()
    save_checkpoint(source, tmp_path / "c.safetensors")
    for name in ("a.pth", "b.pth", "c.safetensors"):
        model = tiny(seed=5)
        report = load_checkpoint(model, tmp_path / name)
        assert report["missing"] == report["unexpected"] == report["mismatched"] == []
        assert_same_weights(source, model)
    save_checkpoint(tiny(seed=9), tmp_path / "a.pth")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth", "c.safetensors"]
    with pytest.raises(ValueError):
        save_checkpoint(source, tmp_path / "d.pth", official=False, epoch=1)


# --------------------------------------------------------------------------- position embedding


def _keys_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D cubic convolution (Keys, a = -0.75), half-pixel centres,
    edge samples replicated: an implementation independent of F.interpolate."""
    def w(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        src = (d + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        for i in range(i0 - 1, i0 + 3):
            m[d, min(max(i, 0), n_in - 1)] += w(src - i)
    return m


def _pos_embed_from_grid(grid: torch.Tensor, cls_row: torch.Tensor) -> torch.Tensor:
    """(h, w, E) patch grid + (E,) class row -> (1, h*w + 1, E), class token in the middle."""
    flat = grid.reshape(-1, grid.shape[-1])
    mid = flat.shape[0] // 2
    return torch.cat((flat[:mid], cls_row[None], flat[mid:]))[None]


def test_resample_same_grid_is_identity():
    pe = torch.randn(1, 17, 8)
    assert resample_pos_embed(pe, (4, 4), cls_index_old=8, cls_index_new=8) is pe
    model = tiny()
    report = load_checkpoint(model, model.state_dict())
    assert report["resized_pos_embed"] is False


@pytest.mark.parametrize("old,new", [((8, 8), (12, 12)), ((4, 4), (6, 6)), ((6, 6), (3, 5))])
def test_resample_matches_independent_bicubic(old, new):
    E = 3
    r = torch.arange(old[0], dtype=torch.float32)[:, None, None]
    c = torch.arange(old[1], dtype=torch.float32)[None, :, None]
    grid = torch.cat((2 * r + 3 * c + 1 + 0 * c, (r - 2) ** 2 + 0 * c, torch.sin(r + 0.5 * c)), -1)
    cls_row = torch.tensor([1000.0, -1000.0, 7.0])
    pe = _pos_embed_from_grid(grid, cls_row)

    out = resample_pos_embed(pe, new, cls_index_old=old[0] * old[1] // 2, cls_index_new=new[0] * new[1] // 2)
    n_new = new[0] * new[1]
    assert out.shape == (1, n_new + 1, E)
    assert torch.equal(out[0, n_new // 2], cls_row)          # class row moved, not interpolated
    patches = torch.cat((out[0, :n_new // 2], out[0, n_new // 2 + 1:])).reshape(*new, E)

    mr, mc = _keys_cubic_matrix(old[0], new[0]), _keys_cubic_matrix(old[1], new[1])
    expected = torch.einsum("ai,ije,bj->abe", mr, grid.double(), mc).float()
    torch.testing.assert_close(patches, expected, atol=1e-5, rtol=1e-5)
    by_hand = F.interpolate(grid.permute(2, 0, 1)[None], size=new, mode="bicubic",
                            align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(patches, by_hand, atol=0, rtol=0)
    assert patches.abs().max() < 999                          # the class row leaked nowhere


def test_resample_constant_stays_constant():
    pe = torch.full((1, 65, 4), 0.25)
    pe[0, 32] = 9.0
    out = resample_pos_embed(pe, (5, 7), cls_index_old=32, cls_index_new=17)
    assert torch.equal(out[0, 17], torch.full((4,), 9.0))
    torch.testing.assert_close(torch.cat((out[0, :17], out[0, 18:])), torch.full((35, 4), 0.25))


def test_load_into_higher_resolution(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "ck32.pth")
    with pytest.warns(UserWarning, match=r"4x4 patch grid.*resampled.*6x6 grid \(img_size 48\)"):
        big = create_backbone("vim_tiny", checkpoint=str(path), **{**TINY, "img_size": 48}).eval()
    assert big.pos_embed.shape == (1, 37, 192) and big.cls_index == 18
    assert torch.equal(big.pos_embed[0, 18], source.pos_embed[0, 8])
    assert_same_weights(source, big, skip={"pos_embed"})
    with torch.no_grad():
        out = big(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_non_square_checkpoint_grid_is_an_error(tmp_path):
    rect = tiny(img_size=(32, 48))                            # 4 x 6 grid: 24 patches
    path = save_checkpoint(rect, tmp_path / "rect.pth")
    with pytest.raises(CheckpointError, match="not a square"):
        load_checkpoint(tiny(), path)


# --------------------------------------------------------------------------- head


def test_head_for_other_classes_is_reinitialised(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "five.pth")
    fresh = tiny(seed=3, num_classes=7)
    head = fresh.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="reinitialised the head for 7 classes"):
        report = load_checkpoint(fresh, path)
    assert report["reinitialized_head"] and not report["missing"]
    assert torch.equal(fresh.head.weight, head)
    sa, sb = source.state_dict(), fresh.state_dict()
    for k in sb:
        if not k.startswith("head."):
            assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth.*does not exist"):
        create_backbone("vim_tiny", checkpoint=str(tmp_path / "nothere.pth"), **TINY)


def test_truncated_file(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "cut.pth")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated or corrupt") as info:
        read_state_dict(path)
    assert info.value.__cause__ is not None


def test_truncated_safetensors(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated or corrupt"):
        read_state_dict(path)


def test_truncated_legacy_pickle(source, tmp_path):
    path = tmp_path / "old.pth"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="old.pth.*truncated or corrupt"):
        read_state_dict(path)


def test_safetensors_recognised_by_content(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "w.safetensors")
    misnamed = path.rename(tmp_path / "w.bin")
    assert read_state_dict(misnamed).keys() == source.state_dict().keys()


def test_text_file(tmp_path):
    path = tmp_path / "page.pth"
    path.write_text("<html><body>Access denied</body></html>\n")
    with pytest.raises(CheckpointError, match="page.pth.*not a PyTorch checkpoint.*text file"):
        read_state_dict(path)


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth.*empty"):
        read_state_dict(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="directory"):
        read_state_dict(tmp_path)


def test_pickle_without_tensors(tmp_path):
    torch.save({"epoch": 3, "best_acc": 76.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="meta.pth.*no tensors.*'epoch'"):
        read_state_dict(tmp_path / "meta.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth.*not a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_unsafe_pickle_is_refused_with_advice(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "obj": types.SimpleNamespace(a=1)},
               tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="unsafe.pth.*weights_only=False"):
        read_state_dict(tmp_path / "unsafe.pth")


def test_wrong_model_width_names_the_preset(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "tiny.pth")
    small = create_backbone("vim_small", **TINY)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small, path)
    msg = str(info.value)
    assert "tiny.pth" in msg and "embed_dim 192" in msg and "embed_dim 384" in msg
    assert "create_model('vim_tiny'" in msg and "depth=2" in msg
    assert "... and 30 more" in msg                            # listings are capped


def test_wrong_depth_is_explained(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "d2.pth")
    with pytest.raises(CheckpointError, match=r"2 blocks \(the model: 3 blocks\)"):
        load_checkpoint(tiny(depth=3), path)


def test_missing_and_unexpected_keys(source, tmp_path):
    sd = dict(source.state_dict())
    del sd["norm_f.weight"]
    sd["extra.thing"] = torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny(), tmp_path / "odd.pth")
    msg = str(info.value)
    assert "odd.pth" in msg and "strict=False" in msg
    assert "missing from the checkpoint (1): norm_f.weight" in msg
    assert "unexpected in the checkpoint (1): extra.thing" in msg

    model = tiny(seed=4)
    before = model.norm_f.weight.detach().clone()
    report = load_checkpoint(model, tmp_path / "odd.pth", strict=False)
    assert report["missing"] == ["norm_f.weight"] and report["unexpected"] == ["extra.thing"]
    assert torch.equal(model.norm_f.weight, before)
    assert_same_weights(source, model, skip={"norm_f.weight"})


def test_partial_load_into_deeper_model(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "d2.pth")
    deep = tiny(seed=6, depth=3)
    fresh_block = {k: v.clone() for k, v in deep.state_dict().items() if k.startswith("layers.2.")}
    report = load_checkpoint(deep, path, strict=False)
    assert sorted(report["missing"]) == sorted(fresh_block) and not report["unexpected"]
    sd = deep.state_dict()
    for k, v in source.state_dict().items():
        assert torch.equal(sd[k], v), k
    for k, v in fresh_block.items():
        assert torch.equal(sd[k], v), k
    report = load_checkpoint(create_backbone("vim_small", **TINY), path, strict=False)
    assert "pos_embed" in report["mismatched"]


def test_not_a_vim_checkpoint(tmp_path):
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(6, 2),
                          "cls_token": torch.zeros(1, 1, 2)}}, tmp_path / "deit.pth")
    with pytest.raises(CheckpointError, match="deit.pth.*not a Vision Mamba.*blocks"):
        load_checkpoint(tiny(), tmp_path / "deit.pth")


# --------------------------------------------------------------------------- hub URIs

HF = "hf://hustvl/Vim-tiny-midclstok/vim_t_midclstok_76p1acc.pth"


def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # import fails as if missing
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        create_backbone("vim_tiny", checkpoint=HF, **TINY)
    with pytest.raises(CheckpointError, match="huggingface_hub"):
        create_backbone("vim_tiny", pretrained=True, **TINY)


def _fake_hub(monkeypatch, download):
    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_hub_download_failure_is_explained(monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    _fake_hub(monkeypatch, offline)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(HF)
    msg = str(info.value)
    assert "could not download" in msg and "internet" in msg and "local path" in msg
    assert "https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/" in msg


def test_hub_download_success(monkeypatch, source, tmp_path):
    path = save_checkpoint(source, tmp_path / "vim_t.pth")
    calls = []

    def download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(path)
    _fake_hub(monkeypatch, download)
    model = tiny(seed=8)
    load_checkpoint(model, "hf://owner/repo@v1/sub/dir/vim_t.pth")
    assert calls == [("owner/repo", "sub/dir/vim_t.pth", "v1")]
    assert_same_weights(source, model)
    with pytest.raises(CheckpointError, match="malformed"):
        read_state_dict("hf://just-a-name")


def test_no_raw_warnings_on_clean_load(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "ok.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tiny(seed=2), path)


# --------------------------------------------------------------------------- grids compared as shapes (issue 25.5)

GRID_CASES = [("vim_tiny", dict(stride=8), 8, 8), ("deit_tiny", {}, 0, 0), ("videomamba_tiny", {}, 0, 0),
              ("mambar_small", dict(num_registers=3), None, None)]


@pytest.mark.parametrize("name,extra,cls_old,cls_new", GRID_CASES)
def test_a_grid_with_as_many_patches_is_still_resampled(name, extra, cls_old, cls_new, tmp_path):
    """A 4x4 checkpoint in a 2x8 model: the same 16 patch rows, another grid: resampled, announced."""
    kw = dict(depth=1, patch_size=8, embed_dim=24, num_classes=3, **extra)
    square = create_backbone(name, img_size=32, **kw)
    path = save_checkpoint(square, tmp_path / "square.pth")
    with pytest.warns(UserWarning, match=r"4x4 patch grid.*resampled.*2x8 grid"):
        wide = create_backbone(name, img_size=(16, 64), checkpoint=str(path), **kw)
    assert wide.grid_size == (2, 8) and wide.pos_embed.shape == square.pos_embed.shape
    want = resample_pos_embed(square.pos_embed.detach(), (2, 8), (4, 4), cls_index_old=cls_old, cls_index_new=cls_new)
    assert torch.equal(wide.pos_embed.detach(), want) and not torch.equal(want, square.pos_embed.detach())
    with pytest.warns(UserWarning, match="resampled"):
        report = load_checkpoint(wide, str(path))
    assert report["resized_pos_embed"] is True and report["pos_embed_grid"] == ((4, 4), (2, 8))
    with warnings.catch_warnings():                    # its own grid: loaded as it is, without a word
        warnings.simplefilter("error")
        assert load_checkpoint(square, str(path))["resized_pos_embed"] is False
