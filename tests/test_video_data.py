"""The video reader (PyAV): segment sampling, crops, views, class folders and annotation lists,
and unreadable files (corrupt, truncated) reported by name and skipped. The tests write their
own small MP4 files."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from vimerge.data import Skipped, collate_skipping, make_loader  # noqa: E402
from vimerge.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vimerge.data.video import VideoDataset, crop_offsets, is_video_source, read_frames, segment_indices  # noqa: E402

STEP = 10     # frame i has red value STEP * i: the decoded frame says which frame it is


def write_video(path: Path, frames: int = 20, width: int = 48, height: int = 32, faststart: bool = False,
                gradient: bool = False) -> Path:
    """An MPEG-4 file whose frame i is red STEP * i (green: a left-to-right ramp if ``gradient``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = STEP * i
            if gradient:
                img[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(clip: torch.Tensor) -> list[int]:
    """Which source frame each frame of a normalised (C, T, H, W) clip is (from its red value)."""
    red = clip[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]          # back to [0, 1]
    return [round(float(v) * 255 / STEP) for v in red.mean(dim=(1, 2))]


def test_segment_sampling_is_the_official_rule():
    # 20 frames, 4 segments of 19/4 = 4.75: starts round(4.75 i) = 0, 5, 10 (9.5 rounds to even), 14
    assert segment_indices(20, 4) == [2, 7, 12, 16]                        # offset int(4.75 / 2)
    assert segment_indices(20, 4, 0, 2) == [1, 6, 11, 15]                  # offsets int(4.75 / 3 * k)
    assert segment_indices(20, 4, 1, 2) == [3, 8, 13, 17]
    assert segment_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]               # short videos repeat frames
    assert segment_indices(1, 4) == [0, 0, 0, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        picks = segment_indices(20, 4, generator=gen, sampling="random")
        assert all(lo <= p <= hi for p, lo, hi in zip(picks, [0, 5, 10, 14], [5, 10, 14, 19]))
    assert crop_offsets(48, 32, 1) == [8] and crop_offsets(48, 32, 3) == [0, 8, 16]


def test_read_frames_decodes_the_wanted_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4")
    total, images = read_frames(str(path), [0, 7, 19])
    assert total == 20 and sorted(images) == [0, 7, 19]
    reds = {i: np.asarray(im)[..., 0].mean() for i, im in images.items()}
    assert all(abs(reds[i] - STEP * i) < 4 for i in reds)


def make_folder(root: Path) -> Path:
    write_video(root / "run" / "a.mp4", frames=20)
    write_video(root / "run" / "b.mp4", frames=12)
    write_video(root / "walk" / "c.mp4", frames=16)
    (root / "walk" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    good = write_video(root / "walk" / "cut.mp4", frames=20).read_bytes()
    (root / "walk" / "cut.mp4").write_bytes(good[: len(good) // 2])            # index at the end: lost
    fast = write_video(root / "walk" / "cut_fast.mp4", frames=20, faststart=True).read_bytes()
    (root / "walk" / "cut_fast.mp4").write_bytes(fast[: len(fast) * 2 // 5])   # index first, frames cut
    return root


def test_class_folders_give_clips_and_skip_unreadable_files_by_name(tmp_path):
    root = make_folder(tmp_path / "videos")
    assert is_video_source(root) and not is_video_source(tmp_path / "missing")
    ds = VideoDataset(root, num_frames=4, img_size=32)
    assert ds.classes == ["run", "walk"] and len(ds) == 6
    items = {Path(ds.samples[i][0]).name: ds[i] for i in range(len(ds))}
    clip, label = items["a.mp4"]
    assert clip.shape == (3, 4, 32, 32) and label == 0 and frame_ids(clip) == [2, 7, 12, 16]
    assert frame_ids(items["b.mp4"][0]) == segment_indices(12, 4) and items["c.mp4"][1] == 1
    for name in ("broken.mp4", "cut.mp4", "cut_fast.mp4"):
        assert isinstance(items[name], Skipped) and items[name].path.endswith(name)
    assert "truncated" in items["cut_fast.mp4"].reason
    assert sorted(Path(p).name for p in ds.skipped) == ["broken.mp4", "cut.mp4", "cut_fast.mp4"]
    batch = collate_skipping([ds[i] for i in range(len(ds))])
    assert batch.images.shape == (3, 3, 4, 32, 32) and batch.labels.tolist() == [0, 0, 1]
    assert len(batch.skipped) == 3
    loaded = list(make_loader(ds, batch_size=4))
    assert sum(len(b.skipped) for b in loaded) == 3


def test_views_are_clips_times_crops_and_the_crops_spread_along_the_long_side(tmp_path):
    path = write_video(tmp_path / "cls" / "g.mp4", frames=20, width=64, height=32, gradient=True)
    one = VideoDataset(tmp_path, num_frames=4, img_size=32)[0][0]
    views = VideoDataset(tmp_path, num_frames=4, img_size=32, num_clips=2, num_crops=3)[0][0]
    assert views.shape == (6, 3, 4, 32, 32)
    green = views[:3, 1].mean(dim=(1, 2, 3))                 # clip 0: left, centre, right crops
    assert green[0] < green[1] < green[2]
    torch.testing.assert_close(views[1, 1].mean(), views[4, 1].mean(), atol=0.05, rtol=0)   # same crop, clip 1
    write_video(tmp_path / "plain" / "cls" / "p.mp4", frames=20)       # no gradient: frame ids readable
    plain = VideoDataset(tmp_path / "plain", num_frames=4, img_size=32, num_clips=2, num_crops=3)[0][0]
    assert [frame_ids(v) for v in plain] == [[1, 6, 11, 15]] * 3 + [[3, 8, 13, 17]] * 3     # clip-major
    assert path.exists() and one.shape == (3, 4, 32, 32)


def test_a_clip_is_the_decoded_frames_cropped_and_normalised(tmp_path):
    path = write_video(tmp_path / "cls" / "v.mp4", frames=20, width=48, height=32)
    clip = VideoDataset(tmp_path, num_frames=4, img_size=32)[0][0]
    _, images = read_frames(str(path), [2, 7, 12, 16])
    for t, index in enumerate([2, 7, 12, 16]):        # short side 32 already: centre crop at x = 8
        pixels = torch.from_numpy(np.asarray(images[index].crop((8, 0, 40, 32)), dtype=np.float32) / 255)
        want = (pixels - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(clip[:, t], want.permute(2, 0, 1))


def test_resize_short_side_then_crop(tmp_path):
    write_video(tmp_path / "cls" / "v.mp4", frames=8, width=48, height=32)
    ds = VideoDataset(tmp_path, num_frames=2, img_size=(16, 24), short_side=20)
    assert ds[0][0].shape == (3, 2, 16, 24)
    grey = VideoDataset(tmp_path, num_frames=2, img_size=16, channels=1)
    assert grey[0][0].shape == (1, 2, 16, 16)


def test_annotation_lists_with_relative_paths_and_separators(tmp_path):
    write_video(tmp_path / "clips" / "x.mp4", frames=10)
    write_video(tmp_path / "clips" / "y.mp4", frames=10)
    (tmp_path / "val.txt").write_text("clips/x.mp4 3\n\n# a comment\nclips/y.mp4 0\nclips/missing.mp4 1\n")
    ds = VideoDataset(None, annotations=tmp_path / "val.txt", num_frames=2, img_size=16)
    assert ds.classes == ["0", "1", "2", "3"] and [label for _, label in ds.samples] == [3, 0, 1]
    assert ds[0][1] == 3 and ds[0][0].shape == (3, 2, 16, 16)
    assert isinstance(ds[2], Skipped) and "missing.mp4" in ds[2].path
    (tmp_path / "val.csv").write_text("x.mp4,2\n")
    csv = VideoDataset(tmp_path / "clips", annotations=tmp_path / "val.csv", separator=",", num_frames=2, img_size=16)
    assert csv[0][1] == 2 and is_video_source(tmp_path / "val.csv")
    (tmp_path / "bad.txt").write_text("x.mp4 cat\n")
    with pytest.raises(ValueError, match="bad.txt:1: expected 'path label'"):
        VideoDataset(tmp_path, annotations=tmp_path / "bad.txt")


def test_random_sampling_is_reproducible_per_epoch(tmp_path):
    write_video(tmp_path / "cls" / "v.mp4", frames=20)
    ds = VideoDataset(tmp_path, num_frames=4, img_size=16, sampling="random", seed=3)
    first = frame_ids(ds[0][0])
    assert frame_ids(ds[0][0]) == first
    picks = set()
    for epoch in range(6):
        ds.epoch = epoch
        picks.add(tuple(frame_ids(ds[0][0])))
    assert len(picks) > 1
