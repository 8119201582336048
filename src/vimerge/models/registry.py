"""Model factories by name (timm-style): ``create_model("vim_small", num_classes=10)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from .vim import VisionMamba

_PRESETS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any], str | None]] = {}
_ALIASES: dict[str, str] = {}

# Where the official weights live, for users who are online (see checkpoint.load_checkpoint).
HUB_WEIGHTS = {
    "vim_tiny": "hf://hustvl/Vim-tiny-midclstok/vim_t_midclstok_76p1acc.pth",
    "vim_small": "hf://hustvl/Vim-small-midclstok/vim_s_midclstok_80p5acc.pth",
    "vim_base": "hf://hustvl/Vim-base-midclstok/vim_b_midclstok_81p9acc.pth",
}


def register_model(name: str, builder: Callable[..., nn.Module], aliases: tuple[str, ...] = (),
                   pretrained: str | None = None, **defaults: Any) -> None:
    """Register ``name`` as ``builder(**defaults, **overrides)``; ``pretrained`` is its weights' URI."""
    _PRESETS[name] = (builder, dict(defaults), pretrained)
    for alias in aliases:
        _ALIASES[alias] = name


def list_models() -> list[str]:
    """Registered model names (aliases excluded)."""
    return sorted(_PRESETS)


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments a preset passes to its builder."""
    return dict(_PRESETS[_canonical(name)][1])


def _canonical(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return name


def create_model(name: str, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 checkpoint: str | None = None, pretrained: bool = False, strict: bool = True,
                 **overrides: Any) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models` (or an official long name, e.g.
            ``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``).
        num_classes, img_size: head size and input resolution (default: the preset's, 1000 and
            224 for the ImageNet Vims); a checkpoint made for other
            values is adapted (head reinitialised with a warning, position embedding resampled).
        checkpoint: path or URI (``hf://...``) of weights: official ``{"model": ...}`` .pth,
            plain state dict, or .safetensors.
        pretrained: load the official weights from the hub (needs ``huggingface_hub`` and
            internet); ignored when ``checkpoint`` is given.
        strict: require exactly the model's keys in the checkpoint.
        **overrides: any constructor argument of the builder (``depth``, ``embed_dim``,
            ``d_state``, ``patch_size``, ``stride``, ``in_chans``, ``drop_path_rate``,
            ``scan_backend``...).
    """
    canonical = _canonical(name)
    builder, defaults, hub = _PRESETS[canonical]
    chosen = {"num_classes": num_classes if num_classes is not None else defaults.get("num_classes", 1000),
              "img_size": img_size if img_size is not None else defaults.get("img_size", 224)}
    model = builder(**{**defaults, **chosen, **overrides})
    if checkpoint is None and pretrained:
        if hub is None:
            raise ValueError(f"model {canonical!r} has no published weights; pass checkpoint=PATH")
        checkpoint = hub
    if checkpoint is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint, strict=strict)
    return model


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
FMNIST_WEIGHTS = str(Path(__file__).resolve().parent.parent / "assets" / "vim_fmnist.pth")
register_model("vim_fmnist", VisionMamba, pretrained=FMNIST_WEIGHTS, img_size=28, patch_size=4, stride=4,
               in_chans=1, depth=8, embed_dim=96, d_state=16, num_classes=10)
