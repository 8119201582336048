"""Re-training of token-reduced Vims (the "Re-training" of R-MeeTo).

>>> from vimerge.train import RetrainConfig, retrain
>>> cfg = RetrainConfig(model="vim_small", checkpoint="vim_s_midclstok_80p5acc.pth",
...                     data="/data/imagenet", method="rmeeto", reduction={"r": 11},
...                     epochs=3, output="runs/vim_s_r11")
>>> result = retrain(cfg)                 # or: torchrun --nproc_per_node 8 -m vimerge retrain ...
>>> model = load_retrained("runs/vim_s_r11/final.pth")   # weights + reduction re-applied

Modules: :mod:`.recipe` (config, schedule, parameter groups, EMA), :mod:`.loop` (the loop),
:mod:`.data` (subset and resumable order), :mod:`.augment` (batch augmentation),
:mod:`.checkpoint` (run directory, resume state), :mod:`.distributed` (torchrun set-up),
:mod:`.options` (command-line options). Imports are lazy: ``vimerge.train.options`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RetrainConfig": ".recipe", "lr_at": ".recipe", "resolve_accum": ".recipe",
    "param_groups": ".recipe", "no_decay_names": ".recipe", "EMA": ".recipe",
    "CosineSchedule": ".recipe",
    "retrain": ".loop", "RetrainResult": ".loop", "NonFiniteLossError": ".loop",
    "RunDirError": ".checkpoint", "load_retrained": ".checkpoint",
    "LightAugment": ".augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
