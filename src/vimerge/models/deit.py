"""DeiT and DeiT III (plain ViTs with a class token at position 0), parameter-compatible with
timm and facebookresearch/deit: the Transformer R-MeeTo compares Vim with (Fig. 1a, Table 4).

Architecture (Touvron et al. 2021, "Training data-efficient image transformers"; Dosovitskiy et
al. 2021, ViT): a patch-embedding convolution, a class token prepended at position 0, a learned
position embedding (1, num_patches + 1, E) added to all tokens, ``depth`` pre-norm blocks
``x = x + attn(LN(x)); x = x + mlp(LN(x))`` (LayerNorm eps 1e-6, multi-head self-attention with
a qkv bias, MLP ratio 4 with GELU), a final LayerNorm and a linear head on the class token.
Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``,
``head``), so the official checkpoints (``{"model": state_dict}``, e.g.
``deit_small_patch16_224-cd65a155.pth``) load strictly.

DeiT III (Touvron, Cord, Jegou 2022, "DeiT III: Revenge of the ViT"; facebookresearch/deit
``models_v2.py``: ``vit_models`` with ``Layer_scale_init_Block``; timm ``deit3_*``): the same
blocks with LayerScale (Touvron et al. 2021, CaiT) on both branches,
``x = x + gamma_1 * attn(LN(x)); x = x + gamma_2 * mlp(LN(x))`` (a learned per-channel vector,
initialised to ``init_values``: 1e-4 in ``models_v2.py``, 1e-6 in timm), and a position
embedding (1, num_patches, E) on the patches only, added *before* the class token is
prepended (``no_embed_class``, timm's name). Parameters: timm's ``blocks.{i}.ls1.gamma`` /
``ls2.gamma``; the facebookresearch files' ``blocks.{i}.gamma_1`` / ``gamma_2`` are renamed
when loaded, so both layouts (``deit_3_small_224_1k.pth``, timm's ``deit3_small_patch16_224``)
load strictly into the same model.

Other ViT families are recognised in checkpoints and refused with what they are and what to use
(:meth:`VisionTransformer.checkpoint_filter`).

Token reduction (the :class:`~vimerge.tokens.TokenModel` protocol, ``reduction_site =
"after_attention"``): in every block the reducer runs after the attention and before the MLP,
as in ToMe and R-MeeTo's ``image_task/R_MeeTo/RMeeTo_deit.py``; one stream (no separate
residual), so a merge averages the tokens weighted by their sizes, and the attention of the
following blocks is proportional (``log(size)`` added to the logits of every key, ToMe eq. 1):
a token that stands for k merged tokens gets the attention k identical tokens would get.
On request a block records its head-averaged queries, keys and values
(:class:`~vimerge.tokens.AttentionRecord`) for R-MeeTo's Q/K/V metrics.

Shapes: images (B, C, H, W); tokens (B, N, E), N = num_patches + 1, class token at 0 (DeiT III
too: only its position embedding has num_patches rows).
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

from ..tokens import AttentionRecord, Reducer, TokenState, check_convention, prepare_reduction
from .checkpoint import CheckpointError, listing
from .layers import DropPath, PatchEmbed, resample_pos_embed
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
        probs = logits.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, n, c)
        if self.record:
            self.last_record = AttentionRecord(q.mean(1), k.mean(1), v.mean(1), probs.detach().mean(1))
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


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT's LayerScale, DeiT III):
    ``x * gamma`` on (..., E); ``gamma`` (E,) starts at ``init_values`` (timm's name and layout)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm Transformer block, split where a reducer runs: :meth:`attend` then :meth:`feed`.

    ``init_values``: None (DeiT) or the initial LayerScale of both branches (DeiT III:
    ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6, init_values: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = nn.Identity() if init_values is None else LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity() if init_values is None else LayerScale(dim, init_values)
        self.drop_path = DropPath(drop_path)

    def attend(self, x: Tensor, log_size: Tensor | None = None) -> Tensor:
        return x + self.drop_path(self.ls1(self.attn(self.norm1(x), log_size)))

    def feed(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: Tensor, log_size: Tensor | None = None) -> Tensor:
        return self.feed(self.attend(x, log_size))


class VisionTransformer(nn.Module):
    """DeiT / ViT with a class token at position 0. See the module docstring.

    Args:
        img_size, patch_size, in_chans: the patch embedding (stride = patch size).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the blocks.
        num_classes: head outputs (0 gives features from :meth:`forward`).
        drop_rate: dropout after the position embedding (timm; ``models_v2.py`` drops before
            the head instead, 0 in both recipes); drop_path_rate: stochastic depth, linear over
            the blocks (timm's ``dpr``) unless ``dpr_constant``.
        norm_eps: LayerNorm epsilon (1e-6 in DeiT and DeiT III).
        init_values: None (DeiT) or LayerScale's initial value (DeiT III; the presets use
            ``models_v2.py``'s ``init_scale=1e-4``; timm's ``deit3_*`` use 1e-6).
        no_embed_class: position embedding on the patches only, (1, num_patches, E), added
            before the class token is prepended (DeiT III); False: (1, num_patches + 1, E) on
            every token, class row first (DeiT).
        dpr_constant: the same drop-path rate in every block (``models_v2.py``'s
            ``dpr_constant=True``, DeiT III) instead of timm's linear rule.
        scan_backend: ignored (a Transformer has no selective scan); accepted like Vim's so
            that the commands and re-training build every backbone the same way.
    """

    reduction_site = "after_attention"
    cls_index = 0

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, init_values: float | None = None,
                 no_embed_class: bool = False, dpr_constant: bool = False, scan_backend: str = "auto"):
        super().__init__()
        self.scan_backend = scan_backend   # no selective scan here: accepted so every command builds any backbone
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.no_embed_class = bool(no_embed_class)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + (0 if no_embed_class else 1), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate] * depth if dpr_constant else torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_eps, init_values)
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
        """Images (B, C, H, W) -> tokens (B, num_patches + 1, E), class token first (DeiT III:
        the position embedding is added to the patches, then the class token is prepended)."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            return self.pos_drop(torch.cat((cls, x + self.pos_embed), dim=1))
        return self.pos_drop(torch.cat((cls, x), dim=1) + self.pos_embed)

    def forward_tokens(self, x: Tensor, track_source: bool = False) -> TokenState:
        """Images -> the token state after the last block (before the final norm).

        With a reduction installed, block ``i`` calls ``reduction.reduce`` (``state.layer = i``)
        between its attention and its MLP, and every attention adds ``log(size)`` to its logits.
        """
        reducer = self.reduction
        track_source = track_source or bool(getattr(reducer, "track_source", False))
        state = TokenState.start(self.embed(x), self.cls_index, track_source)
        if reducer is not None:
            prepare_reduction(reducer, self, state.num_tokens)
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
        GELU 5 Nm M, two residual adds (Na + Nm) C, LayerScale (DeiT III) (Na + Nm) C. Plus
        patch embedding 2 num_patches C p^2 in_chans + bias, position embedding (its rows) x C,
        final norm 7 C, head 2 C classes.
        """
        mult = check_convention(convention)
        C = self.embed_dim
        conv = self.patch_embed.proj
        H = self.blocks[0].attn.num_heads if len(self.blocks) else 1
        M = self.blocks[0].mlp.fc1.out_features if len(self.blocks) else 4 * C
        n0 = self.num_tokens
        ls = int(len(self.blocks) > 0 and isinstance(self.blocks[0].ls1, LayerScale))
        total = mult * (self.num_patches * C * conv.in_channels * math.prod(conv.kernel_size) + C * self.num_classes)
        if convention == "full":
            total += self.num_patches * C + self.pos_embed.shape[1] * C + 7 * C   # patch bias, pos. embed, final norm
        prev = n0
        for nm in token_counts:
            na = prev
            total += mult * (na * C * 3 * C + 2 * na * na * C + na * C * C + nm * C * M + nm * M * C)
            if convention == "full":
                total += (3 * na * C + na * C + nm * M + nm * C          # biases
                          + na * C + 3 * H * na * na                    # scale, softmax
                          + (H * na * na if self.reduction is not None else 0)
                          + 7 * (na + nm) * C + 5 * nm * M + (na + nm) * C
                          + (ls * (na + nm) * C))
            prev = nm
        return float(total)

    # ------------------------------------------------------------------ checkpoints
    @property
    def has_layer_scale(self) -> bool:
        """Whether the blocks have LayerScale (DeiT III)."""
        return len(self.blocks) > 0 and isinstance(self.blocks[0].ls1, LayerScale)

    def checkpoint_filter(self, state: dict[str, Tensor], source: str, strict: bool
                          ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Recognise a DeiT / DeiT III checkpoint and fit its position embedding to this model.

        * Other ViT families are refused with what they are and what to use (see
          :func:`vit_family`: distilled DeiT, registers, global average pooling, a CLIP-style
          pre-norm, BEiT/EVA attention, masked-image-modelling backbones); so is a DeiT file
          for a DeiT III model or the reverse (LayerScale, and whether the position embedding
          has a class row), and another patch size, each naming the ``create_model(...)`` call
          that fits.
        * facebookresearch's LayerScale names ``blocks.{i}.gamma_1`` / ``gamma_2`` become timm's
          ``blocks.{i}.ls1.gamma`` / ``ls2.gamma`` (a rename, nothing else).
        * The checkpoint's patch grid (h, w) is read from its position-embedding rows (a class
          row or not, see :func:`checkpoint_pos_layout`) and compared with the model's grid as a
          shape: another grid, even one with as many patches (14x14 for a 7x28 model), is
          resampled bicubically (:func:`~vimerge.models.layers.resample_pos_embed`; the
          class row, where there is one, kept at 0 and not interpolated), with a warning, and
          the report gets ``"pos_embed_grid": (checkpoint grid, model grid)``.

        With ``strict=False`` a refusal is a warning, and the key check loads what fits.

        Raises:
            CheckpointError: any refusal above, no ``blocks.N.attn`` keys (not a ViT), or a
                grid that is neither square nor of the model's aspect ratio.
        """
        family = vit_family(state)
        if family is not None:
            msg = f"checkpoint {source} is {family[0]}: {family[1]}"
            if strict:
                raise CheckpointError(msg)
            distilled = family[0].startswith("a distilled DeiT")
            warnings.warn(msg + ("; the distillation token and head were left out" if distilled else ""), stacklevel=3)
            if distilled:
                state = {k: v for k, v in state.items() if k != "dist_token" and not k.startswith("head_dist.")}
        if not any(re.match(r"blocks\.\d+\.attn\.", k) for k in state):
            prefixes = sorted({k.split(".", 1)[0] for k in state})
            msg = (f"checkpoint {source} is not a DeiT/ViT checkpoint: it has no 'blocks.N.attn...' keys "
                   f"(its keys start with: {listing(prefixes)})")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(msg, stacklevel=3)
        state = {_LAYER_SCALE_NAME.sub(r"\1ls\2.gamma", k): v for k, v in state.items()}
        unchanged: dict[str, Any] = {"resized_pos_embed": False}
        old, new = state.get("pos_embed"), self.pos_embed
        if old is None or old.dim() != 3 or old.shape[0] != 1 or old.shape[-1] != new.shape[-1]:
            return state, unchanged   # nothing to fit, or a width mismatch the key check reports
        gh, gw = self.grid_size
        class_row, grid = checkpoint_pos_layout(old.shape[1], (gh, gw), not self.no_embed_class)
        arch = {**_architecture(state), "class_row": class_row}
        layer_scale = arch.get("layer_scale", False)
        problems = []
        if (layer_scale, class_row) != (self.has_layer_scale, not self.no_embed_class):
            problems.append(f"the checkpoint is {_layout_name(layer_scale, class_row, old.shape[1], grid)}, the "
                            f"model {_layout_name(self.has_layer_scale, not self.no_embed_class)}")
        patch = arch.get("patch_size")
        if patch is not None and (patch, patch) != tuple(self.patch_embed.patch_size):
            made = f", a {grid[0]}x{grid[1]} grid made at img_size {grid[0] * patch}" if grid else ""
            problems.append(f"its patch size is {patch} (patch_embed.proj {patch}x{patch}{made}), the model's "
                            f"{_fmt_pair(self.patch_embed.patch_size)}")
            if grid is not None and grid[0] == grid[1]:
                arch["img_size"] = grid[0] * patch
        if problems:
            msg = (f"checkpoint {source} does not fit this model: {'; '.join(problems)}. Build the model with "
                   f"{_suggest_model(arch)}")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(f"{msg}; loading only what fits", stacklevel=3)
            return state, unchanged
        if grid is None:
            n_old = old.shape[1] - int(class_row)
            msg = (f"checkpoint {source} has a position embedding for {n_old} patches, not a square grid nor "
                   f"one of the model's aspect ratio ({gh}x{gw}): build the model with the checkpoint's "
                   f"img_size (height and width multiples of {_fmt_pair(self.patch_embed.patch_size)} whose "
                   f"grid has {n_old} patches), or resample it yourself with resample_pos_embed(..., old_grid=(h, w))")
            if strict:
                raise CheckpointError(msg)
            warnings.warn(f"{msg}; its position embedding was not loaded", stacklevel=3)
            return {k: v for k, v in state.items() if k != "pos_embed"}, unchanged
        if grid == (gh, gw):
            return state, unchanged
        p = self.patch_embed.patch_size
        same = " (as many patches, another shape)" if grid[0] * grid[1] == gh * gw else ""
        warnings.warn(f"checkpoint {source} has a {grid[0]}x{grid[1]} patch grid (img_size {grid[0] * p[0]}x"
                      f"{grid[1] * p[1]}): resampled its position embedding to the model's {gh}x{gw} grid{same} "
                      f"(img_size {self.img_size[0]}x{self.img_size[1]})", stacklevel=3)
        resized = resample_pos_embed(old, (gh, gw), grid, cls_index_old=0 if class_row else None,
                                     cls_index_new=0 if class_row else None)
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


# ---------------------------------------------------------------------------------------------
# checkpoint families

_LAYER_SCALE_NAME = re.compile(r"^(blocks\.\d+\.)gamma_([12])$")   # facebookresearch -> timm (ls1.gamma)
_DEIT_PRESETS = "create_model('deit_small') (DeiT) or create_model('deit3_small') (DeiT III)"


def vit_family(state: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """The ViT family of a checkpoint that vimerge's DeiT cannot hold, or None (DeiT, DeiT III,
    plain ViT and anything else are judged by the key check).

    Returns ``(what it is, what to use instead)``. Recognised by keys (timm
    ``vision_transformer.py`` / ``beit.py`` / ``eva.py``, facebookresearch/deit, OpenAI CLIP,
    DINOv2, MAE, Hugging Face transformers ``modeling_vit.py``), in this order:

    * ``dist_token`` / ``head_dist.*``: a distilled DeiT (a second token and head);
    * ``reg_token`` (timm) / ``register_tokens`` (DINOv2): register tokens;
    * ``mask_token``: a masked-image-modelling pre-training backbone (DINOv2, MAE...);
    * ``*class_embedding`` with ``transformer.resblocks.*``: an OpenAI CLIP image tower;
    * ``patch_embeddings.projection`` / ``encoder.layer.N.attention.attention``: Hugging Face
      transformers names (``ViTModel`` / ``DeiTModel``);
    * ``norm_pre.*``: a CLIP-style ViT with a norm before the blocks (timm ``vit_*_clip_*``);
    * ``*relative_position_bias_table``: BEiT / BEiT v2 / data2vec (relative position bias);
    * ``blocks.N.attn.q_proj`` / ``attn.q_bias`` / ``mlp.fc1_g``: EVA / EVA-02 attention or SwiGLU;
    * ``fc_norm.*`` or blocks without a ``cls_token``: global average pooling, no class token.
    """
    keys = list(state)
    has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
    if "dist_token" in state or "head_dist.weight" in state:
        return ("a distilled DeiT (it has a distillation token and head)",
                "vimerge's DeiT has the class token only; use the non-distilled weights "
                "(deit_*_patch16_224-*.pth) with create_model('deit_small') (or deit_tiny / deit_base)")
    if "reg_token" in state or "register_tokens" in state:
        reg = state.get("reg_token", state.get("register_tokens"))
        count = f"{reg.shape[1]} " if reg is not None and reg.dim() == 3 else ""
        return (f"a ViT with {count}register tokens (timm reg_token / DINOv2 register_tokens, Darcet et al. 2024)",
                f"vimerge's DeiT has one class token and no registers; use a DeiT or DeiT III checkpoint with "
                f"{_DEIT_PRESETS}")
    if "mask_token" in state:
        return ("a masked-image-modelling pre-training backbone (mask_token: DINOv2, MAE, BEiT-style)",
                f"it has no ImageNet classifier and its own layout; use a DeiT or DeiT III checkpoint "
                f"(supervised, with a head) with {_DEIT_PRESETS}")
    if has(r"(^|\.)class_embedding$") or has(r"(^|\.)transformer\.resblocks\.\d+\."):
        return ("an OpenAI CLIP image encoder (class_embedding, transformer.resblocks.N with a fused "
                "attn.in_proj_weight, ln_pre)",
                f"vimerge has no CLIP backbone (a pre-norm before the blocks, QuickGELU, a projection head); "
                f"use a DeiT or DeiT III checkpoint with {_DEIT_PRESETS}")
    if has(r"(^|\.)patch_embeddings\.projection\.") or has(r"(^|\.)encoder\.layer\.\d+\.attention\.attention\."):
        return ("a Hugging Face transformers ViT/DeiT (embeddings.patch_embeddings.projection, "
                "encoder.layer.N.attention.attention.query/key/value)",
                "vimerge reads the timm / facebookresearch names; use the facebookresearch .pth (e.g. "
                "deit_small_patch16_224-cd65a155.pth, deit_3_small_224_1k.pth) or timm's weights of the same model "
                f"with {_DEIT_PRESETS}")
    if "norm_pre.weight" in state:
        return ("a CLIP-style ViT with a norm before the blocks (norm_pre: timm vit_*_clip_* / OpenCLIP)",
                f"vimerge's DeiT has no pre-norm; use a DeiT or DeiT III checkpoint with {_DEIT_PRESETS}")
    if has(r"relative_position_bias_table$"):
        return ("a BEiT-style ViT with relative position bias (relative_position_bias_table: BEiT, BEiT v2, "
                "data2vec)",
                f"vimerge's DeiT has absolute position embeddings only; use a DeiT or DeiT III checkpoint "
                f"with {_DEIT_PRESETS}")
    if has(r"^blocks\.\d+\.attn\.(q_proj|q_bias)") or has(r"^blocks\.\d+\.mlp\.fc1_g\."):
        return ("an EVA / EVA-02 style ViT (separate q/k/v projections or q/v biases, SwiGLU MLP, rotary "
                "position embedding)",
                f"vimerge's DeiT has a fused qkv with bias and a GELU MLP; use a DeiT or DeiT III checkpoint "
                f"with {_DEIT_PRESETS}")
    blocks = has(r"^blocks\.\d+\.attn\.")
    if "fc_norm.weight" in state or (blocks and "cls_token" not in state):
        what = "no class token, " if "cls_token" not in state else ""
        return (f"a ViT with global average pooling ({what}fc_norm after the pool: timm global_pool='avg', "
                f"MAE fine-tuning)",
                f"vimerge's DeiT classifies from the class token; use a DeiT or DeiT III checkpoint with "
                f"{_DEIT_PRESETS}")
    return None


def checkpoint_pos_layout(rows: int, model_grid: tuple[int, int], model_class_row: bool
                          ) -> tuple[bool, tuple[int, int] | None]:
    """What a position embedding of ``rows`` rows holds: ``(class row at 0, patch grid (h, w))``.

    A DeiT embedding has a class row and h*w patch rows, a DeiT III one the patch rows only
    (197 and 196 rows at 224 px). A square patch count wins (of ``rows`` and ``rows - 1`` at
    most one is a square, from 3 rows on); else the count with the model's aspect ratio
    (``model_grid``), the model's own layout (``model_class_row``) tried first. The grid is
    None when neither fits (the class row is then the model's).
    """
    options = [(model_class_row, rows - int(model_class_row)), (not model_class_row, rows - int(not model_class_row))]
    for class_row, n in options:
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return class_row, (side, side)
    gh, gw = model_grid
    for class_row, n in options:
        grid = next(((h, n // h) for h in range(1, n + 1) if n % h == 0 and h * gw == (n // h) * gh), None)
        if grid is not None:
            return class_row, grid
    return model_class_row, None


def _layout_name(layer_scale: bool, class_row: bool, rows: int | None = None,
                 grid: tuple[int, int] | None = None) -> str:
    """A DeiT / DeiT III layout in words (with the checkpoint's rows when given)."""
    pos = ""
    if rows is not None:
        shape = f" = {grid[0]}x{grid[1]}" if grid else ""
        patches = rows - int(class_row)
        pos = (f": {rows} rows, a class row and {patches}{shape} patches" if class_row else
               f": {rows} rows = {patches}{shape} patches, no class row")
    if layer_scale and not class_row:
        return f"DeiT III (LayerScale ls1/ls2.gamma or gamma_1/gamma_2; position embedding on the patches only{pos})"
    if not layer_scale and class_row:
        return f"DeiT / ViT (no LayerScale; a class row in the position embedding{pos})"
    if layer_scale:
        return f"a ViT with LayerScale and a class row in the position embedding{pos}"
    return f"a ViT without LayerScale whose position embedding has no class row{pos}"


def _fmt_pair(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What DeiT / DeiT III weights (timm names) say about the model they came from."""
    arch: dict[str, Any] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.dim() == 4:
        arch.update(embed_dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        arch["depth"] = max(blocks) + 1
        arch["layer_scale"] = any(re.match(r"blocks\.\d+\.(ls1\.gamma|gamma_1)$", k) for k in state)
    head = state.get("head.weight")
    if head is not None and head.dim() == 2:
        arch["num_classes"] = head.shape[0]
    return arch


def _suggest_model(arch: dict[str, Any]) -> str:
    """The ``create_model(...)`` call of the DeiT / DeiT III preset nearest these dimensions
    (``layer_scale`` picks the family: DeiT III presets have LayerScale and ``no_embed_class``)."""
    presets = {n: {"in_chans": 3, "num_classes": 1000, "img_size": 224, **model_defaults(n)}
               for n in list_models() if get_preset(n).builder is VisionTransformer}
    deit3 = bool(arch.get("layer_scale", False))
    family = {n: d for n, d in presets.items() if (d.get("init_values") is not None) == deit3}
    best = next((n for n, d in family.items() if d.get("embed_dim") == arch.get("embed_dim")
                 and d.get("img_size") == arch.get("img_size", 224)),
                next((n for n, d in family.items() if d.get("embed_dim") == arch.get("embed_dim")),
                     "deit3_small" if deit3 else "deit_small"))
    defaults = presets.get(best, {})
    overrides = {k: v for k, v in arch.items() if k not in ("layer_scale", "class_row") and defaults.get(k) != v}
    if "class_row" in arch and arch["class_row"] == bool(defaults.get("no_embed_class", False)):
        overrides["no_embed_class"] = not arch["class_row"]
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

# DeiT III (facebookresearch/deit models_v2.py deit_{size}_patch16_LS, timm deit3_{size}_patch16_{res}):
# qkv bias, LayerNorm eps 1e-6, LayerScale init 1e-4 (models_v2.py's init_scale), position embedding
# on the patches only, constant drop-path rate. Weights: the ImageNet-1k files of README_revenge.md
# (top-1 81.4 / 83.4 / 83.0 / 83.8 / 85.0 / 84.9 / 85.8 for the rows below, in order).
DEIT3_WEIGHTS = "https://dl.fbaipublicfiles.com/deit/deit_3_{size}_{res}_1k.pth"
DEIT3 = {"small": (384, 12, 6), "medium": (512, 12, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, (_dim, _depth, _heads) in DEIT3.items():
    for _res in (224, 384) if _size != "medium" else (224,):
        _name = f"deit3_{_size}" + ("" if _res == 224 else f"_{_res}")
        _aliases = (f"deit3_{_size}_patch16_{_res}",) + ((f"deit_{_size}_patch16_LS",) if _res == 224 else ())
        register_model(_name, VisionTransformer, pretrained=DEIT3_WEIGHTS.format(size=_size, res=_res),
                       aliases=_aliases, img_size=_res, patch_size=16, embed_dim=_dim, depth=_depth,
                       num_heads=_heads, mlp_ratio=4.0, qkv_bias=True, init_values=1e-4, no_embed_class=True,
                       dpr_constant=True)

# Fashion-MNIST: the Transformer of the demo's Transformer-vs-Mamba rows, the same geometry as
# vim_fmnist (28x28, one channel, 4x4 patches: 49 patches + the class token = 50 tokens, 8
# blocks of width 96) so that both reduce the same tokens; 3 heads of 32 channels.
FMNIST_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "deit_fmnist.pth"
register_model("deit_fmnist", VisionTransformer, pretrained=FMNIST_WEIGHTS, img_size=28, patch_size=4,
               in_chans=1, depth=8, embed_dim=96, num_heads=3, num_classes=10,
               retrain_recipe=dict(epochs=1, batch_size=64, effective_batch=64, lr=1e-3, min_lr=1e-5,
                                   augment="none", label_smoothing=0.1))
