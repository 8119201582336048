"""Video clips made from real Fashion-MNIST images, for the video study (``vimerge demo --video``).

How a clip is made (deterministic: clip ``i`` of a split depends only on the seed, the split,
``i`` and the geometry, never on how many clips are made or in which order):

* the garment is Fashion-MNIST image ``i`` of the split (28 x 28, grey, its label the clip's);
* it moves over a black ``canvas x canvas`` frame (default 40 x 40) for ``file_frames`` frames
  (default 17 = 2 T + 1 for T = 8 sampled frames, so that the official segment sampling of
  :mod:`vimerge.data.video` takes every second frame, 1, 3, ..., 15, at evaluation and one
  random frame of each pair of neighbours in training);
* its top-left corner starts at a random point of ``[0, canvas - 28]^2`` and moves with a random
  velocity of ``min_speed .. max_speed`` pixels per frame (default 0.5 .. 1.5) in a random
  direction, reflected at the canvas border (a triangle wave), rounded to whole pixels: the
  garment is always whole and never blurred; the random numbers come from
  ``numpy.random.default_rng([seed, split id, i])``;
* the frames are written once as an MP4 file (H.264 through PyAV's own FFmpeg: ``libx264``,
  ``yuv444p``, ``qp=0``, lossless up to the RGB <-> YUV rounding of +-1 grey level; ``mpeg4``
  at the finest quantiser where the wheel has no ``libx264``), ``DIR/<split>/<i>.mp4``;
* ``DIR/<split>-<n>.txt`` lists the first ``n`` clips in the official annotation format, one
  ``path label`` line per clip (paths relative to ``DIR``): what ``vimerge eval --data`` and
  ``vimerge train --data`` read.

Existing files are kept (a manifest, ``DIR/clips.json``, records the geometry and seed, and a
different one starts a fresh folder); files are written under a temporary name and renamed, so
an interrupted generation leaves no half-written clip. Shapes: frames (V, canvas, canvas)
uint8; a garment (28, 28) uint8.

:func:`read_test_clips` reads a list back once through :class:`vimerge.data.VideoDataset`
(decoding included; unreadable files reported and left out) into memory (:class:`ClipTensors`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from vimerge.data.fashion_mnist import load_split
from vimerge.data.video import VideoDataset, require_av

GARMENT = 28
SPLIT_IDS = {"train": 1, "test": 2}


@dataclass(frozen=True)
class ClipGeometry:
    """How clips are drawn: canvas side (px), frames written per file, speed range (px per
    frame) and the seed."""
    canvas: int = 40
    file_frames: int = 17
    min_speed: float = 0.5
    max_speed: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canvas < GARMENT:
            raise ValueError(f"canvas {self.canvas} is smaller than a garment ({GARMENT} px)")
        if self.file_frames < 1 or not 0 <= self.min_speed <= self.max_speed:
            raise ValueError(f"need file_frames >= 1 and 0 <= min_speed <= max_speed, got {self}")


def _reflect(x: np.ndarray, span: int) -> np.ndarray:
    """Positions ``x`` folded into ``[0, span]`` (bouncing off both ends)."""
    if span == 0:
        return np.zeros_like(x)
    period = 2 * span
    y = np.mod(x, period)
    return np.where(y > span, period - y, y)


def trajectory(index: int, split: str, geometry: ClipGeometry) -> np.ndarray:
    """(V, 2) integer (top, left) of the garment in each of the V = ``file_frames`` frames of
    clip ``index`` of ``split``."""
    rng = np.random.default_rng([geometry.seed, SPLIT_IDS[split], index])
    span = geometry.canvas - GARMENT
    start = rng.uniform(0, span, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(geometry.min_speed, geometry.max_speed)
    velocity = speed * np.array([np.sin(angle), np.cos(angle)])
    t = np.arange(geometry.file_frames)[:, None]
    return np.rint(_reflect(start + velocity * t, span)).astype(np.int64)


def clip_frames(garment: np.ndarray, index: int, split: str, geometry: ClipGeometry) -> np.ndarray:
    """The frames (V, canvas, canvas) uint8 of clip ``index``: ``garment`` (28, 28) uint8 on black."""
    frames = np.zeros((geometry.file_frames, geometry.canvas, geometry.canvas), np.uint8)
    for f, (top, left) in enumerate(trajectory(index, split, geometry)):
        frames[f, top:top + GARMENT, left:left + GARMENT] = garment
    return frames


def encoder() -> tuple[str, str, dict[str, str]]:
    """(codec, pixel format, options) of the clips: lossless H.264 when the PyAV wheel has libx264."""
    av = require_av()
    try:
        av.codec.Codec("libx264", "w")
        return "libx264", "yuv444p", {"qp": "0", "preset": "veryfast"}
    except Exception:  # noqa: BLE001 - a wheel without libx264: MPEG-4 at its finest quantiser
        return "mpeg4", "yuv420p", {"qscale": "1"}


def write_clip(path: str | os.PathLike, frames: np.ndarray, fps: int = 10) -> None:
    """Write grey frames (V, H, W) uint8 as an MP4 file (see :func:`encoder`), atomically."""
    av = require_av()
    codec, pix_fmt, options = encoder()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    height, width = frames.shape[1:]
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options
        for frame in frames:
            rgb = np.repeat(frame[:, :, None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def clip_path(root: str | os.PathLike, split: str, index: int) -> Path:
    """Where clip ``index`` of ``split`` lives under ``root``."""
    return Path(root) / split / f"{index:05d}.mp4"


def list_path(root: str | os.PathLike, split: str, count: int) -> Path:
    """The annotation list of the first ``count`` clips of ``split``."""
    return Path(root) / f"{split}-{count}.txt"


def make_clips(root: str | os.PathLike, split: str, count: int, *, data: str | None = None,
               geometry: ClipGeometry = ClipGeometry(), images: np.ndarray | None = None,
               labels: Sequence[int] | None = None, progress: bool = True) -> Path:
    """Write the first ``count`` clips of ``split`` under ``root`` (those already there are
    kept) and their annotation list; returns the list's path.

    Garments come from the Fashion-MNIST IDX files in ``data`` (None: the Debian package), or
    from ``images`` (N, 28, 28) uint8 and ``labels`` when given.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_IDS)}, got {split!r}")
    root = Path(root).expanduser()
    _check_manifest(root, geometry)
    if images is None:
        images, labels = load_split(data, split)
    if count > len(images):
        raise ValueError(f"{count} clips asked of the {split} split, which has {len(images)} images")
    (root / split).mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(count) if not clip_path(root, split, i).is_file()]
    for i in tqdm(todo, desc=f"writing {split} clips", unit="clip", disable=not progress or not todo,
                  file=sys.stderr, dynamic_ncols=True):
        write_clip(clip_path(root, split, i), clip_frames(np.asarray(images[i]), i, split, geometry))
    listing = list_path(root, split, count)
    lines = [f"{split}/{clip_path(root, split, i).name} {int(labels[i])}" for i in range(count)]
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, listing)
    return listing


def _check_manifest(root: Path, geometry: ClipGeometry) -> None:
    """Record the geometry in ``root/clips.json``; clips made with another one are refused
    (they would silently mix)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "clips.json"
    want = {"geometry": asdict(geometry), "garment": GARMENT, "codec": encoder()[0]}
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if have != want:
            raise ValueError(f"{root} holds clips made with {have}, not {want}: use another folder")
        return
    manifest.write_text(json.dumps(want, indent=2) + "\n")


# ------------------------------------------------------------------------------------ reading back


class ClipTensors(Dataset):
    """Decoded clips kept in memory: ``(clip (C, T, H, W), label)`` pairs; ``clips`` (N, C, T, H, W)."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor):
        self.clips, self.targets = clips, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.clips[index], int(self.targets[index])


@dataclass
class TestClips:
    """The test clips as read back: the annotation list, the decoded clips, the garment index of
    each readable clip (its line in the list), the files that could not be read (path -> reason)
    and the seconds reading took."""
    listing: str
    data: ClipTensors
    garments: list[int]
    skipped: dict[str, str]
    seconds: float


def read_test_clips(listing: Path, model, *, progress: bool) -> TestClips:
    """Decode every clip of ``listing`` once through :class:`~vimerge.data.VideoDataset` with the
    evaluation sampling of ``vimerge eval`` for ``model`` (its ``num_frames``, ``img_size``,
    ``in_chans``); unreadable files are named on stderr and left out. Raises RuntimeError when
    no clip can be read."""
    start = time.perf_counter()
    reader = VideoDataset(None, annotations=listing, num_frames=model.num_frames, img_size=model.img_size,
                          channels=model.in_chans)
    clips, labels, garments, skipped = [], [], [], {}
    for i in tqdm(range(len(reader)), desc="reading test clips", unit="clip", disable=not progress,
                  file=sys.stderr, dynamic_ncols=True):
        item = reader[i]
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            clips.append(item[0])
            labels.append(item[1])
            garments.append(i)
        else:
            skipped[item.path] = item.reason
            print(f"skipped unreadable clip {item.path} ({item.reason})", file=sys.stderr)
    if not clips:
        raise RuntimeError(f"no clip of {listing} could be read ({len(skipped)} skipped)")
    data = ClipTensors(torch.stack(clips), torch.tensor(labels))
    return TestClips(str(listing), data, garments, skipped, time.perf_counter() - start)


__all__ = ["ClipGeometry", "GARMENT", "trajectory", "clip_frames", "encoder", "write_clip", "make_clips",
           "clip_path", "list_path", "ClipTensors", "TestClips", "read_test_clips"]
