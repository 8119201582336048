"""Training and re-training of (token-reduced) models: the "Re-training" of R-MeeTo, and
training from scratch (``vimerge train``) with the same loop.

>>> from vimerge.train import RetrainConfig, retrain, load_retrained
>>> cfg = RetrainConfig(model="vim_small", checkpoint="vim_s_midclstok_80p5acc.pth",
...                     data="/data/imagenet", reduce="rmeeto:r=11",
...                     epochs=3, output="runs/vim_s_r11")
>>> result = retrain(cfg)                 # or: torchrun --nproc_per_node 8 -m vimerge retrain ...
>>> model = load_retrained("runs/vim_s_r11/final.pth")   # weights + reduction re-applied

Modules (see docs/architecture.md): :mod:`.recipe` (the configuration, its option rules and
flags; schedule, parameter groups, EMA), :mod:`.setup` (set-up functions: data, model,
optimizer, augmentation, step plan), :mod:`.epoch` (one epoch; validation), :mod:`.loop` (the
run: :func:`retrain`), :mod:`.rundir` (the run directory: lock, resume state, atomic writes),
:mod:`.loss`, :mod:`.log`, :mod:`.data` (subset and resumable order), :mod:`.augment`,
:mod:`.distributed` (torchrun set-up).
"""

from __future__ import annotations

from .augment import LightAugment
from .epoch import NonFiniteLossError
from .log import RunLog
from .loop import RetrainInterrupted, RetrainResult, retrain
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
from .rundir import NothingToResume, Progress, RunDir, RunDirError, RunState, load_retrained

__all__ = ["BASE_RECIPE", "CosineSchedule", "EMA", "LightAugment", "NonFiniteLossError", "NothingToResume",
           "Progress", "RetrainConfig", "RetrainInterrupted", "RetrainLoss", "RetrainResult", "RunDir",
           "RunDirError", "RunLog", "RunState", "load_retrained", "lr_at", "no_decay_names", "param_groups",
           "recipe_defaults", "resolve_accum", "retrain"]
