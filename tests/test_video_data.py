"""The video reader (PyAV): segment sampling, crops, views, class folders and annotation lists,
and unreadable files (corrupt, truncated) reported by name and skipped; display rotation,
frame counts that the header gets wrong, and annotation lists as other tools write them. The
tests write their own small video files (PyAV; ffmpeg only for the test marked as needing it)."""

import os
import shutil
import struct
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from vimerge.data import Skipped, collate_skipping, make_loader  # noqa: E402
from vimerge.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vimerge.data.video import (  # noqa: E402
    FrameCountWarning,
    VideoDataset,
    crop_offsets,
    frame_orientation,
    is_video_source,
    read_annotations,
    read_frames,
    segment_indices,
    upright,
)

STEP = 10     # frame i has red value STEP * i: the decoded frame says which frame it is


def write_video(path: Path, frames: int = 20, width: int = 48, height: int = 32, faststart: bool = False,
                gradient: bool = False, rotation: float | None = None, hflip: bool = False,
                format: str | None = None, marker: bool = False) -> Path:
    """An MPEG-4 file whose frame i is red STEP * i (green: a left-to-right ramp if ``gradient``;
    blue: a top-to-bottom ramp and a white 8 x 8 top-left corner if ``marker``). ``rotation``:
    a display matrix turning the frames counter-clockwise (PyAV's ``set_display_rotation``),
    mirrored after it if ``hflip``; ``format``: the container (default: from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=format, options=options) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        if rotation is not None or hflip:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (set_display_rotation)")
            stream.set_display_rotation(rotation or 0, hflip=hflip)
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = STEP * i
            if gradient:
                img[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
            if marker:
                img[..., 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
                img[:8, :8] = 255
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
    assert "no frame decodes (the container records 20" in items["cut_fast.mp4"].reason
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


# ---- display rotation (issue 25.1) ------------------------------------------------------------

def stored_frames(path: Path) -> list[np.ndarray]:
    """The frames as stored (sideways for a rotated file): PyAV's decoding, no rotation applied."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def shown(stored: np.ndarray, rotation: int, hflip: bool = False) -> np.ndarray:
    """What a player shows for a display matrix of ``rotation`` degrees counter-clockwise (then
    mirrored left-right if ``hflip``): np.rot90 turns counter-clockwise for k > 0."""
    out = np.rot90(stored, k=rotation // 90)
    return out[:, ::-1] if hflip else out


@pytest.mark.parametrize("rotation", [90, -90, 180, 270])
def test_display_rotation_is_applied_as_players_do(tmp_path, rotation):
    path = write_video(tmp_path / "phone.mp4", frames=6, width=48, height=32, rotation=rotation, marker=True)
    stored = stored_frames(path)
    total, images = read_frames(str(path), [0, 5])
    assert total == 6
    for i in (0, 5):
        got = np.asarray(images[i])
        np.testing.assert_array_equal(got, shown(stored[i], rotation))
    # the white corner the camera wrote at the stored top-left, where the screen shows it:
    # turned counter-clockwise by 90 it is bottom-left, by 180 bottom-right, by 270 (= -90) top-right
    corner = {90: (slice(40, 48), slice(0, 8)), 180: (slice(24, 32), slice(40, 48)),
              -90: (slice(0, 8), slice(24, 32)), 270: (slice(0, 8), slice(24, 32))}[rotation]
    got = np.asarray(images[0])
    assert got.shape == ((48, 32, 3) if rotation % 180 else (32, 48, 3))
    assert got[corner].min() > 200 and got[..., 1].mean() < 60


def test_a_portrait_recording_is_resized_and_cropped_as_portrait(tmp_path):
    # stored 48 wide x 32 high, shown turned by 90: 32 wide x 48 high. img_size 32: short side
    # 32 already (no resize), the crop is centred along the height: rows 8..40 of the shown frame.
    path = write_video(tmp_path / "cls" / "portrait.mp4", frames=8, width=48, height=32, rotation=90,
                       marker=True)
    stored = stored_frames(path)
    ds = VideoDataset(tmp_path, num_frames=2, img_size=32)
    clip = ds[0][0]
    for t, index in enumerate(segment_indices(8, 2)):
        pixels = torch.from_numpy(shown(stored[index], 90)[8:40, 0:32].astype(np.float32) / 255)
        want = (pixels - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(clip[:, t], want.permute(2, 0, 1))


@pytest.mark.parametrize("rotation", [0, 90, 180, -90])
def test_mirrored_display_matrices_are_read_from_the_matrix_not_the_angle(tmp_path, rotation):
    # a mirror turns a rotation's angle into another one (hflip at 0 reads as rotation -180):
    # the angle alone would turn the frame upside down instead of mirroring it
    path = write_video(tmp_path / "selfie.mp4", frames=2, rotation=rotation, hflip=True, marker=True)
    _, images = read_frames(str(path), [0])
    np.testing.assert_array_equal(np.asarray(images[0]), shown(stored_frames(path)[0], rotation, hflip=True))


def test_rotation_falls_back_to_the_frame_angle_and_the_old_rotate_tag():
    img = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    arr = np.asarray(img)
    # a PyAV without frame side data but with VideoFrame.rotation (counter-clockwise degrees)
    frame = SimpleNamespace(side_data=None, rotation=90)
    np.testing.assert_array_equal(np.asarray(upright(img, frame_orientation(frame))), np.rot90(arr, 1))
    # PyAV 12's stream side data: {"DISPLAYMATRIX": counter-clockwise degrees}
    stream = SimpleNamespace(side_data={"DISPLAYMATRIX": -90.0}, metadata={})
    bare = SimpleNamespace()
    np.testing.assert_array_equal(np.asarray(upright(img, frame_orientation(bare, stream))), np.rot90(arr, -1))
    # FFmpeg < 6 demuxers: a "rotate" tag in clockwise degrees (phones held upright write 90)
    for tag, k in (("90", -1), ("180", 2), ("270", 1), ("0", 0)):
        old = SimpleNamespace(metadata={"rotate": tag})
        np.testing.assert_array_equal(np.asarray(upright(img, frame_orientation(bare, old))), np.rot90(arr, k))
    assert frame_orientation(bare, SimpleNamespace(metadata={})) == ()


FFMPEG = shutil.which("ffmpeg")


@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg (the command) is not installed")
@pytest.mark.parametrize("case", ["tag90", "tag180", "tag270", "matrix90_hflip", "matrix0_hflip"])
def test_rotation_agrees_with_ffmpegs_own_auto_rotation(tmp_path, case):
    # an independent writer (ffmpeg's "rotate" tag) and an independent reader (ffmpeg's
    # autorotation, on by default when it decodes): vimerge shows what ffmpeg shows
    if case.startswith("tag"):
        plain = write_video(tmp_path / "plain.mp4", frames=3, marker=True)
        path = tmp_path / f"{case}.mp4"
        subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(plain), "-c", "copy",
                        "-metadata:s:v", f"rotate={case[3:]}", str(path)], check=True)
    else:
        path = write_video(tmp_path / f"{case}.mp4", frames=3, rotation=int(case[6:-6]), hflip=True, marker=True)
    png = tmp_path / "first.png"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(path), "-frames:v", "1", str(png)], check=True)
    theirs = np.asarray(Image.open(png).convert("RGB")).astype(int)
    if case.startswith("tag") and theirs.shape == (32, 48, 3) and case != "tag180":
        pytest.skip("this ffmpeg writes no display matrix for a rotate tag")
    _, images = read_frames(str(path), [0])
    ours = np.asarray(images[0]).astype(int)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 2          # the same swscale conversion; 0 with ffmpeg 5.1


# ---- frame counts the header gets wrong (issue 25.2) ------------------------------------------

def patch_avi_count(path: Path, count: int) -> Path:
    """Rewrite an AVI's recorded frame count (the main header's dwTotalFrames and the video
    stream header's dwLength, which FFmpeg reports as the stream's frames) to ``count``."""
    data = bytearray(path.read_bytes())
    avih = data.find(b"avih")
    data[avih + 8 + 16: avih + 8 + 20] = struct.pack("<I", count)         # dwTotalFrames
    strh = data.find(b"strh")
    assert data[strh + 8: strh + 12] == b"vids"
    length = strh + 8 + 32                                                 # after type .. dwStart
    data[length: length + 4] = struct.pack("<I", count)                    # dwLength
    path.write_bytes(bytes(data))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == count                  # the header now lies
    return path


def cut_after_packets(path: Path, keep: int) -> Path:
    """Cut a faststart MP4 (index first) right after its ``keep``-th packet: the index still
    records every frame, ``keep`` of them decode."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    end = packets[keep - 1].pos + packets[keep - 1].size
    assert packets[keep].pos >= end
    path.write_bytes(path.read_bytes()[:end])
    return path


@pytest.mark.parametrize("recorded", [12, 30])
def test_segments_rest_on_the_frames_that_decode_not_the_header(tmp_path, recorded):
    path = patch_avi_count(write_video(tmp_path / "cls" / "v.avi", frames=20, format="avi"), recorded)
    assert read_frames(str(path))[0] == 20
    ds = VideoDataset(tmp_path, num_frames=4, img_size=32)
    with pytest.warns(FrameCountWarning) as caught:
        clip, label = ds[0]
    message = str(caught[0].message)
    assert str(path) in message and f"records {recorded} frames but 20 decode" in message
    # 20 frames, 4 segments of 4.75 (test_segment_sampling_is_the_official_rule): 2, 7, 12, 16
    assert frame_ids(clip) == [2, 7, 12, 16] and label == 0 and ds.skipped == []
    views = VideoDataset(tmp_path, num_frames=4, img_size=32, num_clips=2)
    with pytest.warns(FrameCountWarning):
        assert [frame_ids(v) for v in views[0][0]] == [[1, 6, 11, 15], [3, 8, 13, 17]]
    rand = VideoDataset(tmp_path, num_frames=4, img_size=32, sampling="random", seed=1)
    for epoch in range(4):
        rand.epoch = epoch
        with pytest.warns(FrameCountWarning):
            picks = frame_ids(rand[0][0])
        # segments of 20 frames: [0, 5], [5, 10], [10, 14], [14, 19]; none past frame 19
        assert all(lo <= p <= hi for p, lo, hi in zip(picks, [0, 5, 10, 14], [5, 10, 14, 19]))


def test_a_cut_download_is_sampled_over_what_decodes_with_a_warning(tmp_path):
    path = cut_after_packets(write_video(tmp_path / "cls" / "cut.mp4", frames=20, faststart=True), 12)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 20
    ds = VideoDataset(tmp_path, num_frames=4, img_size=32)
    with pytest.warns(FrameCountWarning, match="records 20 frames but 12 decode"):
        clip, _ = ds[0]
    # 12 frames, 4 segments of 11/4 = 2.75: starts round(0, 2.75, 5.5, 8.25) = 0, 3, 6, 8,
    # offset int(2.75 / 2) = 1
    assert frame_ids(clip) == [1, 4, 7, 9]
    with pytest.warns(FrameCountWarning):                    # the picture path samples the same frames
        clip2, frames = ds.read(ds.samples[0][0])
    assert len(frames) == 4 and frame_ids(clip2) == [1, 4, 7, 9]


def test_no_recorded_count_and_a_right_one_give_no_warning(tmp_path):
    write_video(tmp_path / "mkv" / "cls" / "v.mkv", frames=20, format="matroska")   # Matroska records none
    with av.open(str(tmp_path / "mkv" / "cls" / "v.mkv")) as container:
        assert not container.streams.video[0].frames
    write_video(tmp_path / "mp4" / "cls" / "v.mp4", frames=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameCountWarning)
        for root in ("mkv", "mp4"):
            assert frame_ids(VideoDataset(tmp_path / root, num_frames=4, img_size=32)[0][0]) == [2, 7, 12, 16]


# ---- annotation lists from other tools (issue 25.3) -------------------------------------------

def two_clips(tmp_path: Path) -> Path:
    write_video(tmp_path / "clips" / "x.mp4", frames=10)
    write_video(tmp_path / "clips" / "my clip.mp4", frames=10)
    return tmp_path


WANT = [("clips/x.mp4", 3), ("clips/my clip.mp4", 0)]


@pytest.mark.parametrize("variant, data", [
    ("bom", "\ufeffclips/x.mp4 3\nclips/my clip.mp4 0\n".encode()),
    ("bom_comment", "\ufeff# made by a spreadsheet\nclips/x.mp4 3\nclips/my clip.mp4 0\n".encode()),
    ("crlf_trailing_blanks", b"clips/x.mp4 3  \r\n\r\n  clips/my clip.mp4\t0\t \r\n   \r\n"),
    ("cr_only", b"clips/x.mp4 3\rclips/my clip.mp4 0"),
    ("tabs", b"clips/x.mp4\t3\nclips/my clip.mp4\t\t0\n"),
    ("utf16", "clips/x.mp4 3\r\nclips/my clip.mp4 0\r\n".encode("utf-16")),       # "Unicode text"
    ("concatenated", "\ufeffclips/x.mp4 3\n\ufeffclips/my clip.mp4 0\n".encode()),
])
def test_annotation_lists_as_editors_write_them(tmp_path, variant, data):
    root = two_clips(tmp_path)
    (root / "val.txt").write_bytes(data)
    samples = read_annotations(root / "val.txt", root)
    assert samples == [(os.fspath(root / p), label) for p, label in WANT]
    ds = VideoDataset(None, annotations=root / "val.txt", num_frames=2, img_size=16)
    assert [ds[i][1] for i in range(2)] == [3, 0] and ds.skipped == []


@pytest.mark.parametrize("data", [
    '\ufeffclips/x.mp4,3\r\n"clips/my clip.mp4",0\r\n'.encode(),     # Excel's "CSV UTF-8": BOM, CRLF
    b"clips/x.mp4, 3\nclips/my clip.mp4 ,0 \n",
])
def test_comma_separated_lists_as_spreadsheets_export_them(tmp_path, data):
    root = two_clips(tmp_path)
    (root / "val.csv").write_bytes(data)
    assert read_annotations(root / "val.csv", root, ",") == [(os.fspath(root / p), label) for p, label in WANT]
    (root / "quoted.csv").write_text('"clips/a, b.mp4",2\n')              # a comma inside a quoted path
    assert read_annotations(root / "quoted.csv", root, ",") == [(os.fspath(root / "clips/a, b.mp4"), 2)]


def test_unparseable_entries_are_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("\ufeff# list\r\nclips/x.mp4 3\r\n\r\nclips/y.mp4 three\r\n".encode())
    with pytest.raises(ValueError, match=r"bad\.txt:4: expected 'path label' .* got 'clips/y\.mp4 three'"):
        read_annotations(bad, tmp_path)
    bad.write_text("path label\nclips/x.mp4 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: .*a header row\? delete it"):
        read_annotations(bad, tmp_path)
    bad.write_text("clips/x.mp4 3\nclips/y.mp4,4\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: .*pass separator=','"):
        read_annotations(bad, tmp_path)
    bad.write_text("clips/x.mp4 -1\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: negative label -1"):
        read_annotations(bad, tmp_path)
    bad.write_bytes(b"clips/x.mp4 3\nclips/\xe9t\xe9.mp4 1\n")             # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"bad\.txt:2: not UTF-8 text .*save the list as UTF-8"):
        read_annotations(bad, tmp_path)
    bad.write_bytes("\ufeff\r\n# only comments\r\n".encode())
    with pytest.raises(ValueError, match="lists no videos"):
        read_annotations(bad, tmp_path)
