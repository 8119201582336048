"""The Mamba trunk every Vision Mamba backbone shares: the bidirectional mixer, the block with
its fp32 residual stream, and :class:`MambaTrunk`, the base class that runs the blocks and
offers the token-model protocol (:class:`~vimerge.tokens.TokenModel`) and the FLOPs formula.

A backbone (``vim.py``, ``videomamba.py``, ``mambar.py``) subclasses :class:`MambaTrunk` and
writes only what is its own: the embedding (:meth:`MambaTrunk.embed`: where the class token
or the registers go), the read-out (``forward_features``), the token layout (``num_tokens``,
``cls_index``, ``protected``), the FLOPs of its embedding and head
(:meth:`MambaTrunk.outer_flops`) and its checkpoint filter.

The blocks are hustvl/Vim's ``bimambav2`` (``models_mamba.py`` ``create_block`` with
``rms_norm=True, residual_in_fp32=True, fused_add_norm=True``): ``Add -> RMSNorm (eps 1e-5) ->
mixer``, the residual kept in fp32, block ``i`` with the (i-1)-th stochastic-depth rate of
``linspace(0, rate, depth)`` (the official ``inter_dpr``), a final ``Add -> RMSNorm``
(``norm_f``). Parameter names are the official ones (``layers.{i}.mixer.*``,
``layers.{i}.norm.weight``, ``norm_f.weight``), shared by Vim, VideoMamba and Mamba-Reg.

Shapes: tokens (B, N, E); mixer internals (B, d_inner, N) with d_inner = 2 E.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import Direction, fused_bimamba_v2, fused_mixer_reason, selective_scan
from ..tokens import BlockRecord, Reducer, ScanRecord, TokenState, check_convention, prepare_reduction
from .layers import DropPath, RMSNorm
from .registry import get_preset, list_models, model_defaults


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
        self.record = False   # set through MambaTrunk.record_blocks by reducers that need the scans
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

    def _direction(self, x: Tensor, z: Tensor, backward: bool, stretch: Tensor | None = None) -> Tensor:
        """One scan direction on (B, d_inner, N) inputs (already flipped for backward).

        With ``self.record`` on, keeps this direction's scan inputs as a
        :class:`~vimerge.tokens.ScanRecord` (flipped back to the token order). ``stretch``
        (B, 1, N), in this direction's order: each token's state decay is taken over
        ``stretch`` time steps, ``h_t = exp(stretch_t dt_t A) h_{t-1} + dt_t B_t u_t`` (the
        input term unchanged): :meth:`forward`'s ``gaps``.
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
                              backend=self.scan_backend, decay_scale=stretch)

    def _forward_fused(self, hidden: Tensor, stretch: Tensor | None = None) -> Tensor:
        """:meth:`forward` through :func:`vimerge.ops.fused_bimamba_v2` (same values and records);
        ``stretch`` (B, 2, N): :meth:`forward`'s ``1 + gaps``."""
        fwd, bwd = (Direction(getattr(self, "conv1d" + s).weight, getattr(self, "conv1d" + s).bias,
                              getattr(self, "x_proj" + s).weight, getattr(self, "dt_proj" + s).weight,
                              getattr(self, "dt_proj" + s).bias, getattr(self, a), getattr(self, "D" + s))
                    for s, a in (("", "A_log"), ("_b", "A_b_log")))
        y, scans = fused_bimamba_v2(self.in_proj(hidden), fwd, bwd, self.d_state,
                                    scale=0.5 if self.average else 1.0, record=self.record, stretch=stretch)
        if scans is not None:
            self.last_record = BlockRecord(*(ScanRecord(s.delta, s.B, s.C, s.A, p.dt_proj_bias.detach())
                                             for s, p in zip(scans, (fwd, bwd))), y.detach().transpose(1, 2))
        return self.out_proj(y)

    def forward(self, hidden: Tensor, gaps: Tensor | None = None) -> Tensor:
        """(B, N, E) -> (B, N, E): the fused CPU kernels when ``self.fused`` and the scan backend
        resolves to numba on CPU (:func:`vimerge.ops.fused_mixer_reason`), else step by step.

        ``gaps`` (B, N, 2) (:attr:`vimerge.tokens.TokenState.gaps`): pruned positions before
        (``[..., 0]``) and after (``[..., 1]``) each token; each direction's scan then decays the
        state of token t over ``1 + gap`` steps of its own time step, as if the pruned positions
        were still there with no input (ToP-ViM's hidden-state alignment, our form: the
        released code has no alignment). With gaps the fused kernels run only without autograd
        (inference); with gradients the mixer runs step by step.
        """
        stretch = None if gaps is None else 1 + gaps.float().transpose(1, 2)    # (B, 2, N)
        if self.fused and fused_mixer_reason(hidden, self.scan_backend) is None and (
                gaps is None or not torch.is_grad_enabled()):
            return self._forward_fused(hidden, stretch)
        xz = self.in_proj(hidden).transpose(1, 2)                          # (B, 2 d_inner, N)
        x, z = xz.chunk(2, dim=1)
        self._scans = []
        y = self._direction(x, z, backward=False, stretch=None if stretch is None else stretch[:, :1])
        y_b = self._direction(x.flip(-1), z.flip(-1), backward=True,
                              stretch=None if stretch is None else stretch[:, 1:].flip(-1))
        y = y + y_b.flip(-1)                                               # (B, d_inner, N)
        if self.average:
            y = y / 2
        if self.record:
            self.last_record = BlockRecord(self._scans[0], self._scans[1], y.detach())
            self._scans = []
        return self.out_proj(y.transpose(1, 2))


class MambaBlock(nn.Module):
    """Add -> RMSNorm -> mixer; returns the mixer output and the (fp32) residual stream."""

    def __init__(self, dim: int, mixer: BiMambaMixer, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: Tensor, residual: Tensor | None, gaps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``gaps``: see :meth:`BiMambaMixer.forward` (None: the plain mixer)."""
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()
        normed = self.norm(residual)
        return (self.mixer(normed) if gaps is None else self.mixer(normed, gaps)), residual


Block = MambaBlock
"""The official name of the block (``models_mamba.py`` ``Block``)."""


class MambaTrunk(nn.Module):
    """The stack of Mamba blocks and the token-model protocol; subclassed by every Mamba backbone.

    A subclass calls :meth:`build_trunk` in its ``__init__`` (after its embedding parameters,
    before its head, so that parameter order and random initialisation follow the official
    code) and defines ``embed``, ``forward_features``, ``num_tokens``, ``cls_index`` and
    :meth:`outer_flops`; ``protected`` (the positions a reducer must keep) defaults to
    ``(cls_index,)``. Attributes set here: ``layers`` (``layers[i].mixer`` is block ``i``'s
    :class:`BiMambaMixer`), ``drop_path``, ``norm_f``, ``reduction`` (None),
    ``reduction_site = "before_mixer"``. A backbone whose tokens form frames registers a
    ``token_coords`` buffer (N, 2), every token's ``(frame, cell)``, which the token state
    carries (:attr:`~vimerge.tokens.TokenState.coords`).
    """

    reduction_site = "before_mixer"
    no_decay_names: tuple[str, ...] = ("pos_embed", "cls_token")
    """Parameters trained without weight decay besides the 1-D ones and the state matrices."""
    hint_preset = ""
    """The preset a checkpoint hint names when no preset has the checkpoint's width."""

    def build_trunk(self, embed_dim: int, depth: int, d_state: int, drop_path_rate: float, norm_eps: float,
                    scan_backend: str, average: bool) -> None:
        """Create ``layers``, ``drop_path`` and ``norm_f`` (``average``: see :class:`BiMambaMixer`)."""
        # block i gets the (i-1)-th rate of a linear ramp, as in the official inter_dpr
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            MambaBlock(embed_dim, BiMambaMixer(embed_dim, d_state, scan_backend=scan_backend, average=average),
                       drop_path=dpr[i], eps=norm_eps)
            for i in range(depth))
        self.drop_path = DropPath(drop_path_rate)
        self.norm_f = RMSNorm(embed_dim, norm_eps)
        self.reduction: Reducer | None = None   # installed by vimerge.apply, see vimerge.reduce

    def rescale_out_proj(self, depth: int) -> None:
        """The official prenorm-residual initialisation of every ``out_proj``: Kaiming uniform
        (a = sqrt 5), divided by sqrt(depth) (``models_mamba.py`` ``_init_weights``)."""
        for block in self.layers:
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(depth)

    # ------------------------------------------------------------------ token layout (TokenModel)
    @property
    def protected(self) -> tuple[int, ...]:
        """Positions (after the embedding) of the tokens no reduction may merge or drop: the
        class token (and, in Mamba-Reg, the registers)."""
        return (self.cls_index,)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def in_chans(self) -> int:
        return self.patch_embed.proj.in_channels

    @property
    def img_size(self) -> tuple[int, int]:
        """Input (height, width) of an image (or of every frame), in pixels."""
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

    @property
    def scan_backend(self) -> str:
        """The selective-scan backend of every mixer (see :mod:`vimerge.ops`); settable."""
        return self.layers[0].mixer.scan_backend if len(self.layers) else "auto"

    @scan_backend.setter
    def scan_backend(self, name: str) -> None:
        for block in self.layers:
            block.mixer.scan_backend = name

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally trained without weight decay: :attr:`no_decay_names`,
        1-D parameters and the state matrices (``A_log``, ``A_b_log``, ``D``, ``D_b``)."""
        names = {n for n, _ in self.named_parameters()}
        return (set(self.no_decay_names) & names) | {
            n for n, p in self.named_parameters()
            if p.ndim <= 1 or n.rsplit(".", 1)[-1] in ("A_log", "A_b_log", "D", "D_b")}

    # ------------------------------------------------------------------ forward
    def forward_tokens(self, x: Tensor, track_source: bool = False) -> TokenState:
        """Inputs -> the token state after the last block (before the final Add -> norm).

        The active reduction (``self.reduction``) runs before the mixer of each block.
        """
        reducer = self.reduction
        track_source = track_source or bool(getattr(reducer, "track_source", False))
        protected = self.protected
        state = TokenState.start(self.embed(x), self.cls_index, track_source, coords=getattr(self, "token_coords", None),
                                 protected=None if protected == (self.cls_index,) else protected)
        if reducer is not None:
            prepare_reduction(reducer, self, state.num_tokens)
        for i, block in enumerate(self.layers):
            state.layer = i
            if reducer is not None:
                state = reducer.reduce(state, self)
            state.hidden, state.residual = block(state.hidden, state.residual, state.gaps)
        return state

    def final_residual(self, state: TokenState) -> Tensor:
        """The residual stream after the last block's Add (fp32), (B, N, E): what ``norm_f`` normalises."""
        hidden, residual = state.hidden, state.residual
        return hidden if residual is None else residual + self.drop_path(hidden)

    # ------------------------------------------------------------------ cost
    def outer_flops(self, convention: str) -> int:
        """FLOPs of everything outside the blocks (embedding, final norm, head), per image."""
        raise NotImplementedError

    def flops(self, token_counts: Sequence[int], convention: str = "paper") -> float:
        """FLOPs per image when block ``i``'s mixer sees ``token_counts[i]`` tokens: the blocks
        (below) plus :meth:`outer_flops` (the reduction method's own cost is not included;
        see ``vimerge.count_flops``).

        ``"paper"``: R-MeeTo's ``calc_flops`` convention, which reproduces its Table 2
        (Vim-Ti/S/B: 1.45 / 5.08 / 18.87 GFLOPs) and Table 13 (VideoMamba): a multiply-add is
        one FLOP and one scan direction is counted. Per block with N tokens, width C,
        d_inner = 2C, state n, dt rank R, conv width k = 4::

            in_proj N C 4C, out_proj N 2C C, conv1d (N + 3) 2C 4, x_proj N 2C (R + 2n),
            dt_proj N R 2C, scan 9 N 2C n + N 2C (D term) + N 2C (z gate)

        ``"full"``: every arithmetic operation once (a multiply-add is 2, an exp or a division
        1), both scan directions. Per block: in_proj 2 N C 4C, out_proj 2 N 2C C, the
        directions combined (averaged: 2 N 2C; summed, VideoMamba: N 2C), RMSNorm 4 N C,
        residual add N C, and for EACH direction: conv1d 2 N 2C 4 + bias N 2C; SiLU 4 N 2C;
        x_proj 2 N 2C (R + 2n); dt_proj 2 N R 2C; bias + softplus 3 N 2C; dt u N 2C; dt A and
        its exp 2 N 2C n; (dt u) B and a h + b 3 N 2C n; y = C . h 2 N 2C n; + D u 2 N 2C;
        * silu(z) 5 N 2C.
        """
        check_convention(convention)
        mixer = self.layers[0].mixer if len(self.layers) else None
        C = self.embed_dim
        n, R, k = (mixer.d_state, mixer.dt_rank, mixer.d_conv) if mixer else (16, math.ceil(C / 16), 4)
        average = mixer.average if mixer else True
        di = 2 * C
        total = self.outer_flops(convention)
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
            combine = (2 if average else 1) * N * di        # sum (+ the division by 2)
            total += (2 * N * C * 4 * C + 2 * N * di * C + 2 * per_direction + combine
                      + 4 * N * C + N * C)                  # norm, residual
        return float(total)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_hint(self, state: Mapping[str, Tensor]) -> str | None:
        """When the checkpoint's dimensions differ from this model's: what they are and the
        ``create_model(...)`` call that fits them (:func:`suggest_preset`)."""
        ckpt, mine = mamba_architecture(state), mamba_architecture(self.state_dict())
        differs = {k: (v, mine[k]) for k, v in ckpt.items() if k in mine and mine[k] != v and k != "num_classes"}
        if not differs:
            return None

        def say(key: str, value: int) -> str:
            return f"{value} blocks" if key == "depth" else f"{key} {value}"
        have = " and ".join(say(k, v) for k, (v, _) in differs.items())
        want = " and ".join(say(k, w) for k, (_, w) in differs.items())
        return f"this checkpoint has {have} (the model: {want}); build the model with " \
               f"{suggest_preset(ckpt, type(self), self.hint_preset)}"


# ---------------------------------------------------------------------------------------------
# checkpoint recognition


def mamba_architecture(state: Mapping[str, Tensor]) -> dict[str, int]:
    """What Mamba-trunk weights (Vim, VideoMamba, Mamba-Reg) say about the model they came from
    (only what can be told): ``embed_dim``, ``in_chans``, ``patch_size`` (2-D or 3-D patch
    kernel), ``depth``, ``d_state``, ``num_classes``."""
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


def suggest_preset(arch: dict[str, int], builder: type, fallback: str = "") -> str:
    """The ``create_model(...)`` call of the ``builder`` preset nearest these dimensions: the
    first with the same width and depth, else the same width, else ``fallback``; the
    differing dimensions as overrides (a patch size with the same stride when the builder
    takes one: the stride is not in the weights)."""
    presets = {n: {"in_chans": 3, "num_classes": 1000, **model_defaults(n)}
               for n in list_models() if get_preset(n).builder is builder}
    if not presets:
        return "create_model(...)"
    best = next((n for n, d in presets.items() if d.get("embed_dim") == arch.get("embed_dim")
                 and d.get("depth") == arch.get("depth")), None)
    best = best or next((n for n, d in presets.items() if d.get("embed_dim") == arch.get("embed_dim")),
                        fallback if fallback in presets else next(iter(presets)))
    defaults = presets[best]
    overrides: dict[str, int] = {}
    for key, value in arch.items():
        if defaults.get(key) != value:
            overrides[key] = value
            if key == "patch_size" and "stride" in defaults:
                overrides["stride"] = value
    return f"create_model({', '.join([repr(best), *(f'{k}={v}' for k, v in overrides.items())])})"
