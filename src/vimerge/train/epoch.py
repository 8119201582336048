"""One epoch of training (:func:`run_epoch`) and validation (:func:`validate`).

One optimizer step is ``accum`` micro-batches (forward + backward, the gradient summed over the
processes by DDP on the last one), then gradient clipping, the optimizer, the learning-rate
schedule and the EMA (a Ctrl-C arriving during that update is taken at its end, so that the
state stays whole: :func:`deferred_interrupt`). Validation is
:func:`vimerge.measure.evaluate.evaluate` on each process's shard of the evaluation set, the
counts summed over processes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..measure.evaluate import evaluate
from .augment import batch_generator
from .data import ResumableBatchSampler, collate_eval, collate_train
from .distributed import all_reduce_sum
from .log import RunLog
from .rundir import Progress
from .setup import Training, data_seed


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped, its last checkpoint kept."""


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
class StepHooks:
    """What :func:`run_epoch` calls: ``save()`` writes ``last.pth`` at the current step,
    ``boundary()`` records the random state of a finished step (what a Ctrl-C saves),
    ``nonfinite_hint()`` says which checkpoint a non-finite loss leaves, ``on_step`` is the
    user's hook (or None)."""

    save: Callable[[], None]
    boundary: Callable[[], None]
    nonfinite_hint: Callable[[], str]
    on_step: Callable[[dict[str, Any]], None] | None = None


@dataclass
class EpochReport:
    """What one call of :func:`run_epoch` did: ``steps`` optimizer steps with ``mean_loss``
    (mean of the steps' losses), ``last_loss``, ``elapsed`` seconds; ``complete``: the epoch
    reached its end (False: stopped at ``max_steps``)."""

    steps: int
    mean_loss: float
    last_loss: float | None
    elapsed: float
    complete: bool


def loader(t: Training, epoch: int, start_micro: int) -> DataLoader:
    """The training batches of ``epoch`` from micro-batch ``start_micro`` on, for this process."""
    cfg, env = t.cfg, t.env
    if hasattr(t.train_data, "epoch"):      # a video dataset draws its frames per (seed, epoch, index)
        t.train_data.epoch = epoch
    sampler = ResumableBatchSampler(t.plan.indices, cfg.batch_size, t.plan.micro_per_epoch, data_seed(cfg),
                                    epoch, env.rank, env.world_size, start_micro)
    return DataLoader(t.train_data, batch_sampler=sampler, num_workers=cfg.workers,
                      collate_fn=collate_train, pin_memory=env.device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      persistent_workers=False)


def run_epoch(t: Training, progress: Progress, logger: RunLog, hooks: StepHooks) -> EpochReport:
    """Train the rest of epoch ``progress.epoch`` from ``progress.step_in_epoch``, advancing
    ``progress`` step by step; returns early after step ``cfg.max_steps`` (saved, as an
    interruption would be). Raises :class:`NonFiniteLossError` on a non-finite loss."""
    cfg, env, plan = t.cfg, t.env, t.plan
    start = progress.step_in_epoch * plan.accum
    bar = tqdm(total=plan.steps_per_epoch, initial=progress.step_in_epoch, dynamic_ncols=True,
               desc=f"epoch {progress.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and env.is_main),
               file=sys.stderr, leave=True)
    t.ddp.train()
    loss_sum = torch.zeros(3, dtype=torch.float64, device=env.device)   # sum, bad, count
    epoch_loss, steps, last_loss = 0.0, 0, None
    t_epoch = t_log = time.perf_counter()
    log_images = 0
    with bar:
        for i, (images, labels) in enumerate(loader(t, progress.epoch, start)):
            if not backward(t, progress.epoch, images, labels, start + i, loss_sum):
                continue
            mean_loss = step_loss(t, loss_sum, progress, logger, hooks)
            lr = t.schedule.get_lr()
            with deferred_interrupt():      # the update, the counters and the random state: all or nothing
                optimizer_step(t)
                progress.global_step += 1
                progress.step_in_epoch += 1
                hooks.boundary()
            last_loss = mean_loss
            epoch_loss += mean_loss
            steps += 1
            log_images += plan.effective_batch
            bar.update(1)
            if cfg.log_every and progress.global_step % cfg.log_every == 0:
                now = time.perf_counter()
                logger.write(event="step", epoch=progress.epoch, step=progress.global_step, loss=mean_loss,
                             lr=lr, throughput=log_images / max(now - t_log, 1e-9))
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                t_log, log_images = now, 0
            end_of_epoch = progress.step_in_epoch == plan.steps_per_epoch
            stop = cfg.max_steps is not None and progress.global_step >= cfg.max_steps
            if not end_of_epoch and (stop or (cfg.save_every and progress.global_step % cfg.save_every == 0)):
                hooks.save()
            if hooks.on_step is not None:
                hooks.on_step({"step": progress.global_step, "epoch": progress.epoch, "loss": mean_loss,
                               "step_in_epoch": progress.step_in_epoch, "lr": lr, "model": t.model})
            if stop and not end_of_epoch:
                return EpochReport(steps, epoch_loss / max(steps, 1), last_loss,
                                   time.perf_counter() - t_epoch, complete=False)
    return EpochReport(steps, epoch_loss / max(steps, 1), last_loss, time.perf_counter() - t_epoch, complete=True)


def augment(t: Training, epoch: int, images: torch.Tensor, labels: torch.Tensor, micro: int):
    """The batch augmentations of micro-batch ``micro`` (light: from its own generator, the
    rows of this process in the global batch)."""
    if t.light is not None:
        b, r = t.cfg.batch_size, t.env.rank
        gen = batch_generator(t.cfg.seed, epoch, micro)
        images = t.light(images, gen, rows=slice(r * b, (r + 1) * b), global_n=b * t.env.world_size)
    if t.timm_aug is not None:
        images, labels = t.timm_aug(images, labels)
    return images, labels


def backward(t: Training, epoch: int, images: torch.Tensor, labels: torch.Tensor, micro: int,
             loss_sum: torch.Tensor) -> bool:
    """Forward and backward of micro-batch ``micro``; adds its loss to ``loss_sum`` (sum,
    non-finite count, count). True when it completes an optimizer step's accumulation."""
    env, accum = t.env, t.plan.accum
    images = images.to(env.device, non_blocking=True)
    labels = labels.to(env.device, non_blocking=True)
    images, labels = augment(t, epoch, images, labels, micro)
    boundary = (micro + 1) % accum == 0
    sync = boundary or not env.distributed
    with contextlib.nullcontext() if sync else t.ddp.no_sync():
        with t.autocast():
            loss = t.criterion(images, t.ddp(images), labels)
        lv = loss.detach().double()
        loss_sum[0] += lv
        loss_sum[1] += (~torch.isfinite(lv)).double()
        loss_sum[2] += 1
        scaled = loss / accum
        (t.scaler.scale(scaled) if t.scaler is not None else scaled).backward()
    return boundary


def step_loss(t: Training, loss_sum: torch.Tensor, progress: Progress, logger: RunLog, hooks: StepHooks) -> float:
    """The mean micro-batch loss of the step over all processes (``loss_sum`` is reset);
    raises :class:`NonFiniteLossError` (logged) when any was not finite."""
    stats = all_reduce_sum(t.env, loss_sum.clone()).tolist()
    loss_sum.zero_()
    mean_loss = stats[0] / stats[2]
    if stats[1] > 0 or not math.isfinite(mean_loss):
        value = mean_loss if not math.isfinite(mean_loss) else float("nan")
        message = (f"training loss is {value} at epoch {progress.epoch + 1}, update "
                   f"{progress.global_step + 1} (lr {t.schedule.get_lr():.3g}); stopped; {hooks.nonfinite_hint()}")
        logger.write(event="nonfinite", epoch=progress.epoch, step=progress.global_step + 1,
                     loss=str(value), message=message)
        raise NonFiniteLossError(message)
    return mean_loss


def optimizer_step(t: Training) -> None:
    """Unscale, clip, step, zero the gradients; then the schedule and the EMA."""
    if t.scaler is not None:
        t.scaler.unscale_(t.optimizer)
    if t.cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.clip_grad)
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.schedule.step()
    if t.ema is not None:
        t.ema.update(t.model)


def validate(t: Training, model: nn.Module) -> float | None:
    """Top-1 accuracy (a fraction) of ``model`` on the evaluation set, each process
    evaluating every ``world_size``-th image; None without an evaluation set or images."""
    if t.val_data is None:
        return None
    env = t.env
    shard = Subset(t.val_data, range(env.rank, len(t.val_data), env.world_size))
    batches = DataLoader(shard, batch_size=t.cfg.eval_batch_size or t.cfg.batch_size,
                         num_workers=t.cfg.workers, collate_fn=collate_eval,
                         pin_memory=env.device.type == "cuda")
    metrics = evaluate(model, batches, device=env.device, progress=False, amp_dtype=t.amp_dtype)
    counts = torch.tensor([metrics["correct"], metrics["images"]], dtype=torch.float64, device=env.device)
    all_reduce_sum(env, counts)
    return float(counts[0] / counts[1]) if counts[1] > 0 else None
