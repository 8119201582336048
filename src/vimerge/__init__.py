"""vimerge: token reduction for Vision Mamba.

The public API is ``vimerge.__all__``, listed with one line each in the README's "Public API"
section (``tests/test_train_api.py`` keeps both the same):

    create_model                                   -- a model by name, with its weights and the reduction
                                                      they were re-trained with (vimerge.factory)
    list_models, register_model                    -- backbone presets (vimerge.models)
    load_checkpoint, save_checkpoint, CheckpointError -- official / plain / safetensors / hub weights
    apply, remove, token_counts                    -- token reduction (vimerge.reduce)
    parse_spec, format_spec, list_methods, register_method -- reductions as one string ("rmeeto:r=11")
    reduction_ratio, r_for_ratio                   -- the mean-token ratio and the r that reaches it
    count_flops                                    -- FLOPs per image (paper / full convention)
    selective_scan, available_backends             -- the scan kernels (vimerge.ops)
    RetrainConfig, retrain, load_retrained         -- (re-)training (vimerge.train)

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
from .train import RetrainConfig, load_retrained, retrain

__all__ = ["create_model", "list_models", "register_model", "load_checkpoint", "save_checkpoint",
           "CheckpointError", "apply", "remove", "token_counts", "parse_spec", "format_spec", "list_methods",
           "register_method", "reduction_ratio", "r_for_ratio", "count_flops", "selective_scan",
           "available_backends", "RetrainConfig", "retrain", "load_retrained", "__version__"]
