"""Vision Mamba (Vim) in pure PyTorch, parameter-compatible with hustvl/Vim.

This is the ``vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
architecture of the official repository: a patch-embedding convolution, a class token
inserted in the middle of the patch sequence, an absolute position embedding added after the
insertion, ``depth`` blocks of ``Add -> RMSNorm -> bidirectional Mamba mixer`` with the residual
stream kept in fp32, a final ``Add -> RMSNorm``, and a linear head on the class token.

Shapes: images (B, C, H, W); tokens (B, N, E) with N = num_patches + 1 and the class token
at index ``num_patches // 2``; mixer internals (B, d_inner, N) with d_inner = 2 E.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import selective_scan
from ..reduce.state import Reducer, TokenState


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

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.proj.in_channels, *self.img_size):
            raise ValueError(
                f"expected images of shape (batch, {self.proj.in_channels}, {self.img_size[0]}, "
                f"{self.img_size[1]}), got {tuple(x.shape)}; resize the input or build the model "
                f"with img_size={tuple(x.shape[-2:]) if x.dim() == 4 else '...'} (position "
                f"embeddings are resampled when a checkpoint is loaded)")
        return self.proj(x).flatten(2).transpose(1, 2)


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
    time-flipped x and z. Input and output (B, N, E).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, scan_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.record = False   # set by reducers that need this mixer's internals
        self.recorded: dict = {}
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

        With ``self.record`` on, keeps this direction's raw time steps ``delta`` (before bias
        and softplus, (B, d_inner, N)), ``B`` and ``C`` ((B, d_state, N)) in ``self.recorded``
        under ``"fwd"`` / ``"bwd"``, flipped back to the token order.
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
            keep = {"delta": delta, "B": B.transpose(1, 2), "C": C.transpose(1, 2)}
            self.recorded["bwd" if backward else "fwd"] = {
                k: (v.flip(-1) if backward else v).detach() for k, v in keep.items()}
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2),
                              getattr(self, "D" + sfx).float(), z,
                              delta_bias=dt_proj.bias.float(), delta_softplus=True,
                              backend=self.scan_backend)

    def forward(self, hidden: Tensor) -> Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)                          # (B, 2 d_inner, N)
        x, z = xz.chunk(2, dim=1)
        y = self._direction(x, z, backward=False)
        y_b = self._direction(x.flip(-1), z.flip(-1), backward=True)
        y = (y + y_b.flip(-1)) / 2                                         # (B, d_inner, N)
        if self.record:
            self.recorded["y"] = y.detach()
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
