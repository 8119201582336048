"""The re-training loop: :func:`retrain` (one process, or one of a torchrun group).

One optimizer step is ``accum`` micro-batches (forward + backward, the gradient summed over the
processes by DDP on the last one), then gradient clipping, the optimizer, the learning-rate
schedule and the EMA (a Ctrl-C arriving during that update is taken at its end, so that the
state stays whole). Validation is :func:`vimerge.measure.evaluate.evaluate` on each
process's shard of the evaluation set, the counts summed over processes. The loss is
:class:`vimerge.train.loss.RetrainLoss`, the log :class:`vimerge.train.log.RunLog`.

Ctrl-C (KeyboardInterrupt) during the run writes ``last.pth`` with the state of the last finished
optimizer step (atomically) and raises :class:`RetrainInterrupted`; ``resume=True`` continues
from there, with the weights of an uninterrupted run (single process: bit for bit; a torchrun
group saves rank 0's random state only, see :meth:`_Run._save_interrupted`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..data import subset_evenly
from ..measure.evaluate import evaluate
from ..models import create_backbone, model_defaults
from ..models.checkpoint import save_checkpoint
from ..reduce import apply
from . import rundir as ck
from .augment import LightAugment, TimmBatchAugment, batch_generator, require_timm
from .data import (
    ResumableBatchSampler,
    collate_eval,
    collate_train,
    num_classes_of,
    open_data,
    subset_indices,
)
from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_object, cleanup, gather_objects, setup
from .log import RunLog
from .loss import RetrainLoss
from .recipe import EMA, RESUME_MUTABLE, CosineSchedule, RetrainConfig, build_optimizer, resolve_accum

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped, its last checkpoint kept."""


class RetrainInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run; ``checkpoint`` (``last.pth``, or None when none could be written)
    holds optimizer step ``step``, and ``resume=True`` continues from it."""

    def __init__(self, message: str, checkpoint: str | None, step: int):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back Ctrl-C (SIGINT) inside the block and raise it at the block's end, so that the
    state the block changes (an optimizer update, a checkpoint) is never left half done. Only
    in the main thread (elsewhere signals cannot be handled: the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if previous is signal.default_int_handler:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signal.SIGINT, None)


@dataclass
class RetrainResult:
    output: str
    status: str                      # "finished", "stopped" (max_steps) or "already-finished"
    global_step: int = 0
    epochs_done: int = 0
    steps_per_epoch: int = 0
    accum_steps: int = 1
    effective_batch: int = 0
    world_size: int = 1
    final_checkpoint: str | None = None
    last_loss: float | None = None
    eval_acc: float | None = None
    eval_acc_ema: float | None = None
    epoch_times: list[float] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)


def retrain(config: RetrainConfig, *, train_data: Dataset | None = None,
            val_data: Dataset | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> RetrainResult:
    """Re-train a token-reduced Vim with the paper's recipe (see :class:`RetrainConfig`).

    Args:
        config: the run's options; ``config.output`` is the run directory.
        train_data, val_data: datasets of ``(image tensor, label)`` used instead of
            ``config.data`` (e.g. a ``TensorDataset``).
        on_step: called on every process after each optimizer step (and its checkpoint) with
            ``{"step", "epoch", "step_in_epoch", "loss", "lr", "model"}``; an exception it
            raises ends the run as a crash would.

    Under ``torchrun`` every process calls this; the process group is set up from the
    environment (NCCL on GPU, gloo on CPU) and torn down at the end.
    """
    env = setup(config.device, config.dist_backend)
    try:
        return _Run(config, env, train_data, val_data, on_step).run()
    finally:
        cleanup(env)


def amp_dtype_of(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``RetrainConfig.amp`` on ``device`` (None: full precision)."""
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


class _Run:
    """One process's share of a run; :meth:`run` does it."""

    def __init__(self, config: RetrainConfig, env: DistEnv, train_data, val_data, on_step):
        self.cfg, self.env, self.on_step = config, env, on_step
        self.train_data, self.val_data = train_data, val_data
        self.out = Path(config.output)

    # ----------------------------------------------------------------------------- run

    def run(self) -> RetrainResult:
        status = self._check_run_dir()
        if status == "finished":
            self._say(f"{self.out} already holds a finished run; nothing to do (--overwrite "
                      f"starts over)")
            return RetrainResult(str(self.out), "already-finished",
                                 final_checkpoint=str(self.out / ck.FINAL))
        state = None
        if status == "fresh" and self.cfg.resume and self.env.is_main:
            log.info("nothing to resume in %s: starting a new run there", self.out)   # resume=True: as documented
        if status == "resume":
            state = ck.load_state(self.out / ck.LAST)
            self.cfg = self._resume_config(state)
        self._build()
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.saved_step: int | None = None
        self.stopped = False
        self._seed_process()
        if state is not None:
            self._load(state)
            del state
        self.boundary_rng = ck.rng_state(self.reducer)   # random state at the last step boundary
        env, cfg = self.env, self.cfg
        if env.is_main:
            ck.write_json(self.out / ck.CONFIG, cfg.to_dict())
        self.logger = RunLog(self.out / ck.LOG, env.is_main, cfg.tensorboard)
        result = RetrainResult(str(self.out), "finished", steps_per_epoch=self.steps_per_epoch,
                               accum_steps=self.accum, effective_batch=self.eff_batch,
                               world_size=env.world_size)
        with self.logger:
            self._log_start()
            try:
                while self.epoch < cfg.epochs and not self.stopped:
                    self._epoch(result)
                result.global_step, result.epochs_done = self.global_step, self.epoch
                if self.epoch < cfg.epochs:
                    result.status = "stopped"
                    self.logger.write(event="stopped", step=self.global_step, epoch=self.epoch,
                                      step_in_epoch=self.step_in_epoch)
                    self._say(f"stopped at step {self.global_step} (max_steps); continue with --resume")
                else:
                    self._finish(result)
            except KeyboardInterrupt as exc:
                raise self._interrupted() from exc
        result.model = self.model.eval()
        barrier(env)
        return result

    def _log_start(self) -> None:
        cfg, env = self.cfg, self.env
        self.logger.write(event="resume" if self.global_step else "start", step=self.global_step,
                          epoch=self.epoch, effective_batch=self.eff_batch,
                          per_device_batch=cfg.batch_size, accum_steps=self.accum,
                          world_size=env.world_size, steps_per_epoch=self.steps_per_epoch,
                          total_steps=self.total_steps, train_samples=len(self.indices),
                          reduction=self._reduction(), model=cfg.model, recipe=cfg.recipe,
                          checkpoint=cfg.checkpoint, lr=cfg.lr, augment=cfg.augment)
        self._say(f"retrain {cfg.model} + {cfg.reduce} (recipe {cfg.recipe}; weights "
                  f"{cfg.checkpoint or 'random'}): {env.world_size} "
                  f"process(es) x batch {cfg.batch_size} x accumulation {self.accum} = "
                  f"effective batch {self.eff_batch}; {len(self.indices)} samples, "
                  f"{cfg.epochs} epoch(s) x {self.steps_per_epoch} steps"
                  + (f", resuming at step {self.global_step}" if self.global_step else ""))

    def _interrupted(self) -> RetrainInterrupted:
        """Save the state of the last finished step (when not saved yet) and log the interruption."""
        where: str | None = str(self.out / ck.LAST)
        try:
            with deferred_interrupt():
                self._save_interrupted()
        except KeyboardInterrupt:   # a second Ctrl-C, held back until the file was written
            where = str(self.out / ck.LAST) if (self.out / ck.LAST).exists() else None
        message = (f"interrupted at step {self.global_step} of {self.total_steps} (epoch "
                   f"{self.epoch + 1}/{self.cfg.epochs}); "
                   + (f"{where} holds it: to continue, run again with resume=True (on the command "
                      f"line: the same command plus --resume)" if where else "no checkpoint was written"))
        self.logger.write(event="interrupted", step=self.global_step, epoch=self.epoch,
                          step_in_epoch=self.step_in_epoch, checkpoint=where)
        return RetrainInterrupted(message, where, self.global_step)

    def _save_interrupted(self) -> None:
        """Write ``last.pth`` at the last finished step unless it holds that step already.

        No collective operation here (the other processes may be gone): rank 0 writes its own
        random state only, which every process takes on resume (a warning says that the random
        streams of the other processes then differ from an uninterrupted run)."""
        if self.saved_step == self.global_step and (self.out / ck.LAST).exists():
            return
        if self.env.is_main:
            ck.save_state(self.out / ck.LAST, self.model.state_dict(), rng=[self.boundary_rng],
                          **self._state())
        self.saved_step = self.global_step

    def _finish(self, result: RetrainResult) -> None:
        final = self.out / ck.FINAL
        if self.env.is_main:
            extra: dict[str, Any] = dict(reduction=self._reduction(), arch=self._arch(),
                                         config=self.cfg.to_dict(), epoch=self.epoch,
                                         global_step=self.global_step, eval_acc=result.eval_acc)
            if self.ema is not None:
                extra["model_ema"] = self.ema.module.state_dict()
                extra["eval_acc_ema"] = result.eval_acc_ema
            save_checkpoint(self.model, final, **extra)
        self.logger.write(event="end", step=self.global_step, epoch=self.epoch,
                          final=str(final), eval_acc=result.eval_acc)
        self._say(f"done: {final}")
        result.final_checkpoint = str(final)

    def _say(self, text: str) -> None:
        if self.env.is_main:
            if self.cfg.progress:
                print(text, file=sys.stderr, flush=True)
            else:
                log.info(text)

    # ----------------------------------------------------------------------------- set-up

    def _check_run_dir(self) -> str:
        status, error, kind = None, None, None
        if self.env.is_main:
            try:
                status = ck.prepare_run_dir(self.out, resume=self.cfg.resume,
                                            overwrite=self.cfg.overwrite)
            except (ck.RunDirError, ck.NothingToResume) as exc:
                error, kind = str(exc), type(exc).__name__
        status, error, kind = broadcast_object(self.env, (status, error, kind))
        if error:
            raise (ck.NothingToResume if kind == "NothingToResume" else ck.RunDirError)(error)
        return status

    def _resume_config(self, state: dict[str, Any]) -> RetrainConfig:
        stored = RetrainConfig.from_dict(state["config"])
        given = self.cfg
        changed = [f"{k} ({getattr(given, k)!r}; the run has {v!r})"
                   for k, v in vars(stored).items()
                   if k not in RESUME_MUTABLE and getattr(given, k) != v]
        if changed and self.env.is_main:
            log.warning("resuming %s with its own settings; ignored: %s", self.out, ", ".join(changed))
        for name in RESUME_MUTABLE:
            value = getattr(given, name)
            if name in ("checkpoint", "pretrained") and not value:
                continue      # the run keeps the weights it started from (the teacher's too)
            setattr(stored, name, value)
        return stored

    def _build(self) -> None:
        """Data, model (+ teacher, reduction), optimizer, augmentation and step counts."""
        img_size, channels = self._input_shape()
        self._open_data(img_size, channels)
        num_classes = self.cfg.num_classes or num_classes_of(self.train_data) or 1000
        model = self._create_model(num_classes, img_size)
        teacher = self._teacher(model)
        apply(model, self.cfg.reduce)
        self._setup_training(model)
        self.criterion = RetrainLoss(self.cfg.label_smoothing, teacher, self.cfg.distill,
                                     self.cfg.distill_alpha, self.cfg.distill_tau)
        self._setup_augment(num_classes)
        self._plan_steps()

    def _input_shape(self) -> tuple[Any, int]:
        cfg = self.cfg
        defaults = model_defaults(cfg.model)
        channels = int(cfg.model_kwargs.get("in_chans", defaults.get("in_chans", 3)))
        img_size = cfg.img_size or cfg.model_kwargs.get("img_size") or defaults.get("img_size", 224)
        return img_size, channels

    def _open_data(self, img_size: Any, channels: int) -> None:
        cfg = self.cfg
        if self.train_data is None:
            if not cfg.data:
                raise ValueError("no training data: give data=DIR (--data DIR) or train_data=...")
            frames = cfg.model_kwargs.get("num_frames", model_defaults(cfg.model).get("num_frames"))
            self.train_data, val = open_data(cfg.data, img_size, channels, val=cfg.val_data,
                                             augment=cfg.augment, rand_augment=cfg.rand_augment,
                                             eval_limit=cfg.eval_limit, num_frames=frames)
            if self.val_data is None:
                self.val_data = val
            elif cfg.eval_limit is not None:
                self.val_data = Subset(self.val_data, subset_evenly(len(self.val_data), cfg.eval_limit))
        elif self.val_data is not None and cfg.eval_limit is not None:
            self.val_data = Subset(self.val_data, subset_evenly(len(self.val_data), cfg.eval_limit))
        if cfg.eval_limit is not None and self.val_data is None:
            raise ValueError(f"eval_limit ({cfg.eval_limit}) given, but there is no evaluation data"
                             + (f" ({cfg.data} has no validation split)" if cfg.data else "")
                             + ": drop it or give val_data= (--val-data)")

    def _create_model(self, num_classes: int, img_size: Any) -> nn.Module:
        cfg = self.cfg
        kwargs = {k: v for k, v in cfg.model_kwargs.items() if k not in ("num_classes", "img_size")}
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        kwargs.setdefault("scan_backend", cfg.scan_backend)
        torch.manual_seed(cfg.seed)   # the same fresh head (if any) on every process
        return create_backbone(cfg.model, checkpoint=cfg.checkpoint, num_classes=num_classes,
                            img_size=img_size, **kwargs)

    def _teacher(self, model: nn.Module) -> nn.Module | None:
        """A frozen copy of the loaded model, before its reduction is installed."""
        if self.cfg.distill == "none":
            return None
        if self.cfg.checkpoint is None:
            log.warning("distillation without --checkpoint: the teacher is untrained")
        teacher = copy.deepcopy(model).to(self.env.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _setup_training(self, model: nn.Module) -> None:
        cfg, env = self.cfg, self.env
        self.model = model.to(env.device)
        self.reducer = model.reduction
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.optimizer = build_optimizer(self.model, cfg)
        self.amp_dtype = amp_dtype_of(cfg.amp, env.device)
        self.scaler = (torch.amp.GradScaler(env.device.type) if self.amp_dtype == torch.float16
                       else None)
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = self.model

    def _setup_augment(self, num_classes: int) -> None:
        cfg = self.cfg
        crop = cfg.crop
        if crop == "auto":
            crop = "pad" if min(self.model.img_size) <= 64 else "rrc"
        pil_augmented = bool(getattr(self.train_data, "pil_augmented", False))
        self.light = (LightAugment(crop, cfg.crop_padding, cfg.rrc_scale, cfg.hflip)
                      if cfg.augment in ("light", "timm") and not pil_augmented else None)
        self.timm_aug = None
        if cfg.augment == "timm":
            require_timm()
            self.timm_aug = TimmBatchAugment(num_classes, cfg.mixup, cfg.cutmix, cfg.reprob,
                                             cfg.label_smoothing)

    def _plan_steps(self) -> None:
        cfg, w = self.cfg, self.env.world_size
        self.accum, self.eff_batch = resolve_accum(cfg.batch_size, w, cfg.effective_batch,
                                                   cfg.accum_steps)
        self.indices = subset_indices(len(self.train_data), cfg.fraction, self._data_seed())
        g = cfg.batch_size * w
        self.micro_per_epoch = (len(self.indices) // g) // self.accum * self.accum
        self.steps_per_epoch = self.micro_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.indices)} training samples make no full optimizer step "
                             f"of the effective batch {self.eff_batch} (= {cfg.batch_size} per "
                             f"device x {self.accum} accumulation x {w} processes); lower "
                             f"effective_batch= / batch_size= (--effective-batch / --batch-size) or raise "
                             f"fraction= (--fraction)")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = cfg.warmup_steps or round(cfg.warmup_epochs * self.steps_per_epoch)
        self.schedule = CosineSchedule(self.optimizer, self.total_steps, cfg.lr, cfg.min_lr,
                                       warmup, cfg.warmup_lr)

    def _data_seed(self) -> int:
        return self.cfg.seed if self.cfg.data_seed is None else self.cfg.data_seed

    def _seed_process(self) -> None:
        s = self.cfg.seed + self.env.rank
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def _arch(self) -> dict[str, Any]:
        """What :func:`vimerge.train.load_retrained` needs to rebuild the model."""
        kwargs = dict(self.cfg.model_kwargs, num_classes=self.model.num_classes,
                      img_size=list(self.model.img_size))
        kwargs.pop("scan_backend", None)
        kwargs.pop("drop_path_rate", None)
        return {"name": self.cfg.model, "kwargs": kwargs}

    def _reduction(self) -> str:
        return ck.reduction_spec(self.model)

    # ----------------------------------------------------------------------------- state

    def _state(self) -> dict[str, Any]:
        return dict(
            optimizer=self.optimizer.state_dict(), scheduler=self.schedule.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            model_ema=self.ema.state_dict() if self.ema is not None else None,
            progress={"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                      "global_step": self.global_step, "finished": False},
            config=self.cfg.to_dict(), reduction=self._reduction(), arch=self._arch(),
            world_size=self.env.world_size, accum_steps=self.accum,
            effective_batch=self.eff_batch, steps_per_epoch=self.steps_per_epoch,
            data={"num_samples": len(self.indices), "dataset_size": len(self.train_data),
                  "micro_per_epoch": self.micro_per_epoch,
                  "next_micro_batch": self.step_in_epoch * self.accum})

    def _save(self) -> None:
        rngs = gather_objects(self.env, ck.rng_state(self.reducer))
        if self.env.is_main:
            ck.save_state(self.out / ck.LAST, self.model.state_dict(), rng=rngs, **self._state())
        self.saved_step = self.global_step

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("model_ema"):
            self.ema.load_state_dict(state["model_ema"])
        p = state["progress"]
        self.epoch, self.step_in_epoch, self.global_step = p["epoch"], p["step_in_epoch"], p["global_step"]
        data = state.get("data", {})
        if data and data.get("dataset_size") != len(self.train_data):
            log.warning("the training set has %d samples, the interrupted run had %s: the "
                        "resumed data order differs", len(self.train_data), data.get("dataset_size"))
        if state.get("world_size") != self.env.world_size:
            log.warning("resuming a run of %s processes with %s: the batches and random states "
                        "differ from an uninterrupted run", state.get("world_size"),
                        self.env.world_size)
        rngs = state["rng"]
        if len(rngs) != self.env.world_size and self.env.is_main:
            log.warning("the checkpoint holds the random state of %d process(es) for %d (a run "
                        "interrupted under torchrun): the random streams differ from an "
                        "uninterrupted run", len(rngs), self.env.world_size)
        ck.set_rng_state(rngs[self.env.rank % len(rngs)], self.reducer)
        self.saved_step = self.global_step

    # ----------------------------------------------------------------------------- steps

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _loader(self, start_micro: int) -> DataLoader:
        cfg, env = self.cfg, self.env
        if hasattr(self.train_data, "epoch"):      # a video dataset draws its frames per (seed, epoch, index)
            self.train_data.epoch = self.epoch
        sampler = ResumableBatchSampler(self.indices, cfg.batch_size, self.micro_per_epoch,
                                        self._data_seed(), self.epoch, env.rank, env.world_size,
                                        start_micro)
        return DataLoader(self.train_data, batch_sampler=sampler, num_workers=cfg.workers,
                          collate_fn=collate_train, pin_memory=env.device.type == "cuda",
                          generator=torch.Generator().manual_seed(cfg.seed + self.epoch),
                          persistent_workers=False)

    def _augment(self, images: torch.Tensor, labels: torch.Tensor, micro: int):
        if self.light is not None:
            b, r = self.cfg.batch_size, self.env.rank
            gen = batch_generator(self.cfg.seed, self.epoch, micro)
            images = self.light(images, gen, rows=slice(r * b, (r + 1) * b),
                                global_n=b * self.env.world_size)
        if self.timm_aug is not None:
            images, labels = self.timm_aug(images, labels)
        return images, labels

    def _backward(self, images: torch.Tensor, labels: torch.Tensor, micro: int,
                  loss_sum: torch.Tensor) -> bool:
        """Forward and backward of micro-batch ``micro``; adds its loss to ``loss_sum`` (sum,
        non-finite count, count). True when it completes an optimizer step's accumulation."""
        env = self.env
        images = images.to(env.device, non_blocking=True)
        labels = labels.to(env.device, non_blocking=True)
        images, labels = self._augment(images, labels, micro)
        boundary = (micro + 1) % self.accum == 0
        sync = boundary or not env.distributed
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            with self._autocast():
                loss = self.criterion(images, self.ddp(images), labels)
            lv = loss.detach().double()
            loss_sum[0] += lv
            loss_sum[1] += (~torch.isfinite(lv)).double()
            loss_sum[2] += 1
            scaled = loss / self.accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return boundary

    def _mean_loss(self, loss_sum: torch.Tensor) -> float:
        """The mean micro-batch loss of the step over all processes (``loss_sum`` is reset);
        raises :class:`NonFiniteLossError` when any was not finite."""
        stats = all_reduce_sum(self.env, loss_sum.clone()).tolist()
        loss_sum.zero_()
        mean_loss = stats[0] / stats[2]
        if stats[1] > 0 or not math.isfinite(mean_loss):
            self._nonfinite(mean_loss if not math.isfinite(mean_loss) else float("nan"))
        return mean_loss

    def _optimizer_step(self) -> None:
        """Unscale, clip, step, zero the gradients; then the schedule, the EMA, the counters and
        the random state of the step boundary, all or nothing under Ctrl-C."""
        with deferred_interrupt():
            self._update()
            self.boundary_rng = ck.rng_state(self.reducer)

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1
        self.step_in_epoch += 1

    def _nonfinite(self, loss_value: float) -> None:
        where = (f"the last good checkpoint, {self.out / ck.LAST} (step {self.saved_step}), is "
                 f"kept: continue with resume=True (--resume), e.g. with a lower lr= (--lr) or with "
                 f"clip_grad= (--clip-grad)"
                 if self.saved_step is not None else "no checkpoint was written yet")
        message = (f"training loss is {loss_value} at epoch {self.epoch + 1}, update "
                   f"{self.global_step + 1} (lr {self.schedule.get_lr():.3g}); stopped; {where}")
        self.logger.write(event="nonfinite", epoch=self.epoch, step=self.global_step + 1,
                          loss=str(loss_value), message=message)
        raise NonFiniteLossError(message)

    def _epoch(self, result: RetrainResult) -> None:
        """The rest of the current epoch from ``step_in_epoch``; returns early at ``max_steps``."""
        cfg, env = self.cfg, self.env
        start = self.step_in_epoch * self.accum
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and env.is_main),
                   file=sys.stderr, leave=True)
        self.ddp.train()
        loss_sum = torch.zeros(3, dtype=torch.float64, device=env.device)   # sum, bad, count
        epoch_loss, epoch_n = 0.0, 0
        t_epoch = t_log = time.perf_counter()
        log_images = 0
        with bar:
            for i, (images, labels) in enumerate(self._loader(start)):
                if not self._backward(images, labels, start + i, loss_sum):
                    continue
                mean_loss = self._mean_loss(loss_sum)
                lr = self.schedule.get_lr()
                self._optimizer_step()
                result.last_loss = mean_loss
                epoch_loss += mean_loss
                epoch_n += 1
                log_images += self.eff_batch
                bar.update(1)
                if cfg.log_every and self.global_step % cfg.log_every == 0:
                    now = time.perf_counter()
                    self.logger.write(event="step", epoch=self.epoch, step=self.global_step,
                                      loss=mean_loss, lr=lr,
                                      throughput=log_images / max(now - t_log, 1e-9))
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                    t_log, log_images = now, 0
                end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                stop = cfg.max_steps is not None and self.global_step >= cfg.max_steps
                if not end_of_epoch and (stop or (cfg.save_every and self.global_step % cfg.save_every == 0)):
                    self._save()
                if self.on_step is not None:
                    self.on_step({"step": self.global_step, "epoch": self.epoch, "loss": mean_loss,
                                  "step_in_epoch": self.step_in_epoch, "lr": lr, "model": self.model})
                if stop and not end_of_epoch:
                    self.stopped = True
                    return
        self._end_epoch(result, time.perf_counter() - t_epoch, epoch_loss / max(epoch_n, 1), epoch_n)

    def _end_epoch(self, result: RetrainResult, elapsed: float, loss: float, steps: int) -> None:
        """Validation, the epoch's log record, the move to the next epoch and its checkpoint."""
        cfg = self.cfg
        due = self._eval_due()
        acc = self._validate(self.model) if due else None
        acc_ema = self._validate(self.ema.module) if self.ema is not None and due else None
        result.eval_acc, result.eval_acc_ema = acc, acc_ema
        result.epoch_times.append(elapsed)
        record = dict(event="epoch", epoch=self.epoch, step=self.global_step, loss=loss,
                      lr=self.schedule.get_lr(),
                      throughput=steps * self.eff_batch / max(elapsed, 1e-9),
                      epoch_time=elapsed, eval_acc=acc)
        if self.ema is not None:
            record["eval_acc_ema"] = acc_ema
        self.logger.write(**record)
        self._say(f"epoch {self.epoch + 1}/{cfg.epochs}: loss {loss:.4f}, "
                  f"{record['throughput']:.1f} img/s, {elapsed:.1f} s"
                  + (f", eval acc {acc:.4f}" if acc is not None else "")
                  + (f", EMA {acc_ema:.4f}" if acc_ema is not None else ""))
        with deferred_interrupt():
            self.epoch += 1
            self.step_in_epoch = 0
            self.stopped = cfg.max_steps is not None and self.global_step >= cfg.max_steps
            self._save()

    def _eval_due(self) -> bool:
        e = self.cfg.eval_every
        return bool(e) and ((self.epoch + 1) % e == 0 or self.epoch + 1 == self.cfg.epochs)

    # ----------------------------------------------------------------------------- validation

    def _validate(self, model: nn.Module) -> float | None:
        """Top-1 accuracy (a fraction) of ``model`` on the evaluation set, each process
        evaluating every ``world_size``-th image; None without an evaluation set or images."""
        if self.val_data is None:
            return None
        env = self.env
        shard = Subset(self.val_data, range(env.rank, len(self.val_data), env.world_size))
        loader = DataLoader(shard, batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
                            num_workers=self.cfg.workers, collate_fn=collate_eval,
                            pin_memory=env.device.type == "cuda")
        metrics = evaluate(model, loader, device=env.device, progress=False,
                           amp_dtype=self.amp_dtype)
        counts = torch.tensor([metrics["correct"], metrics["images"]], dtype=torch.float64,
                              device=env.device)
        all_reduce_sum(env, counts)
        return float(counts[0] / counts[1]) if counts[1] > 0 else None
