"""Evaluation preprocessing with pillow and torch only (no torchvision).

The standard ImageNet evaluation pipeline of DeiT / Vim:

1. convert to RGB (or to L, grey, for a one-channel model);
2. resize the shorter side to ``int(img_size / crop_pct)`` (256 for 224 at ``crop_pct=0.875``),
   bicubic, keeping the aspect ratio (the longer side becomes ``int(size * long / short)``);
3. centre crop ``img_size``;
4. to a float tensor (C, H, W) in [0, 1];
5. normalise, ``(x - mean) / std`` per channel (ImageNet statistics by default).

>>> t = EvalTransform(224)
>>> t(Image.open("cat.jpg")).shape
torch.Size([3, 224, 224])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# for one-channel models fed ImageNet-style pictures: the mean of the three channels' values
IMAGENET_GREY_MEAN = (sum(IMAGENET_MEAN) / 3,)
IMAGENET_GREY_STD = (sum(IMAGENET_STD) / 3,)
DEFAULT_CROP_PCT = 0.875

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (torchvision's rule:
    the longer side becomes ``int(size * long / short)``)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _resample(interpolation))


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """The central ``size`` (an int or (height, width)) region; offsets rounded as torchvision.

    An image smaller than ``size`` is padded with black (zeros) around it first.
    """
    crop_h, crop_w = _pair(size)
    w, h = img.size
    if crop_w > w or crop_h > h:
        padded = Image.new(img.mode, (max(w, crop_w), max(h, crop_h)))
        padded.paste(img, ((padded.size[0] - w) // 2, (padded.size[1] - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def to_tensor(img: Image.Image) -> Tensor:
    """8-bit PIL image (L or RGB) -> float tensor (C, H, W) in [0, 1]."""
    if img.mode not in ("L", "RGB"):
        raise ValueError(f"to_tensor expects an L or RGB image, got mode {img.mode!r}")
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of a (C, H, W) or (B, C, H, W) tensor."""
    c = x.shape[-3]
    mean_t = torch.as_tensor(_per_channel(mean, c, "mean"), dtype=x.dtype).view(c, 1, 1)
    std_t = torch.as_tensor(_per_channel(std, c, "std"), dtype=x.dtype).view(c, 1, 1)
    if bool((std_t == 0).any()):
        raise ValueError("std must not contain zeros")
    return (x - mean_t) / std_t


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to RGB (3 channels) or L (1 channel); palette/alpha images are flattened first."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"images can be converted to 1 (L) or 3 (RGB) channels, not {channels}")
    if img.mode == mode:
        return img
    if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits (pillow would clip)
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), "L")
        return img if mode == "L" else img.convert(mode)
    if img.mode == "P":  # palette with transparency: go through RGBA to avoid pillow's warning
        img = img.convert("RGBA")
    return img.convert(mode)


def _resample(name: str):
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; use one of {', '.join(_RESAMPLE)}") from None


def _per_channel(values: Sequence[float] | float, channels: int, what: str) -> tuple[float, ...]:
    values = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values for {channels}-channel images; "
                         f"give 1 or {channels}")
    return values


class EvalTransform:
    """PIL image -> normalised (C, img_size, img_size) tensor, the evaluation pipeline above.

    Args:
        img_size: output side (int) or (height, width).
        channels: 3 (RGB) or 1 (grey, L).
        mean, std: per-channel statistics (one value is broadcast); default ImageNet's for RGB
            and the average of ImageNet's three channels for grey.
        crop_pct: the centre crop's share of the resized image, in (0, 1]; the shorter side
            is first resized to ``int(img_size / crop_pct)``. For (height, width) sizes that
            are not square, the image is resized to exactly ``int(h / crop_pct), int(w /
            crop_pct)`` instead.
        interpolation: ``bicubic`` (default), ``bilinear``, ``lanczos`` or ``nearest``.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, *, channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bicubic"):
        self.img_size = _pair(img_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.channels = channels
        default_mean, default_std = ((IMAGENET_MEAN, IMAGENET_STD) if channels == 3
                                     else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD))
        self.mean = _per_channel(default_mean if mean is None else mean, channels, "mean")
        self.std = _per_channel(default_std if std is None else std, channels, "std")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain zeros")
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        _resample(interpolation)  # validate early
        h, w = self.img_size
        self.resize_size = (int(h / crop_pct), int(w / crop_pct))

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """Steps 1-3: mode conversion, resize, centre crop (still a PIL image)."""
        img = to_mode(img, self.channels)
        h, w = self.img_size
        if h == w:
            img = resize_shorter(img, self.resize_size[0], self.interpolation)
        else:
            rh, rw = self.resize_size
            if img.size != (rw, rh):
                img = img.resize((rw, rh), _resample(self.interpolation))
        return center_crop(img, self.img_size)

    def __call__(self, img: Image.Image) -> Tensor:
        return normalize(to_tensor(self.resize_and_crop(img)), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"EvalTransform(img_size={self.img_size}, channels={self.channels}, "
                f"resize={self.resize_size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


__all__ = ["EvalTransform", "resize_shorter", "center_crop", "to_tensor", "normalize", "to_mode",
           "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_GREY_MEAN", "IMAGENET_GREY_STD",
           "DEFAULT_CROP_PCT"]
