"""Run directories and training checkpoints (atomic, resumable, loadable with weights_only).

``RUN_DIR`` holds:

* ``last.pth``: the resume state, rewritten atomically (temporary file, then rename) at every
  epoch end, every ``save_every`` steps, at ``max_steps`` and when the run is interrupted
  (Ctrl-C: the state of the last finished optimizer step): model, optimizer, scheduler, grad scaler, EMA,
  position (epoch, step inside the epoch, global step; the data order is a function of the
  seed and the epoch, see :mod:`vimerge.train.data`), the RNG states of every process (python,
  numpy, torch, CUDA, the reducer's generator) and the configuration;
* ``final.pth``: the re-trained weights in the official layout ``{"model": ..., "model_ema":
  ..., "reduction": "rmeeto:r=11,...", "arch": {...}, ...}`` (``reduction``: the spec of the
  installed reducer, :func:`vimerge.reduce.spec_of`, or ``"none"``); its presence marks the
  run finished (see :func:`load_retrained`);
* ``config.json``, ``log.jsonl`` (one JSON object a line), ``tb/`` (TensorBoard, optional).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..factory import create_model
from ..models.checkpoint import save_checkpoint
from ..reduce import spec_of

LAST, FINAL, LOG, CONFIG = "last.pth", "final.pth", "log.jsonl", "config.json"
RUN_FILES = (LAST, FINAL, LOG, CONFIG, "tb")


class RunDirError(RuntimeError):
    """The run directory holds a run that this command must not overwrite."""


class NothingToResume(ValueError):
    """``resume`` was asked for, but the run directory holds no run to continue."""


def prepare_run_dir(out: str | os.PathLike, *, resume: bool | str, overwrite: bool) -> str:
    """Check (and with ``overwrite`` clear) ``out``; returns ``"fresh"``, ``"resume"`` or
    ``"finished"`` (``resume`` of a finished run: nothing to do).

    ``resume="require"`` on a directory without ``last.pth`` or ``final.pth`` (missing,
    mistyped, or a run interrupted before its first checkpoint) raises :class:`NothingToResume`;
    ``resume=True`` returns ``"fresh"`` there (the caller says so)."""
    out = Path(out)
    final, last = out / FINAL, out / LAST
    if resume == "require" and not overwrite and not final.exists() and not last.exists():
        where = ("does not exist" if not out.exists() else
                 f"holds no {LAST} (nothing was saved)" if out.is_dir() else "is not a directory")
        raise NothingToResume(f"nothing to resume: {out} {where}; check output= (--output), or drop "
                              f"resume (--resume) to start a new run there")
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
    out.mkdir(parents=True, exist_ok=True)
    return "resume" if resume and last.exists() else "fresh"


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
# writing and reading


def save_state(path: str | os.PathLike, model_state: dict, **entries: Any) -> Path:
    """Write a resume state atomically (see :func:`vimerge.save_checkpoint`)."""
    return save_checkpoint(model_state, path, **entries)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def reduction_spec(model: Any) -> str:
    """The spec of ``model``'s installed reduction (``"none"`` without one), as saved."""
    return "none" if model.reduction is None else spec_of(model.reduction)


def load_retrained(path: str | os.PathLike, *, ema: bool = False, scan_backend: str = "auto"):
    """The model a re-training run wrote to ``final.pth`` (or ``last.pth``), with its token
    reduction re-applied, in eval mode (:func:`vimerge.create_model` on the file). ``ema=True``
    loads the EMA weights.

    Raises:
        ValueError: the file records no model (not written by vimerge retrain/train).
        CheckpointError: ``ema=True`` and the run kept no EMA, or the weights do not fit.
    """
    return create_model(checkpoint=path, ema=ema, scan_backend=scan_backend).eval()
