"""``vimerge.create_model``: a model as its weights were trained, reduction included.

:func:`vimerge.models.create_backbone` builds a backbone and loads weights. Weights written by
``vimerge retrain`` / ``vimerge train`` (``final.pth``, ``last.pth``) also record the model they
were trained as (``"arch"``: preset name and constructor arguments) and the token reduction they
were trained with (``"reduction"``: a spec string). This function, one layer above both
``models`` and ``reduce``, gives them back as they were trained: the recorded preset and
arguments (the caller's win), and the recorded reduction unless ``reduce`` overrides it. Both
decisions are announced on the ``vimerge`` logger (warning level) when they change anything.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.nn as nn

from .models import create_backbone, get_preset, load_checkpoint, pretrained_uri, read_checkpoint
from .reduce import NONE, apply, build, spec_of, stored_spec

log = logging.getLogger("vimerge")


def create_model(name: str | None = None, *, checkpoint: str | os.PathLike | None = None,
                 pretrained: bool = False, reduce: str | None = None, strict: bool = True,
                 ema: bool | None = None, fallback: str | None = None, **overrides: Any) -> nn.Module:
    """Build a model, load weights and install the reduction they were trained with.

    Args:
        name: a registered preset (``vimerge.list_models()``); None: the preset recorded in
            ``checkpoint`` (written by ``vimerge retrain``/``train``).
        checkpoint, pretrained, strict, ema, **overrides: as for
            :func:`vimerge.models.create_backbone` (``num_classes``, ``img_size``, ``depth``, ...).
            The constructor arguments recorded in the checkpoint are the defaults.
        reduce: a reduction spec (``"rmeeto:r=4"``) installed on the model; ``"none"`` for
            none; None (default): the reduction recorded in the checkpoint, if any.
        fallback: the preset when ``name`` is None and the checkpoint records none (the
            command line's ``vim_tiny``).

    Returns:
        The model (train mode, as ``torch.nn`` builds it), with ``model.reduction`` set and
        ``model.preset_name`` the preset it was built as.

    Raises:
        ValueError: no name and no recorded preset, an unknown name, or a bad spec.
        CheckpointError: the weights cannot be read or do not fit.
    """
    if name is None and checkpoint is None:
        name = fallback
    if checkpoint is None and pretrained:
        if name is None or pretrained_uri(name) is None:
            raise ValueError(f"model {name!r} has no published weights; pass checkpoint=PATH")
        checkpoint = pretrained_uri(name)
    state, meta = read_checkpoint(checkpoint) if checkpoint is not None else (None, {})
    arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    recorded_name = arch.get("name")
    if name is None:
        name = recorded_name or fallback
        if name is None:
            raise ValueError("give a model name (vimerge.list_models()); "
                             + ("the checkpoint records none" if checkpoint is not None else "no checkpoint given"))
    kwargs = dict(overrides)
    if recorded_name is not None:
        if _preset(recorded_name) == get_preset(name).name:
            kwargs = {**dict(arch.get("kwargs") or {}), **overrides}
        else:
            log.warning("the checkpoint was written for model %r; building %r as asked", recorded_name, name)
    model = create_backbone(name, **kwargs)
    if state is not None:
        load_checkpoint(model, state, strict=strict, ema=ema, name=os.fspath(checkpoint))
    recorded = stored_spec(meta.get("reduction"))
    if reduce is None:
        if recorded != NONE:
            apply(model, recorded)
            log.warning("applied the reduction these weights were re-trained with: %s (reduce='none' or "
                        "--reduce none evaluates them unreduced)", recorded)
        return model
    wanted = spec_of(build(reduce))
    apply(model, wanted)
    if recorded != NONE and wanted != spec_of(build(recorded)):
        log.warning("these weights were re-trained with %s; using %s as asked", recorded, wanted)
    return model


def _preset(name: str) -> str | None:
    """The registered name of a preset or alias; None for a name this installation lacks."""
    try:
        return get_preset(name).name
    except ValueError:
        return None


__all__ = ["create_model"]
