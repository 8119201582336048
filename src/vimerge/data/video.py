"""Video clips for VideoMamba, decoded with PyAV (``pip install av`` or ``pip install
'vimerge[video]'``: wheels that bring their own FFmpeg, no system FFmpeg needed).

Two layouts:

* a folder of class folders of video files, ``ROOT/<class>/<video>.mp4`` (classes sorted by name
  give the labels, as for images);
* the official annotation list (VideoMamba / UniFormerV2 / R-MeeTo ``data_list``): one video per
  line, ``path label`` (label an integer; ``separator`` "," for the lists written as CSV),
  paths relative to ``root`` unless absolute; byte-order marks, CRLF and stray blanks as
  editors and spreadsheets write them are accepted (:func:`read_annotations`).

Frames are shown as players show them: a display rotation (phone videos store frames sideways
with a display matrix; :func:`frame_orientation`) is applied before resizing and cropping, so
a portrait recording is portrait.

Sampling (the official sparse "segment" sampling, ``kinetics_sparse.py``): a video of V frames
(the frames that decode, not the count its header records: :meth:`VideoDataset.sample`) is cut into T segments of ``(V - 1) / T`` frames; evaluation takes in segment i the frame
``round(i * seg) + int(seg / (num_clips + 1) * (clip + 1))`` for each of ``num_clips`` temporal
clips (one clip: the middle of every segment), training a random frame of each segment
(``sampling="random"``). Every frame is resized (shorter side to ``short_side``, default the
crop size, bilinear) and cropped to ``img_size``: ``num_crops`` crops spread evenly along the
longer side (one crop: the centre; three: the official left / centre / right), then normalised
with ImageNet's mean and std.

``dataset[i]`` is ``(clip, label)`` with ``clip`` (C, T, H, W), or (V, C, T, H, W) for V =
``num_clips * num_crops`` views (clip-major); ``vimerge.measure.evaluate`` averages the
logits of the views. A file that cannot be opened, or of which no frame decodes, gives a
:class:`~vimerge.data.imagefolder.Skipped` record naming it, as unreadable images do; a file
whose header records more (a cut download) or fewer frames than decode is sampled over the
frames that decode, with a :class:`FrameCountWarning` naming it and both counts.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


class FrameCountWarning(UserWarning):
    """A video's container records a frame count that differs from the frames that decode."""


# PIL transpositions: source pixel (x, y) -> displayed pixel, y pointing down
_TRANSPOSE = Image.Transpose.TRANSPOSE            # (x, y) -> (y, x)
_MIRROR_X = Image.Transpose.FLIP_LEFT_RIGHT       # x -> width - 1 - x
_MIRROR_Y = Image.Transpose.FLIP_TOP_BOTTOM       # y -> height - 1 - y


def orientation_from_matrix(matrix: Sequence[float]) -> tuple[Image.Transpose, ...]:
    """The PIL transpositions that show a frame as its display matrix says, nearest right angle.

    ``matrix``: FFmpeg's ``AV_PKT_DATA_DISPLAYMATRIX`` / ``AV_FRAME_DATA_DISPLAYMATRIX``, 9
    numbers ``[a, b, u, c, d, v, x, y, w]`` (``a..d`` 16.16 fixed point; only their signs and
    which pair dominates matter here) mapping a stored pixel ``(x, y)``, y pointing down, to
    the displayed ``(a x + c y, b x + d y)`` (libavutil/display.h). The sign convention:
    ``av_display_rotation_set(m, -t)`` writes ``a = d = cos t, b = -sin t, c = sin t`` for a
    frame shown turned **counter-clockwise** by ``t``, the angle ``av_display_rotation_get`` and
    PyAV's ``VideoFrame.rotation`` report. So rotation 90 (stored with the scene's top on the
    right; FFmpeg's old clockwise ``rotate`` tag 270) is shown as ``np.rot90(frame, 1)``, and
    rotation -90 (scene top on the left, ``rotate`` tag 90: a phone held upright) as
    ``np.rot90(frame, -1)``. A negative determinant is a mirror (``av_display_matrix_flip``).
    tests/test_video_data.py checks this against hand-rotated frames and ffmpeg's own
    auto-rotation.
    """
    if len(matrix) != 9:
        raise ValueError(f"a display matrix has 9 entries, got {len(matrix)}")
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if abs(a) + abs(d) >= abs(b) + abs(c):       # x' = a x, y' = d y
        return tuple(op for op, sign in ((_MIRROR_X, a), (_MIRROR_Y, d)) if sign < 0)
    # x' = c y, y' = b x: swap the axes, then mirror
    return (_TRANSPOSE,) + tuple(op for op, sign in ((_MIRROR_X, c), (_MIRROR_Y, b)) if sign < 0)


def orientation_from_rotation(degrees: float) -> tuple[Image.Transpose, ...]:
    """The transpositions of a counter-clockwise rotation by ``degrees`` (PyAV's
    ``VideoFrame.rotation``; FFmpeg's old ``rotate`` tag is clockwise: pass its negative),
    rounded to the nearest multiple of 90."""
    quarter = round(float(degrees) / 90) % 4
    cos, sin = ((1, 0), (0, 1), (-1, 0), (0, -1))[quarter]
    return orientation_from_matrix([cos, -sin, 0, sin, cos, 0, 0, 0, 1])


def frame_orientation(frame, stream=None) -> tuple[Image.Transpose, ...]:
    """How a decoded PyAV frame must be turned to be shown upright, from (first found) the
    frame's display-matrix side data, its ``rotation`` (PyAV >= 13), the stream's side data
    (PyAV 12-13: ``{"DISPLAYMATRIX": counter-clockwise degrees}``) or the stream's ``rotate``
    tag (FFmpeg < 6 demuxers: clockwise degrees). Nothing found: no transposition."""
    for sd in _iter_side_data(getattr(frame, "side_data", None)):
        if "DISPLAYMATRIX" in str(getattr(sd, "type", "")).upper():
            try:
                raw = bytes(sd)
            except Exception:  # noqa: BLE001 - a PyAV without the buffer protocol: use rotation
                break
            if len(raw) == 36:
                return orientation_from_matrix(np.frombuffer(raw, dtype="=i4").tolist())
    rotation = getattr(frame, "rotation", None)
    if isinstance(rotation, (int, float)) and rotation == rotation:
        return orientation_from_rotation(rotation)
    side = getattr(stream, "side_data", None)
    if isinstance(side, dict) and isinstance(side.get("DISPLAYMATRIX"), (int, float)):
        return orientation_from_rotation(side["DISPLAYMATRIX"])
    tag = (getattr(stream, "metadata", None) or {}).get("rotate")
    try:
        return orientation_from_rotation(-float(tag)) if tag else ()
    except ValueError:
        return ()


def _iter_side_data(side_data) -> list:
    """The side data objects of a PyAV frame: iterating its container yields them in PyAV 18
    (whose ``values()`` then fails), keys to look up in older ones."""
    if side_data is None:
        return []
    out = []
    try:
        for item in list(side_data):
            out.append(item if hasattr(item, "type") else side_data[item])
    except Exception:  # noqa: BLE001 - an unusual PyAV: what was found so far
        pass
    return out


def upright(image: Image.Image, orientation: Sequence[Image.Transpose]) -> Image.Image:
    """``image`` turned by the transpositions of :func:`frame_orientation`, in order."""
    for op in orientation:
        image = image.transpose(op)
    return image


def container_frame_count(path: str) -> tuple[int, int]:
    """``(recorded, estimated)`` frame counts of a video's first video stream: the count its
    header records (0: none) and, without one, duration x frame rate (0: unknown). Neither is
    trusted for sampling (:meth:`VideoDataset.sample`); they only plan the decoding pass.
    Raises what PyAV raises for a file it cannot open."""
    av = require_av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        recorded = int(stream.frames or 0)
        rate = stream.average_rate or stream.guessed_rate
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = (container.duration or 0) / 1e6
        estimated = int(round(seconds * float(rate))) if rate and seconds > 0 else 0
    return recorded, estimated


def read_frames(path: str | os.PathLike, wanted: Sequence[int] | None = None, *, to_end: bool = True
                ) -> tuple[int, dict[int, Image.Image]]:
    """Decode a video: ``(frames decoded, {index: upright RGB PIL image})`` for the ``wanted``
    indices (None: none, only the count).

    The count is of the frames that really decode, whatever the header says: decoding runs to
    the end (``to_end=False``: stops after the last wanted frame, and the count is then only a
    lower bound). A decoding error after some frames ends the video there (a damaged or cut
    tail, as a player shows it); an error before any frame is raised. Frames are turned upright
    by :func:`frame_orientation` (display rotation) before anything else sees them.
    """
    av = require_av()
    want = set(wanted or ())
    stop = max(want) if want else -1
    images: dict[int, Image.Image] = {}
    n = 0
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.FFmpegError:
                if n == 0:
                    raise
                break
            if n in want:
                images[n] = upright(frame.to_image(), frame_orientation(frame, stream))
            n += 1
            if not to_end and n > stop:
                break
    return n, images


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

    def sample(self, path: str, index: int) -> tuple[list[list[int]], dict[int, Image.Image]]:
        """``(frame indices of every clip, {index: upright frame})`` of one video, the segments
        laid over the frames that really decode (:func:`read_frames`).

        The container's count (or, without one, duration x rate) only plans the one decoding
        pass: the planned frames are kept while every frame is counted. When the count
        decoded differs, the clips are re-planned over it and a second pass reads them; a
        recorded count that disagrees is a :class:`FrameCountWarning` naming the file and both
        counts, never a skip. Raises ValueError when no frame decodes.
        """
        recorded, estimated = container_frame_count(path)
        guess = recorded or estimated
        clips = self.clip_indices(guess, index) if guess > 0 else []
        total, images = read_frames(path, _union(clips))
        if total == 0:
            raise ValueError("no frame decodes" + (f" (the container records {recorded}: a cut or damaged "
                                                   f"file)" if recorded else ""))
        if recorded and total != recorded:
            warnings.warn(f"{path}: the container records {recorded} frames but {total} decode; "
                          f"sampling the {total} that decode", FrameCountWarning, stacklevel=2)
        if total != guess:
            clips = self.clip_indices(total, index)
            _, images = read_frames(path, _union(clips), to_end=False)
        missing = [i for i in _union(clips) if i not in images]
        if missing:   # a second pass that decodes less than the first: a non-deterministic decoder
            raise ValueError(f"frame {missing[0]} of {total} decoded once but not again")
        return clips, images

    def load(self, path: str, index: int) -> Tensor:
        """The views of one video: (C, T, H, W), or (V, C, T, H, W) for several."""
        clips, images = self.sample(path, index)
        views = [v for clip in clips for v in self.views([images[i] for i in clip])]
        return views[0] if len(views) == 1 else torch.stack(views)

    def read(self, path: str, index: int = 0) -> tuple[Tensor, list[Image.Image]]:
        """One video's first view as ``(clip (C, T, H, W), its cropped PIL frames)`` (for pictures)."""
        clips, images = self.sample(path, index)
        frames = self.crops([images[i] for i in clips[0]])[0]
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


def _union(clips: list[list[int]]) -> list[int]:
    return sorted({i for clip in clips for i in clip})


def _resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, _resample(interpolation))


def read_annotations(path: Path, root: Path, separator: str | None = None) -> list[tuple[str, int]]:
    """``(path, label)`` of every entry of an annotation list, read as editors and spreadsheets
    write it.

    The format (VideoMamba's ``kinetics_sparse.py`` reads its ``train.csv``/``val.csv`` with
    ``pandas.read_csv(header=None, delimiter=" ")``; UniFormerV2 and R-MeeTo the same): one
    video per line, ``path label``, the label a non-negative integer. Here the label is the
    last field, so a path may hold the separator (``my clip.mp4 3``). ``separator`` None:
    any run of spaces or tabs; ``","`` (or any one character): a CSV line, quoted fields
    allowed (``"a, b.mp4",3``), as a spreadsheet exports it. Accepted around that: a UTF-8 or
    UTF-16 byte-order mark (also at the start of any line, as concatenated files have), LF,
    CRLF or CR line ends, blanks and tabs at either end of a line or field, blank lines and
    lines starting with ``#``. Relative paths are joined to ``root``.

    Raises:
        DatasetError: the list is missing, not text, lists nothing, or has an entry that does
            not parse (named as ``FILE:LINE``, with the line's text and the fix).
    """
    if not path.is_file():
        raise DatasetError(f"annotation list {path} does not exist or is not a file")
    text = _decode_list(path, path.read_bytes())
    if separator is not None and len(separator) != 1:
        raise ValueError(f"separator must be one character or None (whitespace), got {separator!r}")
    samples = []
    for number, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        stripped = line.lstrip("\ufeff").strip()
        if not stripped or stripped.startswith("#"):
            continue
        if separator is None:
            fields = stripped.rsplit(None, 1)
        else:
            fields = next(csv.reader([stripped], delimiter=separator, skipinitialspace=True))
            if len(fields) > 2:     # an unquoted separator inside the path: the label is the last field
                fields = [separator.join(fields[:-1]), fields[-1]]
        fields = [f.strip() for f in fields]
        try:
            if len(fields) != 2 or not fields[0]:
                raise ValueError
            name, label = fields[0], int(fields[1])
        except ValueError:
            raise DatasetError(_entry_error(path, number, stripped, separator, not samples)) from None
        if label < 0:
            raise DatasetError(f"{path}:{number}: negative label {label} in {stripped!r}; labels are class "
                               f"indices 0, 1, ...")
        samples.append((name if os.path.isabs(name) else os.fspath(root / name), label))
    if not samples:
        raise DatasetError(f"annotation list {path} lists no videos (only blank or '#' lines)")
    return samples


def _decode_list(path: Path, data: bytes) -> str:
    """The text of a list file: UTF-16 when it starts with a UTF-16 byte-order mark (Windows'
    "Unicode text"), else UTF-8 with or without one."""
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not {encoding.split('-sig')[0].upper()} text (byte {exc.start}); "
                           f"save the list as UTF-8") from None


def _entry_error(path: Path, number: int, text: str, separator: str | None, first: bool) -> str:
    sep = "spaces or tabs" if separator is None else repr(separator)
    message = (f"{path}:{number}: expected 'path label' (separated by {sep}, the label a class index), "
               f"got {text!r}")
    if separator is None and "," in text and re.fullmatch(r".+,\s*\d+", text):
        message += "; for a comma-separated list pass separator=',' (--list-separator ,)"
    elif separator is not None and separator not in text and len(text.split()) >= 2:
        message += f"; the line has no {separator!r}: for a whitespace-separated list pass separator=None"
    elif first:
        message += "; a header row? delete it or start it with '#'"
    return message


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
           "container_frame_count", "frame_orientation", "orientation_from_matrix", "orientation_from_rotation",
           "upright", "FrameCountWarning",
           "is_video_source", "require_av", "VIDEO_EXTENSIONS", "SAMPLINGS"]
