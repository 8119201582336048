"""Accuracy of a (token-reduced) model on an evaluation set.

>>> from vimerge.data import open_dataset, make_loader
>>> loader = make_loader(open_dataset("/data/imagenet/val", img_size=224), batch_size=64)
>>> evaluate(model, loader)["top1"]
76.1

Accuracies are percentages; ``loss`` is the mean cross-entropy (natural log) per image. The
``vimerge eval`` command (``vimerge/cli/eval.py``) and re-training's validation use this loop.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- evaluation loop


def _unpack(batch: Any):
    """(images, labels, skipped records) of a batch: a vimerge Batch or a plain (images, labels)."""
    if isinstance(batch, dict):
        return batch["images"], batch["labels"], list(batch.get("skipped", ()))
    if len(batch) == 3:
        return batch[0], batch[1], list(batch[2])
    images, labels = batch
    return images, labels, []


def _skip_record(item: Any) -> tuple[str, str]:
    if isinstance(item, str):
        return item, "unreadable"
    path, reason = item
    return str(path), str(reason)


def view_logits(model, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``; a batch of several views per sample, ``(B, V, ...)`` with one dimension
    more than the model takes (e.g. the clips x crops of :class:`vimerge.data.VideoDataset`), gives
    the mean of the views' logits (the multi-view evaluation of video models)."""
    takes = 5 if getattr(model, "num_frames", None) else 4
    if inputs.dim() != takes + 1:
        return model(inputs)
    b, v = inputs.shape[:2]
    return model(inputs.flatten(0, 1)).view(b, v, -1).mean(1)


def evaluate(model, loader: Iterable, *, device: Any = "cpu", progress: bool = True,
             desc: str = "eval", warn_skipped: bool = True, per_image: bool = False,
             amp_dtype: torch.dtype | None = None) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` over ``loader``.

    Args:
        model: a classifier (logits (B, classes)); moved to ``device`` and run in eval mode
            (its previous train/eval mode is restored afterwards).
        loader: batches of ``(images, labels)`` or ``(images, labels, skipped)`` as made by
            :func:`vimerge.data.make_loader` (skipped: records ``(path, reason)`` of files that
            could not be read; ``images`` may be None when a whole batch was unreadable).
        device: where to run.
        progress: show a tqdm progress bar (on stderr).
        desc: the bar's label.
        warn_skipped: log a warning per skipped file.
        per_image: also return ``per_image_correct``, a bool tensor (images,) in loader order
            (for paired comparisons of two models on the same images).
        amp_dtype: run the model under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); None: no autocast. Metrics are computed in fp32.

    Returns:
        ``{"top1", "top5", "loss", "images", "correct", "skipped", "seconds",
        "images_per_second"}``: accuracies in percent (``top5`` None with fewer than 5
        classes; all metrics None when no image was evaluated), ``loss`` the mean natural-log
        cross-entropy, ``skipped`` the paths of the files left out.
    """
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    num_classes = None
    skipped: dict[str, str] = {}
    hits: list = []
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    try:
        with torch.inference_mode():
            for batch in loader:
                images, labels, batch_skipped = _unpack(batch)
                for item in batch_skipped:
                    path, reason = _skip_record(item)
                    if path not in skipped:
                        skipped[path] = reason
                        if warn_skipped:
                            log.warning("skipped unreadable image %s (%s)", path, reason)
                if images is None or len(images) == 0:
                    bar.update(len(batch_skipped))
                    continue
                images = images.to(device, non_blocking=True)
                labels = torch.as_tensor(labels).to(device, dtype=torch.long)
                if amp_dtype is None:
                    logits = view_logits(model, images).float()
                else:
                    with torch.autocast(device.type, dtype=amp_dtype):
                        logits = view_logits(model, images).float()
                num_classes = logits.shape[-1]
                if int(labels.max()) >= num_classes or int(labels.min()) < 0:
                    raise ValueError(f"label {int(labels.max())} is outside the model's "
                                     f"{num_classes} outputs; build the model with the data set's "
                                     f"number of classes (create_model(..., num_classes=N))")
                loss_sum += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
                right = logits.argmax(-1) == labels
                correct1 += int(right.sum())
                if per_image:
                    hits.append(right.cpu())
                if num_classes >= 5:
                    top5 = logits.topk(5, dim=-1).indices
                    correct5 += int((top5 == labels[:, None]).any(-1).sum())
                n += len(labels)
                bar.update(len(labels) + len(batch_skipped))
                bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    ok = n > 0
    extra = {"per_image_correct": torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)} if per_image else {}
    return {
        "top1": 100.0 * correct1 / n if ok else None,
        "top5": 100.0 * correct5 / n if ok and num_classes >= 5 else None,
        "loss": loss_sum / n if ok else None,
        "images": n,
        "correct": correct1,
        "skipped": list(skipped),
        "skipped_reasons": dict(skipped),
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
        **extra,
    }


__all__ = ["evaluate", "view_logits"]
