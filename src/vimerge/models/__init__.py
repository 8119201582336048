"""Backbones, one file each (``vim.py``, ``videomamba.py``, ``mambar.py``, ``deit.py``) on shared
parts (``layers.py``, the Mamba trunk ``mamba.py``), registered by name; generic checkpoint reading.

>>> from vimerge.models import create_backbone, list_models
>>> model = create_backbone("vim_small", checkpoint="vim_s_midclstok_80p5acc.pth")
"""

import warnings

from . import deit, mambar, videomamba, vim  # noqa: F401  (each registers its presets)
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, read_state_dict, save_checkpoint
from .deit import VisionTransformer
from .registry import create_backbone, get_preset, list_models, model_defaults, pretrained_uri, register_model
from .videomamba import VideoMamba
from .vim import VisionMamba

__all__ = ["create_backbone", "list_models", "model_defaults", "register_model", "get_preset", "pretrained_uri",
           "VisionMamba", "VisionTransformer", "VideoMamba", "CheckpointError", "load_checkpoint", "read_checkpoint", "read_state_dict", "save_checkpoint"]


def __getattr__(name: str):
    """``vimerge.models.create_model``, the name of :func:`create_backbone` in earlier releases
    (kept for one release, with a DeprecationWarning)."""
    if name == "create_model":
        warnings.warn("vimerge.models.create_model is deprecated and will be removed in the next release: use "
                      "vimerge.models.create_backbone (or vimerge.create_model, which also applies the model and "
                      "reduction the weights record)", DeprecationWarning, stacklevel=2)
        return create_backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
