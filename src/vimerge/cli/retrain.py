"""``vimerge retrain``: re-train a token-reduced model (the R-MeeTo recipe), also under torchrun.

Recipe: every recipe option left out takes the value of the recipe (``--recipe``): ``auto`` is the
preset's own re-training recipe when it has one (``vim_fmnist``: one pass, lr 1e-3 cosine to 1e-5,
batch 64, no augmentation), else the R-MeeTo paper's ImageNet recipe (``paper``: lr 2e-5, light
augmentation, effective batch 1024, 3 epochs); ``base`` is the from-scratch recipe of
``vimerge train``. The log says which recipe applied; ``config.json`` records it.

Every option acts or is refused: an option that the chosen settings would ignore (``--ema-decay``
without ``--ema``, ``--mixup`` without ``--augment timm``...) is an error naming what it needs.
Those rules are :class:`~vimerge.train.RetrainConfig`'s own (the command reports its errors), and
the options are generated from its fields' metadata (:func:`vimerge.train.recipe.option`): a new
training option is one field.

Ctrl-C saves ``RUN_DIR/last.pth`` (the last finished step) and exits 130 with the advice to
resume; ``--resume`` on a run directory with nothing to resume is an error (exit 2).

Under torchrun, spell ``--r`` as ``--reduce-r`` (or use ``--reduce rmeeto:r=11``): torchrun's own
parser rejects ``--r`` as an ambiguous abbreviation of its ``--rdzv-*``/``--role`` options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from vimerge.factory import Weights, WeightsRecord, read_weights, recorded_model
from vimerge.models import get_preset, list_models
from vimerge.train import NonFiniteLossError, RetrainConfig, RetrainInterrupted, RunDirError, retrain
from vimerge.train.recipe import BASE_RECIPE, RECIPES, flag_of

from . import common
from .common import CommandError, device_arg, model_overrides, reduction_spec

HELP = "re-train a token-reduced model (R-MeeTo recipe); also under torchrun for several GPUs/nodes"

PAPER = {f.name: f.default for f in dataclasses.fields(RetrainConfig)}
_HINTS = typing.get_type_hints(RetrainConfig)


def _flag_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords of a RetrainConfig field: its type from the annotation (the non-None
    member of ``X | None``), ``store_true`` for a bool, its choices."""
    hint = _HINTS[f.name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = kinds[0]
    if kind is bool:
        return dict(action="store_true")
    kwargs: dict[str, Any] = dict(type=kind)
    if f.metadata.get("choices"):
        kwargs["choices"] = list(f.metadata["choices"])
    return kwargs


# Generated from the fields' metadata (vimerge.train.recipe.option): flag -> (field, argparse
# keywords, help text), in argument groups "recipe", "data" and "run". The argparse default is None
# ("not given"): the recipe, else the configuration's default, fills it in.
FLAGS: dict[str, tuple[str, dict[str, Any], str]] = {
    flag_of(f): (f.name, _flag_kwargs(f), f.metadata["help"])
    for f in dataclasses.fields(RetrainConfig) if f.metadata.get("help")}
GROUPS = {f.name: f.metadata["group"] for f in dataclasses.fields(RetrainConfig) if f.metadata.get("help")}
ALIASES = {f.name: tuple(f.metadata["aliases"]) for f in dataclasses.fields(RetrainConfig) if f.metadata.get("help")}
RECIPE_FLAGS = {flag: row for flag, row in FLAGS.items() if GROUPS[row[0]] == "recipe"}


def _dest(field: str) -> str:
    """The argparse destination of a generated option (prefixed: never a reduction option's)."""
    return f"train_{field}"


def recipe_help(field: str) -> str:
    """``default: 2e-05 (paper); 0.001 (vim_fmnist); 0.003 (train)``: the recipes' values."""
    parts = [f"{PAPER[field]} (paper)"]
    for name in list_models():
        recipe = get_preset(name).retrain_recipe or {}
        if field in recipe and recipe[field] != PAPER[field]:
            parts.append(f"{recipe[field]} ({name})")
    if field in BASE_RECIPE and BASE_RECIPE[field] != PAPER[field]:
        parts.append(f"{BASE_RECIPE[field]} (train)")
    if PAPER[field] is None and len(parts) == 1:
        return ""
    return "default: " + "; ".join(parts)


def _add_flags(g: argparse._ArgumentGroup, group: str) -> None:
    for flag, (field, kwargs, text) in FLAGS.items():
        if GROUPS[field] != group:
            continue
        if kwargs.get("action"):
            shown = ""
        elif group == "recipe":
            shown = recipe_help(field)
        else:
            shown = f"default: {PAPER[field]}" if PAPER[field] is not None else ""
        shown = f" ({shown})" if shown else ""
        if not kwargs.get("action") and not kwargs.get("choices"):
            kwargs = dict(kwargs, metavar=field.upper())
        g.add_argument(flag, *ALIASES[field], dest=_dest(field), default=None,
                       help=(text + shown).replace("%", "%%"), **kwargs)


def add_args(p: argparse.ArgumentParser) -> None:
    """Data, recipe and run-directory options of ``vimerge retrain``: the fields of
    :class:`~vimerge.train.RetrainConfig` that carry a help text, plus the few below."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training data: a Fashion-MNIST IDX directory, an ImageFolder or video "
                   "directory (DIR/train and DIR/val are used when present); auto-detected")
    g.add_argument("--val-data", default="auto", help="evaluation data (default auto: Fashion-MNIST's "
                   "test split or DIR/val; 'none' to skip)")
    _add_flags(g, "data")

    g = p.add_argument_group(
        "recipe", "left out, an option takes the recipe's value (--recipe): the preset's re-training "
        "recipe where it has one, else the R-MeeTo paper's (retrain), or the from-scratch recipe (train)")
    g.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="defaults of the options below: auto = the preset's recipe when it has one "
                        "(vim_fmnist), else paper = R-MeeTo's ImageNet recipe; base = vimerge train's "
                        "(default: %(default)s)")
    _add_flags(g, "recipe")

    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", required=True, metavar="RUN_DIR",
                   help="run directory: checkpoints, log.jsonl, final.pth")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR (an error when it holds nothing to continue)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR (not with --resume)")
    g.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, cuda:1 ...")
    _add_flags(g, "run")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                   help="require TensorBoard logs (default: written when tensorboard is installed)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generated options the user gave, as RetrainConfig fields."""
    values = {field: getattr(args, _dest(field)) for field, _, _ in FLAGS.values()}
    return {field: value for field, value in values.items() if value is not None}


def recorded(args: argparse.Namespace, weights: Weights | None) -> tuple[str, dict[str, Any], str]:
    """(preset, constructor arguments, reduction spec) the run starts from: ``--model``, ``--set``
    and the reduction options where given, else what ``--checkpoint`` records (weights written by
    vimerge retrain/train come back as they were trained, as in every command), else the command
    line's default model, its preset arguments and no reduction."""
    record = weights.record if weights is not None else WeightsRecord()
    name, _ = recorded_model(record, args.model, {}, fallback=common.DEFAULT_MODEL)
    args.model = name = get_preset(name).name
    kwargs = model_overrides(args)
    if record.model and get_preset(record.model).name == name:
        kwargs = {**record.kwargs, **kwargs}
    spec = reduction_spec(args, default=None)
    return name, kwargs, record.reduction if spec is None else spec


def checkpoint_weights(args: argparse.Namespace) -> Weights | None:
    """``--checkpoint`` read (once), or None without one."""
    if args.pretrained and args.checkpoint:
        raise CommandError("give --checkpoint PATH or --pretrained (the preset's published weights), not both")
    return read_weights(args.checkpoint) if args.checkpoint else None


def config_from_args(args: argparse.Namespace, weights: Weights | None = None) -> RetrainConfig:
    """The :class:`~vimerge.train.RetrainConfig` of parsed ``vimerge retrain`` arguments: the
    recipe's values (``--recipe``) under the options given; ``weights``: ``--checkpoint``
    already read (else read here). The configuration checks its own rules; their errors
    (ValueError) are the command's (exit 2)."""
    if weights is None:
        weights = checkpoint_weights(args)
    name, model_kwargs, spec = recorded(args, weights)
    num_classes = model_kwargs.pop("num_classes", None)
    img_size = model_kwargs.pop("img_size", None)
    return RetrainConfig.from_recipe(
        name, args.recipe, **given_options(args),
        checkpoint=args.checkpoint, pretrained=args.pretrained, num_classes=num_classes,
        img_size=img_size, model_kwargs=model_kwargs, scan_backend=args.scan_backend,
        reduce=spec, data=args.data, val_data=None if args.val_data in ("none", "") else args.val_data,
        device=args.device, output=args.output, resume="require" if args.resume else False,
        overwrite=args.overwrite, progress=not args.no_progress, tensorboard=args.tensorboard)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when finished or stopped at --max-steps, 1 on a non-finite loss or a protected run
    directory, 2 on bad options, data, checkpoint or nothing to resume, 130 on Ctrl-C (after
    saving RUN_DIR/last.pth)."""
    weights = checkpoint_weights(args)       # the one read of the file: its record and its weights
    config = config_from_args(args, weights)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(f"vimerge {args.command}: recipe {config.recipe} (lr {config.lr:g}, min lr "
              f"{config.min_lr:g}, batch {config.batch_size}, effective batch {config.effective_batch}, "
              f"{config.epochs} epoch(s), augment {config.augment}, label smoothing "
              f"{config.label_smoothing:g}); weights: {config.checkpoint or 'random initialisation'}",
              file=sys.stderr)
    try:
        result = retrain(config, weights=weights)
    except (RunDirError, NonFiniteLossError) as exc:
        print(f"vimerge {args.command}: {exc}", file=sys.stderr)
        return 1
    except RetrainInterrupted as exc:
        if main_rank:   # the message names last.pth and the advice to resume
            print(f"\nvimerge {args.command}: {exc}", file=sys.stderr)
        return 130
    if main_rank:
        summary = {k: v for k, v in vars(result).items() if k != "model"}
        print(json.dumps(summary, default=str))
    return 0
