"""Fashion-MNIST from its four IDX files (raw or gzip-compressed).

Debian's ``dataset-fashion-mnist`` package installs them, gzip-compressed, in
``/usr/share/datasets/fashion-mnist/``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

Any directory holding these files (``.gz`` or not; the ``train-images.idx3-ubyte`` spelling
is accepted too) works. Files are checked: IDX magic numbers (2051 for images, 2049 for
labels), sizes against the header, 28 x 28 images, as many labels as images, labels 0-9.

IDX format: a big-endian header ``0x00 0x00 <type> <ndim>`` (type 0x08 = unsigned byte), then
``ndim`` big-endian uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .imagefolder import DatasetError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
MEAN = 0.2860
STD = 0.3530
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension
FIX = ("fix: apt-get install -y dataset-fashion-mnist (installs " + DEFAULT_ROOT + "/), or pass "
       "the directory (root=DIR, --data DIR) holding the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
       "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz)")

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class FashionMNISTNotFound(DatasetError, FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for."""


def _candidates(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some mirrors spell it
    return [stem + ".gz", stem, dotted + ".gz", dotted]


def find_file(root: str | os.PathLike, stem: str) -> Path | None:
    """The file of ``root`` for ``stem`` (``train-images-idx3-ubyte`` ...), gzipped or not."""
    root = Path(root).expanduser()
    for name in _candidates(stem):
        if (root / name).is_file():
            return root / name
    return None


def is_fashion_mnist_dir(root: str | os.PathLike, split: str | None = None) -> bool:
    """Whether ``root`` holds the IDX files of ``split`` (of either split when None)."""
    splits = [split] if split else list(FILES)
    return any(all(find_file(root, stem) is not None for stem in FILES[s]) for s in splits)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if data[:2] == b"\x1f\x8b":  # gzip, whatever the file's name says
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path} is a corrupt or truncated gzip file ({exc}); "
                               f"reinstall it ({FIX})") from exc
    return data


def read_idx(path: str | os.PathLike, *, magic: int | None = None) -> np.ndarray:
    """The array stored in an IDX file (raw or gzip), checked against its header.

    Args:
        path: the file.
        magic: the expected magic number (e.g. 2051 for images), checked when given.

    Raises:
        DatasetError: not an IDX file, unexpected magic number, or a size that does not match
            the header (truncated or padded file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path} is not an IDX file: only {len(data)} bytes")
    (found,) = struct.unpack(">I", data[:4])
    if magic is not None and found != magic:
        raise DatasetError(f"{path} has the magic number {found} (0x{found:08x}), expected {magic} "
                           f"(0x{magic:08x}): the file is corrupt or not what its name says")
    dtype_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{path} is not an IDX file: bad magic number 0x{found:08x}")
    dtype = _IDX_DTYPES[dtype_code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path} has {len(data)} bytes but its header (shape {tuple(dims)}) "
                           f"needs {expected}: the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).copy()  # writable


def load_split(root: str | os.PathLike | None = None, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of one split, validated.

    ``root`` defaults to :data:`DEFAULT_ROOT`. A missing file raises
    :class:`FashionMNISTNotFound`, whose message has the one-line fix.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {', '.join(FILES)}, got {split!r}")
    root = Path(DEFAULT_ROOT if root is None else root).expanduser()
    paths = []
    for stem in FILES[split]:
        path = find_file(root, stem)
        if path is None:
            where = "does not exist" if not root.is_dir() else f"has no {stem}[.gz]"
            raise FashionMNISTNotFound(f"Fashion-MNIST not found: {root} {where}; {FIX}")
        paths.append(path)
    images = read_idx(paths[0], magic=IMAGES_MAGIC)
    labels = read_idx(paths[1], magic=LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{paths[0]} holds images of shape {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DatasetError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise DatasetError(f"{paths[1]} has label {int(labels.max())}; Fashion-MNIST labels are 0-9")
    return images, labels.astype(np.int64)


class FashionMNIST(Dataset):
    """Fashion-MNIST images as normalised tensors.

    Args:
        root: directory of the IDX files (default :data:`DEFAULT_ROOT`).
        split: ``"test"`` (10,000 images) or ``"train"`` (60,000).
        img_size: output side (int or (height, width)); other than 28 resizes bicubically
            (antialiased when shrinking) before normalising.
        channels: 1, or 3 to repeat the grey channel for RGB models.
        limit: keep the first ``limit`` images (the files' order already mixes the classes).
        indices: keep these images instead (after which ``limit`` still applies).
        mean, std: normalisation (default the training set's 0.2860 / 0.3530).

    ``dataset[i]`` is ``(image (channels, H, W) float32, label int)``.
    """

    classes = CLASSES

    def __init__(self, root: str | os.PathLike | None = None, split: str = "test", *,
                 img_size: int | Sequence[int] = 28, channels: int = 1, limit: int | None = None,
                 indices: Sequence[int] | None = None, mean: float = MEAN, std: float = STD):
        self.root = Path(DEFAULT_ROOT if root is None else root).expanduser()
        self.split = split
        images, labels = load_split(self.root, split)
        if indices is not None:
            idx = np.asarray(indices, dtype=np.int64)
            images, labels = images[idx], labels[idx]
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(np.ascontiguousarray(images))      # uint8 (N, 28, 28)
        self.targets = torch.from_numpy(np.ascontiguousarray(labels))     # int64 (N,)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if std == 0:
            raise ValueError("std must not be 0")
        self.channels, self.mean, self.std = channels, float(mean), float(std)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Tensor:
        """Image ``index`` as a normalised float tensor (channels, H, W)."""
        x = self.images[index].float().div_(255.0)[None, None]             # (1, 1, 28, 28)
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        x = (x[0] - self.mean) / self.std
        return x.expand(self.channels, -1, -1).contiguous() if self.channels != 1 else x

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.image(index), int(self.targets[index])

    def __repr__(self) -> str:
        return (f"FashionMNIST({str(self.root)!r}, split={self.split!r}, {len(self)} images, "
                f"img_size={self.img_size}, channels={self.channels})")


__all__ = ["FashionMNIST", "FashionMNISTNotFound", "read_idx", "load_split", "find_file",
           "is_fashion_mnist_dir", "CLASSES", "MEAN", "STD", "DEFAULT_ROOT", "FILES"]
