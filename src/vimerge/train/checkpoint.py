"""Run directories and training checkpoints (atomic, resumable, loadable with weights_only).

``RUN_DIR`` holds:

* ``last.pth``: the resume state, rewritten atomically (temporary file, then rename) at every
  epoch end and every ``save_every`` steps: model, optimizer, scheduler, grad scaler, EMA,
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

from ..models import create_model
from ..models.checkpoint import save_checkpoint
from ..reduce import apply, spec_of
from .recipe import legacy_spec

LAST, FINAL, LOG, CONFIG = "last.pth", "final.pth", "log.jsonl", "config.json"
RUN_FILES = (LAST, FINAL, LOG, CONFIG, "tb")


class RunDirError(RuntimeError):
    """The run directory holds a run that this command must not overwrite."""


def prepare_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> str:
    """Check (and with ``overwrite`` clear) ``out``; returns ``"fresh"``, ``"resume"`` or
    ``"finished"`` (``resume`` of a finished run: nothing to do)."""
    out = Path(out)
    final, last = out / FINAL, out / LAST
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
        raise RunDirError(f"{out} already holds a finished run ({final}); pass --overwrite to "
                          f"replace it or choose another --output")
    elif last.exists() and not resume:
        raise RunDirError(f"{out} holds an unfinished run ({last}); pass --resume to continue it "
                          f"or --overwrite to start over")
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
    gen = getattr(reducer, "_generator", None)
    if isinstance(gen, torch.Generator):
        state["reducer"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any], reducer: Any = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "reducer" in state and reducer is not None:
        if getattr(reducer, "_generator", None) is None:
            reducer._generator = torch.Generator()
        reducer._generator.set_state(state["reducer"])


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


def saved_spec(entry: Any) -> str:
    """The reduction spec of a checkpoint's ``reduction`` entry: a spec string, or the
    ``{"method", "options"}`` dict of checkpoints written before specs (None: ``"none"``)."""
    if entry is None or isinstance(entry, str):
        return entry or "none"
    return legacy_spec(entry.get("method", "none"), entry.get("options"))


def load_retrained(path: str | os.PathLike, *, ema: bool = False, scan_backend: str = "auto"):
    """The model a re-training run wrote to ``final.pth`` (or ``last.pth``), with its token
    reduction re-applied, in eval mode. ``ema=True`` loads the EMA weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    arch = ckpt.get("arch")
    if not arch:
        raise ValueError(f"{path} has no 'arch' entry: not written by vimerge retrain")
    model = create_model(arch["name"], scan_backend=scan_backend, **arch["kwargs"])
    weights = ckpt["model"]
    if ema:
        if "model_ema" not in ckpt:
            raise ValueError(f"{path} has no EMA weights (the run had EMA off)")
        weights = ckpt["model_ema"]
        weights = weights.get("weights", weights)
    model.load_state_dict(weights)
    apply(model, saved_spec(ckpt.get("reduction")))
    return model.eval()
