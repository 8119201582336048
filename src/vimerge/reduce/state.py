"""The token state carried through a Vim's blocks, and the reducer protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..models.vim import VisionMamba


@dataclass
class TokenState:
    """What flows between blocks (shapes for B images, N tokens, width E).

    Attributes:
        hidden: (B, N, E) the previous block's mixer output (the embedded tokens before block 0).
        residual: (B, N, E) fp32 residual stream, or None before block 0.
        size: (B, N, 1) how many original tokens each token stands for.
        cls_index: position of the class token (the same for every image).
        source: (B, N, N0) optional 0/1 map of which original tokens each token holds
            (only when source tracking is on; N0 = tokens after embedding).
        layer: the index of the block about to run.
    """
    hidden: Tensor
    residual: Tensor | None
    size: Tensor
    cls_index: int
    source: Tensor | None = None
    layer: int = 0
    extras: dict = field(default_factory=dict)

    @classmethod
    def start(cls, tokens: Tensor, cls_index: int, track_source: bool = False) -> "TokenState":
        b, n, _ = tokens.shape
        source = None
        if track_source:
            source = torch.eye(n, device=tokens.device, dtype=tokens.dtype).expand(b, n, n)
        return cls(tokens, None, tokens.new_ones(b, n, 1), cls_index, source)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]


class Reducer(Protocol):
    """A token-reduction method, called by the model before the mixer of every block."""

    def reduce(self, state: TokenState, model: "VisionMamba") -> TokenState:
        """Map the state entering block ``state.layer`` to a (possibly) smaller one."""

    def prepare(self, model: "VisionMamba", num_tokens: int) -> None:
        """Called at the start of every forward (e.g. to ask mixers to record internals)."""
