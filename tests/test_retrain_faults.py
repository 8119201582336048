"""Re-training faults real users hit (issue 13): options that must act or be refused (item 1),
a truncated image in the training folder (5), Ctrl-C and --resume (9), the preset's recipe
(10), threads per process under torchrun on CPU (11), one split rule for a dataset root (12)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from conftest import easy_data, write_fashion_idx
from vimerge import save_checkpoint
from vimerge.cli import build_parser, main
from vimerge.cli import retrain as cli_retrain
from vimerge.data import ImageFolder, Skipped
from vimerge.models import create_backbone, get_preset, pretrained_uri
from vimerge.train import (
    BASE_RECIPE,
    NothingToResume,
    RetrainConfig,
    RetrainInterrupted,
    RunDirError,
    distributed,
    recipe_defaults,
    retrain,
)
from vimerge.train import epoch as train_epoch
from vimerge.train.data import collate_train, open_data

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=2, embed_dim=16, patch_size=4, stride=4, in_chans=1)
# the same two blocks on vim_fmnist's geometry (28x28 grey, 10 classes)
FM_TINY = ["--set", "depth=2", "--set", "embed_dim=16", "--scan-backend", "reference"]






def tiny_config(out, **kw):
    base = dict(model="vim_tiny", model_kwargs=TINY, img_size=16, num_classes=3,
                scan_backend="reference", reduce="rmeeto:r=2,interval=1,grouping=random,seed=1",
                batch_size=8, effective_batch=16, epochs=2, lr=2e-3, min_lr=1e-4, ema=True,
                drop_path=0.1, crop="pad", workers=0, output=str(out), progress=False, log_every=1)
    base.update(kw)
    return RetrainConfig(**base)


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def assert_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def log_events(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def parse(*argv):
    return build_parser().parse_args(list(argv))


def fmnist_dir(tmp_path, n_train=64, n_test=16):
    root = tmp_path / "fm"
    root.mkdir()
    write_fashion_idx(root, n_train, split="train")
    write_fashion_idx(root, n_test, split="t10k")
    return root


# ---------------------------------------------------------------------------------------------
# item 1: --pretrained acts; every option acts or is refused


def test_pretrained_starts_from_the_presets_weights(tmp_path, monkeypatch, capsys):
    # the preset's published weights, redirected to a small checkpoint of the same geometry
    torch.manual_seed(1)
    published = save_checkpoint(create_backbone("vim_fmnist", depth=2, embed_dim=16), tmp_path / "published.pth")
    monkeypatch.setattr(get_preset("vim_fmnist"), "pretrained", str(published))
    data = fmnist_dir(tmp_path)
    out = tmp_path / "run"
    argv = ["retrain", "--model", "vim_fmnist", *FM_TINY, "--pretrained", "--reduce", "none",
            "--data", str(data), "--val-data", "none", "--workers", "0", "--no-progress",
            "--lr", "1e-12", "--min-lr", "1e-12", "--weight-decay", "0", "-o", str(out)]
    assert main(argv) == 0
    assert "weights: " + str(published) in capsys.readouterr().err
    # the run's configuration says where the weights came from
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint"] == str(published) and config["pretrained"] is True
    assert [e for e in log_events(out) if e["event"] == "start"][0]["checkpoint"] == str(published)
    # and the run started from them (a learning rate of 1e-12 leaves them as they were)
    start, final = weights(published), weights(out / "final.pth")
    worst = max((start[k] - final[k]).abs().max().item() for k in start)
    assert worst < 1e-6, worst


def test_pretrained_in_the_library_and_its_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(get_preset("vim_fmnist"), "pretrained", str(tmp_path / "w.pth"))
    cfg = RetrainConfig(model="vim_fmnist", pretrained=True)
    assert cfg.checkpoint == str(tmp_path / "w.pth") == pretrained_uri("vim_fmnist")
    assert RetrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="not both"):
        RetrainConfig(model="vim_fmnist", pretrained=True, checkpoint="other.pth")
    monkeypatch.setattr(get_preset("vim_fmnist"), "pretrained", None)
    with pytest.raises(ValueError, match="no published weights"):
        RetrainConfig(model="vim_fmnist", pretrained=True)


def test_every_recipe_option_reaches_the_configuration():
    """Each recipe flag, given a value that no recipe has, lands in its RetrainConfig field."""
    values = {"--epochs": "7", "--batch-size": "5", "--effective-batch": "35", "--lr": "0.0123",
              "--min-lr": "0.00123", "--warmup-epochs": "0.7", "--warmup-lr": "0.0007",
              "--weight-decay": "0.07", "--clip-grad": "0.7", "--label-smoothing": "0.07",
              "--drop-path": "0.07", "--ema-decay": "0.97", "--distill-alpha": "0.7",
              "--distill-tau": "1.7", "--amp": "bf16", "--augment": "timm", "--crop": "rrc",
              "--hflip": "0.7", "--mixup": "0.7", "--cutmix": "0.7", "--reprob": "0.7"}
    argv = ["retrain", "-o", "x", "--ema", "--distill", "soft"]
    for flag, value in values.items():
        argv += [flag, value]
    cfg = cli_retrain.config_from_args(parse(*argv))
    for flag, (field, kwargs, _) in cli_retrain.RECIPE_FLAGS.items():
        if flag in values:
            expected = kwargs.get("type", str)(values[flag])
            assert getattr(cfg, field) == expected, flag
    assert cfg.ema is True and cfg.distill == "soft"
    # the flags left out above, one at a time
    assert cli_retrain.config_from_args(parse("retrain", "-o", "x", "--accum", "3")).accum_steps == 3
    assert cli_retrain.config_from_args(parse("retrain", "-o", "x", "--warmup-steps", "9")).warmup_steps == 9
    # every recipe field of every flag is covered by the table, and the table by the parser
    assert {f for f, _, _ in cli_retrain.RECIPE_FLAGS.values()} <= set(cli_retrain.PAPER)


@pytest.mark.parametrize("extra, needle", [
    (["--ema-decay", "0.9"], "ema_decay= (--ema-decay) acts only with ema=True (--ema)"),
    (["--distill-alpha", "0.3"], "distill_alpha= (--distill-alpha) acts only with distill="),
    (["--distill", "hard", "--distill-tau", "2"], "distill_tau= (--distill-tau) acts only with distill='soft'"),
    (["--warmup-lr", "1e-5"], "warmup_lr= (--warmup-lr) acts only with a warm-up"),
    (["--mixup", "0.2"], "mixup= (--mixup) acts only with augment='timm' (--augment timm)"),
    (["--reprob", "0.2"], "reprob= (--reprob) acts only with augment='timm'"),
    (["--augment", "none", "--crop", "pad"], "crop= (--crop) acts only with augmentation"),
    (["--augment", "none", "--hflip", "0.3"], "hflip= (--hflip) acts only with augmentation"),
    (["--accum", "2", "--effective-batch", "64"], "accum_steps= (--accum) and effective_batch= (--effective-batch)"),
    (["--warmup-steps", "2", "--warmup-epochs", "0.5"], "warmup_steps= (--warmup-steps) and warmup_epochs="),
    (["--val-data", "none", "--eval-limit", "5"], "eval_limit= (--limit) acts only with evaluation data"),
    (["--val-data", "none", "--limit", "5"], "eval_limit= (--limit) acts only with evaluation data"),
    (["--limit", "0"], "eval_limit (--limit) must be >= 1"),
    (["--resume", "--overwrite"], "resume (--resume) continues"),
    (["--pretrained", "--checkpoint", "w.pth"], "not both"),
])
def test_options_the_run_would_ignore_are_refused(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    code = main(["retrain", "--model", "vim_fmnist", "--data", str(tmp_path), "-o", str(out), *extra])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_crop_and_flip_refused_where_timm_does_them(tmp_path, capsys):
    for c in "ab":
        (tmp_path / "imgs" / c).mkdir(parents=True)
    code = main(["retrain", "--model", "vim_fmnist", "--data", str(tmp_path / "imgs"), "--augment", "timm",
                 "--hflip", "0.2", "-o", str(tmp_path / "run")])
    assert code == 2 and "timm's" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# item 10: the preset's re-training recipe


def test_the_preset_recipe_is_the_default_and_flags_win(capsys):
    cfg = cli_retrain.config_from_args(parse("retrain", "--model", "vim_fmnist", "-o", "x"))
    assert cfg.recipe == "preset:vim_fmnist"
    assert (cfg.lr, cfg.min_lr, cfg.batch_size, cfg.effective_batch, cfg.augment, cfg.label_smoothing,
            cfg.epochs) == (1e-3, 1e-5, 64, 64, "none", 0.1, 1)
    assert get_preset("vim_fmnist").retrain_recipe["lr"] == 1e-3
    # a flag the user gives wins over the recipe; --recipe paper restores the paper's defaults
    cfg = cli_retrain.config_from_args(parse("retrain", "--model", "vim_fmnist", "-o", "x", "--lr", "5e-4"))
    assert cfg.lr == 5e-4 and cfg.batch_size == 64
    paper = cli_retrain.config_from_args(parse("retrain", "--model", "vim_fmnist", "-o", "x", "--recipe", "paper"))
    assert (paper.recipe, paper.lr, paper.augment, paper.effective_batch) == ("paper", 2e-5, "light", 1024)
    # a preset without a recipe gets the paper's; vimerge train the from-scratch recipe
    tiny = cli_retrain.config_from_args(parse("retrain", "--model", "vim_tiny", "-o", "x"))
    assert (tiny.recipe, tiny.lr) == ("paper", 2e-5)
    base = cli_retrain.config_from_args(parse("train", "--model", "vim_fmnist", "-o", "x"))
    assert (base.recipe, base.lr, base.effective_batch, base.warmup_epochs) == (
        "base", BASE_RECIPE["lr"], BASE_RECIPE["effective_batch"], BASE_RECIPE["warmup_epochs"])
    # the library offers the same resolution
    assert recipe_defaults("vim_fmnist") == ("preset:vim_fmnist", get_preset("vim_fmnist").retrain_recipe)
    assert RetrainConfig.from_recipe("vim_fmnist", lr=2e-4).lr == 2e-4
    # --help shows each recipe's default
    with pytest.raises(SystemExit):
        main(["retrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    lr_help = text[text.index("peak learning rate"):text.index("final learning rate")]
    for part in ("2e-05 (paper)", "0.001 (vim_fmnist)", "0.001 (deit_fmnist)", "0.003 (train)"):
        assert part in lr_help, part


def test_the_run_says_which_recipe(tmp_path, capsys):
    data = fmnist_dir(tmp_path)
    out = tmp_path / "run"
    assert main(["retrain", "--model", "vim_fmnist", *FM_TINY, "--reduce", "none", "--data", str(data),
                 "--val-data", "none", "--workers", "0", "--no-progress", "--max-steps", "1",
                 "-o", str(out)]) == 0
    assert "recipe preset:vim_fmnist (lr 0.001" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["recipe"] == "preset:vim_fmnist"
    start = log_events(out)[0]
    assert (start["recipe"], start["lr"], start["per_device_batch"]) == ("preset:vim_fmnist", 1e-3, 64)


# ---------------------------------------------------------------------------------------------
# item 5: a truncated image in the training folder


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)
    return path


def test_truncated_image_in_the_training_folder(tmp_path, caplog):
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for label, value in enumerate((30, 220)):
            for i in range(8):
                _png(root / split / f"c{label}" / f"{i}.png", value + i)
    good = (root / "train" / "c0" / "0.png").read_bytes()
    (root / "train" / "c0" / "0.png").write_bytes(good[: len(good) // 2])     # truncated PNG
    folder = ImageFolder(root / "train")
    assert isinstance(folder[0], Skipped)
    cfg = tiny_config(tmp_path / "run", data=str(root), num_classes=None, reduce="rmeeto:r=2,interval=1",
                      epochs=1, ema=False, drop_path=None)
    with caplog.at_level("WARNING"):
        result = retrain(cfg)
    assert result.status == "finished" and result.global_step == 1
    assert result.eval_acc is not None                      # ROOT/val found by the split rule
    assert "0.png" in caplog.text and "unreadable" in caplog.text


def test_collate_train_tells_samples_apart_without_comparing_tensors():
    images = [torch.full((1, 4, 4), float(i)) for i in range(3)]
    skipped = Skipped("/data/bad.png", "OSError: truncated")
    batch = [(images[0], 0), skipped, (images[1], 1), None, (images[2], 2)]
    x, y = collate_train(batch)
    assert x.shape == (5, 1, 4, 4)
    assert y.tolist() == [0, 1, 2, 0, 1]                     # refilled from the readable ones
    torch.testing.assert_close(x[:3, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(RuntimeError, match="bad.png"):
        collate_train([skipped])


# ---------------------------------------------------------------------------------------------
# item 9: Ctrl-C and --resume


class InterruptAt(Dataset):
    """``base``, raising KeyboardInterrupt (a Ctrl-C) at the ``at``-th item read."""

    def __init__(self, base, at):
        self.base, self.at, self.reads = base, at, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            raise KeyboardInterrupt
        return self.base[i]


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    data = easy_data(48)        # 3 steps of 2 micro-batches of 8 per epoch, 2 epochs
    full = retrain(tiny_config(tmp_path / "full"), train_data=data)
    assert full.global_step == 6

    # Ctrl-C after step 4 (from the step hook), without --save-every
    def ctrl_c(info):
        if info["step"] == 4:
            raise KeyboardInterrupt
    with pytest.raises(RetrainInterrupted, match="resume") as caught:
        retrain(tiny_config(tmp_path / "hook"), train_data=data, on_step=ctrl_c)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.step == 4
    state = torch.load(tmp_path / "hook" / "last.pth", weights_only=True)
    assert state["progress"] == {"epoch": 1, "step_in_epoch": 1, "global_step": 4, "finished": False}
    assert log_events(tmp_path / "hook")[-1]["event"] == "interrupted"
    done = retrain(tiny_config(tmp_path / "hook", resume=True), train_data=data)
    assert done.status == "finished" and done.global_step == 6
    assert_identical(weights(tmp_path / "full" / "final.pth"), weights(tmp_path / "hook" / "final.pth"))
    assert_identical(weights(tmp_path / "full" / "final.pth", "model_ema"),
                     weights(tmp_path / "hook" / "final.pth", "model_ema"))

    # Ctrl-C in the middle of a step's accumulation (while reading micro-batch 2 of step 3,
    # after micro-batch 1 drew its drop-path and grouping randomness): step 2 is saved with the
    # random state of its end, and the resumed run is the uninterrupted one, bit for bit
    with pytest.raises(RetrainInterrupted) as caught:
        retrain(tiny_config(tmp_path / "mid"), train_data=InterruptAt(data, 8 * 5 + 1))
    assert caught.value.step == 2
    assert torch.load(tmp_path / "mid" / "last.pth", weights_only=True)["progress"]["global_step"] == 2
    retrain(tiny_config(tmp_path / "mid", resume=True), train_data=data)
    assert_identical(weights(tmp_path / "full" / "final.pth"), weights(tmp_path / "mid" / "final.pth"))


def test_cli_ctrl_c_exits_130_with_the_advice_to_resume(tmp_path, monkeypatch, capsys):
    data = fmnist_dir(tmp_path)
    out = tmp_path / "run"
    argv = ["retrain", "--model", "vim_fmnist", *FM_TINY, "--reduce", "rmeeto:r=2,interval=1",
            "--data", str(data), "--val-data", "none", "--workers", "0", "--no-progress",
            "--batch-size", "8", "--effective-batch", "8", "-o", str(out)]
    calls = []

    def collate_then_ctrl_c(samples):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return collate_train(samples)
    monkeypatch.setattr(train_epoch, "collate_train", collate_then_ctrl_c)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "--resume" in err
    assert torch.load(out / "last.pth", weights_only=True)["progress"]["global_step"] == 3
    monkeypatch.setattr(train_epoch, "collate_train", collate_train)
    assert main(argv + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 8


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys, caplog):
    data = fmnist_dir(tmp_path)
    common = ["retrain", "--model", "vim_fmnist", *FM_TINY, "--data", str(data), "--workers", "0",
              "--no-progress", "--resume"]
    # a mistyped run directory
    assert main(common + ["-o", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "does not exist" in err
    assert not (tmp_path / "no-such-run").exists()
    # a directory without last.pth
    (tmp_path / "empty").mkdir()
    assert main(common + ["-o", str(tmp_path / "empty")]) == 2
    assert "holds no last.pth" in capsys.readouterr().err
    # the library: resume="require" (what --resume asks) raises; resume=True (continue when there
    # is a run) starts one, saying so at info level (the demo's re-training rows rely on it)
    with pytest.raises(NothingToResume, match="nothing to resume"):
        retrain(tiny_config(tmp_path / "lib", resume="require", epochs=1), train_data=easy_data(16))
    with caplog.at_level("INFO"):
        result = retrain(tiny_config(tmp_path / "lib", resume=True, epochs=1), train_data=easy_data(16))
    assert result.status == "finished" and "nothing to resume" in caplog.text


# ---------------------------------------------------------------------------------------------
# item 11: threads per process under torchrun on CPU


def test_threads_per_process_arithmetic():
    assert distributed.threads_per_process(2, 2, {}) == 1
    assert distributed.threads_per_process(16, 2, {}) == 8
    assert distributed.threads_per_process(16, 3, {}) == 5
    assert distributed.threads_per_process(3, 4, {}) == 1
    assert distributed.threads_per_process(8, 1, {}) == 8
    # the user's OMP_NUM_THREADS wins; an unusable value is ignored
    assert distributed.threads_per_process(16, 2, {"OMP_NUM_THREADS": "3"}) == 3
    assert distributed.threads_per_process(16, 2, {"OMP_NUM_THREADS": "0"}) == 8
    assert distributed.threads_per_process(16, 2, {"OMP_NUM_THREADS": "many"}) == 8


def test_setup_of_a_cpu_group_sets_the_threads(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: None)
    monkeypatch.setattr(distributed, "available_cores", lambda: 8)
    env = {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    dist_env = distributed.setup("cpu")
    assert (dist_env.rank, dist_env.world_size, dist_env.backend) == (1, 4, "gloo")
    assert torch.get_num_threads() == 4                   # 8 cores // 2 processes on this machine
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    distributed.setup("cpu")
    assert torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"


# ---------------------------------------------------------------------------------------------
# item 12: one split rule (train side)


def test_retrain_takes_the_splits_of_a_dataset_root(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "validation"):
        for c in ("cat", "dog"):
            _png(root / split / c / "0.png", 100)
    train, val = open_data(str(root), 16, 1, augment="none")
    assert train.classes == ["cat", "dog"] and train.root == root / "train"
    assert val is not None and val.root == root / "validation"


def test_eval_limit_acts_on_given_evaluation_data_or_is_refused(tmp_path):
    result = retrain(tiny_config(tmp_path / "a", epochs=1, ema=False, eval_limit=5), train_data=easy_data(16),
                     val_data=easy_data(23, 1))
    assert result.eval_acc is not None and result.eval_acc * 5 == pytest.approx(round(result.eval_acc * 5))
    with pytest.raises(ValueError, match="no evaluation data"):
        retrain(tiny_config(tmp_path / "b", epochs=1, eval_limit=5), train_data=easy_data(16))


# ---------------------------------------------------------------------------------------------
# item 14: errors raised from the Python API name the Python argument (and the flag)


def test_library_errors_name_the_python_argument(tmp_path):
    retrain(tiny_config(tmp_path / "run", epochs=1), train_data=easy_data(16))
    with pytest.raises(RunDirError, match=r"overwrite=True \(--overwrite\)"):
        retrain(tiny_config(tmp_path / "run", epochs=1), train_data=easy_data(16))
    with pytest.raises(ValueError, match=r"effective_batch= / batch_size= \(--effective-batch / --batch-size\)"):
        retrain(tiny_config(tmp_path / "big", epochs=1, batch_size=64, effective_batch=64), train_data=easy_data(16))
    with pytest.raises(ValueError, match=r"data=DIR \(--data DIR\) or train_data="):
        retrain(tiny_config(tmp_path / "nodata", epochs=1))
