"""The parts every backbone builds from: patch embedding, RMSNorm, stochastic depth, and the
position-embedding resampling and grid recognition that fit a checkpoint to a model.

Backbone files (``vim.py``, ``videomamba.py``, ``mambar.py``, ``deit.py``) import their parts from
here and from :mod:`vimerge.models.mamba` (the Mamba trunk), never from one another
(``tests/test_architecture.py`` checks it).

Shapes: images (B, C, H, W); tokens (B, N, E); a position embedding (1, rows, E) whose patch
rows are a (h, w) grid in row-major order, with at most one class row among them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def pair(x: int | tuple[int, int]) -> tuple[int, int]:
    """``x`` as (height, width): an int is square."""
    return (x, x) if isinstance(x, int) else tuple(x)  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, num_patches, E) by one strided convolution."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int = 16,
                 in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.img_size = pair(img_size)
        self.patch_size = pair(patch_size)
        self.stride = stride
        if any(s < p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        self.grid_size = tuple((s - p) // stride + 1 for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=stride)
        border = tuple((s - p) % stride for s, p in zip(self.img_size, self.patch_size))
        if any(border):
            warnings.warn(self._border_message(border), stacklevel=3)

    def _border_message(self, border: tuple[int, int]) -> str:
        """The pixels that no patch covers (the convolution drops them) and the sizes that fit."""
        rows, cols = border
        lost = [f"{rows} pixel row{'s' * (rows != 1)}" if rows else "",
                f"{cols} column{'s' * (cols != 1)}" if cols else ""]
        fits = [(size - drop, size - drop + self.stride) for size, drop in zip(self.img_size, border)]
        down, up = (fmt_size(tuple(f[i] for f in fits)) for i in (0, 1))
        return (f"img_size {fmt_size(self.img_size)} is not covered by whole patches (patch_size "
                f"{fmt_size(self.patch_size)}, stride {self.stride}): the border is dropped (never seen: "
                f"the last {' and '.join(t for t in lost if t)}); use img_size={down} or "
                f"img_size={up} (and resize the images to it) to use every pixel")

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.proj.in_channels, *self.img_size):
            raise ValueError(self._input_message(x))
        return self.proj(x).flatten(2).transpose(1, 2)

    def _input_message(self, x: Tensor) -> str:
        """What is wrong with the input's shape and how to fix it: the batch dimension, the
        channels (grayscale / RGB), the layout (channels last), the size; only what differs."""
        c, (h, w) = self.proj.in_channels, self.img_size
        msg = f"expected images of shape (batch, {c}, {h}, {w}), got {tuple(x.shape)}"
        if x.dim() != 4:
            single = x.dim() == 3 and tuple(x.shape) == (c, h, w)
            return (f"{msg}: {'a single image' if single else 'not a batch of images'}; the model "
                    f"takes a batch dimension first (x.unsqueeze(0) for one image)")
        if x.shape[-1] == c and tuple(x.shape[1:3]) == (h, w):
            return f"{msg}: the images are channels-last; pass x.permute(0, 3, 1, 2)"
        fixes = []
        got = x.shape[1]
        if got != c:
            what = f"{got}-channel images into a model that takes {c} channel{'s' * (c != 1)}"
            if c == 3 and got == 1:
                fixes.append(f"{what}: convert them to RGB (PIL's image.convert('RGB'), or "
                             f"x.expand(-1, 3, -1, -1)) or build the model with in_chans=1")
            elif c == 1 and got in (3, 4):
                fixes.append(f"{what}: convert them to grayscale (PIL's image.convert('L'), or "
                             f"x[:, :3].mean(1, keepdim=True)) or build the model with in_chans={got}")
            else:
                fixes.append(f"{what}: build the model with in_chans={got}")
        if tuple(x.shape[-2:]) != (h, w):
            fixes.append(f"{x.shape[-2]}x{x.shape[-1]} images into a model for {h}x{w}: resize the "
                         f"input, or build the model with img_size={tuple(x.shape[-2:])} (position "
                         f"embeddings are resampled when a checkpoint is loaded)")
        return f"{msg}; " + "; ".join(fixes)


def fmt_size(hw: tuple[int, int]) -> str:
    """An image size or grid as written in an argument: ``224`` when square, else ``(224, 320)``."""
    return str(hw[0]) if hw[0] == hw[1] else str(tuple(hw))


def fmt_grid(hw: tuple[int, int]) -> str:
    """A patch grid as ``14x14``."""
    return f"{hw[0]}x{hw[1]}"


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(self.weight.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def checkpoint_grid(num_patches: int, model_grid: Sequence[int]) -> tuple[int, int] | None:
    """The (rows, columns) of a checkpoint's position embedding for ``num_patches`` patches.

    A checkpoint records only its number of patch rows; its grid is taken as square when the
    count is a square (every published ImageNet checkpoint: 14x14 at 224 px), else as the
    model's aspect ratio (``model_grid``), else None (unknown). Callers compare the result with
    the model's grid as (h, w) shapes, never by the count (issue 25 item 5): a 14x14
    checkpoint in a model with a 7x28 grid has as many rows but must be resampled.
    """
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    gh, gw = model_grid
    return next(((h, num_patches // h) for h in range(1, num_patches + 1)
                 if num_patches % h == 0 and h * gw == (num_patches // h) * gh), None)


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None, *,
                       cls_index_old: int | None, cls_index_new: int | None) -> Tensor:
    """Resample a position embedding to another patch grid.

    The class token's row (if any) is taken out, the patch rows are reshaped to their grid,
    resized bicubically (``align_corners=False``, in fp32, as timm's ``resample_abs_pos_embed``)
    and flattened again, and the class row is put back at its new index; it is never
    interpolated.

    Args:
        pos_embed: (1, old_h * old_w + k, E), k = 1 with a class row, 0 without.
        new_grid: (new_h, new_w), e.g. ``model.grid_size``.
        old_grid: (old_h, old_w); default: the square grid of the patch count.
        cls_index_old: the class row's index in ``pos_embed`` (Vim: ``old_h * old_w // 2``; DeiT,
            VideoMamba: 0), or None for an embedding of the patches only (Mamba-Reg, DeiT III).
        cls_index_new: its index in the result (None exactly when ``cls_index_old`` is None).

    Returns:
        (1, new_h * new_w + k, E), dtype of ``pos_embed``; ``pos_embed`` itself when nothing
        changes.

    Raises:
        ValueError: a malformed embedding, a grid that does not hold its rows, or only one of
            the class indices given.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, E), got {tuple(pos_embed.shape)}")
    if (cls_index_old is None) != (cls_index_new is None):
        raise ValueError("give both class-row indices (int) or neither (None: no class row)")
    extra = 0 if cls_index_old is None else 1
    n_old = pos_embed.shape[1] - extra
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"cannot infer the patch grid of a position embedding with {n_old} "
                             f"patches (not a square); pass old_grid=(h, w)")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} patches, the "
                         f"position embedding {n_old}")
    n_new = new_grid[0] * new_grid[1]
    if old_grid == new_grid and cls_index_old == cls_index_new:
        return pos_embed
    if cls_index_old is None:
        patches, cls_row = pos_embed, None
    else:
        cls_row = pos_embed[:, cls_index_old:cls_index_old + 1]                  # (1, 1, E)
        patches = torch.cat((pos_embed[:, :cls_index_old], pos_embed[:, cls_index_old + 1:]), dim=1)
    grid = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()         # (1, E, h, w)
    if old_grid != new_grid:
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, n_new, -1).to(pos_embed.dtype)
    if cls_row is None:
        return patches
    return torch.cat((patches[:, :cls_index_new], cls_row, patches[:, cls_index_new:]), dim=1)
