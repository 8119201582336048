"""Weights that carry their model and reduction come back as they were trained (issue 13, item 2):
``vimerge.create_model(checkpoint=...)`` and every command that builds a model."""

import json
import logging
import warnings

import pytest
import torch

import vimerge
from conftest import write_fashion_idx
from vimerge.cli import build_parser, main
from vimerge.cli.retrain import config_from_args

ARCH = {"name": "vim_fmnist", "kwargs": {"depth": 3, "embed_dim": 16, "num_classes": 10, "img_size": [28, 28]}}


def retrained(tmp_path, reduction="rmeeto:r=6,interval=1", name="final.pth"):
    """A checkpoint in the layout vimerge retrain writes: weights, "arch" and "reduction"."""
    torch.manual_seed(3)
    model = vimerge.models.create_backbone("vim_fmnist", depth=3, embed_dim=16)
    return vimerge.save_checkpoint(model, tmp_path / name, arch=ARCH, reduction=reduction), model


def test_create_model_restores_model_and_reduction(tmp_path, caplog):
    path, trained = retrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vimerge"):
        model = vimerge.create_model(checkpoint=path)            # no name: the recorded preset
    assert model.preset_name == "vim_fmnist" and model.depth == 3 and model.embed_dim == 16
    assert vimerge.reduce.spec_of(model.reduction) == "rmeeto:r=6,interval=1"
    assert vimerge.token_counts(model) == [50, 44, 38]
    assert "re-trained with: rmeeto:r=6,interval=1" in caplog.text          # announced
    x = torch.randn(2, 1, 28, 28)
    vimerge.apply(trained, "rmeeto:r=6,interval=1")
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained.eval()(x))


def test_an_explicit_reduction_overrides_and_says_so(tmp_path, caplog):
    path, _ = retrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vimerge"):
        model = vimerge.create_model("vim_fmnist", checkpoint=path, reduce="none")
    assert model.reduction is None and vimerge.token_counts(model) == [50, 50, 50]
    assert "re-trained with rmeeto:r=6,interval=1; using none as asked" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vimerge"):
        same = vimerge.create_model(checkpoint=path, reduce="rmeeto:interval=1,r=6")   # same spec, other order
    assert vimerge.token_counts(same) == [50, 44, 38] and caplog.text == ""


def test_plain_weights_stay_unreduced_without_a_word(tmp_path, caplog):
    model = vimerge.models.create_backbone("vim_fmnist", depth=3, embed_dim=16)
    path = vimerge.save_checkpoint(model, tmp_path / "plain.pth")
    with caplog.at_level(logging.WARNING, logger="vimerge"):
        again = vimerge.create_model("vim_fmnist", checkpoint=path, depth=3, embed_dim=16)
    assert again.reduction is None and caplog.text == ""
    with pytest.raises(ValueError, match="give a model name"):
        vimerge.create_model(checkpoint=path)


def test_old_checkpoints_with_a_method_dict_and_stm_ratio(tmp_path):
    # written before specs: STM's old "ratio" (tokens gone at the end) is today's final_ratio
    path, _ = retrained(tmp_path, reduction={"method": "stm", "options": {"ratio": 0.2, "per_side": 5, "hsp": False}})
    model = vimerge.create_model(checkpoint=path)
    assert vimerge.reduce.spec_of(model.reduction) == "stm:final_ratio=0.2,per_side=5,hsp=false"
    assert vimerge.token_counts(model) == [50, 40, 40]            # 10 of 50 tokens gone in block 1


@pytest.mark.parametrize("verb", ["flops", "eval"])
def test_commands_use_the_recorded_reduction(tmp_path, capsys, verb):
    path, _ = retrained(tmp_path)
    write_fashion_idx(tmp_path, 8)
    extra = ["--data", str(tmp_path), "--no-progress"] if verb == "eval" else []
    assert main([verb, "--checkpoint", str(path), "--json", *extra]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reduce"] == "rmeeto:r=6,interval=1" and out["token_counts"] == [50, 44, 38]
    assert main([verb, "--checkpoint", str(path), "--json", "--reduce", "none", *extra]) == 0
    assert json.loads(capsys.readouterr().out)["token_counts"] == [50, 50, 50]


def test_safetensors_keep_the_recorded_model_and_reduction(tmp_path):
    pytest.importorskip("safetensors")
    model = vimerge.models.create_backbone("vim_fmnist", depth=3, embed_dim=16)
    path = vimerge.save_checkpoint(model, tmp_path / "w.safetensors", arch=ARCH, reduction="prune:r=3,interval=1")
    again = vimerge.create_model(checkpoint=path)
    assert again.depth == 3 and vimerge.reduce.spec_of(again.reduction) == "prune:r=3,interval=1"


def test_fallback_and_pretrained_without_a_name():
    model = vimerge.create_model(pretrained=True, fallback="vim_fmnist")      # the shipped weights
    assert model.preset_name == "vim_fmnist" and model.reduction is None


def test_ema_weights_flag_and_argument(tmp_path, capsys):
    model = vimerge.models.create_backbone("vim_fmnist", depth=2, embed_dim=16)
    online = model.state_dict()
    averaged = {k: v + 1.0 if v.is_floating_point() else v for k, v in online.items()}
    path = tmp_path / "both.pth"
    torch.save({"state_dict": online, "state_dict_ema": averaged}, path)
    ema = vimerge.create_model("vim_fmnist", depth=2, embed_dim=16, checkpoint=path, ema=True)
    assert torch.equal(ema.state_dict()["norm_f.weight"], averaged["norm_f.weight"])
    common = ["flops", "--model", "vim_fmnist", "--set", "depth=2", "--set", "embed_dim=16", "--checkpoint", str(path)]
    with pytest.warns(UserWarning, match="--ema-weights"):   # the warning names the flag
        assert main(common) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*common, "--ema-weights"]) == 0


def test_retrain_starts_from_what_the_checkpoint_records(tmp_path):
    path, _ = retrained(tmp_path)
    args = build_parser().parse_args(["retrain", "--checkpoint", str(path), "--data", str(tmp_path), "-o",
                                      str(tmp_path / "run")])
    config = config_from_args(args)
    assert config.model == "vim_fmnist" and config.model_kwargs["depth"] == 3 and config.reduce == "rmeeto:r=6,interval=1"
    args = build_parser().parse_args(["retrain", "--checkpoint", str(path), "--data", str(tmp_path), "--reduce", "none",
                                      "--set", "depth=3", "-o", str(tmp_path / "run")])
    assert config_from_args(args).reduce == "none"
