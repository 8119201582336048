"""The video study (`vimerge demo --video`): the clip generator, its claims by hand, and the quick
study end to end through the shared runner on a few clips (one of them corrupt), with every output
checked, the throughput protocol's records, and rows re-evaluated by their commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vimerge
from vimerge import cli
from vimerge.data.fashion_mnist import DEFAULT_ROOT, is_fashion_mnist_dir, load_split
from vimerge.data.video import read_frames

av = pytest.importorskip("av")

import vimerge.demo.video  # noqa: E402
from test_demo import _row, fake_fashion  # noqa: E402
from vimerge.demo.clips import ClipGeometry, clip_frames, clip_path, make_clips, trajectory  # noqa: E402
from vimerge.demo.timing import TimingPlan, protocol_text  # noqa: E402
from vimerge.demo.video import VIDEO_MODEL, VIDEO_QUICK, claims, plan_video_rows  # noqa: E402

HAVE_FMNIST = is_fashion_mnist_dir(DEFAULT_ROOT)


@pytest.fixture(scope="module")
def garments(tmp_path_factory) -> str:
    """The Fashion-MNIST directory: the Debian package, else four small fake IDX files."""
    if HAVE_FMNIST:
        return DEFAULT_ROOT
    return str(fake_fashion(tmp_path_factory.mktemp("fmnist"), n_train=128, n_test=40))


# ------------------------------------------------------------------------------------ the clips


def test_clips_are_deterministic_and_decode_to_what_was_drawn(garments, tmp_path):
    images, labels = load_split(garments, "test")
    g = ClipGeometry()
    # clip i depends only on (seed, split, i): the same trajectory whatever else is made
    assert np.array_equal(trajectory(3, "test", g), trajectory(3, "test", g))
    assert not np.array_equal(trajectory(3, "test", g), trajectory(4, "test", g))
    assert not np.array_equal(trajectory(3, "test", g), trajectory(3, "train", g))
    path = trajectory(7, "test", g)
    assert path.min() >= 0 and path.max() <= g.canvas - 28                     # always whole on the canvas
    assert np.abs(np.diff(path, axis=0)).max() <= 2                            # at most 1.5 px a frame, rounded
    frames = clip_frames(images[2], 2, "test", g)
    assert frames.shape == (g.file_frames, g.canvas, g.canvas) and frames.dtype == np.uint8
    top, left = trajectory(2, "test", g)[0]
    assert np.array_equal(frames[0, top:top + 28, left:left + 28], images[2])
    assert frames.sum() == g.file_frames * int(images[2].sum())                # nothing but the garment

    a = make_clips(tmp_path / "a", "test", 3, data=garments, progress=False)
    b = make_clips(tmp_path / "b", "test", 5, data=garments, progress=False)   # more clips: the first 3 the same
    assert a.read_text().splitlines() == b.read_text().splitlines()[:3]
    assert a.read_text().splitlines()[1] == f"test/00001.mp4 {labels[1]}"      # the official `path label` list
    for i in range(3):
        _, da = read_frames(str(clip_path(tmp_path / "a", "test", i)), range(g.file_frames))
        _, db = read_frames(str(clip_path(tmp_path / "b", "test", i)), range(g.file_frames))
        grey_a = np.stack([np.asarray(da[k].convert("L")) for k in range(g.file_frames)])
        grey_b = np.stack([np.asarray(db[k].convert("L")) for k in range(g.file_frames)])
        assert np.array_equal(grey_a, grey_b)
        drawn = clip_frames(images[i], i, "test", g).astype(int)
        assert np.abs(grey_a.astype(int) - drawn).max() <= 2                  # lossless up to YUV rounding
    with pytest.raises(ValueError, match="holds clips made with"):
        make_clips(tmp_path / "a", "test", 3, data=garments, geometry=ClipGeometry(seed=1), progress=False)


def test_video_rows_share_the_image_rows_ratios():
    rows = {r.key: r for r in plan_video_rows(VIDEO_QUICK)}
    for t in VIDEO_QUICK.ratios:
        v, i = vimerge.create_model(VIDEO_MODEL), vimerge.create_model("vim_fmnist")
        vimerge.apply(v, rows[f"rmeeto@{t:g}"].reduce)
        vimerge.apply(i, rows[f"image-rmeeto@{t:g}"].reduce)
        rv = vimerge.measure.flops.model_cost(v)["reduction_ratio"]
        ri = vimerge.measure.flops.model_cost(i)["reduction_ratio"]
        assert abs(rv - ri) < 0.01
        stm = vimerge.create_model(VIDEO_MODEL)
        vimerge.apply(stm, rows[f"stm@{t:g}"].reduce)
        assert abs(vimerge.measure.flops.model_cost(stm)["reduction_ratio"] - rv) < 0.01


def test_video_claims_by_hand():
    # 5 garments; clip 2 could not be read, so the video rows hold garments 0, 1, 3, 4.
    # images: unreduced all right, merged right on garments 0 and 2 only; video: unreduced right on
    # all 4 clips, merged on 3 (garments 0, 1, 3). Per garment (image drop) - (video drop), on
    # garments 0, 1, 3, 4: 0-0, 1-0, 1-0, 1-1 = 0, 1, 1, 0: +50 points, s.e. 100 sqrt(2 - 4/4) / 4 = 25.
    ones4, ones5 = np.ones(4, bool), np.ones(5, bool)
    rows = [_row("baseline", ones4, model=VIDEO_MODEL),
            _row("rmeeto@0.54", np.array([1, 1, 1, 0], bool), target_ratio=0.54, model=VIDEO_MODEL),
            _row("image-baseline", ones5), _row("image-rmeeto@0.54", np.array([1, 0, 1, 0, 0], bool),
                                                target_ratio=0.54)]
    found = {c["claim"].split(" (")[0]: c for c in claims(rows, garments=[0, 1, 3, 4])}
    video = found["Video tolerates merging better than images"]
    assert video["verdict"] == "inconclusive"                           # 50 = 2 s.e.: not more
    assert "the images' drop +50.00 points larger on the same garments (2 s.e. = 50.00)" in video["evidence"][0]
    assert video["caveat"]
    assert found["Re-training recovers the accuracy merging loses"]["verdict"] == "not measured"
    assert found["Which merging scope keeps most accuracy: flat"]["verdict"] == "not measured"


# ------------------------------------------------------------------------------------ the study


def _is_drawing(path: Path) -> bool:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    return img.width >= 200 and img.height >= 150 and pixels.std() > 10


def test_quick_video_study_end_to_end(garments, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VIMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vimerge.demo.video, "TIMING", TimingPlan(rounds=2, batch=8))
    clips = tmp_path / "clips"
    make_clips(clips, "test", 16, data=garments, progress=False)
    corrupt = clip_path(clips, "test", 5)
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)       # reported and skipped
    torch.manual_seed(0)
    ckpt = tmp_path / "base.pth"
    vimerge.save_checkpoint(vimerge.create_model(VIDEO_MODEL), ckpt)
    out = tmp_path / "study"
    argv = ["demo", "--video", "--quick", "--data", garments, "--clips", str(clips), "--checkpoint", str(ckpt),
            "--limit", "16", "--retrain-images", "64", "-o", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "| `baseline` |" in printed.out and "[" in printed.out                   # tables and verdicts printed
    assert "00005.mp4" in printed.err

    results = json.loads((out / "results.json").read_text())
    assert results["files"] == ["results.json", "report.md", "accuracy_vs_ratio.png", "drop_vs_ratio.png",
                                "merged_frames.png"]
    for name in results["files"]:
        assert (out / name).is_file()
    for name in results["files"][2:]:
        assert _is_drawing(out / name), name
    assert [Path(p).name for p in results["skipped"]] == ["00005.mp4"]
    assert results["setup"]["test_clips"] == 15 and 5 not in results["garments"]
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {s.key for s in plan_video_rows(VIDEO_QUICK)}
    assert rows["baseline"]["token_counts"] == [101] * 8 and rows["image-baseline"]["token_counts"] == [50] * 8
    assert rows["rmeeto-time@0.28"]["token_counts"] == rows["rmeeto@0.28"]["token_counts"]
    assert all(r["images"] == 15 for k, r in rows.items() if not k.startswith("image-"))
    assert rows["rmeeto-retrained@0.54"]["retrain"]["steps"] == 1
    for r in rows.values():     # the throughput protocol: 2 rounds of 8 clips (images), per-round speed-ups
        t = r["throughput"]
        assert len(t["seconds"]) == len(t["speedups"]) == 2 and t["batch"] == 8
        base = rows["image-baseline" if r["model"] == "vim_fmnist" else "baseline"]["throughput"]
        assert r["speedup"] == pytest.approx(np.median([b / s for b, s in zip(base["seconds"], t["seconds"])]))
    assert rows["baseline"]["speedup"] == rows["image-baseline"]["speedup"] == 1.0
    assert {c["claim"].split(" (")[0] for c in results["claims"]} >= {
        "Video tolerates merging better than images", "Merging beats pruning at high reduction ratios",
        "Re-training recovers the accuracy merging loses", "Which merging scope keeps most accuracy: flat"}

    # the report says what the JSON says
    report = (out / "report.md").read_text()
    for key, r in rows.items():
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| `{key}` |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5] == f"{r['top1']:.2f}" and cells[3] == " ".join(map(str, r["token_counts"]))
    for c in results["claims"]:
        assert f"**{c['verdict']}**" in report
    assert protocol_text(TimingPlan(rounds=2, batch=8), "clip") in report

    # a training-free and the re-trained row, re-evaluated by their stored commands: the same numbers
    for key in ("rmeeto@0.54", "rmeeto-retrained@0.54", "image-rmeeto@0.28"):
        command = shlex.split(rows[key]["eval_command"])
        assert command[:2] == ["vimerge", "eval"]
        assert cli.main(command[1:] + ["--json", "--no-progress", "--workers", "0"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert (got["images"], got["correct"]) == (rows[key]["images"], rows[key]["correct"]), key
        assert got["token_counts"] == rows[key]["token_counts"]
        if not key.startswith("image-"):
            assert [Path(p).name for p in got["skipped"]] == ["00005.mp4"]

    # run again: every row comes from the store, nothing is re-evaluated
    assert cli.main(argv) == 0
    capsys.readouterr()
    again = json.loads((out / "results.json").read_text())
    assert again["setup"]["rows_reused"] == len(rows)
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in results["rows"]]
    assert re.search(r"total \d+ s", (out / "report.md").read_text())
