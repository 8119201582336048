"""Re-training (vimerge.train): recipe arithmetic, resume equivalence, robustness, CLI."""

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import easy_data
from vimerge import token_counts
from vimerge.measure.evaluate import evaluate
from vimerge.models import create_backbone
from vimerge.reduce import parse_spec
from vimerge.train import (
    BASE_RECIPE,
    EMA,
    CosineSchedule,
    LightAugment,
    NonFiniteLossError,
    RetrainConfig,
    RunDirError,
    load_retrained,
    lr_at,
    no_decay_names,
    param_groups,
    resolve_accum,
    retrain,
)
from vimerge.train.data import epoch_order, subset_indices

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=2, embed_dim=16, patch_size=4, stride=4, in_chans=1)






def tiny_config(out, **kw):
    base = dict(model="vim_tiny", model_kwargs=TINY, img_size=16, num_classes=3,
                scan_backend="reference", reduce="rmeeto:r=2,interval=1", batch_size=8,
                effective_batch=16, epochs=2, lr=2e-3, min_lr=1e-4, label_smoothing=0.0,
                workers=0, output=str(out), progress=False, log_every=1)
    base.update(kw)
    return RetrainConfig(**base)


def read_log(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def final_weights(run_dir, key="model"):
    return torch.load(run_dir / "final.pth", map_location="cpu", weights_only=True)[key]


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tol, worst


# ---------------------------------------------------------------------------------------------
# recipe arithmetic


def test_lr_schedule_hand_computed():
    # cosine from 2e-5 (first update) to 1e-6 (last update) over 5 updates
    assert lr_at(0, 5, 2e-5, 1e-6) == pytest.approx(2e-5, abs=1e-15)
    assert lr_at(1, 5, 2e-5, 1e-6) == pytest.approx(1e-6 + 1.9e-5 * (1 + math.sqrt(0.5)) / 2, abs=1e-15)
    assert lr_at(2, 5, 2e-5, 1e-6) == pytest.approx(1.05e-5, abs=1e-15)
    assert lr_at(3, 5, 2e-5, 1e-6) == pytest.approx(1e-6 + 1.9e-5 * (1 - math.sqrt(0.5)) / 2, abs=1e-15)
    assert lr_at(4, 5, 2e-5, 1e-6) == pytest.approx(1e-6, abs=1e-15)
    # linear warm-up from 0 over 2 updates, then the cosine over the 3 remaining
    assert [lr_at(t, 5, 2e-5, 1e-6, warmup_steps=2, warmup_lr=0.0) for t in range(5)] == \
        pytest.approx([0.0, 1e-5, 2e-5, 1.05e-5, 1e-6], abs=1e-15)
    # the scheduler applies it to the optimizer, and its state is the update count
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CosineSchedule(opt, 5, 2e-5, 1e-6)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([lr_at(t, 5, 2e-5, 1e-6) for t in range(5)], abs=1e-15)
    again = CosineSchedule(opt, 5, 2e-5, 1e-6)
    again.load_state_dict({"last_step": 2})
    assert opt.param_groups[0]["lr"] == pytest.approx(1.05e-5, abs=1e-15)


def test_no_decay_parameter_groups():
    model = create_backbone("vim_tiny", num_classes=3, img_size=16, **TINY)
    groups = param_groups(model, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    no_decay = set(groups[1]["names"])
    decay = set(groups[0]["names"])
    assert no_decay == no_decay_names(model)
    mixer = "layers.1.mixer."
    assert {"pos_embed", "cls_token", "head.bias", "patch_embed.proj.bias", "norm_f.weight",
            "layers.1.norm.weight", mixer + "A_log", mixer + "A_b_log", mixer + "D", mixer + "D_b",
            mixer + "conv1d.bias", mixer + "conv1d_b.bias", mixer + "dt_proj.bias"} <= no_decay
    assert decay == {"patch_embed.proj.weight", "head.weight"} | {
        f"layers.{i}.mixer.{n}" for i in range(2)
        for n in ("in_proj.weight", "out_proj.weight", "x_proj.weight", "x_proj_b.weight",
                  "conv1d.weight", "conv1d_b.weight", "dt_proj.weight", "dt_proj_b.weight")}
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in model.named_parameters()}


def test_no_decay_names_unchanged_for_vim_fmnist():
    # the rule train/recipe.py had before it left parameter names to the backbone
    model = create_backbone("vim_fmnist")
    old_rule = {name for name, p in model.named_parameters()
                if p.ndim <= 1 or name.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b",
                                                             "pos_embed", "cls_token")}
    assert no_decay_names(model) == old_rule
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.D_b"} <= old_rule


def test_config_reduce_spec_and_old_configs():
    assert RetrainConfig().reduce == "rmeeto:r=11"
    assert RetrainConfig(**BASE_RECIPE).reduce == "none"
    assert RetrainConfig(reduce="rmeeto: r=4, interval=1").reduce == "rmeeto:r=4,interval=1"
    with pytest.raises(ValueError):
        RetrainConfig(reduce="rmeeto:no_such_option=1")
    cfg = RetrainConfig(reduce="rmeeto:r=2,interval=1", epochs=2)
    assert RetrainConfig.from_dict(cfg.to_dict()) == cfg
    # configurations written before specs carry method + reduction
    old = {k: v for k, v in cfg.to_dict().items() if k != "reduce"}
    assert RetrainConfig.from_dict({**old, "method": "rmeeto", "reduction": {"r": 2, "interval": 1}}) == cfg
    assert RetrainConfig.from_dict({**old, "method": "none", "reduction": {}}).reduce == "none"
    assert RetrainConfig.from_dict({**old, "reduction": {"r": 5}}).reduce == "rmeeto:r=5"  # old default method
    # STM's old "ratio" (tokens gone after the last block) is now its "final_ratio"
    stm = RetrainConfig.from_dict({**old, "method": "stm", "reduction": {"ratio": 0.2, "per_side": 2}})
    assert parse_spec(stm.reduce) == ("stm", {"final_ratio": 0.2, "per_side": 2})


def test_effective_batch_arithmetic():
    assert resolve_accum(128, 4, 1024) == (2, 1024)      # the paper: 4 GPUs x 128 x 2
    assert resolve_accum(128, 1, 1024) == (8, 1024)
    assert resolve_accum(1152, 8, 1024) == (1, 9216)     # larger than asked: reported as is
    assert resolve_accum(100, 3, 1024) == (4, 1200)      # ceil(1024 / 300) = 4
    assert resolve_accum(64, 2, 1024, accum_steps=3) == (3, 384)


def test_ema_update_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.996)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[k], 0.996 * old[k] + 0.004 * v)
    assert ema.updates == 1


def test_subset_and_order_are_seeded():
    a = subset_indices(1000, 0.05, seed=3)
    assert len(a) == 50 and a == sorted(a) and a == subset_indices(1000, 0.05, seed=3)
    assert a != subset_indices(1000, 0.05, seed=4)
    assert subset_indices(10, 1.0, 0) == list(range(10))
    assert sorted(epoch_order(a, 0, 1)) == a and epoch_order(a, 0, 1) != epoch_order(a, 0, 2)


def test_light_augment():
    x = torch.randn(6, 1, 8, 8)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    same = LightAugment("none", hflip=0.0)
    torch.testing.assert_close(same(x, gen()), x)
    flip = LightAugment("none", hflip=1.0)
    torch.testing.assert_close(flip(x, gen()), x.flip(-1))
    pad = LightAugment("pad", padding=2, hflip=0.5)
    out = pad(x, gen())
    assert out.shape == x.shape
    # a global batch augmented at once equals its two halves augmented separately (DDP)
    halves = torch.cat([pad(x[:3], gen(), rows=slice(0, 3), global_n=6),
                        pad(x[3:], gen(), rows=slice(3, 6), global_n=6)])
    torch.testing.assert_close(halves, out)
    rrc = LightAugment("rrc")(x, gen())
    assert rrc.shape == x.shape and torch.isfinite(rrc).all()


def test_timm_recipe_needs_timm(tmp_path):
    try:
        import timm  # noqa: F401
        pytest.skip("timm is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install timm"):
        retrain(tiny_config(tmp_path, augment="timm"), train_data=easy_data(32))


# ---------------------------------------------------------------------------------------------
# runs


def test_resume_gives_the_same_weights(tmp_path):
    data = easy_data(48)      # 3 steps of 16 per epoch, 2 epochs
    kw = dict(ema=True, drop_path=0.1, crop="pad",
              reduce="rmeeto:r=2,interval=1,grouping=random,seed=1")
    full = retrain(tiny_config(tmp_path / "full", **kw), train_data=data)
    assert full.status == "finished" and full.global_step == 6

    # interrupted inside epoch 2 by --max-steps, then resumed
    part = retrain(tiny_config(tmp_path / "cut", max_steps=4, **kw), train_data=data)
    assert part.status == "stopped" and part.global_step == 4
    assert not (tmp_path / "cut" / "final.pth").exists()
    state = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert state["progress"] == {"epoch": 1, "step_in_epoch": 1, "global_step": 4, "finished": False}
    done = retrain(tiny_config(tmp_path / "cut", resume=True, **kw), train_data=data)
    assert done.status == "finished" and done.global_step == 6
    assert_same(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut"))
    assert_same(final_weights(tmp_path / "full", "model_ema"), final_weights(tmp_path / "cut", "model_ema"))

    # a crash (exception from a hook) after step 3; checkpoints every 2 steps, so step 2 is kept
    # (Ctrl-C, a KeyboardInterrupt, saves the step it reached: tests/test_retrain_faults.py)
    def crash(info):
        if info["step"] == 3:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        retrain(tiny_config(tmp_path / "crash", save_every=2, **kw), train_data=data, on_step=crash)
    state = torch.load(tmp_path / "crash" / "last.pth", weights_only=True)
    assert state["progress"]["global_step"] == 2
    retrain(tiny_config(tmp_path / "crash", resume=True, save_every=2, **kw), train_data=data)
    assert_same(final_weights(tmp_path / "full"), final_weights(tmp_path / "crash"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(info):
        if info["step"] == 2:
            with torch.no_grad():
                info["model"].head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        retrain(tiny_config(tmp_path, save_every=1, epochs=1), train_data=easy_data(64),
                on_step=poison)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["progress"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "final.pth").exists()
    assert read_log(tmp_path)[-1]["event"] == "nonfinite"


def test_run_dir_protection(tmp_path):
    data = easy_data(32)
    cfg = tiny_config(tmp_path, epochs=1, log_every=0)
    retrain(cfg, train_data=data)
    with pytest.raises(RunDirError, match="--overwrite"):
        retrain(cfg, train_data=data)
    again = retrain(tiny_config(tmp_path, epochs=1, resume=True), train_data=data)
    assert again.status == "already-finished"
    stamp = (tmp_path / "final.pth").stat().st_mtime_ns
    retrain(tiny_config(tmp_path, epochs=1, overwrite=True), train_data=data)
    assert (tmp_path / "final.pth").stat().st_mtime_ns != stamp
    # an unfinished run is not restarted by accident either
    retrain(tiny_config(tmp_path / "b", epochs=2, max_steps=1), train_data=data)
    with pytest.raises(RunDirError, match="--resume"):
        retrain(tiny_config(tmp_path / "b", epochs=2), train_data=data)


def test_short_run_learns_logs_and_records_reduction(tmp_path):
    data = easy_data(96)
    result = retrain(tiny_config(tmp_path, epochs=4, lr=1e-2, log_every=2), train_data=data,
                     val_data=data)
    lines = read_log(tmp_path)
    assert [rec["event"] for rec in lines][0] == "start" and lines[-1]["event"] == "end"
    start = lines[0]
    assert (start["effective_batch"], start["per_device_batch"], start["accum_steps"],
            start["world_size"], start["steps_per_epoch"]) == (16, 8, 2, 1, 6)
    steps = [rec for rec in lines if rec["event"] == "step"]
    epochs = [rec for rec in lines if rec["event"] == "epoch"]
    assert [s["step"] for s in steps] == list(range(2, 25, 2)) and len(epochs) == 4
    assert all(isinstance(s[k], float) for s in steps for k in ("loss", "lr", "throughput"))
    assert steps[0]["lr"] > steps[-1]["lr"] == pytest.approx(1e-4)
    assert all(e["eval_acc"] is not None and "throughput" in e for e in epochs)
    # the loss falls on this easy task, and the model beats chance clearly
    assert epochs[-1]["loss"] < 0.7 * epochs[0]["loss"]
    assert result.eval_acc > 0.8
    # final checkpoint: weights + reduction configuration; load_retrained re-applies it
    ckpt = torch.load(tmp_path / "final.pth", weights_only=True)
    assert ckpt["reduction"] == "rmeeto:r=2,interval=1"
    model = load_retrained(tmp_path / "final.pth", scan_backend="reference")
    assert token_counts(model) == token_counts(result.model) == [17, 15]
    x = data.tensors[0][:5]
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x))
    # checkpoints written before specs stored {"method", "options"}: still loaded
    ckpt["reduction"] = {"method": "rmeeto", "options": {"r": 2, "interval": 1}}
    torch.save(ckpt, tmp_path / "old.pth")
    old = load_retrained(tmp_path / "old.pth", scan_backend="reference")
    assert token_counts(old) == [17, 15]
    with torch.no_grad():
        torch.testing.assert_close(old(x), result.model(x))
    # validation is the library's evaluate() on the same images
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    assert result.eval_acc == evaluate(result.model, loader, progress=False)["correct"] / len(data)


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_cli_retrain_on_fashion_mnist_files(tmp_path):
    from vimerge.cli import main
    rng = np.random.default_rng(0)
    data = tmp_path / "fm"
    data.mkdir()
    for split, n in (("train", 32), ("t10k", 16)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, lab in enumerate(labels):   # a class-dependent bright row
            images[i, 2 * lab:2 * lab + 3] = 250
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels, 2049)
    out = tmp_path / "run"
    common = ["retrain", "--model", "vim_tiny", "--set", "depth=2", "--set", "embed_dim=16",
              "--set", "patch_size=7", "--set", "stride=7", "--set", "in_chans=1", "--img-size", "28",
              "--scan-backend", "reference", "--data", str(data),
              "--epochs", "1", "--batch-size", "8", "--effective-batch", "16", "--workers", "0",
              "--output", str(out), "--no-progress", "--log-every", "1"]
    argv = common + ["--method", "rmeeto", "--r", "2", "--interval", "1"]
    assert main(argv) == 0
    ckpt = torch.load(out / "final.pth", weights_only=True)
    assert ckpt["arch"]["kwargs"]["num_classes"] == 10          # from the data set
    assert ckpt["reduction"] == "rmeeto:r=2,interval=1"
    epoch = [rec for rec in read_log(out) if rec["event"] == "epoch"][0]
    assert epoch["eval_acc"] is not None                         # the test split, auto-detected
    assert main(argv) == 1                                       # finished: needs --overwrite
    # the same reduction as one spec
    assert main(common + ["--reduce", "rmeeto:r=2,interval=1", "--overwrite", "--fraction", "0.5",
                          "--effective-batch", "8"]) == 0
    start = [rec for rec in read_log(out) if rec["event"] == "start"][0]
    assert start["train_samples"] == 16 and start["reduction"] == "rmeeto:r=2,interval=1"
    assert torch.load(out / "final.pth", weights_only=True)["reduction"] == "rmeeto:r=2,interval=1"


def test_distillation_teacher_is_the_unreduced_model(tmp_path):
    from vimerge import save_checkpoint
    torch.manual_seed(0)
    ckpt = save_checkpoint(create_backbone("vim_tiny", num_classes=3, img_size=16, **TINY),
                           tmp_path / "start.pth")
    kw = dict(checkpoint=str(ckpt), distill="soft", distill_alpha=1.0, augment="none", epochs=1,
              lr=1e-6, min_lr=1e-6, weight_decay=0.0)

    def first_loss(run, **extra):
        retrain(tiny_config(tmp_path / run, **kw, **extra), train_data=easy_data(32))
        return [rec for rec in read_log(tmp_path / run) if rec["event"] == "step"][0]["loss"]

    # without reduction the student is the teacher: the KL term is 0; with it, it is not
    assert first_loss("same", reduce="none") == pytest.approx(0.0, abs=1e-6)
    assert first_loss("reduced", reduce="rmeeto:r=3,interval=1") > 1e-4
