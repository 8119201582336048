"""vimerge: token reduction for Vision Mamba.

Public API:
    create_model, list_models, register_model    -- Vim presets by name (vimerge.models)
    load_checkpoint, save_checkpoint             -- official / plain / safetensors / hub weights
    selective_scan, available_backends           -- the scan kernels (vimerge.ops)
    apply, remove, reduction_ratio, token_counts -- token reduction (vimerge.reduce)
"""

__version__ = "0.1.0"

from .models import create_model, list_models, register_model  # noqa: E402
from .models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from .ops import available_backends, selective_scan  # noqa: E402
from .reduce import apply, r_for_ratio, reduction_ratio, remove, token_counts  # noqa: E402

__all__ = ["create_model", "list_models", "register_model", "load_checkpoint", "save_checkpoint",
           "CheckpointError", "selective_scan", "available_backends", "apply", "remove",
           "reduction_ratio", "r_for_ratio", "token_counts", "__version__"]
