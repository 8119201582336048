"""Evaluation data without torchvision: ImageFolder directories, Fashion-MNIST IDX files and
video clips (:class:`VideoDataset`, class folders of videos or annotation lists, with PyAV).

>>> from vimerge.data import open_dataset, make_loader
>>> ds = open_dataset("/data/imagenet/val", img_size=224, channels=3)    # ImageFolder layout
>>> ds = open_dataset(None, kind="fashion-mnist", img_size=28)           # the Debian package
>>> loader = make_loader(ds, batch_size=64)      # batches are (images, labels, skipped)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from .fashion_mnist import FashionMNIST, FashionMNISTNotFound, is_fashion_mnist_dir, load_split, read_idx
from .imagefolder import (
    IMG_EXTENSIONS,
    Batch,
    DatasetError,
    ImageFolder,
    Skipped,
    collate_skipping,
    subset_evenly,
)
from .transforms import (
    DEFAULT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    center_crop,
    normalize,
    resize_shorter,
    to_tensor,
)
from .video import VIDEO_EXTENSIONS, VideoDataset, is_video_source

KINDS = ("auto", "imagefolder", "fashion-mnist")

# folder names of a split inside a dataset root, in order of preference
SPLIT_NAMES = {"train": ("train", "training"),
               "val": ("val", "validation", "valid", "test"),
               "test": ("test", "val", "validation", "valid")}


def split_dir(root: str | os.PathLike, split: str, *, required: bool = True) -> Path | None:
    """The ImageFolder directory of ``split`` (``"train"``, ``"val"``, ``"test"``...) under a
    dataset root: THE rule of ``vimerge retrain`` and ``vimerge eval``.

    * ``ROOT/<name>`` for the first folder name of the split that exists (:data:`SPLIT_NAMES`:
      ``val`` also accepts ``validation``, ``valid`` and ``test``; ``test`` also ``val``...);
    * a root without any split folder is one split itself: ``ROOT`` (its sub-folders are the
      classes);
    * a root with split folders but none for ``split``: :class:`DatasetError` naming the
      folders found, or None when not ``required``.

    So ``ROOT`` holding ``train/`` and ``val/`` is never read as two classes named "train" and
    "val".
    """
    base = Path(root).expanduser()
    names = SPLIT_NAMES.get(split, (split,))
    for name in names:
        if (base / name).is_dir():
            return base / name
    present = sorted({n for ns in SPLIT_NAMES.values() for n in ns if (base / n).is_dir()})
    if not present:
        return base
    if not required:
        return None
    raise DatasetError(f"{base} holds the split folder(s) {', '.join(present)} but no {split} split "
                       f"({' or '.join(names)}); pass the split's folder itself, e.g. "
                       f"{base / present[0]}")


def detect_kind(root: str | os.PathLike | None, split: str = "test") -> str:
    """``"fashion-mnist"`` when ``root`` holds Fashion-MNIST IDX files (or is None: the installed
    package), else ``"imagefolder"``."""
    if root is None or is_fashion_mnist_dir(root, split) or is_fashion_mnist_dir(root):
        return "fashion-mnist"
    return "imagefolder"


def open_dataset(root: str | os.PathLike | None, *, kind: str = "auto", img_size: int | Sequence[int] = 224,
                 channels: int = 3, split: str = "test", limit: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bicubic"):
    """The evaluation dataset at ``root`` preprocessed for a model's ``img_size``/``channels``.

    ``kind`` is ``imagefolder``, ``fashion-mnist`` or ``auto`` (see :func:`detect_kind`).
    ``split`` applies to Fashion-MNIST; an ImageFolder directory is one split already.
    ``mean``/``std`` default to ImageNet's (ImageFolder) or Fashion-MNIST's; ``crop_pct`` and
    ``interpolation`` apply to ImageFolder images.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = detect_kind(root, split)
    if kind == "fashion-mnist":
        stats = {}
        for name, value in (("mean", mean), ("std", std)):
            if value is not None:
                values = tuple(value)
                if len(set(values)) != 1:
                    raise ValueError(f"Fashion-MNIST is grey: give one {name} value, got {values}")
                stats[name] = values[0]
        return FashionMNIST(root, split, img_size=img_size, channels=channels, limit=limit, **stats)
    if root is None:
        raise DatasetError("an ImageFolder dataset needs a directory: root=DIR (--data DIR)")
    transform = EvalTransform(img_size, channels=channels, mean=mean, std=std, crop_pct=crop_pct,
                              interpolation=interpolation)
    return ImageFolder(root, transform, limit=limit)


def make_loader(dataset, batch_size: int = 64, workers: int = 0, *, pin_memory: bool = False):
    """A sequential DataLoader whose batches are :class:`Batch` (unreadable files dropped)."""
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_skipping, pin_memory=pin_memory,
                      persistent_workers=False)


__all__ = ["open_dataset", "make_loader", "detect_kind", "split_dir", "SPLIT_NAMES", "KINDS", "ImageFolder", "FashionMNIST",
           "FashionMNISTNotFound", "DatasetError", "Skipped", "Batch", "collate_skipping",
           "subset_evenly", "read_idx", "load_split", "is_fashion_mnist_dir", "EvalTransform",
           "resize_shorter", "center_crop", "to_tensor", "normalize", "IMAGENET_MEAN", "IMAGENET_STD",
           "DEFAULT_CROP_PCT", "IMG_EXTENSIONS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "VideoDataset",
           "is_video_source", "VIDEO_EXTENSIONS"]
