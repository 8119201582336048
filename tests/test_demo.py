"""The Fashion-MNIST demo (`vimerge demo`): plan, statistics, base model, outputs end to end."""

from __future__ import annotations

import gzip
import json
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vimerge import cli
from vimerge.data.fashion_mnist import DEFAULT_ROOT, is_fashion_mnist_dir
from vimerge.demo import FULL, QUICK, claims, plan_rows, resolve_base
from vimerge.demo.report import _compare, _verdict
from vimerge.reduce import format_spec, parse_spec
from vimerge.reduce.stm import STM, settings_for_mean_ratio

HAVE_FMNIST = is_fashion_mnist_dir(DEFAULT_ROOT)


def _idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def fake_fashion(root: Path, n_train: int = 256, n_test: int = 240) -> Path:
    """Four IDX files of images whose class is visible (a bright band at a class-dependent row)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 230
        _idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


# ------------------------------------------------------------------------------------ the plan


def test_stm_settings_match_rmeeto_token_counts():
    # 50 tokens, 8 blocks, reduction from block 1: removing 2 per side per block for 7 blocks
    # takes 28 tokens (ratio 0.56); counts 50, 46, ..., 22, mean 36 -> 1 - 36/50 = 0.28.
    opts = settings_for_mean_ratio(0.28, 50, 8)
    assert opts == {"final_ratio": 0.56, "per_side": 2}
    assert STM(**opts).token_counts(50, 8) == [50, 46, 42, 38, 34, 30, 26, 22]
    for target in (0.14, 0.42, 0.525):
        got = STM(**settings_for_mean_ratio(target, 50, 8)).reduction_ratio(50, 8)
        assert got == pytest.approx(target, abs=1e-9)
    with pytest.raises(ValueError, match="cannot reach"):
        settings_for_mean_ratio(0.95, 50, 8)


def test_full_plan_rows():
    rows = plan_rows(FULL, 50, 8)
    keys = [r.key for r in rows]
    # Vim: baseline, pruning and merging at 4 ratios, 2 shuffled; the same 11 on DeiT; STM 2 x 8;
    # re-trained at 0.54: merging, pruning, Vim shuffled, DeiT ordered and shuffled
    assert len(keys) == len(set(keys)) == 11 + 11 + 2 * (4 + 4) + 5
    spec = {r.key: parse_spec(r.reduce) for r in rows}
    for r in rows:     # every row is one canonical reduction spec
        assert format_spec(*spec[r.key]) == r.reduce
    # interval 1: ratio = 1 - (50 + sum_k (50 - k r)) / 400 = 0.07 r, so r = 2, 4, 6 hit 0.14, 0.28,
    # 0.42 exactly; 0.54 lies between r = 8 (0.525, capped at the end) and r = 9 (0.56): 8 is nearer.
    r_of = {r.target: spec[r.key][1]["r"] for r in rows if r.family == "rmeeto"}
    assert r_of == {0.14: 2, 0.28: 4, 0.42: 6, 0.54: 8}
    assert spec["baseline"][0] == "none"
    assert spec["rmeeto@0.28"] == ("rmeeto", {"r": 4, "interval": 1})
    assert spec["prune@0.28"] == ("prune", {"r": 4, "interval": 1})
    assert spec["rmeeto-shuffled@0.28"] == ("rmeeto", {"r": 4, "interval": 1, "ordered": False})
    # STM at R-MeeTo's token counts (ratio 0.28: 2 per side per block, 28 of 50 gone at the end)
    assert spec["stm-hsp@0.28"] == ("stm", {"final_ratio": 0.56, "per_side": 2})
    assert spec["stm-bnnm@0.28"] == ("stm", {"final_ratio": 0.56, "per_side": 2, "hsp": False})
    assert spec["stm-hsp@own0.3"] == ("stm", {"final_ratio": 0.3})       # STM's own settings
    assert spec["stm-bnnm@own0.3"] == ("stm", {"final_ratio": 0.3, "hsp": False})
    assert [r.key for r in rows if r.retrain] == [
        "rmeeto-retrained@0.54", "prune-retrained@0.54",
        "rmeeto-shuffled-retrained@0.54", "deit-rmeeto-retrained@0.54", "deit-rmeeto-shuffled-retrained@0.54"]
    assert spec["rmeeto-retrained@0.54"] == spec["rmeeto@0.54"]
    assert spec["prune-retrained@0.54"] == spec["prune@0.54"]
    # DeiT keeps the Vim rows' tokens per block: no reduction in block 0, then r per block
    assert spec["deit-rmeeto@0.28"] == ("rmeeto", {"r": [0, 4, 4, 4, 4, 4, 4, 4]})
    assert spec["deit-rmeeto-shuffled@0.54"] == ("rmeeto", {"r": [0, 8, 8, 8, 8, 8, 8, 8], "ordered": False})
    assert {r.model for r in rows if r.family.startswith("deit-")} == {"deit_fmnist"}
    assert {r.model for r in rows if not r.family.startswith("deit-")} == {"vim_fmnist"}
    assert {r.family for r in rows if r.secondary} == {"stm-hsp", "stm-bnnm", "rmeeto-shuffled"}
    assert len(plan_rows(QUICK, 50, 8)) == 6 + 6 + 2 * (2 + 2) + 2 + 3


def test_demo_does_not_import_the_command_line():
    code = ("import sys, vimerge.demo; bad = [m for m in sys.modules if m.startswith('vimerge.cli')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _row(key: str, correct: np.ndarray, **extra) -> dict:
    bits = np.packbits(correct.astype(np.uint8)).tobytes().hex()
    return {"key": key, "family": key.split("@")[0], "images": len(correct), "correct_bits": bits,
            "top1": 100.0 * correct.mean(), "setting": key, "reduction_ratio": 0.3, "target_ratio": 0.28,
            **extra}


def test_paired_comparison_by_hand():
    # 100 images: 45 both right, 15 only a, 5 only b, 35 both wrong.
    a = np.array([1] * 45 + [1] * 15 + [0] * 5 + [0] * 35, dtype=bool)
    b = np.array([1] * 45 + [0] * 15 + [1] * 5 + [0] * 35, dtype=bool)
    d, se, winner = _compare(_row("x@1", a), _row("y@1", b))
    assert d == pytest.approx(10.0)
    assert se == pytest.approx(100 * np.sqrt(20 - 10 ** 2 / 100) / 100)     # sqrt(19) = 4.36 points
    assert winner == "a"
    b2 = np.array([1] * 45 + [0] * 10 + [1] * 10 + [0] * 35, dtype=bool)  # 10 only-a vs 5 only-b
    a2 = np.array([1] * 45 + [1] * 10 + [0] * 5 + [1] * 0 + [0] * 40, dtype=bool)
    d, se, winner = _compare(_row("x@1", a2), _row("y@1", b2))
    assert (d, winner) == (pytest.approx(0.0), "tie")


def test_claim_verdicts():
    n = 400
    good = np.zeros(n, bool)
    good[:300] = True
    bad = np.zeros(n, bool)
    bad[:200] = True
    rows = [_row("baseline", np.ones(n, bool)),
            _row("rmeeto@0.54", good, target_ratio=0.54), _row("prune@0.54", bad, target_ratio=0.54),
            _row("rmeeto-shuffled@0.54", good, target_ratio=0.54),
            _row("rmeeto-retrained@0.54", bad, target_ratio=0.54)]
    for r in rows:
        r["family"] = r["key"].split("@")[0]
    assert [_verdict(o) for o in (["a", "a"], ["a", "b"], ["tie", "b"], ["a", "tie"], [])] == [
        "reproduced", "mixed", "not reproduced", "inconclusive", "not measured"]
    verdicts = {c["claim"].split(" ")[0]: c["verdict"] for c in reversed(claims(rows))}   # first of a word wins
    assert verdicts["Merging"] == "reproduced"          # 75% vs 50%
    assert next(c for c in claims(rows) if c["claim"].endswith("same re-training"))["verdict"] == "not measured"
    assert verdicts["Token"] == "inconclusive"          # identical rows
    assert verdicts["Re-training"] == "not reproduced"  # 50% after vs 75% before
    assert verdicts["Training-free"] == "not measured"  # no STM rows
    text = next(c for c in claims(rows) if c["claim"].startswith("Merging"))["evidence"][0]
    assert "75.00% vs pruning 50.00%" in text
    assert "Token reduction hurts Mamba more than a Transformer" not in [c["claim"] for c in claims(rows)]


def test_transformer_claims_by_hand():
    # 100 images. Vim: unreduced all right, merged 60 right; DeiT: unreduced all right, merged 90.
    # Per image (vim base - vim row) - (deit base - deit row) is +1 on 30 images and 0 elsewhere:
    # Vim's drop is 30 points larger, s.e. sqrt(30 - 30^2/100) = sqrt(21) = 4.58 points.
    n = 100
    ones = np.ones(n, bool)
    vim = np.array([1] * 60 + [0] * 40, bool)
    deit = np.array([1] * 90 + [0] * 10, bool)
    rows = [_row("baseline", ones), _row("deit-baseline", ones),
            _row("rmeeto@0.54", vim, target_ratio=0.54), _row("deit-rmeeto@0.54", deit, target_ratio=0.54),
            _row("rmeeto-shuffled@0.54", vim, target_ratio=0.54),           # Vim: order makes no difference
            _row("deit-rmeeto-shuffled@0.54", deit, target_ratio=0.54)]      # DeiT: neither
    found = {c["claim"]: c for c in claims(rows)}
    hurt = found["Token reduction hurts Mamba more than a Transformer"]
    assert hurt["verdict"] == "reproduced"
    assert f"Vim's drop +30.00 points larger (2 s.e. = {2 * np.sqrt(21):.2f})" in hurt["evidence"][0]
    order = found["Token order matters for Vim but not for DeiT"]
    assert order["verdict"] == "inconclusive"   # DeiT ties (the claim's side), the Vim ties (no win either way)
    rows[4] = _row("rmeeto-shuffled@0.54", np.array([1] * 40 + [0] * 60, bool), target_ratio=0.54)
    assert {c["claim"]: c for c in claims(rows)}["Token order matters for Vim but not for DeiT"]["verdict"] == \
        "reproduced"
    # rows on fewer images pair on the images both saw (the first ones)
    assert _compare(_row("a@1", vim), _row("b@1", deit[:50]))[:2] == (0.0, 0.0)


# ------------------------------------------------------------------------------------ base model


def test_base_is_trained_into_the_cache_when_nothing_is_shipped(tmp_path, monkeypatch):
    from vimerge.models import get_preset
    data = fake_fashion(tmp_path / "fm", n_train=256, n_test=40)
    monkeypatch.setattr(get_preset("vim_fmnist"), "pretrained", str(tmp_path / "absent.pth"))
    monkeypatch.setenv("VIMERGE_CACHE", str(tmp_path / "cache"))
    base = resolve_base(None, str(data), progress=False)
    assert base.source == "trained"
    assert Path(base.path) == tmp_path / "cache" / "vim_fmnist-base" / "final.pth"
    log = [json.loads(line) for line in (Path(base.path).parent / "log.jsonl").read_text().splitlines()]
    assert log[0]["total_steps"] == 3 * 2          # BASE_RECIPE: 3 epochs of 256 / 128 steps
    again = resolve_base(None, str(data), progress=False)
    assert (again.source, again.path, again.model_args) == ("cache", base.path, ["--checkpoint", base.path])


def test_train_command_defaults_are_the_base_recipe():
    from vimerge.cli.retrain import config_from_args
    from vimerge.train.recipe import BASE_RECIPE
    args = cli.build_parser().parse_args(["train", "--model", "vim_fmnist", "--data", "D", "-o", "R"])
    config = config_from_args(args).to_dict()
    assert {k: config[k] for k in BASE_RECIPE} == {**BASE_RECIPE, "reduce": "none"}
    retrain = config_from_args(cli.build_parser().parse_args(["retrain", "--data", "D", "-o", "R"]))
    assert (retrain.lr, retrain.augment) == (2e-5, "light")    # retrain keeps the paper's recipe


def test_missing_data_and_bad_checkpoint_name_the_fix(tmp_path, capsys):
    assert cli.main(["demo", "--data", str(tmp_path), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and str(tmp_path) in err
    data = fake_fashion(tmp_path / "fm", n_train=16, n_test=16)
    junk = tmp_path / "junk.pth"
    junk.write_text("<html>not a checkpoint</html>")
    assert cli.main(["demo", "--data", str(data), "--checkpoint", str(junk), "-o", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert "junk.pth" in capsys.readouterr().err
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    assert cli.main(["demo", "--data", str(data), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "t10k-images" in capsys.readouterr().err


def test_an_interrupted_demo_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    import vimerge.demo.run as demo
    data = str(fake_fashion(tmp_path / "fm", n_train=128, n_test=64))
    argv = ["demo", "--quick", "--data", data, "-o", str(tmp_path / "d"), "--limit", "64",
            "--retrain-images", "64", "--no-progress"]
    real, calls = demo.run_row, []

    def stop_at_third(*args, **kwargs):
        calls.append(args[0].key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "run_row", stop_at_third)
    assert cli.main(argv) == 130
    assert "run the same command to continue" in capsys.readouterr().err
    saved = json.loads((tmp_path / "d" / "rows.partial.json").read_text())["rows"]
    assert list(saved) == calls[:2]
    monkeypatch.setattr(demo, "run_row", real)
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert results["setup"]["rows_reused"] == 2
    assert [r["key"] for r in results["rows"][:2]] == calls[:2]
    assert [r["correct"] for r in results["rows"][:2]] == [saved[k]["correct"] for k in calls[:2]]


# ------------------------------------------------------------------------------------ end to end


def _report_rows(report: str) -> dict[str, list[str]]:
    cells = {}
    for line in report.splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if m:
            cells[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return cells


def test_quick_demo_end_to_end(tmp_path, capsys):
    data = DEFAULT_ROOT if HAVE_FMNIST else str(fake_fashion(tmp_path / "fm"))
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data", data, "-o", str(out), "--limit", "200", "--retrain-images", "128",
            "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "report.md", "accuracy_vs_ratio.png", "accuracy_vs_speed.png",
                 "merged_tokens.png", "transformer_vs_mamba.png"):
        assert (out / name).is_file(), name
    for name in ("accuracy_vs_ratio.png", "accuracy_vs_speed.png", "merged_tokens.png", "transformer_vs_mamba.png"):
        pixels = np.asarray(Image.open(out / name).convert("L"))
        assert pixels.shape[0] > 100 and pixels.std() > 10, name     # a drawing, not a blank page

    results = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == [s.key for s in plan_rows(QUICK, 50, 8)]
    assert results["setup"]["test_images"] == 200
    assert results["versions"]["torch"] and results["timings"]["total"] > 0
    for r in rows.values():    # accuracies are computed from the per-image record
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(r["correct_bits"]), np.uint8))[:200]
        assert r["images"] == 200 and bits.sum() == r["correct"]
        assert r["top1"] == pytest.approx(100 * r["correct"] / 200)
    assert rows["rmeeto@0.54"]["token_counts"] == [50, 42, 34, 26, 18, 10, 6, 4]
    assert rows["stm-hsp@0.54"]["reduction_ratio"] == pytest.approx(rows["rmeeto@0.54"]["reduction_ratio"])
    assert rows["rmeeto-retrained@0.54"]["retrain"]["images"] == 128
    assert rows["deit-rmeeto@0.54"]["token_counts"] == rows["rmeeto@0.54"]["token_counts"]
    assert rows["deit-rmeeto@0.54"]["model"] == "deit_fmnist"

    report = (out / "report.md").read_text()
    table = _report_rows(report)
    assert set(table) == set(rows)
    for key, r in rows.items():    # the report shows the JSON's numbers
        assert table[key][3] == f"{r['reduction_ratio']:.3f}"
        assert table[key][4] == f"{r['top1']:.2f}"
        assert table[key][6] == f"{r['gflops_paper']:.4f}"
    for c in results["claims"]:
        assert f"**{c['claim']}** ({c['source']}): **{c['verdict']}**" in report
    assert "[" + results["claims"][0]["verdict"] + "]" in printed

    # one training-free row and one re-trained row, re-evaluated with `vimerge eval`
    for key in ("stm-hsp@0.54", "rmeeto-retrained@0.54", "deit-rmeeto-shuffled@0.54"):
        command = shlex.split(rows[key]["eval_command"])
        assert command[:2] == ["vimerge", "eval"]
        assert command[command.index("--reduce") + 1] == rows[key]["reduce"]
        target = tmp_path / f"{key}.json"
        assert cli.main(command[1:] + ["--no-progress", "--json", "--output", str(target)]) == 0
        again = json.loads(target.read_text())
        assert (again["top1"], again["correct"]) == (rows[key]["top1"], rows[key]["correct"])
        assert again["token_counts"] == rows[key]["token_counts"]
    capsys.readouterr()

    # running the same command again reuses every finished row (what a killed run relies on)
    assert cli.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["setup"]["rows_reused"] == len(rows)
