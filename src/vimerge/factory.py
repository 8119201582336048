"""``vimerge.create_model``: a model as its weights were trained, reduction included.

:func:`vimerge.models.create_backbone` builds a backbone and loads weights. Weights written by
``vimerge retrain`` / ``vimerge train`` (``final.pth``, ``last.pth``) also carry a
:class:`WeightsRecord`: the model they were trained as (``"arch"``: preset name and
constructor arguments) and the token reduction they were trained with (``"reduction"``: a spec
string). :meth:`WeightsRecord.entries` is the one writer of those entries and
:meth:`WeightsRecord.read` their one reader; :func:`read_weights` reads a file once, giving its
content and its record together.

:func:`create_model`, one layer above both ``models`` and ``reduce``, gives weights back as they
were trained: the recorded preset and arguments (the caller's win), and the recorded reduction
unless ``reduce`` overrides it. Both decisions are announced on the ``vimerge`` logger (warning
level) when they change anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .models import create_backbone, get_preset, load_checkpoint, pretrained_uri, read_checkpoint
from .reduce import NONE, apply, build, spec_of, stored_spec

log = logging.getLogger("vimerge")

# constructor arguments that say how a model is run, not what it is: never recorded
RUN_ONLY_KWARGS = ("scan_backend", "drop_path_rate")


@dataclass(frozen=True)
class WeightsRecord:
    """What trained weights record about themselves (``vimerge retrain`` / ``train`` write it).

    Attributes:
        model: the preset the weights were trained as (None: not recorded).
        kwargs: its constructor arguments (``num_classes``, ``img_size`` as a list, ``depth``...);
            run-only arguments (:data:`RUN_ONLY_KWARGS`) are never recorded.
        reduction: the spec of the reduction they were trained with (``"none"``: none).
    """

    model: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    reduction: str = NONE

    @classmethod
    def of_model(cls, model: nn.Module, preset: str, kwargs: Mapping[str, Any] | None = None) -> WeightsRecord:
        """The record of ``model`` (built as ``preset`` with ``kwargs``): its classes, input
        size and installed reduction as they are now."""
        recorded = {k: v for k, v in dict(kwargs or {}).items() if k not in RUN_ONLY_KWARGS}
        recorded.update(num_classes=model.num_classes, img_size=list(model.img_size))
        reduction = NONE if model.reduction is None else spec_of(model.reduction)
        return cls(preset, recorded, reduction)

    def entries(self) -> dict[str, Any]:
        """The checkpoint entries of this record: ``{"arch": {"name", "kwargs"}, "reduction"}``
        (plain types, readable with ``weights_only=True``). The one writer of the record."""
        return {"arch": {"name": self.model, "kwargs": dict(self.kwargs)}, "reduction": self.reduction}

    @classmethod
    def read(cls, meta: Mapping[str, Any]) -> WeightsRecord:
        """The record in a checkpoint's metadata (:func:`vimerge.models.read_checkpoint`'s
        second value); an empty record for weights that carry none. The one reader of the
        record; also reads the ``{"method", "options"}`` reductions of older files.

        Raises:
            ValueError: the recorded reduction is malformed.
        """
        arch = meta.get("arch") if isinstance(meta.get("arch"), Mapping) else {}
        return cls(arch.get("name"), dict(arch.get("kwargs") or {}), stored_spec(meta.get("reduction")))


@dataclass(frozen=True)
class Weights:
    """A checkpoint file read once: ``source`` (its path or URI, a string), ``content`` (the
    loaded object, for :func:`vimerge.models.load_checkpoint`) and its ``record``."""

    source: str
    content: Any = field(repr=False)
    record: WeightsRecord


def read_weights(source: str | os.PathLike | Weights) -> Weights:
    """Read the checkpoint ``source`` (a path, ``hf://`` URI or URL) once; a :class:`Weights`
    comes back as it is.

    Raises:
        CheckpointError: the file is missing or unreadable (see :func:`vimerge.models.read_checkpoint`).
    """
    if isinstance(source, Weights):
        return source
    content, meta = read_checkpoint(source)
    return Weights(os.fspath(source), content, WeightsRecord.read(meta))


def create_model(name: str | None = None, *, checkpoint: str | os.PathLike | Weights | None = None,
                 pretrained: bool = False, reduce: str | None = None, strict: bool = True,
                 ema: bool | None = None, fallback: str | None = None, **overrides: Any) -> nn.Module:
    """Build a model, load weights and install the reduction they were trained with.

    Args:
        name: a registered preset (``vimerge.list_models()``); None: the preset recorded in
            ``checkpoint`` (written by ``vimerge retrain``/``train``).
        checkpoint: a path (``str`` or ``os.PathLike``), ``hf://`` URI or URL of weights, or
            :class:`Weights` already read by :func:`read_weights`.
        pretrained, strict, ema, **overrides: as for
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
    weights = read_weights(checkpoint) if checkpoint is not None else None
    record = weights.record if weights is not None else WeightsRecord()
    name, kwargs = recorded_model(record, name, overrides, fallback=fallback)
    model = create_backbone(name, **kwargs)
    if weights is not None:
        load_checkpoint(model, weights.content, strict=strict, ema=ema, name=weights.source)
    if reduce is None:
        if record.reduction != NONE:
            apply(model, record.reduction)
            log.warning("applied the reduction these weights were re-trained with: %s (reduce='none' or "
                        "--reduce none evaluates them unreduced)", record.reduction)
        return model
    wanted = spec_of(build(reduce))
    apply(model, wanted)
    if record.reduction != NONE and wanted != spec_of(build(record.reduction)):
        log.warning("these weights were re-trained with %s; using %s as asked", record.reduction, wanted)
    return model


def recorded_model(record: WeightsRecord, name: str | None, overrides: Mapping[str, Any], *,
                   fallback: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(preset, constructor arguments)`` to build: ``name`` (else the recorded preset, else
    ``fallback``) with the recorded arguments under ``overrides`` when the preset is the
    recorded one (a different one is announced, its arguments not taken).

    Raises:
        ValueError: no name, none recorded and no fallback.
    """
    if name is None:
        name = record.model or fallback
        if name is None:
            raise ValueError("give a model name (vimerge.list_models()); the checkpoint records none "
                             "or no checkpoint was given")
    kwargs = dict(overrides)
    if record.model is not None:
        if _preset(record.model) == get_preset(name).name:
            kwargs = {**record.kwargs, **overrides}
        else:
            log.warning("the checkpoint was written for model %r; building %r as asked", record.model, name)
    return name, kwargs


def _preset(name: str) -> str | None:
    """The registered name of a preset or alias; None for a name this installation lacks."""
    try:
        return get_preset(name).name
    except ValueError:
        return None


__all__ = ["create_model", "read_weights", "recorded_model", "Weights", "WeightsRecord"]
