"""Model presets by name (timm-style): ``create_backbone("vim_small", num_classes=10)``.

A leaf of ``vimerge.models``: backbone files register their presets here where they are
defined (``register_model``), and this module knows no backbone.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .checkpoint import load_checkpoint


@dataclass
class Preset:
    """A registered model: ``builder(**defaults, **overrides)``; ``pretrained`` is the URI or
    path of its published weights (None: none); ``retrain_recipe`` the re-training settings that
    suit it (:class:`vimerge.train.RetrainConfig` fields; None: the paper's ImageNet recipe)."""
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    retrain_recipe: dict[str, Any] | None = None


_PRESETS: dict[str, Preset] = {}
_ALIASES: dict[str, str] = {}


def register_model(name: str, builder: Callable[..., nn.Module], aliases: tuple[str, ...] = (),
                   pretrained: str | os.PathLike | None = None,
                   retrain_recipe: dict[str, Any] | None = None, **defaults: Any) -> None:
    """Register ``name`` as ``builder(**defaults, **overrides)``; ``pretrained`` is its weights' URI,
    ``retrain_recipe`` its re-training defaults (``vimerge retrain`` uses them unless overridden)."""
    _PRESETS[name] = Preset(name, builder, dict(defaults), None if pretrained is None else os.fspath(pretrained),
                            None if retrain_recipe is None else dict(retrain_recipe))
    for alias in aliases:
        _ALIASES[alias] = name


def list_models() -> list[str]:
    """Registered model names (aliases excluded)."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset of a registered name or alias (ValueError listing the names otherwise)."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _PRESETS[canonical]


def model_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments a preset passes to its builder."""
    return dict(get_preset(name).defaults)


def pretrained_uri(name: str) -> str | None:
    """Where a preset's published weights are (a path or ``hf://`` URI), or None."""
    return get_preset(name).pretrained


def create_backbone(name: str, *, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 checkpoint: str | os.PathLike | None = None, pretrained: bool = False, strict: bool = True,
                 ema: bool | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model, optionally loading weights.

    Args:
        name: a name from :func:`list_models` (or an alias such as an official long name, e.g.
            ``vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``).
        num_classes, img_size: head size and input resolution (default: the preset's, 1000 and
            224 for the ImageNet models); a checkpoint made for other values is adapted (head
            reinitialised with a warning, position embedding resampled).
        checkpoint: path or URI (``hf://...``) of weights: official ``{"model": ...}`` .pth,
            plain state dict, or .safetensors.
        pretrained: load the preset's published weights (shipped with vimerge, or from the hub:
            needs ``huggingface_hub`` and internet); ignored when ``checkpoint`` is given.
        strict: require exactly the model's keys in the checkpoint.
        ema: which weights of a file that holds online and averaged ones (see
            :func:`~vimerge.models.checkpoint.load_checkpoint`; None: the online ones, with a warning).
        **overrides: any constructor argument of the builder (``depth``, ``embed_dim``,
            ``d_state``, ``patch_size``, ``stride``, ``in_chans``, ``drop_path_rate``,
            ``scan_backend``...).

    Raises:
        ValueError: unknown name, or ``pretrained`` for a preset without published weights.
        CheckpointError: the checkpoint cannot be read or does not fit (the message says why).
    """
    preset = get_preset(name)
    defaults = preset.defaults
    chosen = {"num_classes": num_classes if num_classes is not None else defaults.get("num_classes", 1000),
              "img_size": img_size if img_size is not None else defaults.get("img_size", 224)}
    model = preset.builder(**{**defaults, **chosen, **overrides})
    model.preset_name = preset.name        # the registered name it was built as (aliases resolved)
    if checkpoint is None and pretrained:
        if preset.pretrained is None:
            raise ValueError(f"model {preset.name!r} has no published weights; pass checkpoint=PATH")
        checkpoint = preset.pretrained
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict, ema=ema)
    return model


# names of earlier releases, kept for one release (DeprecationWarning naming the new spelling)
_MOVED = {"create_model": "vimerge.models.create_backbone (the model as its weights were trained: vimerge.create_model)",
          "FMNIST_WEIGHTS": "vimerge.models.pretrained_uri('vim_fmnist')",
          "HUB_WEIGHTS": "vimerge.models.pretrained_uri(name)"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"vimerge.models.registry.{name} is deprecated and will be removed in the next release: "
                  f"use {_MOVED[name]}", DeprecationWarning, stacklevel=2)
    if name == "create_model":
        return create_backbone
    if name == "FMNIST_WEIGHTS":
        return pretrained_uri("vim_fmnist")
    return {n: p.pretrained for n, p in _PRESETS.items() if p.pretrained and p.pretrained.startswith("hf://")}
