"""vimerge eval / vimerge.measure.evaluate against accuracies and losses computed by hand."""

import gzip
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vimerge
from vimerge.cli import eval as eval_cli
from vimerge.cli import main
from vimerge.cli.common import parse_sweep
from vimerge.data import EvalTransform, ImageFolder, make_loader
from vimerge.measure.evaluate import evaluate
from vimerge.reduce import spec_of

ARCH = dict(img_size=28, patch_size=7, stride=7, depth=4, embed_dim=16, num_classes=10)
ARCH_SET = ["--img-size", "28", "--num-classes", "10", "--set", "patch_size=7", "--set", "stride=7",
            "--set", "depth=4", "--set", "embed_dim=16", "--scan-backend", "reference"]
RUN = ["--no-progress", "--workers", "0", "--batch-size", "8"]


def _model(in_chans: int, path: Path) -> Path:
    torch.manual_seed(1234 + in_chans)
    model = vimerge.create_model("vim_tiny", in_chans=in_chans, scan_backend="reference", **ARCH)
    vimerge.save_checkpoint(model, path)
    return path


def _load(in_chans: int, path: Path):
    return vimerge.create_model("vim_tiny", in_chans=in_chans, checkpoint=str(path),
                                scan_backend="reference", **ARCH).eval()


def _by_hand(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 8]) for i in range(0, len(x), 8)]).double()
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
    top5 = torch.argsort(logits, dim=-1, descending=True)[:, :5]
    return {"top1": 100.0 * (logits.argmax(-1) == y).double().mean().item(),
            "top5": 100.0 * (top5 == y[:, None]).any(-1).double().mean().item(),
            "loss": -log_probs[torch.arange(len(y)), y].mean().item()}


def _check(result: dict, expected: dict):
    assert result["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which costs
    seconds per forward when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grey_ckpt(tmp_path_factory):
    return _model(1, tmp_path_factory.mktemp("ckpt") / "grey.pth")


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory):
    return _model(3, tmp_path_factory.mktemp("ckpt") / "rgb.pth")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A 24-image Fashion-MNIST test split (gzip, as the Debian package ships it)."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(24, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=24, dtype=np.uint8)
    for name, array in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        raw = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (root / name).write_bytes(gzip.compress(raw + array.tobytes()))
    x = torch.from_numpy((images.astype(np.float32) / 255 - 0.2860) / 0.3530)[:, None]
    return root, x, torch.from_numpy(labels.astype(np.int64))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 3 RGB images of 36 x 30, plus a truncated PNG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(3)
    for name in ["cat", "dog", "eel"]:
        (root / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, size=(30, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    data = (root / "cat" / "0.png").read_bytes()
    (root / "dog" / "broken.png").write_bytes(data[: len(data) // 2])
    (root / "eel" / "text.jpg").write_text("not a jpeg")
    return root


def _folder_tensors(root: Path):
    """The folder's readable images preprocessed by hand: resize the 30-pixel side to 32 (36 ->
    int(32 * 36 / 30) = 38), bicubic; centre crop 28 at left 5, top 2; ImageNet normalisation."""
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    xs, ys = [], []
    for label, name in enumerate(["cat", "dog", "eel"]):
        for i in range(3):
            img = Image.open(root / name / f"{i}.png").convert("RGB").resize((38, 32), Image.BICUBIC)
            a = np.asarray(img, dtype=np.float64)[2:30, 5:33] / 255.0
            xs.append(torch.from_numpy(((a - mean) / std).transpose(2, 0, 1).astype(np.float32)))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def _cli_json(capsys, args) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fashion_mnist_cli_matches_hand(capsys, grey_ckpt, fashion):
    root, x, y = fashion
    out = _cli_json(capsys, ["--checkpoint", str(grey_ckpt), *ARCH_SET, "--set", "in_chans=1",
                             "--data", str(root), *RUN])
    assert out["dataset"] == "fashion-mnist" and out["split"] == "test" and out["classes"] == 10
    assert out["images"] == 24 and out["skipped"] == [] and out["method"] == "none"
    _check(out, _by_hand(_load(1, grey_ckpt), x, y))


def test_fashion_mnist_limit(capsys, grey_ckpt, fashion):
    root, x, y = fashion
    out = _cli_json(capsys, ["--checkpoint", str(grey_ckpt), *ARCH_SET, "--set", "in_chans=1",
                             "--dataset", "fashion-mnist", "--data", str(root), "--limit", "10", *RUN])
    assert out["images"] == 10
    _check(out, _by_hand(_load(1, grey_ckpt), x[:10], y[:10]))


def test_imagefolder_cli_with_corrupt_files(capsys, caplog, rgb_ckpt, folder):
    args = ["--checkpoint", str(rgb_ckpt), *ARCH_SET, "--data", str(folder), *RUN]
    with caplog.at_level(logging.WARNING):
        out = _cli_json(capsys, args)
    assert out["dataset"] == "imagefolder" and out["classes"] == 3 and out["images"] == 9
    assert sorted(Path(p).name for p in out["skipped"]) == ["broken.png", "text.jpg"]
    assert "broken.png" in caplog.text and "text.jpg" in caplog.text
    _check(out, _by_hand(_load(3, rgb_ckpt), *_folder_tensors(folder)))
    # the human summary names them too
    assert main(["eval", *args]) == 0
    text = capsys.readouterr().out
    assert "skipped 2 unreadable file(s)" in text and "text.jpg" in text and "top-1" in text


def test_evaluate_function(rgb_ckpt, folder):
    model = _load(3, rgb_ckpt)
    x, y = _folder_tensors(folder)
    ds = ImageFolder(folder, EvalTransform(28))
    result = evaluate(model, make_loader(ds, batch_size=4), progress=False)
    assert result["images"] == 9 and len(result["skipped"]) == 2
    _check(result, _by_hand(model, x, y))
    # plain (images, labels) batches work too
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    plain = evaluate(model, loader, progress=False)
    assert plain["skipped"] == [] and plain["correct"] == round(plain["top1"] * 9 / 100)
    _check(plain, _by_hand(model, x, y))


def test_sweep_rows_match_single_runs(capsys, tmp_path, grey_ckpt, fashion):
    root = fashion[0]
    base = ["--checkpoint", str(grey_ckpt), *ARCH_SET, "--set", "in_chans=1", "--data", str(root),
            "--limit", "16", *RUN]
    output = tmp_path / "sweep.json"
    assert main(["eval", *base, "--sweep", "none; rmeeto:0.2", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and lines[1].startswith("| `none` ") and lines[2].startswith("| `rmeeto:ratio=0.2` ")
    rows = json.loads(output.read_text())["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("none", None), ("rmeeto", 0.2)]
    singles = [_cli_json(capsys, base), _cli_json(capsys, [*base, "--method", "rmeeto", "--ratio", "0.2"])]
    for row, single in zip(rows, singles):
        for key in ("reduce", "method", "ratio", "top1", "top5", "loss", "images", "gflops_paper", "gflops_full",
                    "reduction_ratio", "token_counts"):
            assert row[key] == single[key], key
    assert rows[0]["reduction_ratio"] == 0 and rows[1]["reduction_ratio"] > 0.15
    assert rows[1]["gflops_paper"] < rows[0]["gflops_paper"]


def test_parse_sweep():
    # the ratio shorthand: one row per number
    assert parse_sweep("none;rmeeto:0.14,0.28;prune:0.28") == [
        "none", "rmeeto:ratio=0.14", "rmeeto:ratio=0.28", "prune:ratio=0.28"]
    # full specs, brackets kept together, shorthand flags applied where the method takes them
    assert parse_sweep("rmeeto:r=[0,2,2,2],interval=1;stm:ratio=0.2", {"distance": "l1", "hsp": False}) == [
        "rmeeto:r=[0,2,2,2],interval=1,distance=l1", "stm:ratio=0.2,hsp=false"]
    assert parse_sweep("rmeeto") == ["rmeeto"]                    # a spec with default options (r=0)
    for bad, flags, message in (("magic:0.1", {}, "unknown reduction method 'magic'"),
                                ("rmeeto:1.5", {}, "not in"), ("none:0.1", {}, "no ratios"), (";", {}, "no rows"),
                                ("rmeeto:per_side=2", {}, "rmeeto has no option 'per_side'"),
                                ("rmeeto:0.2", {"per_side": 2}, "--per-side is an option of no row"),
                                ("stm:ratio=0.2,final_ratio=0.2", {}, "not both")):
        with pytest.raises(ValueError, match=message):
            parse_sweep(bad, flags)


def test_cli_errors(capsys, grey_ckpt, rgb_ckpt, tmp_path):
    base = ["eval", "--checkpoint", str(grey_ckpt), *ARCH_SET, "--set", "in_chans=1", *RUN]
    assert main([*base, "--dataset", "fashion-mnist", "--data", str(tmp_path / "none")]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err
    rgb = ["eval", "--checkpoint", str(rgb_ckpt), *ARCH_SET, *RUN]
    assert main(rgb) == 2           # no --data: the Fashion-MNIST default is for one-channel 28x28 models
    assert "--data DIR" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path), "--sweep", "bogus:0.1"]) == 2
    assert "unknown reduction method 'bogus'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--data", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_sweep_warms_up_every_row_before_the_first_timed_row(monkeypatch, capsys, grey_ckpt, fashion):
    """The first row of a sweep is timed like the others: one untimed batch has gone through the
    model with every row's reduction before any row is evaluated."""
    events = []
    real_build, real_evaluate = eval_cli.build_model, eval_cli.evaluate

    def build(args, spec=None):
        model = real_build(args, spec)
        model.register_forward_pre_hook(lambda m, inputs: events.append(("forward", spec_of(m.reduction))))
        return model

    def timed(model, loader, **kwargs):
        events.append(("evaluate", spec_of(model.reduction)))
        return real_evaluate(model, loader, **kwargs)

    monkeypatch.setattr(eval_cli, "build_model", build)
    monkeypatch.setattr(eval_cli, "evaluate", timed)
    assert main(["eval", "--checkpoint", str(grey_ckpt), *ARCH_SET, "--set", "in_chans=1", "--data",
                 str(fashion[0]), "--limit", "16", *RUN, "--sweep", "none;rmeeto:0.2"]) == 0
    first = events.index(("evaluate", "none"))
    assert {("forward", "none"), ("forward", "rmeeto:ratio=0.2")} <= set(events[:first])
