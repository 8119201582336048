"""Checkpoints as users bring them (issue 13): other patch grids, EMA and wrapper layouts."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from vimerge.models import create_backbone
from vimerge.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint

# 32 px / 8 px patches, stride 8: a 4 x 4 grid.
TINY = dict(depth=2, img_size=32, patch_size=8, stride=8, num_classes=5, scan_backend="reference")


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return create_backbone("vim_tiny", **{**TINY, **overrides}).eval()


def same_weights(a: dict, b: dict, skip=()) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k not in skip)


@pytest.fixture(scope="module")
def source():
    return tiny(seed=0)


@pytest.fixture(scope="module")
def shifted(source):
    """Other weights of the same shapes (stand-in for the averaged ones)."""
    return {k: v + 1 for k, v in source.state_dict().items()}


# --------------------------------------------------------------------------- item 3: patch grids


def test_other_stride_checkpoint_is_refused_with_the_fix(tmp_path):
    """The official stride-8 "+" Vim (27x27 grid, 730 rows) into the stride-16 vim_tiny."""
    torch.manual_seed(0)
    plus = create_backbone("vim_tiny", depth=1, stride=8, num_classes=10)
    assert plus.pos_embed.shape[1] == 730
    path = save_checkpoint(plus, tmp_path / "vim_t_plus.pth")
    model = create_backbone("vim_tiny", depth=1, num_classes=10)
    before = model.pos_embed.detach().clone()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert "vim_t_plus.pth" in msg and "27x27" in msg and "14x14" in msg
    assert "stride=8" in msg and "(224-16)/(27-1) = 8" in msg
    assert torch.equal(model.pos_embed, before)                 # nothing squeezed in
    # non-strict: the position embedding is left out (reported), with the same advice
    with pytest.warns(UserWarning, match=r"stride=8"):
        report = load_checkpoint(model, path, strict=False)
    assert "pos_embed" in report["mismatched"] and not report["resized_pos_embed"]
    assert torch.equal(model.pos_embed, before)
    # built as the message says, it loads exactly
    fixed = create_backbone("vim_tiny", depth=1, num_classes=10, stride=8, checkpoint=str(path))
    assert torch.equal(fixed.pos_embed, plus.pos_embed)


def test_other_stride_at_tiny_sizes_both_ways(tmp_path):
    path = save_checkpoint(tiny(stride=4), tmp_path / "s4.pth")       # 7x7 grid at 32 px
    with pytest.raises(CheckpointError, match=r"7x7.*4x4.*stride=4, since \(32-8\)/\(7-1\) = 4"):
        load_checkpoint(tiny(), path)
    path = save_checkpoint(tiny(), tmp_path / "s8.pth")               # 4x4 grid at 32 px
    with pytest.raises(CheckpointError, match=r"stride=8, since \(32-8\)/\(4-1\) = 8"):
        load_checkpoint(tiny(stride=4), path)


@pytest.mark.parametrize("ckpt_size,model_size,old,new", [(48, 32, "6x6", "4x4"), (32, 56, "4x4", "7x7")])
def test_resolution_change_is_resampled_and_announced(ckpt_size, model_size, old, new, tmp_path):
    """The 224 -> 384 kind: the checkpoint's grid is the model's geometry at another img_size."""
    src = tiny(img_size=ckpt_size)
    path = save_checkpoint(src, tmp_path / "ck.pth")
    model = tiny(seed=3, img_size=model_size)
    with pytest.warns(UserWarning) as record:
        report = load_checkpoint(model, path)
    msg = " ".join(str(w.message) for w in record)
    assert f"{old} patch grid" in msg and f"img_size {ckpt_size}" in msg
    assert "resampled" in msg and f"{new} grid" in msg and f"img_size {model_size}" in msg
    assert report["resized_pos_embed"] is True
    assert report["pos_embed_grid"] == (tuple(src.grid_size), tuple(model.grid_size))
    assert same_weights(src.state_dict(), model.state_dict(), skip={"pos_embed"})


def test_same_grid_loads_without_a_word(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "ok.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_checkpoint(tiny(seed=2), path)
    assert report["resized_pos_embed"] is False


# --------------------------------------------------------------------------- item 6: EMA and wrappers


def test_averaged_model_state_dict_loads(source, tmp_path):
    """torch.optim.swa_utils.AveragedModel: ``module.`` prefix plus an ``n_averaged`` entry."""
    swa = AveragedModel(source)
    swa.update_parameters(source)
    sd = swa.state_dict()
    assert "n_averaged" in sd and any(k.startswith("module.") for k in sd)
    torch.save(sd, tmp_path / "swa.pth")
    torch.save({"model_ema": sd, "epoch": 4}, tmp_path / "swa_nested.pth")
    for name in ("swa.pth", "swa_nested.pth"):
        model = tiny(seed=7)
        report = load_checkpoint(model, tmp_path / name)
        assert same_weights(source.state_dict(), model.state_dict())
        assert report["ignored"] == ["n_averaged"]
    assert read_state_dict(tmp_path / "swa.pth").keys() == source.state_dict().keys()
    model = create_backbone("vim_tiny", checkpoint=str(tmp_path / "swa.pth"), **TINY)
    assert same_weights(source.state_dict(), model.state_dict())


def test_compiled_and_ddp_wrappers(source, tmp_path):
    sd = source.state_dict()
    for prefix in ("_orig_mod.", "module._orig_mod.", "module.module."):
        torch.save({f"{prefix}{k}": v for k, v in sd.items()}, tmp_path / "w.pth")
        model = tiny(seed=7)
        load_checkpoint(model, tmp_path / "w.pth")
        assert same_weights(sd, model.state_dict()), prefix


def test_timm_layout_online_by_default_ema_on_request(source, shifted, tmp_path):
    sd = source.state_dict()
    torch.save({"state_dict": sd, "state_dict_ema": shifted, "epoch": 9}, tmp_path / "timm.pth")
    model = tiny(seed=7)
    with pytest.warns(UserWarning, match=r"'state_dict'.*'state_dict_ema'.*ema=True"):
        report = load_checkpoint(model, tmp_path / "timm.pth")
    assert same_weights(sd, model.state_dict())
    assert report["weights"] == "state_dict" and report["ema"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # an explicit choice is not warned about
        report = load_checkpoint(model, tmp_path / "timm.pth", ema=True)
        assert same_weights(shifted, model.state_dict())
        assert report["weights"] == "state_dict_ema" and report["ema"] is True
        load_checkpoint(model, tmp_path / "timm.pth", ema=False)
        assert same_weights(sd, model.state_dict())


@pytest.mark.parametrize("wrapped", [True, False])
def test_vimerge_final_layout(source, shifted, tmp_path, wrapped):
    """``final.pth``: {"model": ..., "model_ema": ...} (EMA flat, or the EMA helper's {"weights": ...})."""
    ema = {"weights": shifted, "decay": 0.99, "updates": 12} if wrapped else shifted
    path = save_checkpoint(source, tmp_path / "final.pth", model_ema=ema, reduction="none",
                           arch={"name": "vim_tiny", "kwargs": {}})
    model = tiny(seed=7)
    with pytest.warns(UserWarning, match=r"loaded the online weights \('model'\)"):
        load_checkpoint(model, path)
    assert same_weights(source.state_dict(), model.state_dict())
    report = load_checkpoint(model, path, ema=True)
    assert same_weights(shifted, model.state_dict())
    assert report["weights"] == ("model_ema/weights" if wrapped else "model_ema")
    assert torch.equal(read_state_dict(path, ema=True)["pos_embed"], shifted["pos_embed"])


def test_flat_file_with_online_and_ema_prefixes(source, shifted, tmp_path):
    """Lightning-style: one flat dict, the model under ``model.``, its average under ``ema.``."""
    sd = source.state_dict()
    flat = {**{f"model.{k}": v for k, v in sd.items()}, **{f"ema.{k}": v for k, v in shifted.items()},
            "ema.num_updates": torch.tensor(40), "step": torch.tensor(40)}
    torch.save({"state_dict": flat, "global_step": 40}, tmp_path / "lightning.ckpt")
    model = tiny(seed=7)
    with pytest.warns(UserWarning, match=r"'state_dict/model\.'.*'state_dict/ema\.'"):
        report = load_checkpoint(model, tmp_path / "lightning.ckpt")
    assert same_weights(sd, model.state_dict()) and report["weights"] == "state_dict/model."
    report = load_checkpoint(model, tmp_path / "lightning.ckpt", ema=True)
    assert same_weights(shifted, model.state_dict()) and report["weights"] == "state_dict/ema."
    assert not report["unexpected"]


def test_ema_requested_but_absent_names_what_is_there(source, tmp_path):
    path = save_checkpoint(source, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain.pth.*no EMA weights.*'model'"):
        load_checkpoint(tiny(), path, ema=True)
    torch.save({"model_ema": source.state_dict()}, tmp_path / "only_ema.pth")
    with pytest.raises(CheckpointError, match=r"only_ema.pth.*only EMA weights.*'model_ema'"):
        load_checkpoint(tiny(), tmp_path / "only_ema.pth", ema=False)
    report = load_checkpoint(tiny(), tmp_path / "only_ema.pth")       # the only weights: taken, and said
    assert report["weights"] == "model_ema" and report["ema"] is True


def test_real_mismatch_is_still_reported(source, tmp_path):
    """Bookkeeping is skipped, but a stray tensor that is not a scalar still fails strict loading."""
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    sd["module.extra.weight"] = torch.zeros(3, 3)
    sd["n_averaged"] = torch.tensor(3)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(1\): extra.weight"):
        load_checkpoint(tiny(), tmp_path / "odd.pth")
