"""Set-up of a training run, as functions: data, model (+ teacher, reduction), optimizer,
augmentation and step plan, gathered in a :class:`Training` (what one epoch needs)."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from ..data import subset_evenly
from ..factory import Weights, WeightsRecord, read_weights
from ..models import create_backbone, load_checkpoint, model_defaults
from ..reduce import apply
from .augment import LightAugment, TimmBatchAugment, require_timm
from .data import num_classes_of, open_data, subset_indices
from .distributed import DistEnv
from .loss import RetrainLoss
from .recipe import EMA, CosineSchedule, RetrainConfig, build_optimizer, resolve_accum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of a run: ``accum`` micro-batches a step, ``effective_batch`` samples
    a step (all processes), ``indices`` of the training samples used, ``micro_per_epoch``
    micro-batches and ``steps_per_epoch`` optimizer steps an epoch, ``total_steps``."""

    accum: int
    effective_batch: int
    indices: list[int]
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class Training:
    """The built parts of a run: what :func:`vimerge.train.epoch.run_epoch` uses."""

    cfg: RetrainConfig
    env: DistEnv
    train_data: Dataset
    val_data: Dataset | None
    model: nn.Module              # the trained model (with its reduction), on the device
    ddp: nn.Module                # ``model`` or its DistributedDataParallel wrapper
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    scaler: Any                   # torch.amp.GradScaler under fp16, else None
    amp_dtype: torch.dtype | None
    criterion: RetrainLoss
    light: LightAugment | None
    timm_aug: TimmBatchAugment | None
    plan: StepPlan
    record: WeightsRecord         # what the weights will record (arch + reduction)

    @property
    def reducer(self) -> Any:
        return self.model.reduction

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)


def build_training(cfg: RetrainConfig, env: DistEnv, train_data: Dataset | None = None,
                   val_data: Dataset | None = None, weights: Weights | None = None) -> Training:
    """Data, model (+ teacher, reduction), optimizer, augmentation and step plan of ``cfg``.

    ``weights``: ``cfg.checkpoint`` already read (:func:`vimerge.factory.read_weights`); None
    reads it here (once). The random draws happen in a fixed order (the model's fresh head from
    ``cfg.seed`` on every process), so that a resumed run builds the same parts."""
    img_size, channels = input_shape(cfg)
    train_data, val_data = open_datasets(cfg, train_data, val_data, img_size, channels)
    num_classes = cfg.num_classes or num_classes_of(train_data) or 1000
    model = build_model(cfg, num_classes, img_size, weights)
    teacher = make_teacher(cfg, model, env.device)
    apply(model, cfg.reduce)
    model = model.to(env.device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None
    optimizer = build_optimizer(model, cfg)
    amp_dtype = amp_dtype_of(cfg.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype == torch.float16 else None
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        ddp: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    else:
        ddp = model
    criterion = RetrainLoss(cfg.label_smoothing, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau)
    light, timm_aug = make_augment(cfg, model, train_data, num_classes)
    plan = plan_steps(cfg, env.world_size, len(train_data))
    schedule = CosineSchedule(optimizer, plan.total_steps, cfg.lr, cfg.min_lr, plan.warmup_steps, cfg.warmup_lr)
    return Training(cfg, env, train_data, val_data, model, ddp, ema, optimizer, schedule, scaler, amp_dtype,
                    criterion, light, timm_aug, plan, WeightsRecord.of_model(model, cfg.model, cfg.model_kwargs))


def input_shape(cfg: RetrainConfig) -> tuple[Any, int]:
    """``(img_size, channels)`` of the model: the configuration's, else the preset's."""
    defaults = model_defaults(cfg.model)
    channels = int(cfg.model_kwargs.get("in_chans", defaults.get("in_chans", 3)))
    img_size = cfg.img_size or cfg.model_kwargs.get("img_size") or defaults.get("img_size", 224)
    return img_size, channels


def open_datasets(cfg: RetrainConfig, train_data: Dataset | None, val_data: Dataset | None,
                  img_size: Any, channels: int) -> tuple[Dataset, Dataset | None]:
    """The training and evaluation sets: those given, else opened from ``cfg.data`` (the
    evaluation set cut to ``cfg.eval_limit`` images, evenly spread)."""
    if train_data is None:
        if not cfg.data:
            raise ValueError("no training data: give data=DIR (--data DIR) or train_data=...")
        frames = cfg.model_kwargs.get("num_frames", model_defaults(cfg.model).get("num_frames"))
        train_data, opened = open_data(cfg.data, img_size, channels, val=cfg.val_data,
                                       augment=cfg.augment, rand_augment=cfg.rand_augment,
                                       eval_limit=cfg.eval_limit, num_frames=frames)
        if val_data is None:
            val_data = opened
        elif cfg.eval_limit is not None:
            val_data = Subset(val_data, subset_evenly(len(val_data), cfg.eval_limit))
    elif val_data is not None and cfg.eval_limit is not None:
        val_data = Subset(val_data, subset_evenly(len(val_data), cfg.eval_limit))
    if cfg.eval_limit is not None and val_data is None:
        raise ValueError(f"eval_limit ({cfg.eval_limit}) given, but there is no evaluation data"
                         + (f" ({cfg.data} has no validation split)" if cfg.data else "")
                         + ": drop it or give val_data= (--val-data)")
    return train_data, val_data


def build_model(cfg: RetrainConfig, num_classes: int, img_size: Any, weights: Weights | None = None) -> nn.Module:
    """The backbone of ``cfg`` (no reduction yet) with the weights of ``cfg.checkpoint``
    (``weights`` when already read), its fresh head drawn from ``cfg.seed``."""
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k not in ("num_classes", "img_size")}
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    kwargs.setdefault("scan_backend", cfg.scan_backend)
    if cfg.checkpoint is not None:
        if weights is not None and weights.source != cfg.checkpoint:
            raise ValueError(f"the weights given ({weights.source}) are not checkpoint= ({cfg.checkpoint})")
        weights = read_weights(cfg.checkpoint if weights is None else weights)
    torch.manual_seed(cfg.seed)   # the same fresh head (if any) on every process
    model = create_backbone(cfg.model, num_classes=num_classes, img_size=img_size, **kwargs)
    if cfg.checkpoint is not None:
        load_checkpoint(model, weights.content, name=weights.source)
    return model


def make_teacher(cfg: RetrainConfig, model: nn.Module, device: torch.device) -> nn.Module | None:
    """A frozen copy of the loaded model, before its reduction is installed (``cfg.distill``)."""
    if cfg.distill == "none":
        return None
    if cfg.checkpoint is None:
        log.warning("distillation without --checkpoint: the teacher is untrained")
    teacher = copy.deepcopy(model).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_augment(cfg: RetrainConfig, model: nn.Module, train_data: Dataset,
                 num_classes: int) -> tuple[LightAugment | None, TimmBatchAugment | None]:
    """The batch augmentations: light crop + flip (unless the dataset augments its PIL images
    itself) and timm's mixup/cutmix/erasing (``augment="timm"``)."""
    crop = cfg.crop
    if crop == "auto":
        crop = "pad" if min(model.img_size) <= 64 else "rrc"
    pil_augmented = bool(getattr(train_data, "pil_augmented", False))
    light = (LightAugment(crop, cfg.crop_padding, cfg.rrc_scale, cfg.hflip)
             if cfg.augment in ("light", "timm") and not pil_augmented else None)
    timm_aug = None
    if cfg.augment == "timm":
        require_timm()
        timm_aug = TimmBatchAugment(num_classes, cfg.mixup, cfg.cutmix, cfg.reprob, cfg.label_smoothing)
    return light, timm_aug


def data_seed(cfg: RetrainConfig) -> int:
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def plan_steps(cfg: RetrainConfig, world_size: int, dataset_size: int) -> StepPlan:
    """The :class:`StepPlan` of ``cfg`` on ``world_size`` processes and ``dataset_size`` samples.

    Raises:
        ValueError: the samples make no full optimizer step.
    """
    accum, eff_batch = resolve_accum(cfg.batch_size, world_size, cfg.effective_batch, cfg.accum_steps)
    indices = subset_indices(dataset_size, cfg.fraction, data_seed(cfg))
    per_micro = cfg.batch_size * world_size
    micro_per_epoch = (len(indices) // per_micro) // accum * accum
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(indices)} training samples make no full optimizer step "
                         f"of the effective batch {eff_batch} (= {cfg.batch_size} per "
                         f"device x {accum} accumulation x {world_size} processes); lower "
                         f"effective_batch= / batch_size= (--effective-batch / --batch-size) or raise "
                         f"fraction= (--fraction)")
    warmup = cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)
    return StepPlan(accum, eff_batch, indices, micro_per_epoch, steps_per_epoch,
                    cfg.epochs * steps_per_epoch, warmup)


def seed_process(cfg: RetrainConfig, env: DistEnv) -> None:
    """Seed python, numpy and torch with ``cfg.seed + rank``."""
    s = cfg.seed + env.rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def amp_dtype_of(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``RetrainConfig.amp`` on ``device`` (None: full precision)."""
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
