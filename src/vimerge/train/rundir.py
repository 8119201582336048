"""The run directory: its files, its lock, resume, and the atomic writes of the run state.

``RUN_DIR`` holds:

* ``last.pth``: the resume state (:class:`RunState`), rewritten atomically (temporary file, then
  rename) at every epoch end, every ``save_every`` steps, at ``max_steps`` and when the run is
  interrupted (Ctrl-C: the state of the last finished optimizer step): model, optimizer,
  scheduler, grad scaler, EMA, position (:class:`Progress`: epoch, step inside the epoch, global
  step; the data order is a function of the seed and the epoch, see :mod:`vimerge.train.data`),
  the RNG states of every process (python, numpy, torch, CUDA, the reducer's generator), the
  configuration and the weights record;
* ``final.pth``: the trained weights in the official layout ``{"model": ..., "model_ema": ...,
  "reduction": "rmeeto:r=11,...", "arch": {...}, ...}`` (``arch`` + ``reduction``: the
  :class:`vimerge.factory.WeightsRecord`, its one writer); its presence marks the run finished
  (see :func:`load_retrained`);
* ``config.json``, ``log.jsonl`` (one JSON object a line), ``tb/`` (TensorBoard, optional);
* ``.lock`` while a run writes there (the process id and host): a second run on the same
  directory is refused while the first one lives; a lock left by a process that is gone is
  taken over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..factory import WeightsRecord, create_model
from ..models.checkpoint import save_checkpoint

log = logging.getLogger(__name__)

LAST, FINAL, LOG, CONFIG, LOCK = "last.pth", "final.pth", "log.jsonl", "config.json", ".lock"
RUN_FILES = (LAST, FINAL, LOG, CONFIG, "tb")


class RunDirError(RuntimeError):
    """The run directory holds a run that this command must not overwrite (or one still running)."""


class NothingToResume(ValueError):
    """``resume`` was asked for, but the run directory holds no run to continue."""


# ---------------------------------------------------------------------------------------------
# the directory


class RunDir:
    """The run directory ``path`` (str or os.PathLike): :meth:`open` checks and locks it,
    :meth:`close` unlocks it; the file names are attributes (``last``, ``final``, ``log``,
    ``config``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.last, self.final = self.path / LAST, self.path / FINAL
        self.log, self.config, self.lock = self.path / LOG, self.path / CONFIG, self.path / LOCK
        self._locked = False

    def open(self, *, resume: bool | str, overwrite: bool) -> str:
        """Check (and with ``overwrite`` clear) the directory and lock it; returns ``"fresh"``,
        ``"resume"`` or ``"finished"`` (``resume`` of a finished run: nothing to do).

        ``resume="require"`` on a directory without ``last.pth`` or ``final.pth`` (missing,
        mistyped, or a run interrupted before its first checkpoint) raises
        :class:`NothingToResume` and creates nothing; ``resume=True`` returns ``"fresh"`` there
        (the caller says so).

        Raises:
            RunDirError: a finished or unfinished run is there and neither ``resume`` nor
                ``overwrite`` was given, or another live process holds the lock.
        """
        out, final, last = self.path, self.final, self.last
        if resume == "require" and not overwrite and not final.exists() and not last.exists():
            where = ("does not exist" if not out.exists() else
                     f"holds no {LAST} (nothing was saved)" if out.is_dir() else "is not a directory")
            raise NothingToResume(f"nothing to resume: {out} {where}; check output= (--output), or drop "
                                  f"resume (--resume) to start a new run there")
        out.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            return self._status(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _status(self, resume: bool | str, overwrite: bool) -> str:
        out, final, last = self.path, self.final, self.last
        if overwrite:
            for name in RUN_FILES:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif final.exists():
            if resume:
                return "finished"
            raise RunDirError(f"{out} already holds a finished run ({final}); pass overwrite=True "
                              f"(--overwrite) to replace it or choose another output= (--output)")
        elif last.exists() and not resume:
            raise RunDirError(f"{out} holds an unfinished run ({last}); pass resume=True (--resume) to "
                              f"continue it or overwrite=True (--overwrite) to start over")
        return "resume" if resume and last.exists() else "fresh"

    def _take_lock(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.lock)
                if holder is not None and _alive(*holder):
                    raise RunDirError(f"{self.path} is in use by another run (process {holder[0]} on "
                                      f"{holder[1]}); wait for it to end or choose another output= "
                                      f"(--output)") from None
                log.info("%s: taking over the lock of a run that is gone (%s)", self.path, holder)
                self.lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self._locked = True
            return
        raise RunDirError(f"could not lock {self.path} ({self.lock}): another run keeps taking it")

    def close(self) -> None:
        """Release the lock (when this object holds it)."""
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False


def _read_lock(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    """Whether process ``pid`` on ``host`` may still run (another host: assumed so)."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False          # this process's own lock, left by an earlier run in it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_run_dir(out: str | os.PathLike, *, resume: bool | str, overwrite: bool) -> str:
    """:meth:`RunDir.open` without keeping the lock (a check of the directory alone)."""
    run_dir = RunDir(out)
    try:
        return run_dir.open(resume=resume, overwrite=overwrite)
    finally:
        run_dir.close()


# ---------------------------------------------------------------------------------------------
# the run state


@dataclass
class Progress:
    """Where a run is: ``epoch`` (0-based, the one running), ``step_in_epoch`` (optimizer steps
    done in it) and ``global_step`` (optimizer steps done in all)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class RunState:
    """What ``last.pth`` holds: the state after one finished optimizer step, from which a run
    continues as if never stopped. Kept to plain types and tensors (``weights_only`` loading).

    ``rng`` is one random state per process (:func:`rng_state`), ``data`` the data plan
    (``num_samples``, ``dataset_size``, ``micro_per_epoch``, ``next_micro_batch``)."""

    model: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, Any] = field(repr=False)
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    model_ema: dict[str, Any] | None = field(repr=False)
    progress: Progress
    config: dict[str, Any]
    record: WeightsRecord
    rng: list[dict[str, Any]] = field(repr=False)
    world_size: int = 1
    accum_steps: int = 1
    effective_batch: int = 0
    steps_per_epoch: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to ``path`` atomically (see :func:`vimerge.save_checkpoint`)."""
        p = self.progress
        return save_checkpoint(
            self.model, path, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            model_ema=self.model_ema,
            progress={"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                      "finished": False},
            config=self.config, **self.record.entries(), world_size=self.world_size,
            accum_steps=self.accum_steps, effective_batch=self.effective_batch,
            steps_per_epoch=self.steps_per_epoch, data=self.data, rng=self.rng)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunState:
        """The state :meth:`save` wrote."""
        d = torch.load(path, map_location="cpu", weights_only=True)
        p = d["progress"]
        return cls(model=d["model"], optimizer=d["optimizer"], scheduler=d["scheduler"],
                   scaler=d.get("scaler"), model_ema=d.get("model_ema"),
                   progress=Progress(p["epoch"], p["step_in_epoch"], p["global_step"]),
                   config=d["config"], record=WeightsRecord.read(d), rng=d["rng"],
                   world_size=d.get("world_size", 1), accum_steps=d.get("accum_steps", 1),
                   effective_batch=d.get("effective_batch", 0), steps_per_epoch=d.get("steps_per_epoch", 0),
                   data=d.get("data", {}))


def save_final(path: str | os.PathLike, model: Any, record: WeightsRecord, **extra: Any) -> Path:
    """Write the trained weights with their record (``arch`` + ``reduction``) and ``extra``
    entries (``config``, ``epoch``, ``global_step``, ``eval_acc``, ``model_ema``...) atomically."""
    return save_checkpoint(model, path, **record.entries(), **extra)


# ---------------------------------------------------------------------------------------------
# RNG states (kept to plain types and tensors so that weights_only loading reads them)


def rng_state(reducer: Any = None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    reducer_state = reducer.rng_state() if hasattr(reducer, "rng_state") else None
    if reducer_state is not None:
        state["reducer"] = reducer_state
    return state


def set_rng_state(state: dict[str, Any], reducer: Any = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "reducer" in state and hasattr(reducer, "set_rng_state"):
        reducer.set_rng_state(state["reducer"])


# ---------------------------------------------------------------------------------------------
# other files


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (paths and other objects as strings)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(obj: Any) -> str:
    return os.fspath(obj) if isinstance(obj, os.PathLike) else str(obj)


def load_retrained(path: str | os.PathLike, *, ema: bool = False, scan_backend: str = "auto"):
    """The model a training run wrote to ``final.pth`` (or ``last.pth``; a str or os.PathLike),
    with its token reduction re-applied, in eval mode (:func:`vimerge.create_model` on the
    file). ``ema=True`` loads the EMA weights.

    Raises:
        ValueError: the file records no model (not written by vimerge retrain/train).
        CheckpointError: ``ema=True`` and the run kept no EMA, or the weights do not fit.
    """
    return create_model(checkpoint=path, ema=ema, scan_backend=scan_backend).eval()
