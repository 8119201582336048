"""The base weights a study starts from: a given checkpoint, the weights shipped with vimerge,
the cache, or trained with ``vimerge train``'s recipe into the cache (resumably).

Shared by every study (each names its models); the video study trains its own base on clips and
only uses :func:`find_base` from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimerge.models import create_backbone, pretrained_uri
from vimerge.train import RetrainConfig, retrain
from vimerge.train.recipe import BASE_RECIPE


@dataclass
class Base:
    """A base checkpoint: where it came from and how ``vimerge eval`` names it (``model_args``).

    ``source``: "shipped", "checkpoint", "cache" or "trained"; ``seconds``: training time (0 when
    not trained here); ``sidecar``: the facts recorded with the weights (accuracy, recipe).
    """
    path: str
    source: str
    model_args: list[str]
    seconds: float = 0.0
    sidecar: dict[str, Any] = field(default_factory=dict)
    model: str = "vim_fmnist"

    def weights(self) -> dict[str, Any]:
        """The :func:`vimerge.models.create_backbone` arguments that load these weights."""
        return {"pretrained": True} if self.source == "shipped" else {"checkpoint": self.path}


def cache_dir() -> Path:
    """Where trained bases (and the video study's clips) live: ``$VIMERGE_CACHE`` or ``~/.cache/vimerge``."""
    return Path(os.environ.get("VIMERGE_CACHE", Path.home() / ".cache" / "vimerge")).expanduser()


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_base(model: str, checkpoint: str | None, *, train: bool = False) -> Base | None:
    """``model``'s base weights without training: ``checkpoint`` (checked by loading it: a wrong
    file raises with its reason), else the shipped weights (skipped when ``train``), else
    ``cache_dir()/<model>-base/final.pth``; None when there are none."""
    if checkpoint is not None:
        create_backbone(model, checkpoint=checkpoint)
        return Base(str(checkpoint), "checkpoint", ["--checkpoint", str(checkpoint)], model=model)
    shipped = pretrained_uri(model)                         # the weights shipped in vimerge/assets
    if not train and shipped is not None and Path(shipped).is_file():
        sidecar = Path(shipped).with_suffix(".json")
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return Base(shipped, "shipped", ["--pretrained"], sidecar=info, model=model)
    final = cache_dir() / f"{model}-base" / "final.pth"
    if final.is_file():
        return Base(str(final), "cache", ["--checkpoint", str(final)], model=model)
    return None


def resolve_base(checkpoint: str | None, data: str, *, train: bool = False, progress: bool = True,
                 train_data=None, val_data=None, model: str = "vim_fmnist") -> Base:
    """The base checkpoint of an image ``model``: :func:`find_base`, else trained.

    Training uses :data:`vimerge.train.recipe.BASE_RECIPE` (``vimerge train``'s defaults) on the
    Fashion-MNIST directory ``data`` into ``cache_dir()/<model>-base``, resuming there when
    interrupted. ``train=True`` skips the shipped weights. ``train_data`` / ``val_data``:
    datasets used instead of ``data``'s splits.
    """
    found = find_base(model, checkpoint, train=train)
    if found is not None:
        return found
    run_dir = cache_dir() / f"{model}-base"
    print(f"training the base {model} from scratch into {run_dir} (resumable: run the demo again to "
          f"continue after an interruption)", file=sys.stderr)
    config = RetrainConfig(model=model, data=data, output=str(run_dir), resume=True, save_every=100,
                           progress=progress, workers=0, **BASE_RECIPE)
    start = time.perf_counter()
    result = retrain(config, train_data=train_data, val_data=val_data)
    return Base(str(result.final_checkpoint), "trained", ["--checkpoint", str(result.final_checkpoint)],
                seconds=time.perf_counter() - start,
                sidecar={"eval_acc": result.eval_acc, "config": config.to_dict()}, model=model)


__all__ = ["Base", "cache_dir", "sha256", "find_base", "resolve_base"]
