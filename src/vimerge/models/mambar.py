"""Mamba-Reg (Mamba®, Wang et al., "Vision Mambas Need Registers", CVPR 2025): Vim with
registers, parameter-compatible with the official wangf3014/Mamba-Reg ``models_mamba.py``.

Architecture (the official ``VisionMamba`` with ``rms_norm=True, residual_in_fp32=True,
fused_add_norm=True``): a patch embedding (stride = patch size), ``pos_embed`` (1, P, E) added
to the P patch tokens, R registers ``cls_token`` (1, R, E) + ``pos_embed_cls`` (1, R, E)
inserted evenly among the patches (the official ``utils.get_cls_idx``: with L = P // (R + 1),
register i follows patches ``i L .. i L + L - 1``, at position ``i (L + 1) + L``, and the last
``P - R L`` patches come after the last register), the shared Mamba trunk
(:class:`~vimerge.models.mamba.MambaTrunk`, directions averaged as in Vim), ``norm_f`` on every
token, and the head reading the registers: their R outputs, each projected by ``neck``
(E -> E / cls_reduce, no bias) and concatenated, then ``norm_neck`` (RMSNorm) and ``head``
(``cls_reduce = 1``: the R outputs concatenated straight into the head).

Token reduction: the registers are the protected tokens (``protected``: never merged, dropped
or absorbing, their positions kept in order, :attr:`~vimerge.tokens.TokenState.protected`);
``cls_index`` names the middle register (the one STM sweeps toward).

Shapes: images (B, C, H, W); tokens (B, P + R, E).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..tokens import check_convention
from .checkpoint import CheckpointError, listing
from .layers import PatchEmbed, RMSNorm, checkpoint_grid, fmt_grid, resample_pos_embed
from .mamba import MambaTrunk
from .registry import register_model


def register_positions(num_patches: int, num_registers: int) -> tuple[list[int], list[int]]:
    """(order, positions): ``order[j]`` is the index into ``[patches..., registers...]`` of
    sequence token j, ``positions`` the registers' places in the sequence (the official
    ``get_cls_idx(H, W, R)``, ``models_mamba.py`` / ``utils.py``)."""
    every = num_patches // (num_registers + 1)
    order: list[int] = []
    for i in range(num_registers):
        order += list(range(i * every, (i + 1) * every)) + [num_patches + i]
    order += list(range(num_registers * every, num_patches))
    return order, [i * (every + 1) + every for i in range(num_registers)]


class MambaReg(MambaTrunk):
    """Mamba-Reg. See the module docstring.

    Args:
        img_size, patch_size, in_chans: the patch embedding (stride = patch size).
        depth, embed_dim, d_state: the blocks.
        num_registers: R (the official ``num_cls_tokens``: 12, large 16); at most P.
        cls_reduce: the neck's width divisor (official: 1 tiny, 2 small, 4 base, 8 large).
        num_classes: head outputs (0: features). drop_rate, drop_path_rate, norm_eps,
            scan_backend: as in :class:`~vimerge.models.vim.VisionMamba`.
    """

    no_decay_names = ("pos_embed", "cls_token", "pos_embed_cls")   # the official set
    hint_preset = "mambar_small"

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, depth: int = 24,
                 embed_dim: int = 384, d_state: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 num_registers: int = 12, cls_reduce: int = 2, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-5, scan_backend: str = "auto"):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        if not 1 <= num_registers <= self.num_patches or cls_reduce < 1 or embed_dim % cls_reduce:
            raise ValueError(f"num_registers={num_registers} must be in 1..{self.num_patches} (the patches) and "
                             f"cls_reduce={cls_reduce} must divide embed_dim={embed_dim}")
        self.num_registers, self.cls_reduce = num_registers, cls_reduce
        order, self.register_index = register_positions(self.num_patches, num_registers)
        self.register_buffer("token_order", torch.tensor(order), persistent=False)
        self.cls_index = self.register_index[num_registers // 2]
        self.cls_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.build_trunk(embed_dim, depth, d_state, drop_path_rate, norm_eps, scan_backend, average=True)
        width = num_registers * (embed_dim // cls_reduce)
        if cls_reduce > 1:
            self.neck = nn.Linear(embed_dim, embed_dim // cls_reduce, bias=False)
            self.norm_neck = RMSNorm(width, norm_eps)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """The official initialisation: LeCun normal patch convolution, truncated normal 0.02
        for the embeddings, registers, neck and head, the out_proj rescaling."""
        conv = self.patch_embed.proj
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / conv.weight[0].numel()))
        nn.init.zeros_(conv.bias)
        for p in (self.pos_embed, self.cls_token, self.pos_embed_cls):
            nn.init.trunc_normal_(p, std=0.02)
        for linear in (getattr(self, "neck", None), self.head):
            if isinstance(linear, nn.Linear):
                nn.init.trunc_normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        self.rescale_out_proj(depth)

    @property
    def num_tokens(self) -> int:
        """Tokens after the embedding: patches + registers."""
        return self.num_patches + self.num_registers

    @property
    def protected(self) -> tuple[int, ...]:
        """The registers' positions: no reduction merges or drops them."""
        return tuple(self.register_index)

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, P + R, E), registers among the patches."""
        patches = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        registers = self.cls_token.expand(patches.shape[0], -1, -1) + self.pos_embed_cls
        return torch.cat((patches, registers), dim=1)[:, self.token_order]

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> the registers' read-out (B, R E / cls_reduce), after ``norm_neck``."""
        state = self.forward_tokens(x)
        registers = self.norm_f(self.final_residual(state))[:, list(state.kept)]   # (B, R, E)
        if self.cls_reduce > 1:
            return self.norm_neck(self.neck(registers).flatten(1))
        return registers.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    def outer_flops(self, convention: str) -> int:
        """FLOPs outside the blocks (blocks: :meth:`MambaTrunk.flops
        <vimerge.models.mamba.MambaTrunk.flops>`). ``"paper"`` (R-MeeTo's convention, a
        multiply-add is one): the patch embedding ``P C p^2 in_chans``, the neck ``R C C / r``
        and the head ``(R C / r) classes``. ``"full"``: twice those, plus the position embeddings
        ``(P + R) C``, the final norm on the R registers ``4 R C`` and ``norm_neck`` ``4 R C / r``."""
        mult = check_convention(convention)
        C, conv, R = self.embed_dim, self.patch_embed.proj, self.num_registers
        width = R * (C // self.cls_reduce)
        neck = R * C * (C // self.cls_reduce) if self.cls_reduce > 1 else 0
        total = mult * (self.num_patches * C * conv.in_channels * math.prod(conv.kernel_size) + neck
                        + width * self.num_classes)
        if convention == "full":
            total += self.num_tokens * C + 4 * R * C + (4 * width if self.cls_reduce > 1 else 0)
        return total

    def checkpoint_filter(self, state: dict[str, Tensor], source: str, strict: bool
                          ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Recognise a Mamba-Reg checkpoint and fit its (patches-only) position embedding to
        this model's grid, compared as (h, w) shapes: resampled bicubically with a warning
        (``"pos_embed_grid"``); registers and their embeddings load as they are.

        Raises:
            CheckpointError: no ``layers.N.mixer`` keys or no ``pos_embed_cls`` (not a
                Mamba-Reg: Vim checkpoints go to ``vim_*``), or a grid neither square nor of
                the model's aspect ratio.
        """
        if not any(re.match(r"layers\.\d+\.mixer\.", k) for k in state) or "pos_embed_cls" not in state:
            prefixes = sorted({k.split(".", 1)[0] for k in state})
            msg = (f"checkpoint {source} is not a Mamba-Reg checkpoint: it needs 'layers.N.mixer...' keys and "
                   f"'pos_embed_cls' (its keys start with: {listing(prefixes)}); a Vim checkpoint loads into vim_*")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(msg, stacklevel=3)
        unchanged: dict[str, Any] = {"resized_pos_embed": False}
        old = state.get("pos_embed")
        if old is None or old.dim() != 3 or old.shape[-1] != self.embed_dim:
            return state, unchanged
        grid, mine = checkpoint_grid(old.shape[1], self.grid_size), tuple(self.grid_size)
        if grid == mine:
            return state, unchanged
        if grid is None:
            msg = (f"checkpoint {source} has a position embedding for {old.shape[1]} patches, not a square grid "
                   f"nor one of the model's aspect ratio ({fmt_grid(mine)}); build the model with its img_size")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(f"{msg}; its position embedding was not loaded", stacklevel=3)
            return {k: v for k, v in state.items() if k != "pos_embed"}, unchanged
        warnings.warn(f"checkpoint {source} has a {fmt_grid(grid)} patch grid: resampled its position embedding "
                      f"to the model's {fmt_grid(mine)} grid", stacklevel=3)
        resized = resample_pos_embed(old, mine, grid, cls_index_old=None, cls_index_new=None)
        return {**state, "pos_embed": resized}, {"resized_pos_embed": True, "pos_embed_grid": (grid, mine)}


# ---------------------------------------------------------------------------------------------
# presets: the official models_mamba.py; weights on the Hugging Face hub (official README:
# ImageNet-1k top-1 81.4 / 83.0 / 83.6 for small / base / large at 224 px)

HUB = "hf://Wangf3014/Mamba-Reg"
_SIZES = {"tiny": (192, 24, 12, 1), "small": (384, 24, 12, 2), "base": (768, 24, 12, 4), "large": (1024, 48, 16, 8)}
"""Preset size -> (embed_dim, depth, num_registers, cls_reduce), from ``mambar_*_patch16_224``."""
for _size, (_dim, _depth, _regs, _reduce) in _SIZES.items():
    register_model(f"mambar_{_size}", MambaReg, aliases=(f"mambar_{_size}_patch16_224",),
                   pretrained=None if _size == "tiny" else f"{HUB}/mambar_{_size}_patch16_224.pth",
                   patch_size=16, embed_dim=_dim, depth=_depth, d_state=16, num_registers=_regs,
                   cls_reduce=_reduce)
