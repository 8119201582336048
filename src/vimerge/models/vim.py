"""Vision Mamba (Vim) in pure PyTorch, parameter-compatible with hustvl/Vim.

This is the ``vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
architecture of the official repository: a patch-embedding convolution, a class token
inserted in the middle of the patch sequence, an absolute position embedding added after the
insertion, ``depth`` blocks of ``Add -> RMSNorm -> bidirectional Mamba mixer`` with the residual
stream kept in fp32, a final ``Add -> RMSNorm``, and a linear head on the class token.

Shapes: images (B, C, H, W); tokens (B, N, E) with N = num_patches + 1 and the class token
at index ``num_patches // 2``; mixer internals (B, d_inner, N) with d_inner = 2 E.

The blocks, the token-model protocol and the block FLOPs formula are the shared Mamba trunk
(:class:`~vimerge.models.mamba.MambaTrunk`, directions averaged: Vim's "div2"); this file has
what is Vim's own: the middle class token (embedding and read-out), the FLOPs of the embedding
and head (:meth:`VisionMamba.outer_flops`), the checkpoint filter (middle class token in the
position embedding, stride recognition) and the presets (registered below).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..tokens import check_convention
from .checkpoint import CheckpointError, listing
from .layers import PatchEmbed, checkpoint_grid, fmt_grid, fmt_size, resample_pos_embed
from .mamba import MambaTrunk
from .registry import register_model


class VisionMamba(MambaTrunk):
    """Vim with a middle class token. See the module docstring for the architecture.

    Args:
        img_size, patch_size, stride, in_chans: the patch embedding.
        depth, embed_dim, d_state: the blocks (d_inner = 2 * embed_dim).
        num_classes: head outputs (0 gives features from :meth:`forward`).
        drop_rate: dropout after the position embedding; drop_path_rate: stochastic depth,
            linearly increasing over blocks as in the official code.
        scan_backend: selective-scan backend of every mixer (see :mod:`vimerge.ops`).
    """

    hint_preset = "vim_tiny"

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int = 16,
                 depth: int = 24, embed_dim: int = 192, d_state: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-5, scan_backend: str = "auto"):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_index = self.num_patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.build_trunk(embed_dim, depth, d_state, drop_path_rate, norm_eps, scan_backend, average=True)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        conv = self.patch_embed.proj  # LeCun normal (truncated), zero bias
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / (conv.weight[0].numel())))
        nn.init.zeros_(conv.bias)
        for p in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.rescale_out_proj(depth)

    # ------------------------------------------------------------------ token layout (TokenModel)
    @property
    def num_tokens(self) -> int:
        """Tokens after the embedding: patches + the class token."""
        return self.num_patches + 1

    # ------------------------------------------------------------------ cost
    def outer_flops(self, convention: str) -> int:
        """FLOPs outside the blocks (the block formula: :meth:`MambaTrunk.flops
        <vimerge.models.mamba.MambaTrunk.flops>`). ``"paper"`` (R-MeeTo's ``calc_flops``): the
        patch embedding ``(num_patches + 1) C p^2 in_chans`` (the class token counted, as in the
        paper) and the head ``C classes``. ``"full"``: twice those (a multiply-add is 2), plus
        the position embedding ``(num_patches + 1) C`` and the final norm ``4C`` (class token only)."""
        mult = check_convention(convention)
        C, conv, n0 = self.embed_dim, self.patch_embed.proj, self.num_tokens
        total = mult * (n0 * C * conv.in_channels * math.prod(conv.kernel_size) + C * self.num_classes)
        if convention == "full":
            total += n0 * C + 4 * C                          # position embedding, final norm
        return total

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_filter(self, state: dict[str, Tensor], source: str, strict: bool
                          ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Recognise a Vim checkpoint and fit its position embedding to this model's patch grid.

        The checkpoint records no img_size or stride, only its grid (the position embedding's
        rows) and patch size (the patch convolution). Its grid is compared with the model's:

        * the same grid: loaded as it is;
        * a grid that another stride gives at the model's img_size (a stride dividing the patch
          size, e.g. the official stride-8 Vims: 27x27 at 224 px): refused, with the fix
          (``stride=8``, since (224-16)/(27-1) = 8); with ``strict=False`` the position
          embedding is left out (reported as mismatched) with a warning;
        * any other grid is the model's geometry at another img_size (the checkpoint was made at
          another resolution): the patch rows are resampled bicubically to the model's grid
          (the middle class token's row kept out, see
          :func:`~vimerge.models.checkpoint.resample_pos_embed`), with a warning naming both
          grids; the report gets ``"pos_embed_grid": (checkpoint grid, model grid)``.

        The checkpoint's grid is square, or has the model's aspect ratio.

        Raises:
            CheckpointError: the weights are not a Vim's (no ``layers.N.mixer`` keys), the grid
                fits another stride, or it is neither square nor of the model's aspect ratio.
        """
        if not any(k.startswith("layers.") for k in state):
            prefixes = sorted({k.split(".", 1)[0] for k in state})
            msg = (f"checkpoint {source} is not a Vision Mamba (Vim) checkpoint: it has no "
                   f"'layers.N.mixer...' keys (its keys start with: {listing(prefixes)})")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(msg, stacklevel=3)
        unchanged: dict[str, Any] = {"resized_pos_embed": False}
        old, new = state.get("pos_embed"), self.pos_embed
        if old is None or old.dim() != 3 or old.shape[-1] != new.shape[-1]:
            return state, unchanged   # nothing to do, or a mismatch the key check reports
        proj = state.get("patch_embed.proj.weight")
        if proj is not None and tuple(proj.shape[-2:]) != tuple(self.patch_embed.patch_size):
            return state, unchanged   # another patch size: the key check reports it, with the preset hint
        n_old = old.shape[1] - 1
        grid = checkpoint_grid(n_old, self.grid_size)
        if grid == tuple(self.grid_size):
            return state, unchanged   # compared as (h, w) grids: 14x14 into 7x28 is resampled
        mine = f"{fmt_grid(self.grid_size)} grid (img_size {fmt_size(self.img_size)}, patch_size " \
               f"{fmt_size(self.patch_embed.patch_size)}, stride {self.patch_embed.stride})"
        if grid is None:
            msg = (f"checkpoint {source} has a position embedding for {n_old} patches, which is not a "
                   f"square grid nor one of the model's aspect ratio, and the model has {self.num_patches} "
                   f"patches: a {mine}; build the model with the checkpoint's img_size/stride, or "
                   f"resample it yourself with resample_pos_embed(..., old_grid=(h, w))")
        elif (stride := self._stride_for_grid(grid)) is not None:
            (h, _), (p, _) = self.img_size, self.patch_embed.patch_size
            at = tuple((g - 1) * self.patch_embed.stride + q for g, q in zip(grid, self.patch_embed.patch_size))
            msg = (f"checkpoint {source} has a {fmt_grid(grid)} patch grid ({n_old + 1} position-embedding "
                   f"rows), the model a {mine}: the checkpoint's grid is what stride {stride} gives "
                   f"at img_size {fmt_size(self.img_size)}. Build the model with stride={stride}, since "
                   f"({h}-{p})/({grid[0]}-1) = {stride} (or, if the checkpoint was made at "
                   f"img_size={fmt_size(at)} with stride {self.patch_embed.stride}, with img_size={fmt_size(at)})")
        else:
            at = tuple((g - 1) * self.patch_embed.stride + q for g, q in zip(grid, self.patch_embed.patch_size))
            warnings.warn(
                f"checkpoint {source} has a {fmt_grid(grid)} patch grid (img_size {fmt_size(at)} with patch_size "
                f"{fmt_size(self.patch_embed.patch_size)}, stride {self.patch_embed.stride}): resampled its "
                f"position embedding to the model's {fmt_grid(self.grid_size)} grid (img_size "
                f"{fmt_size(self.img_size)}); build the model with img_size={fmt_size(at)} to use it unchanged",
                stacklevel=3)
            resized = resample_pos_embed(old, tuple(self.grid_size), grid, cls_index_old=n_old // 2,
                                         cls_index_new=self.cls_index)
            return ({**state, "pos_embed": resized},
                    {"resized_pos_embed": True, "pos_embed_grid": (grid, tuple(self.grid_size))})
        if strict:
            raise CheckpointError(msg)
        warnings.warn(f"{msg}; its position embedding was not loaded", stacklevel=3)
        return state, unchanged

    def _stride_for_grid(self, grid: tuple[int, int]) -> int | None:
        """The stride (other than the model's, dividing the patch size) that gives ``grid`` at the
        model's img_size and patch size, or None."""
        spans = [s - p for s, p in zip(self.img_size, self.patch_embed.patch_size)]
        if min(grid) < 2 or any(span % (g - 1) for span, g in zip(spans, grid)):
            return None
        strides = {span // (g - 1) for span, g in zip(spans, grid)}
        if len(strides) != 1:
            return None
        stride = strides.pop()
        if stride < 1 or stride == self.patch_embed.stride or any(p % stride for p in self.patch_embed.patch_size):
            return None
        return stride

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, num_patches + 1, E), class token at ``cls_index``."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((x[:, :self.cls_index], cls, x[:, self.cls_index:]), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> class-token features (B, E) after the final norm."""
        state = self.forward_tokens(x)
        return self.norm_f(self.final_residual(state)[:, state.cls_index])

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# presets

# Where the official weights live, for users who are online (see checkpoint.read_state_dict).
HUB_WEIGHTS = {
    "vim_tiny": "hf://hustvl/Vim-tiny-midclstok/vim_t_midclstok_76p1acc.pth",
    "vim_small": "hf://hustvl/Vim-small-midclstok/vim_s_midclstok_80p5acc.pth",
    "vim_base": "hf://hustvl/Vim-base-midclstok/vim_b_midclstok_81p9acc.pth",
}

_VIM = dict(patch_size=16, stride=16, depth=24, d_state=16)
for _size, _dim, _letter in (("tiny", 192, "t"), ("small", 384, "s"), ("base", 768, "b")):
    register_model(
        f"vim_{_size}", VisionMamba, pretrained=HUB_WEIGHTS[f"vim_{_size}"], embed_dim=_dim, **_VIM,
        aliases=(f"vim_{_size}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                 f"vim_{_letter}_midclstok"))

# Fashion-MNIST (28x28, one channel, 10 classes): the demo's model. Patch 4 gives 49 patches +
# the class token = 50 tokens; patch 2 (197 tokens, the ImageNet Vims' count) trains at 31 img/s
# on the 2-core development CPU (32 min per epoch) and evaluates at 134 img/s, too slow for a
# demo that must finish in minutes, against 123 / 499 img/s with patch 4 (measured 2026-11-25).
# The shipped base checkpoint (trained here; its JSON sidecar records command, seed and accuracy).
FMNIST_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "vim_fmnist.pth"
# Its re-training recipe (the demo's): one pass, lr 1e-3 cosine to 1e-5, batch 64, no augmentation.
register_model("vim_fmnist", VisionMamba, pretrained=FMNIST_WEIGHTS, img_size=28, patch_size=4, stride=4,
               in_chans=1, depth=8, embed_dim=96, d_state=16, num_classes=10,
               retrain_recipe=dict(epochs=1, batch_size=64, effective_batch=64, lr=1e-3, min_lr=1e-5,
                                   augment="none", label_smoothing=0.1))
