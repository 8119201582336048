"""ImageFolder-style datasets (ImageNet's val layout) that survive unreadable files.

Layout: ``ROOT/<class>/<image>``, one sub-folder per class, e.g.
``val/n01440764/ILSVRC2012_val_00000293.JPEG``. Classes are the sub-folder names sorted, and
that order is the label order (class ``i`` is the ``i``-th name), as in torchvision. Images
are found recursively inside each class folder; hidden files and folders are ignored.

A file that cannot be decoded (truncated, not an image, wrong extension...) does not stop a
long evaluation: :meth:`ImageFolder.__getitem__` returns a :class:`Skipped` record naming it,
:func:`collate_skipping` drops it from the batch and passes its name on, and
:func:`vimerge.measure.evaluate.evaluate` logs it and lists it in its result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp",
                  ".gif")

LAYOUT_HELP = ("expected one sub-folder per class holding its images, e.g. "
               "DIR/n01440764/ILSVRC2012_val_00000293.JPEG (ImageNet's val layout; "
               "classes sorted by name give the labels)")


class DatasetError(ValueError):
    """A data set cannot be opened: missing, empty, wrongly laid out or corrupt."""


class Skipped(NamedTuple):
    """What :meth:`ImageFolder.__getitem__` returns for a file it could not read."""
    path: str
    reason: str


class Batch(NamedTuple):
    """A collated batch: images (B, C, H, W) or None when every sample was skipped, labels (B,),
    and the :class:`Skipped` records of the files left out."""
    images: Tensor | None
    labels: Tensor
    skipped: list[Skipped]


def collate_skipping(samples: Sequence[Any]) -> Batch:
    """Stack ``(image, label)`` samples into a :class:`Batch`, dropping :class:`Skipped` (and
    ``None``) samples and keeping their records."""
    kept, skipped = [], []
    for sample in samples:
        if sample is None:
            skipped.append(Skipped("<unknown>", "the dataset returned None"))
        elif isinstance(sample, Skipped):
            skipped.append(sample)
        else:
            kept.append(sample)
    if not kept:
        return Batch(None, torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([s[0] for s in kept])
    labels = torch.as_tensor([int(s[1]) for s in kept], dtype=torch.long)
    return Batch(images, labels, skipped)


def subset_evenly(n: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(n)`` (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return [i * n // limit for i in range(limit)]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def find_classes(root: str | os.PathLike) -> list[str]:
    """The class folder names of ``root``, sorted; errors name the directory and the layout."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist; {LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"image folder {root} is not a directory; {LAYOUT_HELP}")
    entries = [e for e in os.scandir(root) if _visible(e.name)]
    if not entries:
        raise DatasetError(f"image folder {root} is empty; {LAYOUT_HELP}")
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise DatasetError(f"image folder {root} has no class sub-folders (only files such as "
                           f"{sorted(e.name for e in entries)[0]!r}); {LAYOUT_HELP}")
    return classes


def find_images(root: str | os.PathLike, classes: Sequence[str],
                extensions: Sequence[str] = IMG_EXTENSIONS) -> list[tuple[str, int]]:
    """``(path, label)`` of every image (by extension, case-insensitive) under each class folder,
    class by class in label order, files sorted by path within a class."""
    root = Path(root).expanduser()
    exts = tuple(e.lower() for e in extensions)
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            found.extend(os.path.join(dirpath, f) for f in filenames
                         if _visible(f) and f.lower().endswith(exts))
        if not found:
            empty.append(name)
        samples.extend((path, label) for path in sorted(found))
    if not samples:
        raise DatasetError(f"image folder {root} has class sub-folders ({', '.join(classes[:5])}"
                           f"{', ...' if len(classes) > 5 else ''}) but no images with the "
                           f"extensions {', '.join(exts)}; {LAYOUT_HELP}")
    if empty:
        log.warning("image folder %s: %d class folder(s) without images (%s%s); their labels are "
                    "kept", root, len(empty), ", ".join(empty[:5]), ", ..." if len(empty) > 5 else "")
    return samples


class ImageFolder(Dataset):
    """Images under ``root/<class>/``, labels from the sorted class names.

    Args:
        root: the directory (see the module docstring for the layout).
        transform: PIL image -> tensor, e.g. :class:`vimerge.data.transforms.EvalTransform`;
            None returns the PIL image (RGB).
        limit: keep only this many images, spread evenly over the sorted list so that every
            class is represented (the list is sorted by class, so the first N would not be).
        extensions: file name endings counted as images (case-insensitive).

    ``dataset[i]`` is ``(image, label)``, or a :class:`Skipped` record (path and reason) when
    the file cannot be read; those paths also collect in :attr:`skipped` (of the process that
    read them: with DataLoader workers, read them from the batches, see
    :func:`collate_skipping`).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 *, limit: int | None = None, extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = Path(root).expanduser()
        self.transform = transform
        self.classes = find_classes(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        all_samples = find_images(self.root, self.classes, extensions)
        self.samples = [all_samples[i] for i in subset_evenly(len(all_samples), limit)]
        self.targets = [label for _, label in self.samples]
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Image.Image:
        """Open and fully decode one image (pillow decodes lazily: force it here)."""
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return img

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = self.load(path)
            if self.transform is None:
                img = img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoding failure skips the file
            reason = f"{type(exc).__name__}: {exc}"
            if path not in self.skipped:
                self.skipped.append(path)
            return Skipped(path, reason)
        return (self.transform(img) if self.transform is not None else img), label

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, {len(self.classes)} classes, {len(self)} images, "
                f"transform={self.transform!r})")


__all__ = ["ImageFolder", "DatasetError", "Skipped", "Batch", "collate_skipping", "find_classes",
           "find_images", "subset_evenly", "IMG_EXTENSIONS"]
