"""Reading, adapting and writing checkpoints, for any backbone.

Accepted sources (:func:`read_state_dict`):

* the official hustvl/Vim ``.pth`` (``{"model": state_dict, "optimizer": ..., ...}``; also
  ``{"state_dict": ...}`` or ``{"model_ema": ...}`` when there is no ``"model"``),
* a plain state dict saved with ``torch.save`` (``.pth``, ``.pt``, ``.bin``),
* a ``.safetensors`` file (needs the ``safetensors`` package),
* ``hf://owner/repo/path/in/repo.pth`` (needs ``huggingface_hub`` and internet).

:func:`load_checkpoint` adapts a checkpoint to the model it is loaded into. What is specific to
a backbone comes from the model itself (timm's ``checkpoint_filter_fn``, as methods):

* ``model.checkpoint_filter(state, source, strict) -> (state, info)``: recognise the
  architecture (raise :class:`CheckpointError` for another one) and adapt it, e.g. resample
  the position embedding to the model's patch grid (:func:`resample_pos_embed`); ``info`` is
  merged into the returned report (e.g. ``{"resized_pos_embed": True}``);
* ``model.checkpoint_hint(state) -> str | None``: one line for a mismatch message, e.g. which
  ``create_model(...)`` call the checkpoint was made for.

Generic here: reading every container format, wrapper prefixes, a head made for another number
of classes (replaced by the model's fresh one, with a warning) and one :class:`CheckpointError`
listing every key and shape that does not fit. This module knows no backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CheckpointError", "read_state_dict", "load_checkpoint", "save_checkpoint",
           "resample_pos_embed", "listing"]

_NESTED_KEYS = ("model", "state_dict", "model_ema")   # where training checkpoints keep weights
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")         # DistributedDataParallel, torch.compile
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# reading


def read_state_dict(source: str | os.PathLike) -> dict[str, Tensor]:
    """Read the weights of a checkpoint as a flat ``{name: tensor}`` dict on the CPU.

    Args:
        source: a local path (``.pth``/``.pt``/``.bin`` pickle or ``.safetensors``) or an
            ``hf://owner/repo/path/in/repo`` URI.

    Returns:
        The state dict, with a ``module.`` prefix (DistributedDataParallel) removed when every
        key carries it. Non-tensor entries are dropped.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or not a checkpoint.
    """
    name = os.fspath(source)
    path = _download(name) if name.startswith("hf://") else Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {name!r} does not exist; check the path "
                              f"(current directory: {os.getcwd()})")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {name!r} is a directory; pass the path of the weights "
                              f"file inside it (.pth, .pt, .bin or .safetensors)")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        obj: Any = _read_safetensors(path, name)
    else:
        obj = _read_pickle(path, name)
    return _strip_wrapper_prefix(_extract_state_dict(obj, name))


def _download(uri: str) -> Path:
    """``hf://owner/repo[@revision]/path/in/repo`` -> local path of the cached download."""
    match = re.fullmatch(r"hf://([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)", uri)
    if match is None:
        raise CheckpointError(f"malformed hub URI {uri!r}; expected hf://owner/repo/path/in/repo")
    repo_id, revision, filename = match.groups()
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise CheckpointError(
            f"loading {uri!r} needs the huggingface_hub package: pip install huggingface_hub "
            f"(or pip install 'vimerge[hub]'); or download the file yourself and pass its "
            f"local path") from exc
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except Exception as exc:  # offline, 404, auth, ...: all end the same way for the user
        url = f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{filename}"
        raise CheckpointError(
            f"could not download {uri!r} ({_first_line(exc)}). This needs "
            f"internet access; on an offline machine download {url} elsewhere, copy it here and "
            f"pass its local path, e.g. checkpoint='/path/to/{Path(filename).name}'") from exc


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by a JSON ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _read_safetensors(path: Path, name: str) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(f"reading {name!r} needs the safetensors package: "
                              f"pip install safetensors") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"could not read {name!r} as safetensors ({_first_line(exc)}); the file is truncated "
            f"or corrupt: download or copy it again") from exc


def _read_pickle(path: Path, name: str) -> Any:
    with open(path, "rb") as f:
        magic = f.read(2)
    # The official Vim training script stores its argparse.Namespace next to the weights.
    safe = getattr(torch.serialization, "safe_globals", None)
    allow = safe([argparse.Namespace]) if safe is not None else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not magic:
            raise CheckpointError(f"checkpoint {name!r} is an empty file; download or copy it "
                                  f"again") from exc
        if magic != b"PK" and magic[:1] != b"\x80":  # neither a torch zip archive nor a pickle
            text = _text_start(path)
            what = (f"it is a text file starting with {text!r}, perhaps an error page saved by "
                    f"a failed download" if text is not None else _first_line(exc))
            raise CheckpointError(
                f"{name!r} is not a PyTorch checkpoint: {what}. Pass a .pth/.pt/.bin file "
                f"written by torch.save or a .safetensors file") from exc
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"{name!r} holds a Python object ({unsafe.group(1)}) that is not loaded for "
                f"safety (weights_only=True). If you trust the file, load it once with "
                f"torch.load(path, weights_only=False), save its weights with "
                f"vimerge.models.checkpoint.save_checkpoint and use that file") from exc
        raise CheckpointError(
            f"could not read checkpoint {name!r}: the file is truncated or corrupt "
            f"({_first_line(exc)}); download or copy it again") from exc


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, for one-line error messages."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 120 and ". " in text:
        text = text[:text.index(". ") + 1]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _text_start(path: Path) -> str | None:
    """The first characters of ``path`` when it looks like a text file, else None."""
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text.strip()[:40]


def _extract_state_dict(obj: Any, name: str) -> dict[str, Tensor]:
    """The weights in a loaded checkpoint object (official nested layout or a plain dict)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name!r} holds a {type(obj).__name__}, not a state dict; expected "
                              f"a dict of tensors or {{'model': state_dict, ...}}")
    for key in _NESTED_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(map(repr, list(obj)[:_MAX_LISTED])) or "none"
        raise CheckpointError(f"{name!r} contains no tensors (top-level keys: {keys}); it is not "
                              f"a model checkpoint")
    return state


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# position embedding


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int],
                       old_grid: tuple[int, int] | None = None, cls_index_old: int | None = None,
                       cls_index_new: int | None = None) -> Tensor:
    """Resample a position embedding with one class token to another patch grid.

    The class token's row is taken out, the patch rows are reshaped to their grid, resized
    bicubically (``align_corners=False``, in fp32) and flattened again, and the class row is
    put back at its new index. The class row itself is never interpolated.

    Args:
        pos_embed: (1, old_h * old_w + 1, E).
        new_grid: (new_h, new_w), e.g. ``model.patch_embed.grid_size``.
        old_grid: (old_h, old_w); default: the square grid of the patch count.
        cls_index_old: row of the class token in ``pos_embed``; default ``old_h * old_w // 2``
            (Vim's middle class token).
        cls_index_new: row of the class token in the result; default ``new_h * new_w // 2``.

    Returns:
        (1, new_h * new_w + 1, E), dtype of ``pos_embed``. ``pos_embed`` itself when nothing
        changes.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N + 1, E), got {tuple(pos_embed.shape)}")
    n_old = pos_embed.shape[1] - 1
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(f"cannot infer the patch grid of a position embedding with {n_old} "
                             f"patches (not a square); pass old_grid=(h, w)")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} patches, the "
                         f"position embedding {n_old}")
    n_new = new_grid[0] * new_grid[1]
    cls_old = n_old // 2 if cls_index_old is None else cls_index_old
    cls_new = n_new // 2 if cls_index_new is None else cls_index_new
    if old_grid == new_grid and cls_old == cls_new:
        return pos_embed

    cls_row = pos_embed[:, cls_old:cls_old + 1]                                  # (1, 1, E)
    patches = torch.cat((pos_embed[:, :cls_old], pos_embed[:, cls_old + 1:]), dim=1)
    grid = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()     # (1, E, h, w)
    if old_grid != new_grid:
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, n_new, -1).to(pos_embed.dtype)
    return torch.cat((patches[:, :cls_new], cls_row, patches[:, cls_new:]), dim=1)


# ---------------------------------------------------------------------------------------------
# loading into a model


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], *,
                    strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``model``, adapting resolution and head size.

    Adaptations: the model's own ``checkpoint_filter`` (see the module docstring; e.g. a
    position embedding for another patch grid is resampled); a head for another number of
    classes is left at the model's fresh initialisation, with a warning.

    Args:
        model: any module; the head adaptation applies when it has a linear ``head``.
        source: anything :func:`read_state_dict` accepts, or a state dict.
        strict: raise :class:`CheckpointError` when keys are missing or unexpected, or shapes
            differ. With ``strict=False`` the tensors that fit are loaded and the rest reported.

    Returns:
        ``{"missing": [...], "unexpected": [...], "mismatched": [...],
        "resized_pos_embed": bool, "reinitialized_head": bool}`` (the lists hold the keys that
        were not loaded).
    """
    if isinstance(source, Mapping):
        name = "(state dict)"
        state = _strip_wrapper_prefix(_extract_state_dict(source, name))
    else:
        name = repr(os.fspath(source))
        state = read_state_dict(source)
    target = model.state_dict()
    info: dict[str, Any] = {"resized_pos_embed": False}
    checkpoint_filter = getattr(model, "checkpoint_filter", None)
    if checkpoint_filter is not None:
        state, extra = checkpoint_filter(state, name, strict)
        info.update(extra)
    state, reinit = _adapt_head(model, state, target)

    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in target if k in state and state[k].shape != target[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(model, state, target, name, missing, unexpected,
                                                mismatched))
    # Own check done: complete the dict with the model's tensors so torch's strict load passes.
    merged = {k: (state[k] if k in state and k not in mismatched else v) for k, v in target.items()}
    model.load_state_dict(merged, strict=True)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched,
            **info, "reinitialized_head": reinit}


def _adapt_head(model: nn.Module, state: dict[str, Tensor],
                target: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """Keep the model's fresh head when the checkpoint's is for another number of classes."""
    old, new = state.get("head.weight"), target.get("head.weight")
    if old is None or old.dim() != 2:
        return state, False
    if new is None and "head.bias" not in target and getattr(model, "num_classes", None) == 0:
        warnings.warn(f"the model has no head (num_classes=0); ignored the checkpoint's "
                      f"{old.shape[0]}-class head", stacklevel=3)
        return {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}, False
    if new is None or old.shape == new.shape or old.shape[1] != new.shape[1]:
        return state, False  # same head, or a width mismatch the key check reports
    warnings.warn(f"checkpoint head has {old.shape[0]} classes: reinitialised the head for "
                  f"{new.shape[0]} classes (train it before use)", stacklevel=3)
    state = {**state, "head.weight": target["head.weight"]}
    if "head.bias" in target:
        state["head.bias"] = target["head.bias"]
    else:
        state.pop("head.bias", None)
    return state, True


def _mismatch_message(model: nn.Module, state: dict[str, Tensor], target: dict[str, Tensor],
                      name: str, missing: list[str], unexpected: list[str],
                      mismatched: list[str]) -> str:
    lines = [f"checkpoint {name} does not fit this {type(model).__name__}:"]
    hint = getattr(model, "checkpoint_hint", None)
    line = hint(state) if hint is not None else None
    if line:
        lines.append(f"  {line}")
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {listing(unexpected)}")
    if mismatched:
        shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in mismatched]
        lines.append(f"  shape mismatch ({len(mismatched)}): {listing(shapes)}")
    lines.append("  pass strict=False to load only the tensors that fit")
    return "\n".join(lines)


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


# ---------------------------------------------------------------------------------------------
# writing


def save_checkpoint(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *,
                    official: bool = True, **extra: Any) -> Path:
    """Write ``model``'s weights atomically (temporary file in the same folder, then rename).

    Args:
        model: a module or a state dict.
        path: destination; a ``.safetensors`` suffix writes safetensors (``extra`` goes into
            its string metadata), anything else ``torch.save``.
        official: write the hustvl/Vim layout ``{"model": state_dict, **extra}``; ``False``
            writes the plain state dict (and allows no ``extra``).
        **extra: more entries of the official dict (epoch, args...). Keep them to plain
            types (numbers, strings, lists, dicts, tensors) so that ``weights_only`` loading
            can read them back.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    safetensors = path.suffix == ".safetensors"
    if extra and not official and not safetensors:
        raise ValueError("extra entries need the official layout (official=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        if safetensors:
            from safetensors.torch import save_file
            metadata = {"format": "pt", **{k: str(v) for k, v in extra.items()}}
            save_file(state, tmp, metadata=metadata)
        else:
            torch.save({"model": state, **extra} if official else state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
