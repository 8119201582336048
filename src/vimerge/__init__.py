"""vimerge: token reduction for Vision Mamba.

Public API:
    create_model                                   -- a model by name, with its weights and the reduction
                                                      they were re-trained with (vimerge.factory)
    list_models, register_model                    -- backbone presets (vimerge.models)
    load_checkpoint, save_checkpoint               -- official / plain / safetensors / hub weights
    apply, remove, token_counts                    -- token reduction (vimerge.reduce)
    parse_spec, format_spec, list_methods          -- reductions as one string ("rmeeto:r=11")
    count_flops                                    -- FLOPs per image (paper / full convention)
    selective_scan, available_backends             -- the scan kernels (vimerge.ops)

>>> import vimerge
>>> model = vimerge.create_model("vim_fmnist", pretrained=True)
>>> vimerge.apply(model, "rmeeto:ratio=0.28")
>>> logits = model(images)                  # (B, 1, 28, 28) -> (B, 10)
>>> vimerge.token_counts(model), vimerge.count_flops(model)
"""

from ._version import __version__
from .factory import create_model
from .measure import count_flops
from .models import CheckpointError, list_models, load_checkpoint, register_model, save_checkpoint
from .ops import available_backends, selective_scan
from .reduce import (
    apply,
    format_spec,
    list_methods,
    parse_spec,
    r_for_ratio,
    reduction_ratio,
    register_method,
    remove,
    token_counts,
)

__all__ = ["create_model", "list_models", "register_model", "load_checkpoint", "save_checkpoint",
           "CheckpointError", "selective_scan", "available_backends", "apply", "remove", "token_counts",
           "parse_spec", "format_spec", "list_methods", "register_method", "count_flops",
           "reduction_ratio", "r_for_ratio", "__version__"]
