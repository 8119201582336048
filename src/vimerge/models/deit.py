"""DeiT (a plain ViT with a class token at position 0), parameter-compatible with timm and
facebookresearch/deit: the Transformer R-MeeTo compares Vim with (Fig. 1a, Table 4).

Architecture (Touvron et al. 2021, "Training data-efficient image transformers"; Dosovitskiy et
al. 2021, ViT): a patch-embedding convolution, a class token prepended at position 0, a learned
position embedding (1, num_patches + 1, E) added to all tokens, ``depth`` pre-norm blocks
``x = x + attn(LN(x)); x = x + mlp(LN(x))`` (LayerNorm eps 1e-6, multi-head self-attention with
a qkv bias, MLP ratio 4 with GELU), a final LayerNorm and a linear head on the class token.
Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``,
``head``), so the official checkpoints (``{"model": state_dict}``, e.g.
``deit_small_patch16_224-cd65a155.pth``) load strictly.

Token reduction (the :class:`~vimerge.tokens.TokenModel` protocol, ``reduction_site =
"after_attention"``): in every block the reducer runs after the attention and before the MLP,
as in ToMe and R-MeeTo's ``image_task/R_MeeTo/RMeeTo_deit.py``; one stream (no separate
residual), so a merge averages the tokens weighted by their sizes, and the attention of the
following blocks is proportional (``log(size)`` added to the logits of every key, ToMe eq. 1):
a token that stands for k merged tokens gets the attention k identical tokens would get.
On request a block records its head-averaged queries, keys and values
(:class:`~vimerge.tokens.AttentionRecord`) for R-MeeTo's Q/K/V metrics.

Shapes: images (B, C, H, W); tokens (B, N, E), N = num_patches + 1, class token at 0.
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
from torch import Tensor

from ..tokens import AttentionRecord, Reducer, TokenState, check_convention
from .checkpoint import CheckpointError, listing
from .layers import DropPath, PatchEmbed, checkpoint_grid, resample_pos_embed
from .registry import get_preset, list_models, model_defaults, register_model


class Attention(nn.Module):
    """Multi-head self-attention with optional proportional attention.

    ``forward(x (B, N, E), log_size (B, N) or None)`` -> (B, N, E). ``log_size`` is added to the
    logits of every key (ToMe's proportional attention); None adds nothing.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.record = False                            # set by VisionTransformer.record_blocks
        self.last_record: AttentionRecord | None = None

    def forward(self, x: Tensor, log_size: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * self.scale) @ k.transpose(-2, -1)                 # (B, H, N, N)
        if log_size is not None:
            logits = logits + log_size[:, None, None, :].to(logits.dtype)
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        if self.record:
            self.last_record = AttentionRecord(q.mean(1), k.mean(1), v.mean(1))
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on every token."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block, split where a reducer runs: :meth:`attend` then :meth:`feed`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def attend(self, x: Tensor, log_size: Tensor | None = None) -> Tensor:
        return x + self.drop_path(self.attn(self.norm1(x), log_size))

    def feed(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, log_size: Tensor | None = None) -> Tensor:
        return self.feed(self.attend(x, log_size))


class VisionTransformer(nn.Module):
    """DeiT / ViT with a class token at position 0. See the module docstring.

    Args:
        img_size, patch_size, in_chans: the patch embedding (stride = patch size).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the blocks.
        num_classes: head outputs (0 gives features from :meth:`forward`).
        drop_rate: dropout after the position embedding; drop_path_rate: stochastic depth,
            linear over the blocks (timm's ``dpr``).
        norm_eps: LayerNorm epsilon (1e-6 in DeiT).
        scan_backend: ignored (a Transformer has no selective scan); accepted like Vim's so
            that the commands and re-training build every backbone the same way.
    """

    reduction_site = "after_attention"
    cls_index = 0

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, scan_backend: str = "auto"):
        super().__init__()
        self.scan_backend = scan_backend   # no selective scan here: accepted so every command builds any backbone
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_eps)
                                    for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reduction: Reducer | None = None   # installed by vimerge.apply, see vimerge.reduce
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT init: truncated normal 0.02 for embeddings and linears, zero biases."""
        for p in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ token layout (TokenModel)
    @property
    def num_tokens(self) -> int:
        """Tokens after the embedding: patches + the class token."""
        return self.num_patches + 1

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def in_chans(self) -> int:
        return self.patch_embed.proj.in_channels

    @property
    def img_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); the patch tokens (after the class token) in row-major order."""
        return self.patch_embed.grid_size

    def record_blocks(self, layers: Collection[int]) -> None:
        """Record the head-averaged q, k, v of exactly these blocks in the next forwards."""
        wanted = set(layers)
        for i, block in enumerate(self.blocks):
            block.attn.record = i in wanted
            block.attn.last_record = None

    def block_record(self, layer: int) -> AttentionRecord | None:
        """Block ``layer``'s :class:`~vimerge.tokens.AttentionRecord` from the last forward, or None."""
        return self.blocks[layer].attn.last_record

    def no_weight_decay(self) -> set[str]:
        """Parameter names trained without weight decay (timm/DeiT: embeddings, norms, biases)."""
        return {"pos_embed", "cls_token"} | {n for n, p in self.named_parameters() if p.ndim <= 1}

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, num_patches + 1, E), class token first."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_tokens(self, x: Tensor, track_source: bool = False) -> TokenState:
        """Images -> the token state after the last block (before the final norm).

        With a reduction installed, block ``i`` calls ``reduction.reduce`` (``state.layer = i``)
        between its attention and its MLP, and every attention adds ``log(size)`` to its logits.
        """
        reducer = self.reduction
        track_source = track_source or bool(getattr(reducer, "track_source", False))
        state = TokenState.start(self.embed(x), self.cls_index, track_source)
        if reducer is not None:
            reducer.prepare(self, state.num_tokens)
        for i, block in enumerate(self.blocks):
            state.layer = i
            log_size = None if reducer is None else state.size[..., 0].log()
            state.hidden = block.attend(state.hidden, log_size)
            if reducer is not None:
                state = reducer.reduce(state, self)
            state.hidden = block.feed(state.hidden)
        return state

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> class-token features (B, E) after the final norm."""
        state = self.forward_tokens(x)
        return self.norm(state.hidden[:, state.cls_index])

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))

    # ------------------------------------------------------------------ cost
    def flops(self, token_counts: Sequence[int], convention: str = "paper") -> float:
        """FLOPs per image when block ``i``'s MLP sees ``token_counts[i]`` tokens and its attention
        ``token_counts[i - 1]`` (the embedding's ``num_tokens`` for block 0); the reduction
        method's own cost is not included (see ``vimerge.count_flops``).

        ``"paper"`` (a multiply-add is one FLOP, the convention of DeiT's 1.3 / 4.6 / 17.6 GFLOPs
        and R-MeeTo's tables), per block with width C, attention tokens Na, MLP tokens Nm::

            qkv Na C 3C, q k^T and attn v 2 Na^2 C, proj Na C C, MLP 2 Nm C (mlp_ratio C)

        plus the patch embedding ``num_patches C p^2 in_chans`` and the head ``C classes``
        (norms, softmax and activations not counted).

        ``"full"``: every arithmetic operation (a multiply-add is 2; an exp, erf or division
        1). Per block, besides twice the products above: qkv/proj/fc biases 3 Na C + Na C +
        Nm M + Nm C (M = mlp_ratio C), the 1/sqrt(d) scale Na C, softmax 3 H Na^2 (exp, sum,
        divide), proportional attention H Na^2 when reduced, two LayerNorms 7 (Na + Nm) C,
        GELU 5 Nm M, two residual adds (Na + Nm) C. Plus patch embedding 2 num_patches C p^2
        in_chans + bias, position embedding N0 C, final norm 7 C, head 2 C classes.
        """
        mult = check_convention(convention)
        C = self.embed_dim
        conv = self.patch_embed.proj
        H = self.blocks[0].attn.num_heads if len(self.blocks) else 1
        M = self.blocks[0].mlp.fc1.out_features if len(self.blocks) else 4 * C
        n0 = self.num_tokens
        total = mult * (self.num_patches * C * conv.in_channels * math.prod(conv.kernel_size) + C * self.num_classes)
        if convention == "full":
            total += self.num_patches * C + n0 * C + 7 * C          # patch bias, position embedding, final norm
        prev = n0
        for nm in token_counts:
            na = prev
            total += mult * (na * C * 3 * C + 2 * na * na * C + na * C * C + nm * C * M + nm * M * C)
            if convention == "full":
                total += (3 * na * C + na * C + nm * M + nm * C          # biases
                          + na * C + 3 * H * na * na                    # scale, softmax
                          + (H * na * na if self.reduction is not None else 0)
                          + 7 * (na + nm) * C + 5 * nm * M + (na + nm) * C)
            prev = nm
        return float(total)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_filter(self, state: dict[str, Tensor], source: str, strict: bool
                          ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Recognise a DeiT/ViT checkpoint and fit its position embedding to this model's grid.

        A position embedding for another (square) patch grid is resampled bicubically with the
        class row kept at 0 (:func:`~vimerge.models.layers.resample_pos_embed`), with a
        warning. Distilled DeiTs (``dist_token``, ``head_dist``) are refused with the reason.

        Raises:
            CheckpointError: no ``blocks.N.attn`` keys (not a ViT), a distilled DeiT, or a grid
                that is neither square nor of the model's aspect ratio.
        """
        if not any(re.match(r"blocks\.\d+\.attn\.", k) for k in state):
            prefixes = sorted({k.split(".", 1)[0] for k in state})
            msg = (f"checkpoint {source} is not a DeiT/ViT checkpoint: it has no 'blocks.N.attn...' keys "
                   f"(its keys start with: {listing(prefixes)})")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(msg, stacklevel=3)
        if "dist_token" in state or "head_dist.weight" in state:
            msg = (f"checkpoint {source} is a distilled DeiT (it has a distillation token and head): "
                   f"vimerge's DeiT has the class token only; use the non-distilled weights "
                   f"(deit_*_patch16_224-*.pth)")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(msg + "; the distillation token and head were left out", stacklevel=3)
            state = {k: v for k, v in state.items() if k != "dist_token" and not k.startswith("head_dist.")}
        unchanged: dict[str, Any] = {"resized_pos_embed": False}
        old, new = state.get("pos_embed"), self.pos_embed
        if old is None or old.dim() != 3 or old.shape[-1] != new.shape[-1]:
            return state, unchanged
        proj = state.get("patch_embed.proj.weight")
        if proj is not None and tuple(proj.shape[-2:]) != tuple(self.patch_embed.patch_size):
            return state, unchanged   # another patch size: the key check reports it with the hint
        n_old = old.shape[1] - 1
        gh, gw = self.grid_size
        grid = checkpoint_grid(n_old, self.grid_size)
        if grid == (gh, gw):
            return state, unchanged   # compared as (h, w) grids: 14x14 into 7x28 is resampled
        if grid is None:
            msg = (f"checkpoint {source} has a position embedding for {n_old} patches, not a square grid nor "
                   f"one of the model's aspect ratio ({gh}x{gw}); build the model with the checkpoint's img_size")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(f"{msg}; its position embedding was not loaded", stacklevel=3)
            return state, unchanged
        p = self.patch_embed.patch_size
        warnings.warn(f"checkpoint {source} has a {grid[0]}x{grid[1]} patch grid (img_size {grid[0] * p[0]}x"
                      f"{grid[1] * p[1]}): resampled its position embedding to the model's {gh}x{gw} grid "
                      f"(img_size {self.img_size[0]}x{self.img_size[1]})", stacklevel=3)
        resized = resample_pos_embed(old, (gh, gw), grid, cls_index_old=0, cls_index_new=0)
        return {**state, "pos_embed": resized}, {"resized_pos_embed": True, "pos_embed_grid": (grid, (gh, gw))}

    def checkpoint_hint(self, state: Mapping[str, Tensor]) -> str | None:
        """When the checkpoint's dimensions differ from this model's: what they are and the
        ``create_model(...)`` call that fits them."""
        ckpt, mine = _architecture(state), _architecture(self.state_dict())
        differs = {k: (v, mine[k]) for k, v in ckpt.items() if k in mine and mine[k] != v and k != "num_classes"}
        if not differs:
            return None
        have = " and ".join(f"{k} {v}" for k, (v, _) in differs.items())
        want = " and ".join(f"{k} {w}" for k, (_, w) in differs.items())
        return f"this checkpoint has {have} (the model: {want}); build the model with {_suggest_model(ckpt)}"


def _architecture(state: Mapping[str, Tensor]) -> dict[str, int]:
    """What DeiT weights say about the model they came from."""
    arch: dict[str, int] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4:
        arch.update(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        arch["depth"] = max(blocks) + 1
    head = state.get("head.weight")
    if head is not None and head.dim() == 2:
        arch["num_classes"] = head.shape[0]
    return arch


def _suggest_model(arch: dict[str, int]) -> str:
    """The ``create_model(...)`` call of the DeiT preset nearest these dimensions."""
    presets = {n: {"in_chans": 3, "num_classes": 1000, **model_defaults(n)}
               for n in list_models() if get_preset(n).builder is VisionTransformer}
    best = next((n for n, d in presets.items() if d.get("embed_dim") == arch.get("embed_dim")), "deit_small")
    defaults = presets.get(best, {})
    overrides = {k: v for k, v in arch.items() if defaults.get(k) != v}
    return f"create_model({', '.join([repr(best), *(f'{k}={v}' for k, v in overrides.items())])})"


# ---------------------------------------------------------------------------------------------
# presets: the official DeiT weights (facebookresearch/deit README: 72.2 / 79.9 / 81.8 top-1)

DEIT_WEIGHTS = {
    "deit_tiny": "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
    "deit_small": "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
    "deit_base": "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
}

for _size, _dim, _heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)):
    register_model(f"deit_{_size}", VisionTransformer, pretrained=DEIT_WEIGHTS[f"deit_{_size}"],
                   aliases=(f"deit_{_size}_patch16_224",), patch_size=16, embed_dim=_dim, depth=12,
                   num_heads=_heads, mlp_ratio=4.0, qkv_bias=True)

# Fashion-MNIST: the Transformer of the demo's Transformer-vs-Mamba rows, the same geometry as
# vim_fmnist (28x28, one channel, 4x4 patches: 49 patches + the class token = 50 tokens, 8
# blocks of width 96) so that both reduce the same tokens; 3 heads of 32 channels.
FMNIST_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "deit_fmnist.pth"
register_model("deit_fmnist", VisionTransformer, pretrained=FMNIST_WEIGHTS, img_size=28, patch_size=4,
               in_chans=1, depth=8, embed_dim=96, num_heads=3, num_classes=10,
               retrain_recipe=dict(epochs=1, batch_size=64, effective_batch=64, lr=1e-3, min_lr=1e-5,
                                   augment="none", label_smoothing=0.1))
