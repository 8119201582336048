"""Training augmentation on batches with torch ops only (no torchvision).

The light default, per sample: a random resized crop (scale and aspect ratio drawn as in
torchvision's ``RandomResizedCrop``) or, for small images, a random crop of the zero-padded
image (shifts of up to ``padding`` pixels; zero is the data mean after normalisation), and a
horizontal flip; both are one ``grid_sample`` call on the (normalised) batch.

The random parameters of a micro-batch are drawn from a generator seeded with
``(seed, epoch, micro-batch index)`` for the *global* batch, and each process takes its rows:
augmentation is the same for any number of processes and after a resume, with no state.

``augment="timm"`` switches on the Vim/DeiT recipe (RandAugment on PIL images where the dataset
has them, mixup/cutmix, random erasing); it needs ``timm`` and is not bit-exact on resume
(timm draws from the global random generators).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def batch_generator(seed: int, epoch: int, index: int, salt: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, micro-batch index, salt)."""
    state = np.random.SeedSequence([seed, epoch, index, salt, 0x5EED]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def rrc_boxes(gen: torch.Generator, n: int, height: int, width: int,
              scale: tuple[float, float] = (0.08, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Tensor:
    """(n, 4) crop boxes ``top, left, h, w`` (floats, pixels) of a random resized crop.

    As torchvision: up to ``attempts`` draws of an area share in ``scale`` and a log-uniform
    aspect ratio in ``ratio``; the first that fits is kept, else the central crop of the
    largest box with an aspect ratio inside ``ratio``.
    """
    area = height * width
    share = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = log_r.exp()
    w = (area * share * r).sqrt().round()
    h = (area * share / r).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    u = torch.rand(n, 2, generator=gen)
    boxes = torch.empty(n, 4)
    for i in range(n):  # n small; the fallback branch keeps the draw count fixed per sample
        k = int(first[i])
        if k >= 0:
            hh, ww = float(h[i, k]), float(w[i, k])
        else:
            in_ratio = width / height
            if in_ratio < ratio[0]:
                ww, hh = float(width), float(round(width / ratio[0]))
            elif in_ratio > ratio[1]:
                hh, ww = float(height), float(round(height * ratio[1]))
            else:
                hh, ww = float(height), float(width)
        top = math.floor(float(u[i, 0]) * (height - hh + 1))
        left = math.floor(float(u[i, 1]) * (width - ww + 1))
        boxes[i] = torch.tensor([top, left, hh, ww])
    return boxes


def _theta_from_boxes(boxes: Tensor, flip: Tensor, height: int, width: int) -> Tensor:
    """Affine grids (n, 2, 3) mapping output coordinates to the boxes (align_corners=False)."""
    top, left, h, w = boxes.unbind(1)
    sx = w / width * torch.where(flip, -1.0, 1.0)
    sy = h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)


class LightAugment:
    """Random crop (resized, or shifted with padding) and horizontal flip on batches.

    Args:
        crop: ``"rrc"`` (random resized crop), ``"pad"`` (random crop with padding), ``"none"``.
        padding: the largest shift of ``"pad"`` in pixels (default: 1/8 of the smaller side).
        scale: area share range of ``"rrc"``.
        hflip: probability of a horizontal flip.
    """

    def __init__(self, crop: str = "rrc", padding: int | None = None,
                 scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5):
        if crop not in ("rrc", "pad", "none"):
            raise ValueError(f"crop must be rrc, pad or none, got {crop!r}")
        self.crop, self.padding, self.scale, self.hflip = crop, padding, tuple(scale), hflip

    def params(self, gen: torch.Generator, n: int, height: int, width: int) -> tuple[Tensor, str]:
        """``(theta (n, 2, 3), interpolation)`` of ``n`` samples, drawn from ``gen``."""
        flip = torch.rand(n, generator=gen) < self.hflip
        if self.crop == "rrc":
            boxes = rrc_boxes(gen, n, height, width, self.scale)
            mode = "bilinear"
        else:
            pad = max(1, min(height, width) // 8) if self.padding is None else self.padding
            shift = (torch.randint(-pad, pad + 1, (n, 2), generator=gen).float()
                     if self.crop == "pad" else torch.zeros(n, 2))
            boxes = torch.stack([shift[:, 0], shift[:, 1], torch.full((n,), float(height)),
                                 torch.full((n,), float(width))], 1)
            mode = "nearest"   # whole-pixel shifts and flips sample pixel centres exactly
        return _theta_from_boxes(boxes, flip, height, width), mode

    def apply(self, images: Tensor, theta: Tensor, mode: str) -> Tensor:
        """Warp (B, C, H, W) images, or (B, C, T, H, W) clips with one crop and flip per clip."""
        if images.dim() == 5:
            b, c, t, h, w = images.shape
            return self.apply(images.reshape(b, c * t, h, w), theta, mode).reshape(b, c, t, h, w)
        grid = F.affine_grid(theta.to(images.device, torch.float32), list(images.shape),
                             align_corners=False)
        out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros",
                            align_corners=False)
        return out.to(images.dtype)

    def __call__(self, images: Tensor, gen: torch.Generator, rows: slice | None = None,
                 global_n: int | None = None) -> Tensor:
        """Augment ``images``, which are ``rows`` of a global batch of ``global_n`` samples."""
        n = images.shape[0]
        theta, mode = self.params(gen, global_n or n, images.shape[-2], images.shape[-1])
        theta = theta[rows] if rows is not None else theta
        return self.apply(images, theta[:n], mode)

    def __repr__(self) -> str:
        return (f"LightAugment(crop={self.crop!r}, padding={self.padding}, scale={self.scale}, "
                f"hflip={self.hflip})")


def require_timm():
    """Import timm or explain how to get it."""
    try:
        import timm  # noqa: F401
        import timm.data
    except ImportError as exc:
        raise ImportError("augment='timm' (RandAugment, mixup/cutmix, random erasing) needs timm "
                          "and torchvision: pip install timm; or use augment='light' (--augment light)") from exc
    return timm


class TimmBatchAugment:
    """Mixup/cutmix and random erasing from timm on batches (the Vim/DeiT recipe)."""

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
                 reprob: float = 0.25, label_smoothing: float = 0.1):
        timm = require_timm()
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = timm.data.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                         label_smoothing=label_smoothing, num_classes=num_classes)
        from timm.data.random_erasing import RandomErasing
        self.erasing = RandomErasing(reprob, mode="pixel", device="cpu") if reprob > 0 else None

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.erasing is not None:
            self.erasing.device = images.device
            images = self.erasing(images)
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, labels = self.mixup(images, labels)
        return images, labels


def timm_train_transform(img_size: int, channels: int, rand_augment: str, mean, std):
    """timm's training transform of PIL images with RandAugment (random erasing is done on
    batches by :class:`TimmBatchAugment`)."""
    require_timm()
    from timm.data import create_transform
    if channels != 3:
        raise ValueError("timm's RandAugment transform needs 3-channel (RGB) images")
    return create_transform(img_size, is_training=True, auto_augment=rand_augment,
                            interpolation="bicubic", re_prob=0.0, mean=mean, std=std)
