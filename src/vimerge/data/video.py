"""Video clips for VideoMamba, decoded with PyAV (``pip install av`` or ``pip install
'vimerge[video]'``: wheels that bring their own FFmpeg, no system FFmpeg needed).

Two layouts:

* a folder of class folders of video files, ``ROOT/<class>/<video>.mp4`` (classes sorted by name
  give the labels, as for images);
* the official annotation list (VideoMamba / UniFormerV2 / R-MeeTo ``data_list``): one video per
  line, ``path label`` (label an integer; ``separator`` "," for the lists written as CSV),
  paths relative to ``root`` unless absolute.

Sampling (the official sparse "segment" sampling, ``kinetics_sparse.py``): a video of V frames
is cut into T segments of ``(V - 1) / T`` frames; evaluation takes in segment i the frame
``round(i * seg) + int(seg / (num_clips + 1) * (clip + 1))`` for each of ``num_clips`` temporal
clips (one clip: the middle of every segment), training a random frame of each segment
(``sampling="random"``). Every frame is resized (shorter side to ``short_side``, default the
crop size, bilinear) and cropped to ``img_size``: ``num_crops`` crops spread evenly along the
longer side (one crop: the centre; three: the official left / centre / right), then normalised
with ImageNet's mean and std.

``dataset[i]`` is ``(clip, label)`` with ``clip`` (C, T, H, W), or (V, C, T, H, W) for V =
``num_clips * num_crops`` views (clip-major); ``vimerge.measure.evaluate`` averages the
logits of the views. A file that cannot be opened or decoded, or that ends before the frames
it needs (truncated), gives a :class:`~vimerge.data.imagefolder.Skipped` record naming it,
as unreadable images do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .imagefolder import DatasetError, Skipped, find_classes, find_images, subset_evenly
from .transforms import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _pair,
    _per_channel,
    _resample,
    normalize,
    to_mode,
    to_tensor,
)

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv", ".wmv")
SAMPLINGS = ("uniform", "random")


def require_av():
    """Import PyAV or explain how to get it."""
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading videos needs PyAV: pip install av (or pip install 'vimerge[video]'); "
                          "its wheels bring their own FFmpeg") from exc
    return av


def segment_indices(total: int, num_frames: int, clip: int = 0, num_clips: int = 1,
                    generator: torch.Generator | None = None, sampling: str = "uniform") -> list[int]:
    """The frame indices of one clip of a ``total``-frame video (module docstring; the
    official sparse sampling). ``sampling="random"`` draws one frame per segment with
    ``generator``."""
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    seg = max(0.0, (total - 1) / num_frames)
    last = total - 1
    if sampling == "random":
        out = []
        for i in range(num_frames):
            lo, hi = int(round(seg * i)), int(round(seg * (i + 1)))
            out.append(min(lo + int(torch.randint(0, hi - lo + 1, (1,), generator=generator)), last))
        return out
    if sampling != "uniform":
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    offset = int(seg / (num_clips + 1) * (clip + 1))
    return [min(int(round(seg * i)) + offset, last) for i in range(num_frames)]


def crop_offsets(length: int, crop: int, num_crops: int) -> list[int]:
    """Starts of ``num_crops`` crops of ``crop`` pixels along a side of ``length`` (the official
    rule: evenly spread from one end to the other; one crop: the centre)."""
    if num_crops == 1:
        return [int((length - crop) / 2)]
    step = (length - crop) / (num_crops - 1)
    return [int(k * step) for k in range(num_crops)]


def read_frames(path: str, wanted: Sequence[int] | None = None) -> tuple[int, dict[int, Image.Image]]:
    """Decode a video: ``(frame count, {index: RGB PIL image})`` for the ``wanted`` indices
    (None: none, only the count). Decoding stops after the last wanted frame; the count is the
    container's when it records one, else the frames decoded (a second pass)."""
    av = require_av()
    want = set(wanted or ())
    images: dict[int, Image.Image] = {}
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = int(stream.frames or 0)
        stop = max(want) if want else -1
        n = 0
        for frame in container.decode(stream):
            if n in want:
                images[n] = frame.to_image()
            n += 1
            if n > stop and total > 0:
                break
    if total <= 0:
        total = n
    return total, images


class VideoDataset(Dataset):
    """Clips of the videos under ``root`` (class folders) or of an annotation list.

    Args:
        root: a folder of class folders of videos; with ``annotations``, the folder the list's
            paths are relative to (None: the list's own folder).
        annotations: a list file, ``path label`` per line (module docstring).
        num_frames: frames per clip (T).
        img_size: crop size (int or (height, width)).
        short_side: the shorter side frames are resized to before cropping (default: the crop's
            longer side, as the official test setting: 224 -> 224).
        num_clips, num_crops: temporal clips and spatial crops per video (K400's 4 x 3 views).
        channels: 3 (RGB) or 1 (grey); mean, std: default ImageNet's.
        interpolation: the resize filter (default bilinear, the official one).
        sampling: "uniform" (evaluation) or "random" (training: a random frame per segment).
        limit: keep this many videos, spread evenly over the list.
        separator: the annotation list's field separator (None: whitespace).
        extensions: file endings counted as videos in class folders.
        seed: seed of random sampling (mixed with the index and an epoch counter).
        samples: ``(path, label)`` pairs instead of ``root``/``annotations``.
    """

    def __init__(self, root: str | os.PathLike | None, *, annotations: str | os.PathLike | None = None,
                 num_frames: int = 8, img_size: int | Sequence[int] = 224, short_side: int | None = None,
                 num_clips: int = 1, num_crops: int = 1, channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, interpolation: str = "bilinear", sampling: str = "uniform",
                 limit: int | None = None, separator: str | None = None,
                 extensions: Sequence[str] = VIDEO_EXTENSIONS, seed: int = 0,
                 samples: Sequence[tuple[str, int]] | None = None):
        require_av()
        if num_frames < 1 or num_clips < 1 or num_crops < 1:
            raise ValueError(f"num_frames, num_clips and num_crops must be >= 1, got {num_frames}, {num_clips}, "
                             f"{num_crops}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.num_frames, self.num_clips, self.num_crops = num_frames, num_clips, num_crops
        self.img_size = _pair(img_size)
        self.short_side = max(self.img_size) if short_side is None else int(short_side)
        if self.short_side < min(self.img_size):
            raise ValueError(f"short_side {self.short_side} is smaller than the crop {self.img_size}")
        self.channels, self.interpolation, self.sampling, self.seed = channels, interpolation, sampling, seed
        _resample(interpolation)
        default_mean, default_std = ((IMAGENET_MEAN, IMAGENET_STD) if channels == 3
                                     else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD))
        self.mean = _per_channel(default_mean if mean is None else mean, channels, "mean")
        self.std = _per_channel(default_std if std is None else std, channels, "std")
        if samples is not None:
            samples = [(os.fspath(p), int(label)) for p, label in samples]
            if not samples:
                raise DatasetError("no videos given (samples is empty)")
            self.root = Path(root).expanduser() if root is not None else Path(samples[0][0]).parent
            self.classes = [str(i) for i in range(max(label for _, label in samples) + 1)]
        elif annotations is not None:
            listing = Path(annotations).expanduser()
            self.root = Path(root).expanduser() if root is not None else listing.parent
            samples = read_annotations(listing, self.root, separator)
            self.classes = [str(i) for i in range(max(label for _, label in samples) + 1)]
        else:
            if root is None:
                raise DatasetError("a video dataset needs a folder of class folders (root) or an annotation list")
            self.root = Path(root).expanduser()
            self.classes = find_classes(self.root)
            samples = find_images(self.root, self.classes, extensions)
        self.samples = [samples[i] for i in subset_evenly(len(samples), limit)]
        self.targets = [label for _, label in self.samples]
        self.skipped: list[str] = []
        self.epoch = 0

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def __len__(self) -> int:
        return len(self.samples)

    def clip_indices(self, total: int, index: int) -> list[list[int]]:
        """Frame indices of every temporal clip of sample ``index`` (a ``total``-frame video)."""
        gen = None
        if self.sampling == "random":
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**62)
        return [segment_indices(total, self.num_frames, c, self.num_clips, gen, self.sampling)
                for c in range(self.num_clips)]

    def crops(self, frames: list[Image.Image]) -> list[list[Image.Image]]:
        """The ``num_crops`` crops of one clip's frames (resized, cropped PIL frames)."""
        h, w = self.img_size
        resized = [_resize_shorter(to_mode(f, self.channels), self.short_side, self.interpolation) for f in frames]
        width, height = resized[0].size
        out = []
        for k in range(self.num_crops):
            if width >= height:          # spread along the width, centred in height
                left = crop_offsets(width, w, self.num_crops)[k]
                top = int(round((height - h) / 2))
            else:
                top = crop_offsets(height, h, self.num_crops)[k]
                left = int(round((width - w) / 2))
            out.append([f.crop((left, top, left + w, top + h)) for f in resized])
        return out

    def to_clip(self, frames: list[Image.Image]) -> Tensor:
        """Cropped PIL frames -> a normalised (C, T, H, W) clip."""
        return normalize(torch.stack([to_tensor(f) for f in frames]), self.mean, self.std).transpose(0, 1)

    def views(self, frames: list[Image.Image]) -> list[Tensor]:
        """The ``num_crops`` crops of one clip's frames, each (C, T, H, W)."""
        return [self.to_clip(crop) for crop in self.crops(frames)]

    def load(self, path: str, index: int) -> Tensor:
        """The views of one video: (C, T, H, W), or (V, C, T, H, W) for several."""
        total = _known_count(path) or read_frames(path)[0]
        clips = self.clip_indices(total, index)
        wanted = sorted({i for clip in clips for i in clip})
        total_read, images = read_frames(path, wanted)
        missing = [i for i in wanted if i not in images]
        if missing:
            raise ValueError(f"truncated: the video lists {total_read} frames but frame {missing[0]} "
                             f"does not decode ({len(images)} of {len(wanted)} needed frames read)")
        views = [v for clip in clips for v in self.views([images[i] for i in clip])]
        return views[0] if len(views) == 1 else torch.stack(views)

    def read(self, path: str, index: int = 0) -> tuple[Tensor, list[Image.Image]]:
        """One video's first view as ``(clip (C, T, H, W), its cropped PIL frames)`` (for pictures)."""
        total = _known_count(path) or read_frames(path)[0]
        indices = self.clip_indices(total, index)[0]
        _, images = read_frames(path, sorted(set(indices)))
        if any(i not in images for i in indices):
            raise ValueError(f"truncated: frames {[i for i in indices if i not in images][:3]} do not decode")
        frames = self.crops([images[i] for i in indices])[0]
        return self.to_clip(frames), frames

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            clip = self.load(path, index)
        except Exception as exc:  # noqa: BLE001 - any decoding failure skips the file
            reason = f"{type(exc).__name__}: {exc}"
            if path not in self.skipped:
                self.skipped.append(path)
            return Skipped(path, reason)
        return clip, label

    def __repr__(self) -> str:
        return (f"VideoDataset({str(self.root)!r}, {len(self.classes)} classes, {len(self)} videos, "
                f"{self.num_frames} frames, {self.img_size[0]}x{self.img_size[1]}, {self.num_clips} clip(s) x "
                f"{self.num_crops} crop(s), sampling={self.sampling!r})")


def read_clip(path: str | os.PathLike, num_frames: int, img_size: int | Sequence[int] = 224, *, channels: int = 3,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None
              ) -> tuple[Tensor, list[Image.Image]]:
    """One video file as a normalised (C, T, H, W) clip (the evaluation sampling: one clip, the
    centre crop) and the cropped PIL frames it was made of."""
    if not Path(path).expanduser().is_file():
        raise DatasetError(f"video {path} does not exist")
    name = os.fspath(Path(path).expanduser())
    reader = VideoDataset(None, samples=[(name, 0)], num_frames=num_frames, img_size=img_size, channels=channels,
                          mean=mean, std=std)
    return reader.read(name)


def _known_count(path: str) -> int:
    """The frame count the container records (0 when it records none or cannot be opened)."""
    av = require_av()
    try:
        with av.open(path) as container:
            return int(container.streams.video[0].frames or 0) if container.streams.video else 0
    except Exception:  # noqa: BLE001 - the decoding pass reports the error
        return 0


def _resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, _resample(interpolation))


def read_annotations(path: Path, root: Path, separator: str | None = None) -> list[tuple[str, int]]:
    """``(path, label)`` of every line ``path label`` of an annotation list (blank lines and
    lines starting with ``#`` ignored; relative paths joined to ``root``)."""
    if not path.is_file():
        raise DatasetError(f"annotation list {path} does not exist or is not a file")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(separator, 1)
        try:
            name, label = parts[0].strip(), int(parts[1])
        except (IndexError, ValueError):
            sep = "whitespace" if separator is None else repr(separator)
            raise DatasetError(f"{path}:{number}: expected 'path label' (separated by {sep}, label an "
                               f"integer), got {text!r}") from None
        if label < 0:
            raise DatasetError(f"{path}:{number}: negative label {label}")
        samples.append((name if os.path.isabs(name) else os.fspath(root / name), label))
    if not samples:
        raise DatasetError(f"annotation list {path} lists no videos")
    return samples


def is_video_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an annotation list (a file) or a folder of class folders whose first
    files are videos (by extension)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix.lower() not in VIDEO_EXTENSIONS
    if not p.is_dir():
        return False
    for entry in sorted(os.scandir(p), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            for inner in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if inner.is_file() and not inner.name.startswith("."):
                    return inner.name.lower().endswith(VIDEO_EXTENSIONS)
    return False


__all__ = ["VideoDataset", "read_clip", "segment_indices", "crop_offsets", "read_frames", "read_annotations",
           "is_video_source", "require_av", "VIDEO_EXTENSIONS", "SAMPLINGS"]
