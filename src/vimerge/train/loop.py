"""The training loop: :func:`retrain` (one process, or one of a torchrun group).

:func:`retrain` opens the run directory (:mod:`.rundir`), builds the run's parts
(:func:`.setup.build_training`), runs epochs (:func:`.epoch.run_epoch`), validates, saves
``last.pth`` (a :class:`~.rundir.RunState`) at epoch ends and ``final.pth`` at the end. The
loss is :class:`vimerge.train.loss.RetrainLoss`, the log :class:`vimerge.train.log.RunLog`. It
serves re-training a reduced model (``vimerge retrain``) and training from scratch
(``vimerge train``, :data:`~.recipe.BASE_RECIPE`) alike.

Ctrl-C (KeyboardInterrupt) during the run writes ``last.pth`` with the state of the last finished
optimizer step (atomically) and raises :class:`RetrainInterrupted`; ``resume=True`` continues
from there, with the weights of an uninterrupted run (single process: bit for bit; a torchrun
group saves rank 0's random state only, see :meth:`Checkpoints.save_interrupted`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch.utils.data import Dataset

from ..factory import Weights
from .distributed import DistEnv, barrier, broadcast_object, cleanup, gather_objects, setup
from .epoch import (
    EpochReport,
    NonFiniteLossError,  # noqa: F401  (its home before train/epoch.py)
    StepHooks,
    deferred_interrupt,
    run_epoch,
    validate,
)
from .log import RunLog
from .recipe import RESUME_MUTABLE, RetrainConfig
from .rundir import (
    NothingToResume,
    Progress,
    RunDir,
    RunDirError,
    RunState,
    rng_state,
    save_final,
    set_rng_state,
    write_json,
)
from .setup import Training, amp_dtype_of, build_training, seed_process  # noqa: F401  (amp_dtype_of: as before)

log = logging.getLogger(__name__)


class RetrainInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run; ``checkpoint`` (``last.pth``, or None when none could be written)
    holds optimizer step ``step``, and ``resume=True`` continues from it."""

    def __init__(self, message: str, checkpoint: str | None, step: int):
        super().__init__(message)
        self.checkpoint, self.step = checkpoint, step


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
            on_step: Callable[[dict[str, Any]], None] | None = None,
            weights: Weights | None = None) -> RetrainResult:
    """Train (or re-train a token-reduced) model with ``config``'s recipe (see :class:`RetrainConfig`).

    Args:
        config: the run's options; ``config.output`` is the run directory.
        train_data, val_data: datasets of ``(image tensor, label)`` used instead of
            ``config.data`` (e.g. a ``TensorDataset``).
        on_step: called on every process after each optimizer step (and its checkpoint) with
            ``{"step", "epoch", "step_in_epoch", "loss", "lr", "model"}``; an exception it
            raises ends the run as a crash would.
        weights: ``config.checkpoint`` already read by :func:`vimerge.factory.read_weights`
            (``vimerge retrain`` reads it once, for the model it records); None: read here.

    Returns:
        A :class:`RetrainResult` (``status`` ``"finished"``, ``"stopped"`` at ``max_steps`` or
        ``"already-finished"``; ``model``: the trained model in eval mode).

    Raises:
        RunDirError, NothingToResume: see :class:`~vimerge.train.rundir.RunDir`.
        NonFiniteLossError: the loss became NaN or infinite (``last.pth`` keeps the last good step).
        RetrainInterrupted: Ctrl-C (``last.pth`` holds the last finished step).

    Under ``torchrun`` every process calls this; the process group is set up from the
    environment (NCCL on GPU, gloo on CPU) and torn down at the end.
    """
    env = setup(config.device, config.dist_backend)
    run_dir = RunDir(config.output)
    try:
        status = open_run_dir(run_dir, config, env)
        if status == "finished":
            _say(config, env, f"{run_dir.path} already holds a finished run; nothing to do (--overwrite "
                              f"starts over)")
            return RetrainResult(str(run_dir.path), "already-finished", final_checkpoint=str(run_dir.final))
        if status == "fresh" and config.resume and env.is_main:
            log.info("nothing to resume in %s: starting a new run there", run_dir.path)   # resume=True
        return _run(config, env, run_dir, status == "resume", train_data, val_data, on_step, weights)
    finally:
        run_dir.close()
        cleanup(env)


def open_run_dir(run_dir: RunDir, config: RetrainConfig, env: DistEnv) -> str:
    """:meth:`RunDir.open` on the main process (which holds the lock), its answer or error on all."""
    status, error, kind = None, None, None
    if env.is_main:
        try:
            status = run_dir.open(resume=config.resume, overwrite=config.overwrite)
        except (RunDirError, NothingToResume) as exc:
            error, kind = str(exc), type(exc).__name__
    status, error, kind = broadcast_object(env, (status, error, kind))
    if error:
        raise (NothingToResume if kind == "NothingToResume" else RunDirError)(error)
    return status


def resumed_config(given: RetrainConfig, state: RunState, env: DistEnv, run_dir: RunDir) -> RetrainConfig:
    """The configuration of the run being resumed, with the fields a resume may change
    (:data:`RESUME_MUTABLE`) taken from ``given``; the other differences are logged, ignored."""
    stored = RetrainConfig.from_dict(state.config)
    changed = [f"{k} ({getattr(given, k)!r}; the run has {v!r})"
               for k, v in vars(stored).items()
               if k not in RESUME_MUTABLE and getattr(given, k) != v]
    if changed and env.is_main:
        log.warning("resuming %s with its own settings; ignored: %s", run_dir.path, ", ".join(changed))
    for name in RESUME_MUTABLE:
        value = getattr(given, name)
        if name in ("checkpoint", "pretrained") and not value:
            continue      # the run keeps the weights it started from (the teacher's too)
        setattr(stored, name, value)
    return stored


class Checkpoints:
    """Writes ``last.pth`` (and knows what it holds): the state of the last finished step."""

    def __init__(self, t: Training, progress: Progress, run_dir: RunDir):
        self.t, self.progress, self.run_dir = t, progress, run_dir
        self.saved_step: int | None = None
        self.boundary_rng = rng_state(t.reducer)        # random state at the last step boundary

    def boundary(self) -> None:
        self.boundary_rng = rng_state(self.t.reducer)

    def state(self, rngs: list[dict[str, Any]]) -> RunState:
        t, p = self.t, self.progress
        return RunState(
            model=t.model.state_dict(), optimizer=t.optimizer.state_dict(), scheduler=t.schedule.state_dict(),
            scaler=t.scaler.state_dict() if t.scaler is not None else None,
            model_ema=t.ema.state_dict() if t.ema is not None else None,
            progress=Progress(p.epoch, p.step_in_epoch, p.global_step), config=t.cfg.to_dict(),
            record=t.record, rng=rngs, world_size=t.env.world_size, accum_steps=t.plan.accum,
            effective_batch=t.plan.effective_batch, steps_per_epoch=t.plan.steps_per_epoch,
            data={"num_samples": len(t.plan.indices), "dataset_size": len(t.train_data),
                  "micro_per_epoch": t.plan.micro_per_epoch,
                  "next_micro_batch": p.step_in_epoch * t.plan.accum})

    def save(self) -> None:
        """Every process's random state gathered, rank 0 writes (a collective operation)."""
        rngs = gather_objects(self.t.env, rng_state(self.t.reducer))
        if self.t.env.is_main:
            self.state(rngs).save(self.run_dir.last)
        self.saved_step = self.progress.global_step

    def save_interrupted(self) -> None:
        """Write ``last.pth`` at the last finished step unless it holds that step already.

        No collective operation here (the other processes may be gone): rank 0 writes its own
        random state only, which every process takes on resume (a warning says that the random
        streams of the other processes then differ from an uninterrupted run)."""
        if self.saved_step == self.progress.global_step and self.run_dir.last.exists():
            return
        if self.t.env.is_main:
            self.state([self.boundary_rng]).save(self.run_dir.last)
        self.saved_step = self.progress.global_step

    def nonfinite_hint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return (f"the last good checkpoint, {self.run_dir.last} (step {self.saved_step}), is kept: continue "
                f"with resume=True (--resume), e.g. with a lower lr= (--lr) or with clip_grad= (--clip-grad)")


def restore(t: Training, state: RunState) -> Progress:
    """Load ``state`` into the built parts; the :class:`Progress` it was at."""
    env = t.env
    t.model.load_state_dict(state.model)
    t.optimizer.load_state_dict(state.optimizer)
    t.schedule.load_state_dict(state.scheduler)
    if t.scaler is not None and state.scaler:
        t.scaler.load_state_dict(state.scaler)
    if t.ema is not None and state.model_ema:
        t.ema.load_state_dict(state.model_ema)
    if state.data and state.data.get("dataset_size") != len(t.train_data):
        log.warning("the training set has %d samples, the interrupted run had %s: the "
                    "resumed data order differs", len(t.train_data), state.data.get("dataset_size"))
    if state.world_size != env.world_size:
        log.warning("resuming a run of %s processes with %s: the batches and random states "
                    "differ from an uninterrupted run", state.world_size, env.world_size)
    if len(state.rng) != env.world_size and env.is_main:
        log.warning("the checkpoint holds the random state of %d process(es) for %d (a run "
                    "interrupted under torchrun): the random streams differ from an "
                    "uninterrupted run", len(state.rng), env.world_size)
    set_rng_state(state.rng[env.rank % len(state.rng)], t.reducer)
    p = state.progress
    return Progress(p.epoch, p.step_in_epoch, p.global_step)


def _run(cfg: RetrainConfig, env: DistEnv, run_dir: RunDir, resume: bool, train_data, val_data,
         on_step, weights: Weights | None) -> RetrainResult:
    state = RunState.load(run_dir.last) if resume else None
    if state is not None:
        cfg = resumed_config(cfg, state, env, run_dir)
    t = build_training(cfg, env, train_data, val_data, weights)
    seed_process(cfg, env)
    progress = restore(t, state) if state is not None else Progress()
    checkpoints = Checkpoints(t, progress, run_dir)
    if state is not None:
        checkpoints.saved_step = progress.global_step
        del state         # the resume state's tensors are not kept through the run
    if env.is_main:
        write_json(run_dir.config, cfg.to_dict())
    logger = RunLog(run_dir.log, env.is_main, cfg.tensorboard)
    plan = t.plan
    result = RetrainResult(str(run_dir.path), "finished", steps_per_epoch=plan.steps_per_epoch,
                           accum_steps=plan.accum, effective_batch=plan.effective_batch, world_size=env.world_size)
    hooks = StepHooks(checkpoints.save, checkpoints.boundary, checkpoints.nonfinite_hint, on_step)
    with logger:
        _log_start(t, progress, logger)
        try:
            stopped = False
            while progress.epoch < cfg.epochs and not stopped:
                report = run_epoch(t, progress, logger, hooks)
                if report.last_loss is not None:
                    result.last_loss = report.last_loss
                stopped = not report.complete or end_epoch(t, progress, logger, checkpoints, report, result)
            result.global_step, result.epochs_done = progress.global_step, progress.epoch
            if progress.epoch < cfg.epochs:
                result.status = "stopped"
                logger.write(event="stopped", step=progress.global_step, epoch=progress.epoch,
                             step_in_epoch=progress.step_in_epoch)
                _say(cfg, env, f"stopped at step {progress.global_step} (max_steps); continue with --resume")
            else:
                finish(t, progress, logger, run_dir, result)
        except KeyboardInterrupt as exc:
            raise interrupted(t, progress, logger, checkpoints, run_dir) from exc
    result.model = t.model.eval()
    barrier(env)
    return result


def end_epoch(t: Training, progress: Progress, logger: RunLog, checkpoints: Checkpoints, report: EpochReport,
              result: RetrainResult) -> bool:
    """Validation, the epoch's log record, the move to the next epoch and its checkpoint; True
    when ``max_steps`` is reached (the run stops)."""
    cfg = t.cfg
    due = bool(cfg.eval_every) and ((progress.epoch + 1) % cfg.eval_every == 0 or progress.epoch + 1 == cfg.epochs)
    acc = validate(t, t.model) if due else None
    acc_ema = validate(t, t.ema.module) if t.ema is not None and due else None
    result.eval_acc, result.eval_acc_ema = acc, acc_ema
    result.epoch_times.append(report.elapsed)
    record = dict(event="epoch", epoch=progress.epoch, step=progress.global_step, loss=report.mean_loss,
                  lr=t.schedule.get_lr(),
                  throughput=report.steps * t.plan.effective_batch / max(report.elapsed, 1e-9),
                  epoch_time=report.elapsed, eval_acc=acc)
    if t.ema is not None:
        record["eval_acc_ema"] = acc_ema
    logger.write(**record)
    _say(cfg, t.env, f"epoch {progress.epoch + 1}/{cfg.epochs}: loss {report.mean_loss:.4f}, "
                     f"{record['throughput']:.1f} img/s, {report.elapsed:.1f} s"
                     + (f", eval acc {acc:.4f}" if acc is not None else "")
                     + (f", EMA {acc_ema:.4f}" if acc_ema is not None else ""))
    with deferred_interrupt():
        progress.epoch += 1
        progress.step_in_epoch = 0
        checkpoints.save()
    return cfg.max_steps is not None and progress.global_step >= cfg.max_steps


def finish(t: Training, progress: Progress, logger: RunLog, run_dir: RunDir, result: RetrainResult) -> None:
    """Write ``final.pth``: the weights with their record, the configuration, the accuracies."""
    if t.env.is_main:
        extra: dict[str, Any] = dict(config=t.cfg.to_dict(), epoch=progress.epoch,
                                     global_step=progress.global_step, eval_acc=result.eval_acc)
        if t.ema is not None:
            extra["model_ema"] = t.ema.module.state_dict()
            extra["eval_acc_ema"] = result.eval_acc_ema
        save_final(run_dir.final, t.model, t.record, **extra)
    logger.write(event="end", step=progress.global_step, epoch=progress.epoch, final=str(run_dir.final),
                 eval_acc=result.eval_acc)
    _say(t.cfg, t.env, f"done: {run_dir.final}")
    result.final_checkpoint = str(run_dir.final)


def interrupted(t: Training, progress: Progress, logger: RunLog, checkpoints: Checkpoints,
                run_dir: RunDir) -> RetrainInterrupted:
    """Save the state of the last finished step (when not saved yet) and log the interruption."""
    where: str | None = str(run_dir.last)
    try:
        with deferred_interrupt():
            checkpoints.save_interrupted()
    except KeyboardInterrupt:   # a second Ctrl-C, held back until the file was written
        where = str(run_dir.last) if run_dir.last.exists() else None
    message = (f"interrupted at step {progress.global_step} of {t.plan.total_steps} (epoch "
               f"{progress.epoch + 1}/{t.cfg.epochs}); "
               + (f"{where} holds it: to continue, run again with resume=True (on the command "
                  f"line: the same command plus --resume)" if where else "no checkpoint was written"))
    logger.write(event="interrupted", step=progress.global_step, epoch=progress.epoch,
                 step_in_epoch=progress.step_in_epoch, checkpoint=where)
    return RetrainInterrupted(message, where, progress.global_step)


def _log_start(t: Training, progress: Progress, logger: RunLog) -> None:
    cfg, env, plan = t.cfg, t.env, t.plan
    logger.write(event="resume" if progress.global_step else "start", step=progress.global_step,
                 epoch=progress.epoch, effective_batch=plan.effective_batch, per_device_batch=cfg.batch_size,
                 accum_steps=plan.accum, world_size=env.world_size, steps_per_epoch=plan.steps_per_epoch,
                 total_steps=plan.total_steps, train_samples=len(plan.indices), reduction=t.record.reduction,
                 model=cfg.model, recipe=cfg.recipe, checkpoint=cfg.checkpoint, lr=cfg.lr, augment=cfg.augment)
    _say(cfg, env, f"{'train' if cfg.recipe == 'base' else 'retrain'} {cfg.model} + {cfg.reduce} (recipe "
                   f"{cfg.recipe}; weights {cfg.checkpoint or 'random'}): {env.world_size} "
                   f"process(es) x batch {cfg.batch_size} x accumulation {plan.accum} = "
                   f"effective batch {plan.effective_batch}; {len(plan.indices)} samples, "
                   f"{cfg.epochs} epoch(s) x {plan.steps_per_epoch} steps"
                   + (f", resuming at step {progress.global_step}" if progress.global_step else ""))


def _say(cfg: RetrainConfig, env: DistEnv, text: str) -> None:
    if env.is_main:
        if cfg.progress:
            print(text, file=sys.stderr, flush=True)
        else:
            log.info(text)
