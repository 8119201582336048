"""Training data: the subset (Table 8), a resumable deterministic order, and opening ``--data``.

The order of epoch ``e`` is a permutation of the subset drawn from ``(seed, e)``. Micro-batch
``m`` of the epoch is the slice ``[m * G, (m + 1) * G)`` of that permutation, ``G`` = per-device
batch x world size, and process ``k`` takes rows ``[k * B, (k + 1) * B)`` of it: the global
batch is the same for any number of processes, and a resumed run starts at micro-batch ``m``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ..data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageFolder,
    Skipped,
    VideoDataset,
    detect_kind,
    open_dataset,
    split_dir,
)
from .augment import timm_train_transform

log = logging.getLogger(__name__)


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """``round(fraction * n)`` indices of ``range(n)`` drawn with ``seed`` (sorted); all for 1."""
    if fraction >= 1.0:
        return list(range(n))
    k = max(1, round(fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return sorted(perm[:k].tolist())


def epoch_order(indices: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The subset's indices in the order of ``epoch``."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(indices), generator=gen).tolist()
    return [indices[i] for i in perm]


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of one process for one epoch, from micro-batch ``start`` on (see module doc)."""

    def __init__(self, indices: Sequence[int], batch_size: int, num_micro: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.order = epoch_order(indices, seed, epoch)
        self.batch_size, self.num_micro, self.start = batch_size, num_micro, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.world_size
        for m in range(self.start, self.num_micro):
            base = m * g + self.rank * self.batch_size
            yield self.order[base:base + self.batch_size]

    def __len__(self) -> int:
        return max(0, self.num_micro - self.start)


def readable(sample: Any) -> bool:
    """Whether a dataset item is an ``(image tensor, label)`` pair (not a ``Skipped`` record)."""
    return (isinstance(sample, (tuple, list)) and not isinstance(sample, Skipped)
            and len(sample) == 2 and isinstance(sample[0], torch.Tensor))


def collate_train(samples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` samples. A sample the dataset could not read (a ``Skipped``
    record or None) is replaced by a readable sample of the same batch, so that every process
    keeps the same batch size; a batch with none readable raises.

    Samples are told apart by :func:`readable` alone, never by ``in`` / ``==`` on the list:
    those compare tuples holding tensors element by element (``bool(tensor == tensor)`` is an
    error for images)."""
    ok = [readable(s) for s in samples]
    good = [s for s, keep in zip(samples, ok) if keep]
    names = [getattr(s, "path", repr(s)) for s, keep in zip(samples, ok) if not keep]
    if not good:
        raise RuntimeError(f"no readable sample in a training batch of {len(samples)}: "
                           f"{', '.join(names[:3])}")
    if names:
        log.warning("skipped %d unreadable training sample(s), replaced by others of the batch: "
                    "%s", len(names), ", ".join(names[:3]))
    filled = [good[i % len(good)] for i in range(len(samples))] if names else good
    images = torch.stack([s[0] for s in filled])
    labels = torch.as_tensor([int(s[1]) for s in filled], dtype=torch.long)
    return images, labels


def collate_eval(samples: Sequence[Any]) -> tuple[torch.Tensor | None, torch.Tensor]:
    good = [s for s in samples if readable(s)]
    if not good:
        return None, torch.empty(0, dtype=torch.long)
    return torch.stack([s[0] for s in good]), torch.as_tensor([int(s[1]) for s in good])


def num_classes_of(dataset: Dataset) -> int | None:
    """The class count a dataset declares (``classes``), or None."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None


def open_data(root: str, img_size: int | tuple[int, int], channels: int, *, val: str | None = "auto",
              augment: str = "light", rand_augment: str = "", eval_limit: int | None = None,
              num_frames: int | None = None) -> tuple[Dataset, Dataset | None]:
    """``(train, val)`` datasets for ``--data``: Fashion-MNIST IDX files (train and test
    splits) or an ImageFolder directory: the splits of :func:`vimerge.data.split_dir` (the
    rule ``vimerge eval`` follows too): ``DIR/train`` and, for ``val="auto"``, ``DIR/val``
    (or ``validation``/``test``) when there is one, else no validation set; a directory
    without split folders is the training set itself. ``val`` may name another directory or
    be None. With ``num_frames`` (a video model): :class:`~vimerge.data.VideoDataset` s of class
    folders of videos (the same split rule) or annotation lists (``--data`` / ``--val-data``
    a list file), training clips sampled at random in their segments."""
    if num_frames:
        return _open_video(root, img_size, channels, num_frames, val, augment, eval_limit)
    kind = detect_kind(root, "train")
    if kind == "fashion-mnist":
        train = open_dataset(root, kind=kind, split="train", img_size=img_size, channels=channels)
        val_ds = None
        if val == "auto":
            val_ds = open_dataset(root, kind=kind, split="test", img_size=img_size,
                                  channels=channels, limit=eval_limit)
        elif val:
            val_ds = open_dataset(val, img_size=img_size, channels=channels, split="test",
                                  limit=eval_limit)
        return train, val_ds
    train_dir = split_dir(root, "train")
    val_dir = split_dir(root, "val", required=False) if train_dir != Path(root).expanduser() else None
    if augment == "timm":
        size = img_size if isinstance(img_size, int) else img_size[0]
        transform = timm_train_transform(size, channels, rand_augment, IMAGENET_MEAN, IMAGENET_STD)
    else:  # the whole shorter side, centre-cropped; crops and flips come per batch
        transform = EvalTransform(img_size, channels=channels, crop_pct=1.0)
    train = ImageFolder(train_dir, transform)
    train.pil_augmented = augment == "timm"   # crops and flips already done on PIL images
    val_ds = None
    if val == "auto" and val_dir is not None:
        val_ds = open_dataset(os.fspath(val_dir), kind="imagefolder", img_size=img_size,
                              channels=channels, limit=eval_limit)
    elif val and val != "auto":
        val_ds = open_dataset(val, img_size=img_size, channels=channels, limit=eval_limit)
    return train, val_ds


def _open_video(root: str, img_size: int | tuple[int, int], channels: int, num_frames: int, val: str | None,
                augment: str, eval_limit: int | None) -> tuple[Dataset, Dataset | None]:
    """``open_data`` for a video model: clips of ``num_frames`` frames (see :mod:`vimerge.data.video`)."""
    if augment == "timm":
        raise ValueError("augment='timm' works on images; re-train video models with augment='light' or 'none'")

    def clips(path: str | os.PathLike, sampling: str, limit: int | None = None) -> VideoDataset:
        path = Path(path).expanduser()
        listing = path if path.is_file() else None
        return VideoDataset(None if listing else path, annotations=listing, num_frames=num_frames,
                            img_size=img_size, channels=channels, sampling=sampling, limit=limit)

    base = Path(root).expanduser()
    val_dir = None
    if base.is_file():
        train = clips(base, "random")
    else:
        train_dir = split_dir(base, "train")
        train = clips(train_dir, "random")
        val_dir = split_dir(base, "val", required=False) if train_dir != base else None
    val_ds = None
    if val == "auto" and val_dir is not None:
        val_ds = clips(val_dir, "uniform", eval_limit)
    elif val and val != "auto":
        val_ds = clips(val, "uniform", eval_limit)
    return train, val_ds
