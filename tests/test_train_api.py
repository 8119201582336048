"""The training API's shape (issue 21 item 2, issue 25 items 6 and 7): the configuration checks its own
rules; one writer and one reader of the weights record; `vimerge retrain --checkpoint` reads the file
once; the run directory's lock; paths as str or os.PathLike, recorded as strings; last week's
spellings still work with a DeprecationWarning; `vimerge.__all__` is the README's list."""

import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vimerge
from conftest import easy_data, write_fashion_idx
from vimerge.cli import main
from vimerge.factory import WeightsRecord, read_weights
from vimerge.models import checkpoint as weights_io
from vimerge.models import create_backbone, pretrained_uri
from vimerge.train import RetrainConfig, RunDir, RunDirError, retrain
from vimerge.train.recipe import FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=2, embed_dim=16, patch_size=4, stride=4, in_chans=1)
README = Path(__file__).resolve().parent.parent / "README.md"


def tiny_config(out, **kw):
    base = dict(model="vim_tiny", model_kwargs=TINY, img_size=16, num_classes=3, scan_backend="reference",
                reduce="rmeeto:r=2,interval=1", batch_size=8, effective_batch=8, epochs=1, lr=1e-3,
                min_lr=1e-4, workers=0, output=out, progress=False, log_every=1)
    base.update(kw)
    return RetrainConfig(**base)


# ---------------------------------------------------------------------------------------------
# the configuration's own rules (what `vimerge retrain` refused alone before)


@pytest.mark.parametrize("values, needle", [
    (dict(ema_decay=0.9), "ema_decay= (--ema-decay) acts only with ema=True"),
    (dict(mixup=0.2), "mixup= (--mixup) acts only with augment='timm'"),
    (dict(distill="hard", distill_tau=2.0), "distill_tau= (--distill-tau) acts only with distill='soft'"),
    (dict(augment="none", hflip=0.2), "hflip= (--hflip) acts only with augmentation"),
    (dict(warmup_lr=1e-4), "warmup_lr= (--warmup-lr) acts only with a warm-up"),
    (dict(val_data=None, eval_limit=5), "eval_limit= (--limit) acts only with evaluation data"),
    (dict(accum_steps=2, effective_batch=64), "accum_steps= (--accum) and effective_batch="),
    (dict(distill="soft!"), "distill (--distill) must be one of none, soft, hard"),
])
def test_the_configuration_refuses_what_the_run_would_ignore(values, needle):
    with pytest.raises(ValueError) as caught:
        RetrainConfig(**values)
    assert needle in str(caught.value)


def test_given_means_different_from_the_recipe():
    # the preset recipe's own values count as not given; an explicit value through from_recipe does
    assert RetrainConfig.from_recipe("vim_fmnist", accum_steps=2).accum_steps == 2
    with pytest.raises(ValueError, match="give one"):
        RetrainConfig.from_recipe("vim_fmnist", accum_steps=2, effective_batch=64)
    # a value the rule allows passes: ema_decay with ema, mixup with timm's augmentation
    assert RetrainConfig(ema=True, ema_decay=0.9).ema_decay == 0.9
    assert RetrainConfig(augment="timm", mixup=0.2).mixup == 0.2


def test_every_flagged_field_is_on_the_command_line(capsys):
    """A field with a help text is a flag of vimerge retrain: one edit makes an option."""
    with pytest.raises(SystemExit):
        main(["retrain", "--help"])
    text = capsys.readouterr().out
    flagged = [f for f in FLAGS if RetrainConfig.__dataclass_fields__[f].metadata.get("help")]
    assert len(flagged) >= 30
    for field in flagged:
        assert re.search(rf"(^|\s){re.escape(FLAGS[field])}(\s|,|$)", text, re.M), FLAGS[field]


# ---------------------------------------------------------------------------------------------
# the weights record: one writer, one reader; `vimerge retrain --checkpoint` reads the file once


def test_weights_record_round_trip(tmp_path):
    model = create_backbone("vim_tiny", num_classes=3, img_size=16, **TINY)
    vimerge.apply(model, "rmeeto:r=2,interval=1")
    record = WeightsRecord.of_model(model, "vim_tiny", dict(TINY, scan_backend="reference", drop_path_rate=0.1))
    assert record.kwargs == dict(TINY, num_classes=3, img_size=[16, 16])       # run-only arguments left out
    assert record.reduction == "rmeeto:r=2,interval=1"
    path = vimerge.save_checkpoint(model, tmp_path / "w.pth", **record.entries())
    assert read_weights(path).record == record
    assert read_weights(path).source == str(path)
    # weights without a record read as an empty one
    assert read_weights(vimerge.save_checkpoint(model, tmp_path / "plain.pth")).record == WeightsRecord()


def test_cli_retrain_reads_the_checkpoint_once(tmp_path, monkeypatch):
    data = tmp_path / "fm"
    data.mkdir()
    write_fashion_idx(data, 16, split="train")
    start = retrain(RetrainConfig(model="vim_fmnist", model_kwargs=dict(depth=2, embed_dim=16), scan_backend="reference",
                                  reduce="rmeeto:r=2,interval=1", batch_size=8, effective_batch=8, epochs=1,
                                  workers=0, output=tmp_path / "first", progress=False, val_data=None,
                                  data=data, augment="none"))
    reads = []
    real = weights_io._read_object
    monkeypatch.setattr(weights_io, "_read_object", lambda source: reads.append(os.fspath(source)) or real(source))
    out = tmp_path / "second"
    assert main(["retrain", "--checkpoint", start.final_checkpoint, "--data", str(data), "--val-data", "none",
                 "--batch-size", "8", "--effective-batch", "8", "--scan-backend", "reference",
                 "--workers", "0", "--no-progress", "--max-steps", "1", "-o", str(out)]) == 0
    assert reads == [start.final_checkpoint]
    # and it started from what the file records: model, arguments and reduction
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["model_kwargs"]["depth"], config["reduce"]) == (
        "vim_fmnist", 2, "rmeeto:r=2,interval=1")


# ---------------------------------------------------------------------------------------------
# the run directory's lock


def test_a_live_run_locks_its_directory_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import socket
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "live").mkdir()
        (tmp_path / "live" / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunDirError, match=f"in use by another run \\(process {holder.pid}"):
            retrain(tiny_config(tmp_path / "live"), train_data=easy_data(16))
        assert not (tmp_path / "live" / "config.json").exists()       # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and the run takes it over, and releases it at the end
    result = retrain(tiny_config(tmp_path / "live"), train_data=easy_data(16))
    assert result.status == "finished" and not (tmp_path / "live" / ".lock").exists()
    # held while the run writes
    seen = []
    retrain(tiny_config(tmp_path / "during"), train_data=easy_data(16),
            on_step=lambda info: seen.append((tmp_path / "during" / ".lock").read_text().split()[0]))
    assert seen == [str(os.getpid())] * 2
    run_dir = RunDir(tmp_path / "x")
    assert run_dir.open(resume=False, overwrite=False) == "fresh" and (tmp_path / "x" / ".lock").exists()
    run_dir.close()
    assert not (tmp_path / "x" / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# issue 25 item 6: paths as str or os.PathLike, recorded as strings


def test_pathlib_paths_end_to_end(tmp_path):
    data = tmp_path / "fm"
    data.mkdir()
    write_fashion_idx(data, 16, split="train")
    write_fashion_idx(data, 8, split="t10k")
    torch.manual_seed(0)
    start = vimerge.save_checkpoint(create_backbone("vim_fmnist", depth=2, embed_dim=16), tmp_path / "start.pth")
    assert isinstance(start, Path)
    out = tmp_path / "run"
    cfg = RetrainConfig(model="vim_fmnist", model_kwargs=dict(depth=2, embed_dim=16), scan_backend="reference",
                        checkpoint=start, data=data, val_data=data, output=out, reduce="rmeeto:r=2,interval=1",
                        batch_size=8, effective_batch=8, epochs=1, workers=0, progress=False, augment="none")
    assert (cfg.checkpoint, cfg.data, cfg.val_data, cfg.output) == (str(start), str(data), str(data), str(out))
    result = retrain(cfg)
    assert result.status == "finished" and (out / "final.pth").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["checkpoint"], config["data"], config["output"]) == (str(start), str(data), str(out))
    final = torch.load(out / "final.pth", weights_only=True)      # plain types only: strings
    assert final["config"]["checkpoint"] == str(start)
    start_event = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start_event["checkpoint"] == str(start)
    model = vimerge.load_retrained(out / "final.pth", scan_backend="reference")
    assert vimerge.reduce.spec_of(model.reduction) == "rmeeto:r=2,interval=1"
    assert RetrainConfig.from_dict(config) == cfg


def test_paths_in_saved_entries_are_strings(tmp_path):
    model = create_backbone("vim_fmnist", depth=1, embed_dim=8)
    path = vimerge.save_checkpoint(model, tmp_path / "w.pth", config={"data": tmp_path / "fm"},
                                   files=[tmp_path / "a", "b"], pair=(tmp_path, 1))
    saved = torch.load(path, weights_only=True)      # a PosixPath would not load with weights_only
    assert saved["config"] == {"data": str(tmp_path / "fm")}
    assert saved["files"] == [str(tmp_path / "a"), "b"] and saved["pair"] == (str(tmp_path), 1)


# ---------------------------------------------------------------------------------------------
# issue 25 item 7: last week's spellings, with a DeprecationWarning naming the new one


@pytest.mark.parametrize("old, new", [
    (dict(method="rmeeto", reduction={"r": 4}), "rmeeto:r=4"),
    (dict(method="rmeeto"), "rmeeto:r=11"),                        # the old default options
    (dict(reduction={"r": 5}), "rmeeto:r=5"),                      # the old default method
    (dict(method="none", reduction={}), "none"),
    (dict(method="stm", reduction={"ratio": 0.2, "per_side": 2}), "stm:per_side=2,final_ratio=0.2"),  # old ratio
])
def test_old_reduction_keywords_warn_and_give_the_same_config(old, new):
    with pytest.warns(DeprecationWarning, match=re.escape(f"reduce={new!r}")):
        cfg = RetrainConfig(epochs=2, **old)
    assert cfg == RetrainConfig(epochs=2, reduce=new)
    assert cfg.to_dict() == RetrainConfig(epochs=2, reduce=new).to_dict()
    with pytest.raises(ValueError, match="not both"):
        RetrainConfig(reduce="rmeeto:r=3", **old)


def test_moved_names_warn_and_are_the_new_ones():
    with pytest.warns(DeprecationWarning, match=r"vimerge\.models\.create_backbone"):
        old_create = vimerge.models.create_model
    assert old_create is create_backbone
    registry = importlib.import_module("vimerge.models.registry")
    with pytest.warns(DeprecationWarning, match=r"vimerge\.models\.create_backbone"):
        assert registry.create_model is create_backbone
    with pytest.warns(DeprecationWarning, match=re.escape("vimerge.models.pretrained_uri('vim_fmnist')")):
        assert registry.FMNIST_WEIGHTS == pretrained_uri("vim_fmnist")
    with pytest.warns(DeprecationWarning, match=re.escape("vimerge.models.pretrained_uri(name)")):
        hub = registry.HUB_WEIGHTS
    assert hub["vim_small"] == pretrained_uri("vim_small") and hub["vim_small"].startswith("hf://")
    with pytest.raises(AttributeError):
        getattr(registry, "no_such_name")  # noqa: B009
    sys.modules.pop("vimerge.train.checkpoint", None)
    with pytest.warns(DeprecationWarning, match=r"vimerge\.train\.rundir"):
        old_module = importlib.import_module("vimerge.train.checkpoint")
    assert old_module.load_retrained is vimerge.train.load_retrained
    assert old_module.prepare_run_dir is vimerge.train.rundir.prepare_run_dir


# ---------------------------------------------------------------------------------------------
# the public API in one place


def readme_api() -> list[str]:
    text = README.read_text()
    block = text[text.index("<!-- public-api"):text.index("<!-- /public-api -->")]
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", "\n".join(line.split(":")[0] for line in block.splitlines()
                                                              if line.startswith("- ")))


def test_the_readme_lists_vimerge_all_and_every_name_imports():
    assert sorted(readme_api()) == sorted(vimerge.__all__)
    assert len(set(vimerge.__all__)) == len(vimerge.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)       # no public name is a deprecated one
        namespace: dict = {}
        exec("from vimerge import *", namespace)
    assert all(name in namespace for name in vimerge.__all__)
    assert namespace["create_model"] is vimerge.factory.create_model
