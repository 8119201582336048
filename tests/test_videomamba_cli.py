"""The command line on a tiny video model: eval (views, unreadable files, a sweep), retrain and the
re-trained weights evaluated as they were trained, flops (Table 13 as printed), bench, visualize,
and the errors that name the fix."""

import json
from pathlib import Path

import pytest
import torch

import vimerge
from vimerge.cli import main
from vimerge.measure.evaluate import view_logits

av = pytest.importorskip("av")

from test_video_data import write_video  # noqa: E402

TINY = ["--model", "videomamba_tiny_k400", "--set", "depth=2", "--set", "embed_dim=16", "--img-size", "32",
        "--num-frames", "4", "--num-classes", "2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """train/ and val/ folders of two classes (dark and bright clips), one corrupt file in val/."""
    root = tmp_path_factory.mktemp("clips")
    for split, count in (("train", 4), ("val", 2)):
        for label, cls in enumerate(("dark", "bright")):
            for j in range(count):
                write_video(root / split / cls / f"{j}.mp4", frames=10, width=40, height=32, gradient=label == 1)
    (root / "val" / "bright" / "broken.mp4").write_bytes(b"not a video" * 20)
    torch.manual_seed(0)
    model = vimerge.create_model("videomamba_tiny_k400", depth=2, embed_dim=16, img_size=32, num_frames=4,
                                 num_classes=2)
    vimerge.save_checkpoint(model, root / "tiny.pth")
    return root


def test_eval_reads_clips_averages_views_and_names_skipped_files(videos, capsys):
    args = ["eval", *TINY, "--checkpoint", str(videos / "tiny.pth"), "--data", str(videos), "--no-progress",
            "--workers", "0", "--json", "--batch-size", "2"]
    assert main([*args, "--num-clips", "2", "--num-crops", "3"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["dataset"] == "video" and row["data"].endswith("val") and row["views"] == 6
    assert row["images"] == 4 and row["num_frames"] == 4 and row["token_counts"] == [17, 17]
    assert [Path(p).name for p in row["skipped"]] == ["broken.mp4"]
    # the averaged views are what the model gives each view, averaged
    model = vimerge.create_model("videomamba_tiny_k400", depth=2, embed_dim=16, img_size=32, num_frames=4,
                                 num_classes=2, checkpoint=str(videos / "tiny.pth")).eval()
    views = torch.randn(2, 6, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(view_logits(model, views), model(views.flatten(0, 1)).view(2, 6, 2).mean(1))
    assert main([*args, "--sweep", "none;rmeeto:r=4,interval=1;stm:final_ratio=0.2,per_side=3"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["token_counts"] for r in rows] == [[17, 17], [17, 13], [17, 14]]


def test_retrain_a_video_model_and_evaluate_it_as_trained(videos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["retrain", *TINY, "--checkpoint", str(videos / "tiny.pth"), "--data", str(videos),
                 "--reduce", "rmeeto:r=4,interval=1", "--epochs", "1", "--batch-size", "2", "--effective-batch", "2",
                 "--lr", "1e-3", "--output", str(out), "--no-progress", "--workers", "0", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "finished" and result["global_step"] == 4 and result["eval_acc"] is not None
    assert main(["eval", "--checkpoint", str(out / "final.pth"), "--data", str(videos), "--no-progress",
                 "--workers", "0", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "videomamba_tiny_k400" and row["num_frames"] == 4
    assert row["reduce"] == "rmeeto:r=4,interval=1" and row["token_counts"] == [17, 13]


def test_flops_print_table_13(capsys):
    assert main(["flops", "--model", "videomamba_small_k400", "--reduce", "rmeeto:r=88", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert round(row["gflops_paper"], 2) == 30.99 and row["token_counts"][-1] == 601
    # an image preset becomes its video model with --num-frames
    assert main(["flops", "--model", "videomamba_tiny", "--num-frames", "8", "--num-classes", "400"]) == 0
    assert "11.54 GFLOPs (paper convention)" in capsys.readouterr().out
    assert main(["flops", "--model", "videomamba_middle_k400", "--r", "88"]) == 0
    assert "videomamba_middle_k400 (rmeeto:r=88): 71.71 GFLOPs (paper convention)" in capsys.readouterr().out


def test_bench_and_visualize_take_clips(videos, tmp_path, capsys):
    assert main(["bench", *TINY, "--set", "depth=4", "--ratios", "0,0.1", "--batch-size", "1", "--repeats", "1",
                 "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["ratio"] for r in rows] == [0.0, 0.1] and all(r["img_s"] > 0 for r in rows)
    png = tmp_path / "groups.png"
    assert main(["visualize", *TINY, "--set", "depth=4", "--reduce", "rmeeto:r=3",
                 "--video", str(videos / "val" / "dark" / "0.mp4"), str(videos / "val" / "bright" / "0.mp4"),
                 "-o", str(png)]) == 0
    assert "2 clip(s), 4 x 4 patches -> 14 tokens" in capsys.readouterr().out
    from PIL import Image
    with Image.open(png) as img:
        assert img.width > 4 * 4 * 6 and img.height > 4 * 4 * 6       # 4 rows of 4 frames


def test_video_options_on_image_models_say_what_to_do(videos, capsys):
    assert main(["flops", "--model", "vim_tiny", "--num-frames", "8"]) == 2
    assert "vim_tiny is an image model" in capsys.readouterr().err
    assert main(["visualize", "--model", "vim_tiny", "--video", str(videos / "val" / "dark" / "0.mp4")]) == 2
    assert "--video needs a video model" in capsys.readouterr().err
    assert main(["eval", *TINY, "--no-progress"]) == 2
    assert "is a video model (4 frames): give --data" in capsys.readouterr().err
