"""Reading, adapting and writing checkpoints, for any backbone.

Accepted sources (:func:`read_state_dict`):

* the official hustvl/Vim ``.pth`` (``{"model": state_dict, "optimizer": ..., ...}``), timm's
  ``{"state_dict": ..., "state_dict_ema": ...}``, vimerge's ``final.pth``/``last.pth``
  (``{"model": ..., "model_ema": ... or {"weights": ...}}``), and for :func:`load_checkpoint`
  any dict holding the model's keys, e.g. Lightning-style flat dicts with the model under
  ``model.`` and its average under ``ema.``,
* a plain state dict saved with ``torch.save`` (``.pth``, ``.pt``, ``.bin``), also wrapped:
  ``module.`` (DistributedDataParallel, ``torch.optim.swa_utils.AveragedModel``, timm's
  ``ModelEmaV2``), ``_orig_mod.`` (``torch.compile``), nested (``module._orig_mod.``),
* a ``.safetensors`` file (needs the ``safetensors`` package),
* ``hf://owner/repo/path/in/repo.pth`` (needs ``huggingface_hub`` and internet).

Where the weights are: :func:`load_checkpoint` knows the model, so it looks for the model's
keys anywhere in the file (any nested dict, under any key prefix) and takes the place that
holds most of them; :func:`read_state_dict` knows no model and uses the layouts above.
Bookkeeping entries (scalars that are not parameters of the model: ``n_averaged``,
``num_updates``, step counters) are ignored and listed in the report's ``"ignored"``.

Online or averaged weights: a file can hold both (``model``/``model_ema``,
``state_dict``/``state_dict_ema``, ``model.``/``ema.``). The rule: ``ema=None`` (the default)
takes the online weights and warns, naming both places, that it did; ``ema=True`` takes the
averaged (EMA/SWA) weights, ``ema=False`` the online ones, without a warning, and either
raises :class:`CheckpointError` when the file has no such weights. A file holding only
averaged weights is loaded with ``ema=None``. The report says which: ``"weights"`` (the place
in the file, e.g. ``"model_ema/weights"`` or ``"state_dict/ema."``) and ``"ema"`` (bool).

:func:`load_checkpoint` adapts a checkpoint to the model it is loaded into. What is specific to
a backbone comes from the model itself (timm's ``checkpoint_filter_fn``, as methods):

* ``model.checkpoint_filter(state, source, strict) -> (state, info)``: recognise the
  architecture (raise :class:`CheckpointError` for another one) and adapt it, e.g. resample
  the position embedding to the model's patch grid (:func:`vimerge.models.layers.resample_pos_embed`); ``info`` is
  merged into the returned report (e.g. ``{"resized_pos_embed": True}``). A filter adapts
  only what the user asked for and announces every adaptation (a warning); a checkpoint made
  for another geometry is refused with the fix;
* ``model.checkpoint_hint(state) -> str | None``: one line for a mismatch message, e.g. which
  ``create_model(...)`` call the checkpoint was made for.

Generic here: reading every container format, wrapper prefixes, a head made for another number
of classes (replaced by the model's fresh one, with a warning) and one :class:`CheckpointError`
listing every key and shape that does not fit. This module knows no backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["CheckpointError", "read_state_dict", "read_checkpoint", "load_checkpoint", "save_checkpoint",
           "listing"]

# Where training checkpoints keep weights, in order of preference (online, then averaged).
_ONLINE_KEYS = ("model", "state_dict", "module", "net", "network")
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_model", "ema_state_dict", "model_ema_state_dict",
             "averaged_model", "swa_model")
_INNER_KEYS = ("weights", "state_dict", "module", "model")   # e.g. vimerge's EMA {"weights": ..., "decay": ...}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")         # DDP / AveragedModel / ModelEmaV2, torch.compile
_EMA_NAME = re.compile(r"(^|_)(ema|swa|averaged)(_|$)", re.IGNORECASE)
_MAX_DEPTH = 3                                        # how deep load_checkpoint looks into nested dicts
_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------------------------
# reading


def read_state_dict(source: str | os.PathLike, *, ema: bool | None = None) -> dict[str, Tensor]:
    """Read the weights of a checkpoint as a flat ``{name: tensor}`` dict on the CPU.

    Args:
        source: a local path (``.pth``/``.pt``/``.bin`` pickle or ``.safetensors``), an
            ``hf://owner/repo/path/in/repo`` URI or an ``https://`` URL (cached in torch's hub
            directory).
        ema: which weights when the file holds online and averaged ones (see the module
            docstring): None the online ones, with a warning; True the averaged ones; False
            the online ones.

    Returns:
        The state dict, with wrapper prefixes (``module.``, ``_orig_mod.``) removed when every
        key that is not a scalar carries them; the scalars outside the prefix (bookkeeping such
        as ``n_averaged``) and non-tensor entries are dropped.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated or not a checkpoint, or
            holds no weights of the kind ``ema`` asks for.
    """
    obj, name = _read_object(source)
    return _select_weights(obj, repr(name), ema, None).state


def read_checkpoint(source: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint file once: the whole loaded object (pass it to :func:`load_checkpoint`)
    and its metadata, the top-level entries that hold no tensors (e.g. ``"arch"`` and
    ``"reduction"`` written by ``vimerge retrain``, ``"epoch"``; a safetensors file's string
    metadata).

    Raises:
        CheckpointError: as :func:`read_state_dict`.
    """
    obj, _ = _read_object(source)
    if not isinstance(obj, Mapping):
        return obj, {}

    def holds_tensors(value: Any) -> bool:
        return isinstance(value, Tensor) or (isinstance(value, Mapping) and any(map(holds_tensors, value.values())))
    return obj, {str(k): v for k, v in obj.items() if not holds_tensors(v)}


def _read_object(source: str | os.PathLike) -> tuple[Any, str]:
    """The loaded object of a checkpoint file (a dict, usually) and the name to call it by."""
    name = os.fspath(source)
    if name.startswith("hf://"):
        path = _download(name)
    elif name.startswith(("https://", "http://")):
        path = _download_url(name)
    else:
        path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {name!r} does not exist; check the path "
                              f"(current directory: {os.getcwd()})")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {name!r} is a directory; pass the path of the weights "
                              f"file inside it (.pth, .pt, .bin or .safetensors)")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors(path, name), name
    return _read_pickle(path, name), name


def _download_url(url: str) -> Path:
    """An https:// checkpoint (e.g. the official DeiT weights) -> its cached copy in torch's hub
    directory (``torch.hub.get_dir()/checkpoints``), downloaded once."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?", 1)[0]).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, os.fspath(target), progress=True)
        except Exception as exc:  # offline, 404, ...
            raise CheckpointError(
                f"could not download {url!r} ({_first_line(exc)}). This needs internet access; on an "
                f"offline machine download it elsewhere, copy it here and pass its local path, e.g. "
                f"checkpoint='/path/to/{target.name}'") from exc
    return target


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


def _read_safetensors(path: Path, name: str) -> dict[str, Any]:
    """The tensors of a safetensors file, with its string metadata beside them at the top
    level (JSON values decoded, as :func:`save_checkpoint` writes them), like the extra entries
    of a ``.pth``."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(f"reading {name!r} needs the safetensors package: "
                              f"pip install safetensors") from exc
    try:
        tensors: dict[str, Any] = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        for key, text in metadata.items():
            if key not in tensors:
                try:
                    tensors[key] = json.loads(text)
                except ValueError:
                    tensors[key] = text
        return tensors
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


@dataclass
class _Weights:
    """One place in a checkpoint that holds a model's weights."""
    where: str                       # "model", "model_ema/weights", "state_dict/ema.", "module."
    state: dict[str, Tensor]         # keys without the prefix
    ema: bool                        # averaged (EMA/SWA) weights
    ignored: list[str] = field(default_factory=list)   # entries of the same dict left out
    stray: list[str] = field(default_factory=list)     # of which tensors that are not scalars


def _tensors(mapping: Mapping) -> dict[str, Tensor]:
    return {str(k): v for k, v in mapping.items() if isinstance(v, Tensor)}


def _is_ema(path: tuple[str, ...], prefix: str) -> bool:
    parts = [*path, *prefix.split(".")]
    return any(_EMA_NAME.search(p) for p in parts if p)


def _place(path: tuple[str, ...], prefix: str) -> str:
    where = "/".join(path)
    if prefix:
        where = f"{where}/{prefix}" if where else prefix
    return where or "(top level)"


def _weights_at(path: tuple[str, ...], tensors: dict[str, Tensor], prefix: str,
                target: Mapping[str, Tensor] | None, siblings: tuple[str, ...] = ()) -> _Weights:
    """The weights under ``prefix`` of one dict; scalars that are not the model's are bookkeeping.

    ``siblings``: prefixes of the other weights in the same dict (not reported as left out).
    """
    state, ignored, stray = {}, [], []
    for key, value in tensors.items():
        inner = key[len(prefix):] if key.startswith(prefix) else None
        scalar = value.dim() == 0 and (target is None or inner not in target)
        if inner is not None and not (scalar and target is not None):
            state[inner] = value
        elif inner is None and not scalar and any(key.startswith(p) for p in siblings):
            continue
        else:
            ignored.append(key)
            if not scalar:
                stray.append(key)
    # AveragedModel: {"module.<model>": ..., "n_averaged": n}
    ema = _is_ema(path, prefix) or (bool(prefix) and "n_averaged" in tensors)
    return _Weights(_place(path, prefix), state, ema, ignored, stray)


def _layout_weights(obj: Mapping) -> list[_Weights]:
    """The weights in the known checkpoint layouts (module docstring), without knowing the model."""
    places: list[tuple[tuple[str, ...], dict[str, Tensor]]] = []
    for key in (*_ONLINE_KEYS, *_EMA_KEYS):
        value = obj.get(key)
        if not isinstance(value, Mapping):
            continue
        if _tensors(value):
            places.append(((key,), _tensors(value)))
            continue
        inner = next((sub for sub in _INNER_KEYS
                      if isinstance(value.get(sub), Mapping) and _tensors(value[sub])), None)
        if inner is not None:
            places.append(((key, inner), _tensors(value[inner])))
    if not places and _tensors(obj):
        places.append(((), _tensors(obj)))
    found = []
    for path, tensors in places:
        prefix = ""
        while True:   # strip wrapper prefixes carried by every key that is not a scalar
            body = [k[len(prefix):] for k, v in tensors.items() if k.startswith(prefix) and v.dim() > 0]
            step = next((p for p in _WRAPPER_PREFIXES if body and all(k.startswith(p) for k in body)), None)
            if step is None:
                break
            prefix += step
        found.append(_weights_at(path, tensors, prefix, None))
    return found


def _dicts(obj: Mapping, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Tensor]]]:
    """Every dict holding tensors in a checkpoint object, with its path of keys."""
    tensors = _tensors(obj)
    if tensors:
        yield path, tensors
    if len(path) < _MAX_DEPTH:
        for key, value in obj.items():
            if isinstance(value, Mapping):
                yield from _dicts(value, (*path, str(key)))


def _matching_weights(obj: Mapping, target: Mapping[str, Tensor]) -> list[_Weights]:
    """The places (dict and key prefix) holding the model's keys: those with more than half as
    many of them as the best place, best first (known layouts before others on a tie)."""
    scored: list[tuple[int, int, int, tuple[str, ...], str, dict[str, Tensor]]] = []
    known = (*_ONLINE_KEYS, *_EMA_KEYS)
    for order, (path, tensors) in enumerate(_dicts(obj)):
        counts: dict[str, int] = {}
        for key in tensors:
            start = 0
            while True:
                if key[start:] in target:
                    counts[key[:start]] = counts.get(key[:start], 0) + 1
                dot = key.find(".", start)
                if dot < 0:
                    break
                start = dot + 1
        rank = known.index(path[0]) if path and path[0] in known else (-1 if not path else len(known))
        scored += [(n, rank, order, path, prefix, tensors) for prefix, n in counts.items()]
    if not scored:
        return []
    best = max(n for n, *_ in scored)
    scored = sorted((s for s in scored if 2 * s[0] > best), key=lambda s: (-s[0], s[1], s[2], len(s[4])))
    found = []
    for _, _, _, path, prefix, tensors in scored:
        siblings = tuple(p for _, _, _, q, p, _ in scored if q == path and p != prefix)
        found.append(_weights_at(path, tensors, prefix, target, siblings))
    return found


def _select_weights(obj: Any, name: str, ema: bool | None,
                    target: Mapping[str, Tensor] | None) -> _Weights:
    """The weights of a loaded checkpoint object, chosen by the rule of the module docstring.

    ``target``: the model's state dict when known (its keys are looked for anywhere).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict; expected "
                              f"a dict of tensors or {{'model': state_dict, ...}}")
    found = _matching_weights(obj, target) if target is not None else []
    if not found:   # the model's keys are nowhere: the known layouts (the filter says what it is)
        found = _layout_weights(obj)
    if not found:
        keys = ", ".join(map(repr, list(obj)[:_MAX_LISTED])) or "none"
        raise CheckpointError(f"{name} contains no tensors (top-level keys: {keys}); it is not "
                              f"a model checkpoint")
    online = [w for w in found if not w.ema]
    averaged = [w for w in found if w.ema]
    if ema is True and not averaged:
        raise CheckpointError(f"checkpoint {name} has no EMA weights (its weights are at "
                              f"{', '.join(repr(w.where) for w in online)}); load it without ema=True")
    if ema is False and not online:
        raise CheckpointError(f"checkpoint {name} holds only EMA weights "
                              f"({', '.join(repr(w.where) for w in averaged)}); pass ema=True, or "
                              f"leave ema unset, to load them")
    chosen = averaged[0] if ema is True or not online else online[0]
    if ema is None and online and averaged:
        warnings.warn(f"checkpoint {name} holds online weights ({online[0].where!r}) and EMA weights "
                      f"({averaged[0].where!r}): loaded the online weights ({chosen.where!r}); pass "
                      f"ema=True (--ema-weights) to load the EMA weights (ema=False says you want the online ones)",
                      stacklevel=3)
    if chosen.stray:
        warnings.warn(f"checkpoint {name}: took the weights at {chosen.where!r} and left out "
                      f"{len(chosen.stray)} other tensor(s) of the same dict: {listing(chosen.stray)}",
                      stacklevel=3)
    return chosen


# ---------------------------------------------------------------------------------------------
# position embedding


# ---------------------------------------------------------------------------------------------
# loading into a model


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], *,
                    strict: bool = True, ema: bool | None = None, name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint into ``model``, adapting resolution and head size.

    The model's keys are looked for anywhere in the file (nested dicts, wrapper prefixes such
    as ``module.`` or ``ema.``); bookkeeping scalars (``n_averaged``...) are ignored. When the
    file holds online and averaged weights, ``ema`` picks (module docstring).

    Adaptations: the model's own ``checkpoint_filter`` (see the module docstring; e.g. a
    position embedding for another resolution is resampled, with a warning); a head for
    another number of classes is left at the model's fresh initialisation, with a warning.

    Args:
        model: any module; the head adaptation applies when it has a linear ``head``.
        source: anything :func:`read_state_dict` accepts, or a (checkpoint) dict.
        strict: raise :class:`CheckpointError` when keys are missing or unexpected, or shapes
            differ. With ``strict=False`` the tensors that fit are loaded and the rest reported.
        ema: None (default): the online weights when the file holds both, with a warning saying
            so, else the only ones; True: the averaged (EMA/SWA) weights; False: the online ones.
        name: what messages call a dict ``source`` (e.g. the file it was read from).

    Returns:
        ``{"missing": [...], "unexpected": [...], "mismatched": [...],
        "resized_pos_embed": bool, "reinitialized_head": bool, "weights": str, "ema": bool,
        "ignored": [...]}`` (the first lists hold the keys that were not loaded; ``weights``:
        where in the file the loaded weights were, e.g. ``"model"``, ``"model_ema/weights"``,
        ``"state_dict/ema."``; ``ema``: whether they are the averaged ones; ``ignored``: the
        file's entries left out, e.g. ``["n_averaged"]``), plus what the model's filter
        reports (Vim: ``"pos_embed_grid": ((h, w), (h, w))`` when it resampled).
    """
    target = model.state_dict()
    if isinstance(source, Mapping):
        obj, name = source, repr(name) if name else "(state dict)"
    else:
        obj, name = _read_object(source)
        name = repr(name)
    weights = _select_weights(obj, name, ema, target)
    state = weights.state
    info: dict[str, Any] = {"resized_pos_embed": False, "weights": weights.where, "ema": weights.ema,
                            "ignored": weights.ignored}
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


def _plain(value: Any) -> Any:
    """``value`` with every ``os.PathLike`` inside (dicts, lists, tuples) as a string."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    return value


def save_checkpoint(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, *,
                    official: bool = True, **extra: Any) -> Path:
    """Write ``model``'s weights atomically (temporary file in the same folder, then rename).

    Args:
        model: a module or a state dict.
        path: destination; a ``.safetensors`` suffix writes safetensors (``extra`` goes into
            its string metadata as JSON, read back by :func:`read_checkpoint`), anything else
            ``torch.save``.
        official: write the hustvl/Vim layout ``{"model": state_dict, **extra}``; ``False``
            writes the plain state dict (and allows no ``extra``).
        **extra: more entries of the official dict (epoch, args...). Keep them to plain
            types (numbers, strings, lists, dicts, tensors) so that ``weights_only`` loading
            can read them back.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    extra = {k: _plain(v) for k, v in extra.items()}   # a path recorded is a string (weights_only reads it)
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
            metadata = {"format": "pt", **{k: json.dumps(v, default=str) for k, v in extra.items()}}
            save_file(state, tmp, metadata=metadata)
        else:
            torch.save({"model": state, **extra} if official else state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
