"""Re-training of token-reduced Vims (the "Re-training" of R-MeeTo).

>>> from vimerge.train import RetrainConfig, retrain, load_retrained
>>> cfg = RetrainConfig(model="vim_small", checkpoint="vim_s_midclstok_80p5acc.pth",
...                     data="/data/imagenet", reduce="rmeeto:r=11",
...                     epochs=3, output="runs/vim_s_r11")
>>> result = retrain(cfg)                 # or: torchrun --nproc_per_node 8 -m vimerge retrain ...
>>> model = load_retrained("runs/vim_s_r11/final.pth")   # weights + reduction re-applied

Modules: :mod:`.recipe` (config, schedule, parameter groups, EMA), :mod:`.loss` (the training
loss), :mod:`.loop` (the loop), :mod:`.log` (the run log), :mod:`.data` (subset and resumable
order), :mod:`.augment` (batch augmentation), :mod:`.rundir` (run directory, resume state),
:mod:`.distributed` (torchrun set-up).
"""

from __future__ import annotations

from .augment import LightAugment
from .log import RunLog
from .loop import NonFiniteLossError, RetrainInterrupted, RetrainResult, retrain
from .loss import RetrainLoss
from .recipe import (
    BASE_RECIPE,
    EMA,
    CosineSchedule,
    RetrainConfig,
    lr_at,
    no_decay_names,
    param_groups,
    recipe_defaults,
    resolve_accum,
)
from .rundir import NothingToResume, RunDirError, load_retrained

__all__ = ["BASE_RECIPE", "CosineSchedule", "EMA", "LightAugment", "NonFiniteLossError",
           "RetrainConfig", "RetrainLoss", "RetrainResult", "RunDirError", "RunLog",
           "NothingToResume", "RetrainInterrupted", "load_retrained", "lr_at", "no_decay_names", "param_groups", "recipe_defaults", "resolve_accum", "retrain"]
