"""Vision Mamba (Vim) in pure PyTorch, parameter-compatible with hustvl/Vim.

This is the ``vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
architecture of the official repository: a patch-embedding convolution, a class token
inserted in the middle of the patch sequence, an absolute position embedding added after the
insertion, ``depth`` blocks of ``Add -> RMSNorm -> bidirectional Mamba mixer`` with the residual
stream kept in fp32, a final ``Add -> RMSNorm``, and a linear head on the class token.

Shapes: images (B, C, H, W); tokens (B, N, E) with N = num_patches + 1 and the class token
at index ``num_patches // 2``; mixer internals (B, d_inner, N) with d_inner = 2 E.

This file is the whole backbone: the modules, the presets (registered below), the checkpoint
filter (middle class token in the position embedding, architecture recognition, preset
suggestions), the FLOPs formulas (:meth:`VisionMamba.flops`), the no-weight-decay set and
what it offers token-reduction methods (the :class:`~vimerge.tokens.TokenModel` protocol:
token layout and, on request, each block's scan inputs as a :class:`~vimerge.tokens.BlockRecord`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import Direction, fused_bimamba_v2, fused_mixer_reason, selective_scan
from ..tokens import BlockRecord, Reducer, ScanRecord, TokenState, check_convention
from .checkpoint import CheckpointError, listing, resample_pos_embed
from .registry import get_preset, list_models, model_defaults, register_model


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, num_patches, E) by one strided convolution."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int = 16,
                 in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
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
        down, up = (_fmt_size(tuple(f[i] for f in fits)) for i in (0, 1))
        return (f"img_size {_fmt_size(self.img_size)} is not covered by whole patches (patch_size "
                f"{_fmt_size(self.patch_size)}, stride {self.stride}): the border is dropped (never seen: "
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


def _fmt_size(hw: tuple[int, int]) -> str:
    """An image size or grid as written in an argument: ``224`` when square, else ``(224, 320)``."""
    return str(hw[0]) if hw[0] == hw[1] else str(tuple(hw))


def _grid(hw: tuple[int, int]) -> str:
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


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer ("v2"): one selective scan per direction, averaged.

    The backward direction has its own conv1d / x_proj / dt_proj / A / D and sees the
    time-flipped x and z. Input and output (B, N, E). ``average=False`` sums the two
    directions instead (VideoMamba: ``out_proj(y_fwd + flip(y_bwd))``; Vim's "div2"
    checkpoints divide by 2, the default).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, scan_backend: str = "auto", average: bool = True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.average = average
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.fused = True     # CPU + numba scan: the fused kernels (vimerge.ops.fused_mixer); False: step by step
        self.record = False   # set through VisionMamba.record_blocks by reducers that need the scans
        self.last_record: BlockRecord | None = None
        self._scans: list[ScanRecord] = []
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv,
                                                         groups=self.d_inner, padding=d_conv - 1))
            self.add_module("x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state,
                                                         bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            self._init_dt_proj(dt_proj, dt_min, dt_max, dt_init_floor)
            self.add_module("dt_proj" + suffix, dt_proj)
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            self.register_parameter("A_log" if not suffix else "A_b_log", nn.Parameter(torch.log(A)))
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(self.d_inner)))

    def _init_dt_proj(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        with torch.no_grad():  # inverse of softplus, so softplus(bias) = dt
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _direction(self, x: Tensor, z: Tensor, backward: bool) -> Tensor:
        """One scan direction on (B, d_inner, N) inputs (already flipped for backward).

        With ``self.record`` on, keeps this direction's scan inputs as a
        :class:`~vimerge.tokens.ScanRecord` (flipped back to the token order).
        """
        sfx = "_b" if backward else ""
        conv: nn.Conv1d = getattr(self, "conv1d" + sfx)
        x_proj: nn.Linear = getattr(self, "x_proj" + sfx)
        dt_proj: nn.Linear = getattr(self, "dt_proj" + sfx)
        A = -torch.exp(getattr(self, "A_b_log" if backward else "A_log").float())
        L = x.shape[-1]
        x = F.silu(conv(x)[..., :L])
        dbc = x_proj(x.transpose(1, 2))                                    # (B, N, R + 2n)
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(dt_proj.weight, dt.transpose(1, 2))           # (B, d_inner, N), contiguous
        if self.record:
            order = (lambda t: t.flip(-1).detach()) if backward else (lambda t: t.detach())  # noqa: E731
            self._scans.append(ScanRecord(order(delta), order(B.transpose(1, 2)), order(C.transpose(1, 2)),
                                          A.detach(), dt_proj.bias.detach()))
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2),
                              getattr(self, "D" + sfx).float(), z,
                              delta_bias=dt_proj.bias.float(), delta_softplus=True,
                              backend=self.scan_backend)

    def _forward_fused(self, hidden: Tensor) -> Tensor:
        """:meth:`forward` through :func:`vimerge.ops.fused_bimamba_v2` (same values and records)."""
        fwd, bwd = (Direction(getattr(self, "conv1d" + s).weight, getattr(self, "conv1d" + s).bias,
                              getattr(self, "x_proj" + s).weight, getattr(self, "dt_proj" + s).weight,
                              getattr(self, "dt_proj" + s).bias, getattr(self, a), getattr(self, "D" + s))
                    for s, a in (("", "A_log"), ("_b", "A_b_log")))
        y, scans = fused_bimamba_v2(self.in_proj(hidden), fwd, bwd, self.d_state,
                                    scale=0.5 if self.average else 1.0, record=self.record)
        if scans is not None:
            self.last_record = BlockRecord(*(ScanRecord(s.delta, s.B, s.C, s.A, p.dt_proj_bias.detach())
                                             for s, p in zip(scans, (fwd, bwd))), y.detach().transpose(1, 2))
        return self.out_proj(y)

    def forward(self, hidden: Tensor) -> Tensor:
        if self.fused and fused_mixer_reason(hidden, self.scan_backend) is None:
            return self._forward_fused(hidden)
        xz = self.in_proj(hidden).transpose(1, 2)                          # (B, 2 d_inner, N)
        x, z = xz.chunk(2, dim=1)
        self._scans = []
        y = self._direction(x, z, backward=False)
        y_b = self._direction(x.flip(-1), z.flip(-1), backward=True)
        y = y + y_b.flip(-1)                                               # (B, d_inner, N)
        if self.average:
            y = y / 2
        if self.record:
            self.last_record = BlockRecord(self._scans[0], self._scans[1], y.detach())
            self._scans = []
        return self.out_proj(y.transpose(1, 2))


class Block(nn.Module):
    """Add -> RMSNorm -> mixer; returns the mixer output and the (fp32) residual stream."""

    def __init__(self, dim: int, mixer: BiMambaMixer, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        return self.mixer(self.norm(residual)), residual


class VisionMamba(nn.Module):
    """Vim with a middle class token. See the module docstring for the architecture.

    Args:
        img_size, patch_size, stride, in_chans: the patch embedding.
        depth, embed_dim, d_state: the blocks (d_inner = 2 * embed_dim).
        num_classes: head outputs (0 gives features from :meth:`forward`).
        drop_rate: dropout after the position embedding; drop_path_rate: stochastic depth,
            linearly increasing over blocks as in the official code.
        scan_backend: selective-scan backend of every mixer (see :mod:`vimerge.ops`).
    """

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
        # block i gets the (i-1)-th rate of a linear ramp, as in the official inter_dpr
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList(
            Block(embed_dim, BiMambaMixer(embed_dim, d_state, scan_backend=scan_backend),
                  drop_path=dpr[i], eps=norm_eps)
            for i in range(depth))
        self.drop_path = DropPath(drop_path_rate)
        self.norm_f = RMSNorm(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reduction: Reducer | None = None   # installed by vimerge.apply, see vimerge.reduce
        self.reduction_site = "before_mixer"   # block i's reduction runs before its mixer
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
        for block in self.layers:  # prenorm residual rescaling of the output projection
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(depth)

    # ------------------------------------------------------------------ token layout (TokenModel)
    @property
    def num_tokens(self) -> int:
        """Tokens after the embedding: patches + the class token."""
        return self.num_patches + 1

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def in_chans(self) -> int:
        return self.patch_embed.proj.in_channels

    @property
    def img_size(self) -> tuple[int, int]:
        """Input (height, width) in pixels."""
        return self.patch_embed.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); the patch tokens are its cells in row-major order."""
        return self.patch_embed.grid_size

    def record_blocks(self, layers: Collection[int]) -> None:
        """Record the scan inputs of exactly these blocks in the next forwards (others: none)."""
        wanted = set(layers)
        for i, block in enumerate(self.layers):
            block.mixer.record = i in wanted
            block.mixer.last_record = None

    def block_record(self, layer: int) -> BlockRecord | None:
        """Block ``layer``'s :class:`~vimerge.tokens.BlockRecord` from the last forward, or None."""
        return self.layers[layer].mixer.last_record

    # ------------------------------------------------------------------ cost
    def flops(self, token_counts: Sequence[int], convention: str = "paper") -> float:
        """FLOPs per image when block ``i``'s mixer sees ``token_counts[i]`` tokens (the
        reduction method's own cost is not included; see ``vimerge.count_flops``).

        ``"paper"``: R-MeeTo's ``calc_flops`` convention, which reproduces its Table 2
        (Vim-Ti/S/B: 1.45 / 5.08 / 18.87 GFLOPs): a multiply-add is one FLOP and one scan
        direction is counted. Per block with N tokens, width C, d_inner = 2C, state n, dt rank R::

            in_proj N C 4C, out_proj N 2C C, conv1d (N + 3) 2C 4, x_proj N 2C (R + 2n),
            dt_proj N R 2C, scan 9 N 2C n + N 2C (D term) + N 2C (z gate)

        plus the patch embedding ``(num_patches + 1) C p^2 in_chans`` and the head
        ``C classes``.

        ``"full"``: every arithmetic operation once (a multiply-add is 2, an exp or a division
        1), both scan directions. Per block: in_proj 2 N C 4C, out_proj 2 N 2C C, direction
        average 2 N 2C, RMSNorm 4 N C, residual add N C, and for EACH direction: conv1d
        2 N 2C 4 + bias N 2C; SiLU 4 N 2C; x_proj 2 N 2C (R + 2n); dt_proj 2 N R 2C; bias +
        softplus 3 N 2C; dt u N 2C; dt A and its exp 2 N 2C n; (dt u) B and a h + b 3 N 2C n;
        y = C . h 2 N 2C n; + D u 2 N 2C; * silu(z) 5 N 2C. Plus the patch embedding
        2 (num_patches + 1) C p^2 in_chans (the class token counted, as in the paper),
        position embedding (num_patches + 1) C, final norm 4C (class token only), head
        2 C classes.
        """
        mult = check_convention(convention)
        mixer = self.layers[0].mixer
        C, n, R, k = self.embed_dim, mixer.d_state, mixer.dt_rank, mixer.d_conv
        di = 2 * C
        conv = self.patch_embed.proj
        n0 = self.num_tokens
        total = mult * (n0 * C * conv.in_channels * math.prod(conv.kernel_size) + C * self.num_classes)
        if convention == "full":
            total += n0 * C + 4 * C                          # position embedding, final norm
        for N in token_counts:
            if convention == "paper":
                total += (N * C * 4 * C + N * di * C + (N + k - 1) * di * k + N * di * (R + 2 * n)
                          + N * R * di + 9 * N * di * n + 2 * N * di)
                continue
            per_direction = (2 * N * di * k + N * di        # depthwise causal conv + bias
                             + 4 * N * di                    # SiLU
                             + 2 * N * di * (R + 2 * n)      # x_proj
                             + 2 * N * R * di                # dt_proj
                             + 3 * N * di                    # + bias, softplus (exp, log1p)
                             + N * di                        # dt * u
                             + 2 * N * di * n                # dt * A and exp
                             + 3 * N * di * n                # (dt u) * B, a * h + that
                             + 2 * N * di * n                # y = C . h
                             + 2 * N * di                    # + D u
                             + 5 * N * di)                   # * silu(z)
            total += (2 * N * C * 4 * C + 2 * N * di * C + 2 * per_direction + 2 * N * di   # average
                      + 4 * N * C + N * C)                                                  # norm, residual
        return float(total)

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
        if old is None or old.dim() != 3 or old.shape[-1] != new.shape[-1] or old.shape[1] == new.shape[1]:
            return state, unchanged   # nothing to do, or a mismatch the key check reports
        proj = state.get("patch_embed.proj.weight")
        if proj is not None and tuple(proj.shape[-2:]) != tuple(self.patch_embed.patch_size):
            return state, unchanged   # another patch size: the key check reports it, with the preset hint
        n_old = old.shape[1] - 1
        grid = self._checkpoint_grid(n_old)
        mine = f"{_grid(self.grid_size)} grid (img_size {_fmt_size(self.img_size)}, patch_size " \
               f"{_fmt_size(self.patch_embed.patch_size)}, stride {self.patch_embed.stride})"
        if grid is None:
            msg = (f"checkpoint {source} has a position embedding for {n_old} patches, which is not a "
                   f"square grid nor one of the model's aspect ratio, and the model has {self.num_patches} "
                   f"patches: a {mine}; build the model with the checkpoint's img_size/stride, or "
                   f"resample it yourself with resample_pos_embed(..., old_grid=(h, w))")
        elif (stride := self._stride_for_grid(grid)) is not None:
            (h, _), (p, _) = self.img_size, self.patch_embed.patch_size
            at = tuple((g - 1) * self.patch_embed.stride + q for g, q in zip(grid, self.patch_embed.patch_size))
            msg = (f"checkpoint {source} has a {_grid(grid)} patch grid ({n_old + 1} position-embedding "
                   f"rows), the model a {mine}: the checkpoint's grid is what stride {stride} gives "
                   f"at img_size {_fmt_size(self.img_size)}. Build the model with stride={stride}, since "
                   f"({h}-{p})/({grid[0]}-1) = {stride} (or, if the checkpoint was made at "
                   f"img_size={_fmt_size(at)} with stride {self.patch_embed.stride}, with img_size={_fmt_size(at)})")
        else:
            at = tuple((g - 1) * self.patch_embed.stride + q for g, q in zip(grid, self.patch_embed.patch_size))
            warnings.warn(
                f"checkpoint {source} has a {_grid(grid)} patch grid (img_size {_fmt_size(at)} with patch_size "
                f"{_fmt_size(self.patch_embed.patch_size)}, stride {self.patch_embed.stride}): resampled its "
                f"position embedding to the model's {_grid(self.grid_size)} grid (img_size "
                f"{_fmt_size(self.img_size)}); build the model with img_size={_fmt_size(at)} to use it unchanged",
                stacklevel=3)
            resized = resample_pos_embed(old, tuple(self.grid_size), grid, n_old // 2, self.cls_index)
            return ({**state, "pos_embed": resized},
                    {"resized_pos_embed": True, "pos_embed_grid": (grid, tuple(self.grid_size))})
        if strict:
            raise CheckpointError(msg)
        warnings.warn(f"{msg}; its position embedding was not loaded", stacklevel=3)
        return state, unchanged

    def _checkpoint_grid(self, n: int) -> tuple[int, int] | None:
        """The (rows, columns) of a checkpoint's ``n`` patches: square, or the model's aspect ratio."""
        side = math.isqrt(n)
        if side * side == n:
            return side, side
        gh, gw = self.grid_size
        return next(((h, n // h) for h in range(1, n + 1) if n % h == 0 and h * gw == (n // h) * gh), None)

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

    def checkpoint_hint(self, state: Mapping[str, Tensor]) -> str | None:
        """When the checkpoint's dimensions differ from this model's: what they are and the
        ``create_model(...)`` call that fits them."""
        ckpt, mine = mamba_architecture(state), mamba_architecture(self.state_dict())
        differs = {k: (v, mine[k]) for k, v in ckpt.items() if k in mine and mine[k] != v and k != "num_classes"}
        if not differs:
            return None

        def say(key: str, value: int) -> str:
            return f"{value} blocks" if key == "depth" else f"{key} {value}"
        have = " and ".join(say(k, v) for k, (v, _) in differs.items())
        want = " and ".join(say(k, w) for k, (_, w) in differs.items())
        return f"this checkpoint has {have} (the model: {want}); build the model with {_suggest_model(ckpt)}"

    @property
    def scan_backend(self) -> str:
        return self.layers[0].mixer.scan_backend if len(self.layers) else "auto"

    @scan_backend.setter
    def scan_backend(self, name: str) -> None:
        for block in self.layers:
            block.mixer.scan_backend = name

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally trained without weight decay."""
        skip = {"pos_embed", "cls_token"}
        return skip | {n for n, p in self.named_parameters()
                       if p.ndim <= 1 or n.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b")}

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, num_patches + 1, E), class token at ``cls_index``."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((x[:, :self.cls_index], cls, x[:, self.cls_index:]), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_tokens(self, x: Tensor, track_source: bool = False) -> TokenState:
        """Images -> the token state after the last block (before the final Add -> norm).

        The active reduction (``self.reduction``) runs before the mixer of each block.
        """
        reducer = self.reduction
        track_source = track_source or bool(getattr(reducer, "track_source", False))
        state = TokenState.start(self.embed(x), self.cls_index, track_source)
        if reducer is not None:
            reducer.prepare(self, state.num_tokens)
        for i, block in enumerate(self.layers):
            state.layer = i
            if reducer is not None:
                state = reducer.reduce(state, self)
            state.hidden, state.residual = block(state.hidden, state.residual)
        return state

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> class-token features (B, E) after the final norm."""
        state = self.forward_tokens(x)
        hidden, residual = state.hidden, state.residual
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.norm_f(residual[:, state.cls_index])

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# checkpoint recognition


def mamba_architecture(state: Mapping[str, Tensor]) -> dict[str, int]:
    """What Vim or VideoMamba weights say about the model they came from (only what can be
    told): ``embed_dim``, ``in_chans``, ``patch_size`` (2-D or 3-D patch kernel), ``depth``,
    ``d_state``, ``num_classes``."""
    arch: dict[str, int] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() in (4, 5):
        arch.update(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[-1])
    elif "norm_f.weight" in state:
        arch["embed_dim"] = state["norm_f.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if blocks:
        arch["depth"] = max(blocks) + 1
    a_log = state.get("layers.0.mixer.A_log")
    if a_log is not None and a_log.dim() == 2:
        arch["d_state"] = a_log.shape[1]
    head = state.get("head.weight")
    if head is not None and head.dim() == 2:
        arch["num_classes"] = head.shape[0]
    return arch


def _suggest_model(arch: dict[str, int]) -> str:
    """The ``create_model(...)`` call of the Vim preset nearest these dimensions."""
    presets = {n: {"in_chans": 3, "num_classes": 1000, **model_defaults(n)}
               for n in list_models() if get_preset(n).builder is VisionMamba}
    best = next((n for n, d in presets.items() if d.get("embed_dim") == arch.get("embed_dim")), "vim_tiny")
    defaults = presets.get(best, {})
    overrides: dict[str, int] = {}
    for key, value in arch.items():
        if defaults.get(key) != value:
            overrides[key] = value
            if key == "patch_size":  # the stride is not in the weights: assume no overlap
                overrides["stride"] = value
    return f"create_model({', '.join([repr(best), *(f'{k}={v}' for k, v in overrides.items())])})"


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
