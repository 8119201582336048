"""The studies' runner and the image study (`vimerge demo`): plan, shared paired statistics and
claims by hand, the throughput protocol on a fake clock, a small third study run, killed and
resumed through the runner, the base model, and the quick image study end to end."""

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
import torch
from PIL import Image

import vimerge
import vimerge.demo.runner as runner
from vimerge import cli
from vimerge.data import make_loader
from vimerge.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, is_fashion_mnist_dir
from vimerge.demo import (
    FAMILIES,
    FULL,
    QUICK,
    Base,
    Prepared,
    Row,
    Study,
    claims,
    plan_rows,
    resolve_base,
    run_study,
)
from vimerge.demo.image import COMPARED
from vimerge.demo.image_figures import methods_table, style
from vimerge.demo.report import plot_accuracy_vs_ratio, rows_table
from vimerge.demo.stats import (
    compare,
    compare_claim,
    correct_bits,
    drop_comparison,
    paired,
    select_items,
    verdict,
)
from vimerge.demo.timing import TimingPlan, protocol_text, time_rows
from vimerge.reduce import build, format_spec, parse_spec
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
    # re-trained at 0.54: merging, pruning, Vim shuffled, DeiT ordered and shuffled; the other
    # methods (ToP-ViM aligned and plain, token recognition, MTR) at 4 ratios
    assert len(keys) == len(set(keys)) == 11 + 11 + 2 * (4 + 4) + 5 + 4 * 4
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
    assert {r.family for r in rows if r.data == "secondary"} == {"stm-hsp", "stm-bnnm", "rmeeto-shuffled", "topvim",
                                                                  "topvim-plain", "evit", "mtr"}
    assert [r.key for r in rows if r.unreduced] == ["baseline", "deit-baseline"]
    assert len(plan_rows(QUICK, 50, 8)) == 6 + 6 + 2 * (2 + 2) + 2 + 3 + 4 * 2


def test_every_method_row_sees_rmeetos_tokens_per_block():
    """The comparison is at equal tokens: each method row's reducer gives exactly the token counts
    of the R-MeeTo row at its ratio (50 tokens, 8 blocks, interval 1; r = 8 is capped at the end:
    50 42 34 26 18 10 6 4)."""
    rows = {r.key: r for r in plan_rows(FULL, 50, 8)}
    assert parse_spec(rows["mtr@0.54"].reduce) == ("mtr", {"r": [0, 8, 8, 8, 8, 8, 4, 2]})
    assert parse_spec(rows["topvim-plain@0.28"].reduce) == ("topvim", {"r": [0, 4, 4, 4, 4, 4, 4, 4], "align": False})
    assert parse_spec(rows["topvim@0.28"].reduce) == ("topvim", {"r": [0, 4, 4, 4, 4, 4, 4, 4]})
    for t in FULL.ratios:
        want = build(rows[f"rmeeto@{t:g}"].reduce).token_counts(50, 8)
        for fam in ("topvim", "topvim-plain", "evit", "mtr"):
            assert build(rows[f"{fam}@{t:g}"].reduce).token_counts(50, 8) == want, (fam, t)
    assert build(rows["rmeeto@0.54"].reduce).token_counts(50, 8) == [50, 42, 34, 26, 18, 10, 6, 4]


def test_methods_table_and_claims_by_hand():
    n = 400
    good, bad = np.zeros(n, bool), np.zeros(n, bool)
    good[:300], bad[:200] = True, True
    rows = [_row("baseline", np.ones(n, bool), target_ratio=None, gflops_paper=0.2)] + [
        _row(f"{fam}@0.28", mask, gflops_paper=0.1) for fam, mask in
        (("rmeeto", good), ("prune", bad), ("mtr", good), ("topvim", bad), ("topvim-plain", good))]
    found = {c["claim"]: c for c in claims(rows)}
    assert found["MTR beats pruning without training"]["verdict"] == "reproduced"          # 75% vs 50%
    assert found["MTR beats ToP-ViM without training"]["verdict"] == "reproduced"
    assert found["ToP-ViM's hidden-state alignment beats plain pruning with the same scores"]["verdict"] == \
        "not reproduced"                                                                   # 50% vs 75%
    table = methods_table(rows, FAMILIES, COMPARED)
    lines = table.splitlines()
    # R-MeeTo has no difference to itself; pruning: -25 points, 2 s.e. = 2 * 2.165 (see above), significant
    assert any("R-MeeTo (merge)" in line and line.rstrip(" |").endswith("-") for line in lines)
    assert any("Pruning" in line and f"-25.00 ± {2 * np.sqrt(75) / 4:.2f} (-)" in line for line in lines)
    assert any("MTR" in line and "+0.00 ± 0.00" in line for line in lines)
    assert not any("Token recognition" in line for line in lines)                   # no row: no line


def test_demo_does_not_import_the_command_line():
    code = ("import sys, vimerge.demo; bad = [m for m in sys.modules if m.startswith('vimerge.cli')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_study_modules_do_not_import_each_other():
    # the image and video studies share the runner, the statistics and the report, not each other
    package = Path(vimerge.__file__).parent / "demo"
    for name, other in (("image", "video"), ("video", "image"), ("image_figures", "video"),
                        ("video_figures", "image")):
        text = (package / f"{name}.py").read_text()
        assert not re.search(rf"from \.{other}\b|import vimerge\.demo\.{other}\b", text), name
    for shared in ("runner", "study", "stats", "timing", "report", "base"):
        text = (package / f"{shared}.py").read_text()
        assert not re.search(r"from \.(image|video)", text), shared


# ------------------------------------------------------------------------------------ statistics and claims


def _row(key: str, correct: np.ndarray, **extra) -> dict:
    return {"key": key, "family": key.split("@")[0], "images": len(correct), "correct_bits": correct_bits(correct),
            "top1": 100.0 * correct.mean(), "setting": key, "reduction_ratio": 0.3, "target_ratio": 0.28,
            **extra}


def test_paired_comparison_by_hand():
    # 100 images: 45 both right, 15 only a, 5 only b, 35 both wrong.
    a = np.array([1] * 45 + [1] * 15 + [0] * 5 + [0] * 35, dtype=bool)
    b = np.array([1] * 45 + [0] * 15 + [1] * 5 + [0] * 35, dtype=bool)
    d, se, winner = compare(_row("x@1", a), _row("y@1", b))
    assert d == pytest.approx(10.0)
    assert se == pytest.approx(100 * np.sqrt(20 - 10 ** 2 / 100) / 100)     # sqrt(19) = 4.36 points
    assert winner == "a"
    assert compare(_row("y@1", b), _row("x@1", a))[2] == "b"
    b2 = np.array([1] * 45 + [0] * 10 + [1] * 10 + [0] * 35, dtype=bool)  # 10 only-a vs 10 only-b
    a2 = np.array([1] * 45 + [1] * 10 + [0] * 5 + [0] * 40, dtype=bool)
    d, se, winner = compare(_row("x@1", a2), _row("y@1", b2))
    assert (d, winner) == (pytest.approx(0.0), "tie")
    # 4 only-a and 1 only-b of 100: +3 points, s.e. sqrt(5 - 9/100) = 2.216: within two s.e.
    a3 = np.array([1] * 4 + [0] + [0] * 95, bool)
    b3 = np.array([0] * 4 + [1] + [0] * 95, bool)
    d, se, winner = compare(_row("x@1", a3), _row("y@1", b3))
    assert (d, se, winner) == (pytest.approx(3.0), pytest.approx(np.sqrt(4.91)), "tie")
    assert paired(np.zeros(0)) == (0.0, 0.0, "tie")


def test_drop_comparison_and_item_selection_by_hand():
    # 10 items. a: base all right, row right on 4 (drop 6/10); b: base right on 9, row on 8 (drop 1/10).
    ab = np.ones(10, bool)
    ar = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    bb = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    br = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    # d = [0,0,0,0, 1,1,1,1, 1-1=0, 1-0=1] -> sum 5, squares 5: mean 50 points, s.e. 100 sqrt(5 - 2.5) / 10
    d, se, o = drop_comparison(*(_row(f"r{i}@1", m) for i, m in enumerate((ab, ar, bb, br))))
    assert (d, se, o) == (pytest.approx(50.0), pytest.approx(10 * np.sqrt(2.5)), "a")
    picked = select_items(_row("x@1", ar), [0, 5, 3, 42])      # 42 is past the end: left out
    assert picked["images"] == 3 and picked["correct_bits"] == correct_bits(np.array([1, 0, 1], bool))


def test_verdicts_and_claim_records():
    assert [verdict(o) for o in (["a", "a"], ["a", "b"], ["tie", "b"], ["a", "tie"], [])] == [
        "reproduced", "mixed", "not reproduced", "inconclusive", "not measured"]
    a = np.array([1] * 60 + [0] * 40, bool)
    b = np.array([1] * 40 + [0] * 60, bool)
    c = compare_claim("A beats B", "a paper", [("at 1", _row("a@1", a), _row("b@1", b))], "A", "B",
                      lambda x, y: "; note")
    # 20 only-a, 0 only-b: +20 points, s.e. sqrt(20 - 400/100) = 4 points
    assert c == {"claim": "A beats B", "source": "a paper", "verdict": "reproduced",
                 "evidence": ["at 1: A 60.00% vs B 40.00% (+20.00 points, 2 s.e. = 8.00); note"]}


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
    verdicts = {c["claim"].split(" ")[0]: c["verdict"] for c in reversed(claims(rows))}   # first of a word wins
    assert verdicts["Merging"] == "reproduced"          # 75% vs 50%
    assert next(c for c in claims(rows) if c["claim"].endswith("same re-training"))["verdict"] == "not measured"
    assert verdicts["Token"] == "inconclusive"          # identical rows
    assert verdicts["Re-training"] == "not reproduced"  # 50% after vs 75% before
    assert verdicts["Training-free"] == "not measured"  # no STM rows
    text = next(c for c in claims(rows) if c["claim"].startswith("Merging"))["evidence"][0]
    # 100 only-a, 0 only-b of 400: +25 points, s.e. 100 sqrt(100 - 100^2/400) / 400 = 2.165
    assert text == f"at 0.54: merging 75.00% vs pruning 50.00% (+25.00 points, 2 s.e. = {2 * np.sqrt(75) / 4:.2f})"
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
    assert compare(_row("a@1", vim), _row("b@1", deit[:50]))[:2] == (0.0, 0.0)


# ------------------------------------------------------------------------------------ throughput


class FakeClock:
    """A clock that only moves when a fake forward says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_timing_protocol_on_a_fake_clock():
    clock, calls = FakeClock(), []
    # seconds per forward, round by round (the warm-up forward takes 100 s and must not count);
    # round 2 is a busy spell that slows every row alike
    plan = {"base": [2.0, 4.0, 2.0], "half": [1.0, 2.0, 1.25], "slow": [4.0, 8.0, 3.0]}

    def forward(key):
        def run():
            calls.append(key)
            done = sum(1 for c in calls if c == key)
            clock.now += 100.0 if done == 1 else plan[key][done - 2]
        return run

    got = time_rows({k: forward(k) for k in plan}, {"base": "base", "half": "base", "slow": None},
                    {"base": 64, "half": 64, "slow": 32}, TimingPlan(rounds=3, batch=64, warmup=1), clock=clock)
    # warm-up for every row first, then rounds in which every row (the unreduced one too) runs once
    assert calls == ["base", "half", "slow"] + ["base", "half", "slow"] * 3
    assert got["base"]["seconds"] == [2.0, 4.0, 2.0]
    assert got["half"]["best"] == 64 / 1.0 and got["half"]["median"] == 64 / 1.25
    assert got["slow"]["best"] == 32 / 3.0 and got["slow"]["median"] == 32 / 4.0
    # per-round speed-ups 2/1, 4/2, 2/1.25 = 2, 2, 1.6: the median is 2 (the busy round does not skew it)
    assert got["half"]["speedups"] == pytest.approx([2.0, 2.0, 1.6]) and got["half"]["speedup"] == pytest.approx(2.0)
    assert got["base"]["speedup"] == 1.0
    assert got["slow"]["speedup"] is None and got["slow"]["speedups"] == []
    assert (got["half"]["batch"], got["slow"]["batch"], got["half"]["rounds"]) == (64, 32, 3)
    with pytest.raises(ValueError, match="not among the timed rows"):
        time_rows({"a": lambda: None}, {"a": "b"}, {"a": 1}, TimingPlan())
    with pytest.raises(ValueError, match="rounds >= 1"):
        TimingPlan(rounds=0)
    assert "3 interleaved rounds" in protocol_text(TimingPlan(rounds=3), "image")


def test_speed_plot_styles_tell_every_row_apart():
    looks = {f: (s["color"], s["marker"], s["markerfacecolor"]) for f, s in ((f, style(f)) for f in FAMILIES)}
    assert len(set(looks.values())) == len(FAMILIES)          # no two families look alike
    assert style("prune")["color"] == style("deit-prune")["color"] == style("prune-retrained")["color"]
    assert style("deit-prune")["markerfacecolor"] == "white" != style("prune")["markerfacecolor"]
    assert style("rmeeto-retrained")["marker"] == "s" and style("rmeeto")["marker"] == "o"
    assert style("deit-rmeeto-retrained")["color"] != style("deit-prune")["color"]


# ------------------------------------------------------------------------------------ the runner


class ToyStudy(Study):
    """A third study in a few lines: unreduced, pruning and merging at one ratio on 24 images."""
    name = "toy"
    title = "toy study"
    unit = "image"
    families = {"baseline": "Unreduced", "prune": "Pruning", "rmeeto": "R-MeeTo"}
    plan = {"ratio": 0.28, "images": 24}
    timing = TimingPlan(rounds=2, batch=8)

    def __init__(self, data: str, checkpoint: str):
        self.data, self.checkpoint = data, checkpoint

    def prepare(self, *, progress: bool) -> Prepared:
        test = FashionMNIST(self.data, "test", limit=24)
        base = Base(self.checkpoint, "checkpoint", ["--checkpoint", self.checkpoint])
        return Prepared(bases={"vim_fmnist": base}, loaders={"test": make_loader(test, 8, 0)}, identity=[self.data])

    def rows(self) -> list[Row]:
        return [Row("baseline", "baseline", "no reduction", None, "none", "vim_fmnist"),
                Row("prune@0.28", "prune", "r=4", 0.28, "prune:r=4,interval=1", "vim_fmnist"),
                Row("rmeeto@0.28", "rmeeto", "r=4", 0.28, "rmeeto:r=4,interval=1", "vim_fmnist")]

    def eval_command(self, row, prepared, checkpoint):
        return shlex.join(["vimerge", "eval", "--model", "vim_fmnist", "--checkpoint", self.checkpoint, "--dataset",
                           "fashion-mnist", "--data", self.data, "--limit", "24", "--reduce", row.reduce])

    def claims(self, rows, prepared):
        by = {r["key"]: r for r in rows}
        return [compare_claim("Merging beats pruning", "toy", [("at 0.28", by["rmeeto@0.28"], by["prune@0.28"])],
                              "merging", "pruning")]

    def figures(self, rows, prepared, out):
        plot_accuracy_vs_ratio(rows, self.families, out / "acc.png", title="toy", xlabel="ratio",
                               hline_label="unreduced")
        return [("acc.png", "accuracy against ratio")]


def _reference_correct(checkpoint: str, spec: str, data: str) -> np.ndarray:
    """Per-image correctness by a plain forward of the 24 images (independent of the runner)."""
    net = vimerge.models.create_backbone("vim_fmnist", checkpoint=checkpoint)
    vimerge.apply(net, spec)
    test = FashionMNIST(data, "test", limit=24)
    with torch.inference_mode():
        logits = net.eval()(torch.stack([test[i][0] for i in range(24)]))
    return (logits.argmax(-1) == torch.as_tensor([test[i][1] for i in range(24)])).numpy()


def test_a_study_runs_resumes_and_reports_through_the_runner(tmp_path, monkeypatch):
    data = str(fake_fashion(tmp_path / "fm", n_train=16, n_test=24))
    torch.manual_seed(0)
    ckpt = tmp_path / "toy.pth"
    vimerge.save_checkpoint(vimerge.models.create_backbone("vim_fmnist"), ckpt)
    study, out = ToyStudy(data, str(ckpt)), tmp_path / "toy"
    real, calls, stop = runner.evaluate_row, [], {"at": "prune@0.28"}

    def counted(row, *args, **kwargs):
        calls.append(row.key)
        if row.key == stop["at"]:       # killed while the second row runs
            raise KeyboardInterrupt
        return real(row, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_row", counted)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, progress=False)
    saved = json.loads((out / "rows.partial.json").read_text())
    assert list(saved["rows"]) == ["baseline"] and saved["timing"] is None
    calls.clear()
    stop["at"] = None
    results = run_study(study, out, progress=False)
    assert calls == ["prune@0.28", "rmeeto@0.28"]               # the finished row is not recomputed
    assert results["setup"]["rows_reused"] == 1 and results["study"] == "toy"
    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "prune@0.28", "rmeeto@0.28"]
    assert rows["baseline"]["correct_bits"] == saved["rows"]["baseline"]["correct_bits"]
    masks = {k: _reference_correct(str(ckpt), r["reduce"], data) for k, r in rows.items()}
    for key, r in rows.items():          # the row's numbers are those of a plain forward
        assert r["correct"] == masks[key].sum() and r["correct_bits"] == correct_bits(masks[key])
        assert r["images"] == 24 and r["top1"] == pytest.approx(100 * masks[key].mean())
    assert rows["rmeeto@0.28"]["token_counts"] == [50, 46, 42, 38, 34, 30, 26, 22]

    # the claim, from the shared statistic, against the formula on the reference masks
    m, p = masks["rmeeto@0.28"].astype(int), masks["prune@0.28"].astype(int)
    n01, n10 = int(((m == 1) & (p == 0)).sum()), int(((m == 0) & (p == 1)).sum())
    d, se = 100 * (n01 - n10) / 24, 100 * np.sqrt(n01 + n10 - (n01 - n10) ** 2 / 24) / 24
    [c] = results["claims"]
    assert c["evidence"] == [f"at 0.28: merging {100 * m.mean():.2f}% vs pruning {100 * p.mean():.2f}% "
                             f"({d:+.2f} points, 2 s.e. = {2 * se:.2f})"]
    assert c["verdict"] == ("reproduced" if d > 2 * se else "not reproduced" if d < -2 * se else "inconclusive")

    # throughput: 2 interleaved rounds of 8 images for every row, speed-ups within each round
    base_t = rows["baseline"]["throughput"]
    assert rows["baseline"]["speedup"] == 1.0 and len(base_t["seconds"]) == 2 and base_t["batch"] == 8
    for key in ("prune@0.28", "rmeeto@0.28"):
        t = rows[key]["throughput"]
        ratios = [b / s for b, s in zip(base_t["seconds"], t["seconds"])]
        assert t["speedups"] == pytest.approx(ratios) and rows[key]["speedup"] == pytest.approx(np.median(ratios))
        assert t["best"] == pytest.approx(8 / min(t["seconds"]))

    report = (out / "report.md").read_text()
    assert report.startswith("# toy study") and "## Throughput" in report and "2 interleaved rounds" in report
    assert f"**Merging beats pruning** (toy): **{c['verdict']}**" in report and "![accuracy against ratio](acc.png)" \
        in report
    assert rows_table(results["rows"]).splitlines()[2].startswith("| `baseline` |")
    assert results["files"] == ["results.json", "report.md", "acc.png"] and (out / "acc.png").is_file()

    # once more: every row and the throughput come from the store
    def never(*args, **kwargs):
        raise AssertionError("recomputed")
    monkeypatch.setattr(runner, "evaluate_row", never)
    monkeypatch.setattr(runner, "time_rows", never)
    again = run_study(study, out, progress=False)
    assert again["setup"]["rows_reused"] == 3
    assert [r["throughput"] for r in again["rows"]] == [r["throughput"] for r in results["rows"]]
    # fresh, or another plan (another fingerprint): everything again
    monkeypatch.setattr(runner, "evaluate_row", counted)
    monkeypatch.setattr(runner, "time_rows", time_rows)
    calls.clear()
    study.plan = {"ratio": 0.28, "images": 24, "other": 1}
    assert run_study(study, out, progress=False)["setup"]["rows_reused"] == 0
    assert calls == ["baseline", "prune@0.28", "rmeeto@0.28"]

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




# ------------------------------------------------------------------------------------ end to end


def _report_rows(report: str) -> dict[str, list[str]]:
    cells = {}
    for line in report.splitlines():
        m = re.match(r"\| `([^`]+)` \|(.*)\|$", line)
        if m:
            cells[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return cells


def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vimerge.demo.image, "TIMING", TimingPlan(rounds=2, batch=16))
    data = DEFAULT_ROOT if HAVE_FMNIST else str(fake_fashion(tmp_path / "fm"))
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data", data, "-o", str(out), "--limit", "200", "--retrain-images", "128",
            "--no-progress"]
    real, calls = runner.evaluate_row, []

    def stop_at_third(row, *args, **kwargs):
        calls.append(row.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(row, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_row", stop_at_third)     # a killed demo ...
    assert cli.main(argv) == 130
    assert "run the same command to continue" in capsys.readouterr().err
    assert list(json.loads((out / "rows.partial.json").read_text())["rows"]) == calls[:2]
    monkeypatch.setattr(runner, "evaluate_row", real)               # ... continues where it stopped
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("results.json", "report.md", "accuracy_vs_ratio.png", "accuracy_vs_speed.png",
                 "merged_tokens.png", "transformer_vs_mamba.png"):
        assert (out / name).is_file(), name
    for name in ("accuracy_vs_ratio.png", "accuracy_vs_speed.png", "merged_tokens.png", "transformer_vs_mamba.png"):
        pixels = np.asarray(Image.open(out / name).convert("L"))
        assert pixels.shape[0] > 100 and pixels.std() > 10, name     # a drawing, not a blank page

    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["rows_reused"] == 2
    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == [s.key for s in plan_rows(QUICK, 50, 8)]
    assert list(rows)[:2] == calls[:2]
    assert results["setup"]["test_images"] == 200
    assert results["versions"]["torch"] and results["timings"]["total"] > 0
    for r in rows.values():    # accuracies are computed from the per-image record
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(r["correct_bits"]), np.uint8))[:200]
        assert r["images"] == 200 and bits.sum() == r["correct"]
        assert r["top1"] == pytest.approx(100 * r["correct"] / 200)
        assert len(r["throughput"]["seconds"]) == 2 and r["throughput"]["batch"] == 16
    assert rows["baseline"]["speedup"] == rows["deit-baseline"]["speedup"] == 1.0
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
        assert table[key][8] == f"{r['throughput']['best']:.0f} ({r['throughput']['median']:.0f})"
        assert table[key][9] == f"{r['speedup']:.2f}x"
    for c in results["claims"]:
        assert f"**{c['claim']}** ({c['source']}): **{c['verdict']}**" in report
    assert protocol_text(TimingPlan(rounds=2, batch=16), "image") in report
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
