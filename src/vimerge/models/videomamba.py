"""VideoMamba (OpenGVLab/VideoMamba) in pure PyTorch: image and video models that load the
official checkpoints strictly.

Architecture (Li et al. 2024, "VideoMamba: State Space Model for Efficient Video Understanding";
the official ``videomamba/image_sm`` and ``video_sm`` models):

* a patch embedding: a Conv2d ``p x p`` for images (B, C, H, W), a Conv3d ``(tubelet, p, p)``
  for clips (B, C, T, H, W) (tubelet 1 in every released model);
* a class token at position 0, then the patch tokens frame after frame, each frame's row-major:
  ``[cls, frame 0 patches, frame 1 patches, ...]``, ``1 + (T / tubelet) * grid`` tokens (1569 for
  8 frames at 224 px);
* ``pos_embed`` (1, 1 + grid, E): row 0 added to the class token, rows 1.. to the patches of
  every frame; for clips also ``temporal_pos_embedding`` (1, T / tubelet, E), added to the patch
  tokens of each frame only (not to the class token);
* ``depth`` blocks ``Add -> RMSNorm (eps 1e-5) -> bidirectional Mamba mixer``, the residual in
  fp32, with Vim's "v2" mixer parameters (:class:`~vimerge.models.mamba.BiMambaMixer`) but the two
  directions SUMMED, ``out_proj(y_fwd + flip(y_bwd))`` (Vim's checkpoints divide by 2);
* a final ``RMSNorm(residual + last mixer output)`` and a linear head on token 0.

Parameter names are the official ones (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``temporal_pos_embedding``, ``layers.{i}.mixer.*``, ``layers.{i}.norm.weight``, ``norm_f``,
``head``). :meth:`VideoMamba.checkpoint_filter` adapts checkpoints made for another geometry:
an image checkpoint in a video model (the 2-D patch kernel inflated into the middle time slice
of the 3-D one, the official ``inflate_weight(center=True)``; the temporal embedding starting at
zero), another frame count (the temporal embedding interpolated linearly), another resolution
(the spatial embedding resampled with the class row kept at 0); the self-distillation head of
the M and B ImageNet checkpoints (``distill_head.*``) is left out with a note.

Token reduction (:class:`~vimerge.tokens.TokenModel`): ``reduction_site = "before_mixer"``,
``cls_index = 0``; the state carries every token's ``(frame, cell)`` (``TokenState.coords``)
for reducers that merge only within a frame or only across time.

Shapes: tokens (B, N, E) with N = 1 + token_frames * grid_h * grid_w; mixer internals
(B, 2E, N).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..tokens import check_convention
from .checkpoint import CheckpointError, listing
from .layers import PatchEmbed, checkpoint_grid, fmt_size, pair, resample_pos_embed
from .mamba import MambaTrunk
from .registry import register_model


class PatchEmbed3D(nn.Module):
    """Clips (B, C, T, H, W) -> patch tokens (B, T / tubelet, grid_h * grid_w, E) by one Conv3d
    with kernel and stride ``(tubelet, p, p)`` (the official video ``PatchEmbed``)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, num_frames: int = 8,
                 tubelet_size: int = 1, in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.img_size = pair(img_size)
        self.patch_size = pair(patch_size)
        if any(s < p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        if tubelet_size < 1 or num_frames < tubelet_size or num_frames % tubelet_size:
            raise ValueError(f"num_frames={num_frames} must be a positive multiple of tubelet_size={tubelet_size}")
        border = [s % p for s, p in zip(self.img_size, self.patch_size)]
        if any(border):
            warnings.warn(f"img_size {fmt_size(self.img_size)} is not a multiple of patch_size "
                          f"{fmt_size(self.patch_size)}: the last {border[0]} pixel rows / {border[1]} columns "
                          f"are never seen", stacklevel=3)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, *self.patch_size),
                              stride=(tubelet_size, *self.patch_size))

    def forward(self, x: Tensor) -> Tensor:
        want = (self.proj.in_channels, self.num_frames, *self.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(self._input_message(x, want))
        x = self.proj(x)                                        # (B, E, T', h, w)
        return x.flatten(3).permute(0, 2, 3, 1)                 # (B, T', h w, E)

    def _input_message(self, x: Tensor, want: tuple[int, ...]) -> str:
        c, t, h, w = want
        msg = f"expected clips of shape (batch, {c}, {t}, {h}, {w}) (channels, frames, height, width), got {tuple(x.shape)}"
        if x.dim() == 4:
            if tuple(x.shape) == want:
                return f"{msg}: a single clip; add the batch dimension (x.unsqueeze(0))"
            return (f"{msg}: images into a video model; build the model without num_frames for images, "
                    f"or stack {t} frames along dimension 2")
        if x.dim() == 5 and tuple(x.shape[1:3]) == (t, c):
            return f"{msg}: the frames come before the channels; pass x.permute(0, 2, 1, 3, 4)"
        if x.dim() == 5 and x.shape[2] != t:
            return (f"{msg}: {x.shape[2]} frames into a model for {t}; sample {t} frames, or build the model "
                    f"with num_frames={x.shape[2]} (the temporal embedding is interpolated when weights load)")
        if x.dim() == 5 and tuple(x.shape[-2:]) != (h, w):
            return (f"{msg}: resize the frames to {h}x{w}, or build the model with img_size="
                    f"{tuple(x.shape[-2:])} (position embeddings are resampled when weights load)")
        return msg


class VideoMamba(MambaTrunk):
    """VideoMamba with the class token at position 0. See the module docstring.

    Args:
        img_size, patch_size, in_chans: the patch embedding (stride = patch size).
        num_frames: None for an image model (input (B, C, H, W)); T for a video model (input
            (B, C, T, H, W)).
        tubelet_size: frames per patch of a video model (1 in the released models).
        depth, embed_dim, d_state: the blocks (d_inner = 2 * embed_dim).
        num_classes: head outputs (0 gives features from :meth:`forward`).
        drop_rate: dropout after the embeddings; drop_path_rate: stochastic depth (the
            official ramp: block i gets the (i-1)-th of ``linspace(0, rate, depth)``);
            fc_drop_rate: dropout before the head (the official video models' ``head_drop``).
        scan_backend: selective-scan backend of every mixer (see :mod:`vimerge.ops`).
    """

    cls_index = 0
    no_decay_names = ("pos_embed", "cls_token", "temporal_pos_embedding")
    hint_preset = "videomamba_tiny"

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, depth: int = 24,
                 embed_dim: int = 192, d_state: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 num_frames: int | None = None, tubelet_size: int = 1, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, fc_drop_rate: float = 0.0, norm_eps: float = 1e-5,
                 scan_backend: str = "auto"):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_frames = num_frames
        if num_frames is None:
            self.patch_embed: nn.Module = PatchEmbed(img_size, patch_size, patch_size, in_chans, embed_dim)
            self.token_frames = 1
        else:
            self.patch_embed = PatchEmbed3D(img_size, patch_size, num_frames, tubelet_size, in_chans, embed_dim)
            self.token_frames = num_frames // tubelet_size
        self.num_patches = self.patch_embed.num_patches          # per frame
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        if num_frames is not None:
            self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, self.token_frames, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.build_trunk(embed_dim, depth, d_state, drop_path_rate, norm_eps, scan_backend, average=False)
        self.head_drop = nn.Dropout(fc_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # (frame, cell) of every token, the class token (-1, -1): TokenState.coords
        frames = torch.arange(self.token_frames).repeat_interleave(self.num_patches)
        cells = torch.arange(self.num_patches).repeat(self.token_frames)
        coords = torch.cat([torch.full((1, 2), -1), torch.stack([frames, cells], dim=1)])
        self.register_buffer("token_coords", coords, persistent=False)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """The official initialisation where it matters for training from scratch: truncated
        normal 0.02 for the position embedding and the head, zero biases, the output
        projections rescaled by 1/sqrt(depth); class token and temporal embedding zero."""
        conv = self.patch_embed.proj
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / conv.weight[0].numel()))
        nn.init.zeros_(conv.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.rescale_out_proj(depth)

    # ------------------------------------------------------------------ token layout (TokenModel)
    @property
    def num_tokens(self) -> int:
        """Tokens after the embedding: the class token + every frame's patches."""
        return 1 + self.token_frames * self.num_patches

    @property
    def img_size(self) -> tuple[int, int]:
        """Input (height, width) of an image or of every frame, in pixels."""
        return self.patch_embed.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of one frame; the patch tokens are ``token_frames`` such
        grids, frame after frame, each in row-major order."""
        return self.patch_embed.grid_size

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) or clips (B, C, T, H, W) -> tokens (B, num_tokens, E), class token first."""
        patches = self.patch_embed(x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        if self.num_frames is None:
            patches = patches + self.pos_embed[:, 1:]
        else:                                                   # (B, T', P, E): space, then time
            patches = patches + self.pos_embed[:, None, 1:]
            patches = (patches + self.temporal_pos_embedding[:, :, None]).flatten(1, 2)
        return self.pos_drop(torch.cat((cls, patches), dim=1))

    def forward_features(self, x: Tensor) -> Tensor:
        """Inputs -> class-token features (B, E) after the final norm."""
        state = self.forward_tokens(x)
        return self.norm_f(self.final_residual(state)[:, state.cls_index])

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) or clips (B, C, T, H, W) -> logits (B, num_classes)."""
        return self.head(self.head_drop(self.forward_features(x)))

    # ------------------------------------------------------------------ cost
    def outer_flops(self, convention: str) -> int:
        """FLOPs outside the blocks (the blocks: :meth:`MambaTrunk.flops
        <vimerge.models.mamba.MambaTrunk.flops>`, with the two directions summed).

        ``"paper"``: R-MeeTo's ``video_task/utils/calc_flops.py`` convention, which with the
        blocks reproduces its Table 13 (8 frames, 224 px, 400 classes: tiny / small / middle
        11.54 / 40.43 / 115.33 GFLOPs; with R-MeeTo r = 88: 9.49 / 30.99 / 71.71): the patch
        embedding ``P C k`` (P patch tokens of all frames, k = in_chans x kernel volume; the
        class token not counted) and the head ``C classes``. ``"full"``: twice those, plus the
        patch-embedding bias P C, the spatial position embedding on every token N0 C, the
        temporal one on the patches P C (video), final norm 4C.
        """
        mult = check_convention(convention)
        C, conv = self.embed_dim, self.patch_embed.proj
        patches = self.token_frames * self.num_patches
        n0 = self.num_tokens
        total = mult * (patches * C * conv.in_channels * math.prod(conv.kernel_size) + C * self.num_classes)
        if convention == "full":
            total += patches * C + n0 * C + 4 * C + (patches * C if self.num_frames is not None else 0)
        return total

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_filter(self, state: dict[str, Tensor], source: str, strict: bool
                          ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Recognise a VideoMamba checkpoint and fit it to this model (image or video).

        Every adaptation is announced with a warning and reported:

        * ``distill_head.*`` (the self-distillation head of the M/B ImageNet checkpoints, unused
          at inference) is left out; ``"ignored_distill_head": True``;
        * a 2-D patch kernel (image checkpoint) in a video model is inflated into the 3-D one,
          the 2-D kernel in the middle time slice and zeros elsewhere (the official
          ``inflate_weight(center=True)``); ``"inflated_patch_embed": True``. A 3-D kernel of
          one time slice in an image model is squeezed to 2-D;
        * ``temporal_pos_embedding``: missing (image checkpoint) in a video model -> zeros, the
          official initialisation (``"temporal_pos_embedding": "zero"``); for another frame count
          -> interpolated linearly along time (``align_corners=False``, as the official
          fine-tuning script; ``"interpolated"``); present in a checkpoint loaded into an image
          model -> left out (``"dropped"``);
        * ``pos_embed`` for another patch grid -> the patch rows resampled bicubically with the
          class row kept at 0 (``"resized_pos_embed": True``, ``"pos_embed_grid"``).

        Vim checkpoints have the same key names but a middle class token and averaged
        directions: they load without error and compute something else; use ``vim_*`` for them.

        Raises:
            CheckpointError: no ``layers.N.mixer`` keys (not a Mamba checkpoint), or a position
                embedding whose grid is neither square nor of the model's aspect ratio.
        """
        if not any(re.match(r"layers\.\d+\.mixer\.", k) for k in state):
            prefixes = sorted({k.split(".", 1)[0] for k in state})
            msg = (f"checkpoint {source} is not a VideoMamba checkpoint: it has no 'layers.N.mixer...' keys "
                   f"(its keys start with: {listing(prefixes)})")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(msg, stacklevel=3)
        info: dict[str, Any] = {"resized_pos_embed": False}
        state = dict(state)
        distill = [k for k in state if k.startswith("distill_head.")]
        if distill:
            warnings.warn(f"checkpoint {source} carries a self-distillation head ({len(distill)} tensors "
                          f"distill_head.*, used only while training): left out", stacklevel=3)
            for k in distill:
                del state[k]
            info["ignored_distill_head"] = True
        self._fit_patch_kernel(state, source, info)
        self._fit_temporal(state, source, info)
        self._fit_spatial(state, source, strict, info)
        return state, info

    def _fit_patch_kernel(self, state: dict[str, Tensor], source: str, info: dict[str, Any]) -> None:
        old, new = state.get("patch_embed.proj.weight"), self.patch_embed.proj.weight
        if old is None or old.dim() == new.dim() or tuple(old.shape[-2:]) != tuple(new.shape[-2:]) \
                or old.shape[:2] != new.shape[:2]:
            return                                   # as it is, or a mismatch the key check reports
        if old.dim() == 4 and new.dim() == 5:
            t = new.shape[2]
            inflated = old.new_zeros(new.shape)
            inflated[:, :, t // 2] = old
            state["patch_embed.proj.weight"] = inflated
            info["inflated_patch_embed"] = True
            warnings.warn(f"checkpoint {source} has an image (2-D) patch embedding: inflated into the video "
                          f"model's {t}-frame kernel, in time slice {t // 2} (the official center "
                          f"initialisation)", stacklevel=4)
        elif old.dim() == 5 and new.dim() == 4 and old.shape[2] == 1:
            state["patch_embed.proj.weight"] = old[:, :, 0]
            info["squeezed_patch_embed"] = True
            warnings.warn(f"checkpoint {source} is a video model's (3-D patch embedding of one frame): "
                          f"loaded as an image model", stacklevel=4)

    def _fit_temporal(self, state: dict[str, Tensor], source: str, info: dict[str, Any]) -> None:
        old = state.get("temporal_pos_embedding")
        if self.num_frames is None:
            if old is not None:
                del state["temporal_pos_embedding"]
                info["temporal_pos_embedding"] = "dropped"
                warnings.warn(f"checkpoint {source} is a video model's: its temporal position embedding "
                              f"({old.shape[1]} frames) is not used by this image model", stacklevel=4)
            return
        new = self.temporal_pos_embedding
        if old is None:
            if any(k.startswith("layers.") for k in state):
                state["temporal_pos_embedding"] = torch.zeros_like(new)
                info["temporal_pos_embedding"] = "zero"
                warnings.warn(f"checkpoint {source} has no temporal position embedding (an image "
                              f"checkpoint): it starts at zero, as in the official video fine-tuning",
                              stacklevel=4)
            return
        if old.dim() != 3 or old.shape[-1] != new.shape[-1] or old.shape[1] == new.shape[1]:
            return
        state["temporal_pos_embedding"] = resample_temporal(old, new.shape[1])
        info["temporal_pos_embedding"] = "interpolated"
        warnings.warn(f"checkpoint {source} has a temporal position embedding for {old.shape[1]} frames: "
                      f"interpolated linearly to the model's {new.shape[1]}", stacklevel=4)

    def _fit_spatial(self, state: dict[str, Tensor], source: str, strict: bool, info: dict[str, Any]) -> None:
        old, new = state.get("pos_embed"), self.pos_embed
        if old is None or old.dim() != 3 or old.shape[-1] != new.shape[-1]:
            return
        n_old = old.shape[1] - 1
        gh, gw = self.grid_size
        grid = checkpoint_grid(n_old, self.grid_size)
        if grid == (gh, gw):
            return                      # compared as (h, w) grids: 14x14 into 7x28 is resampled
        if grid is None:
            msg = (f"checkpoint {source} has a position embedding for {n_old} patches, not a square grid nor "
                   f"one of the model's aspect ratio ({gh}x{gw}); build the model with the checkpoint's img_size")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(f"{msg}; its position embedding was not loaded", stacklevel=4)
            del state["pos_embed"]
            return
        p = self.patch_embed.patch_size
        warnings.warn(f"checkpoint {source} has a {grid[0]}x{grid[1]} patch grid (img_size {grid[0] * p[0]}x"
                      f"{grid[1] * p[1]}): resampled its position embedding to the model's {gh}x{gw} grid "
                      f"(img_size {self.img_size[0]}x{self.img_size[1]})", stacklevel=4)
        state["pos_embed"] = resample_pos_embed(old, (gh, gw), grid, cls_index_old=0, cls_index_new=0)
        info.update(resized_pos_embed=True, pos_embed_grid=(grid, (gh, gw)))


def resample_temporal(embedding: Tensor, frames: int) -> Tensor:
    """A temporal position embedding (1, T, E) interpolated linearly to (1, frames, E)
    (``align_corners=False``, in fp32, returned in the input's dtype)."""
    out = F.interpolate(embedding.float().transpose(1, 2), size=frames, mode="linear", align_corners=False)
    return out.transpose(1, 2).to(embedding.dtype)


# ---------------------------------------------------------------------------------------------
# presets: the official weights (OpenGVLab/VideoMamba MODEL_ZOO.md), on the Hugging Face hub

HUB = "hf://OpenGVLab/VideoMamba"
SIZES = {"tiny": ("t", 192, 24), "small": ("s", 384, 24), "middle": ("m", 576, 32), "base": ("b", 768, 24)}
"""Preset size -> (checkpoint letter, embed_dim, depth)."""
VIDEO_SIZES = ("tiny", "small", "middle")   # the released video models

for _size, (_letter, _dim, _depth) in SIZES.items():
    # ImageNet-1K, 224 px: 76.9 / 81.2 / 82.8 / 82.7 top-1 (M and B with self-distillation)
    register_model(f"videomamba_{_size}", VideoMamba, pretrained=f"{HUB}/videomamba_{_letter}16_in1k_res224.pth",
                   aliases=(f"videomamba_{_letter}16_in1k", f"videomamba_{_letter}16_in1k_res224"),
                   patch_size=16, embed_dim=_dim, depth=_depth, d_state=16)
for _size in VIDEO_SIZES:
    _letter, _dim, _depth = SIZES[_size]
    # Kinetics-400, 8 frames, 224 px: 76.9 / 79.3 / 80.6 top-1 (8x3x4 views). The SSv2 weights
    # (videomamba_*16_ssv2_f8_res224.pth) are the same model with num_classes=174.
    register_model(f"videomamba_{_size}_k400", VideoMamba,
                   pretrained=f"{HUB}/videomamba_{_letter}16_k400_f8_res224.pth",
                   aliases=(f"videomamba_{_letter}16_k400_f8", f"videomamba_{_letter}16_k400_f8_res224"),
                   patch_size=16, embed_dim=_dim, depth=_depth, d_state=16, num_frames=8, tubelet_size=1,
                   num_classes=400)

# ---------------------------------------------------------------------------------------------
# the video study's model (``vimerge demo --video``, vimerge.demo.video): clips of a Fashion-MNIST
# garment moving over a 40 x 40 black canvas (vimerge.demo.clips), 4 frames sampled, one grey
# channel, 10 classes. Patch 8 gives 5 x 5 patches a frame: 1 + 4 x 25 = 101 tokens, the image
# study's vim_fmnist width and depth (96, 8). 8 frames (201 tokens) evaluated 2x slower and
# trained at half the clips per second on the shared 2-core development CPU (measured
# 2026-11-30), past the study's 10-minute and the training's 25-minute budget. The shipped
# weights were trained by `vimerge train` (command, seed, accuracy: the JSON sidecar).
from pathlib import Path as _Path  # noqa: E402 - only for this preset's shipped weights

FMNIST_VIDEO_WEIGHTS = _Path(__file__).resolve().parent.parent / "assets" / "videomamba_fmnist_video.pth"
# Its re-training recipe (the video study's): one pass, lr 1e-3 cosine to 1e-5, batch 64, no augmentation.
register_model("videomamba_fmnist_video", VideoMamba, pretrained=FMNIST_VIDEO_WEIGHTS, img_size=40, patch_size=8,
               in_chans=1, depth=8, embed_dim=96, d_state=16, num_classes=10, num_frames=4, tubelet_size=1,
               retrain_recipe=dict(epochs=1, batch_size=64, effective_batch=64, lr=1e-3, min_lr=1e-5,
                                   augment="none", label_smoothing=0.1))
