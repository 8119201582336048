"""``vimerge retrain``: re-train a token-reduced model (the R-MeeTo recipe), also under torchrun.

Recipe: every recipe option left out takes the value of the recipe (``--recipe``): ``auto`` is the
preset's own re-training recipe when it has one (``vim_fmnist``: one pass, lr 1e-3 cosine to 1e-5,
batch 64, no augmentation), else the R-MeeTo paper's ImageNet recipe (``paper``: lr 2e-5, light
augmentation, effective batch 1024, 3 epochs); ``base`` is the from-scratch recipe of
``vimerge train``. The log says which recipe applied; ``config.json`` records it.

Every option acts or is refused: an option that the chosen settings would ignore (``--ema-decay``
without ``--ema``, ``--mixup`` without ``--augment timm``...) is an error naming what it needs.

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
from typing import Any

from vimerge.data import detect_kind
from vimerge.models import get_preset, list_models, read_checkpoint
from vimerge.reduce import stored_spec
from vimerge.train import NonFiniteLossError, RetrainConfig, RetrainInterrupted, RunDirError, retrain
from vimerge.train.recipe import BASE_RECIPE, DEFAULT_WORKERS, RECIPES

from . import common
from .common import CommandError, device_arg, model_overrides, positive_int, reduction_spec

HELP = "re-train a token-reduced model (R-MeeTo recipe); also under torchrun for several GPUs/nodes"

PAPER = {f.name: f.default for f in dataclasses.fields(RetrainConfig)}

# recipe options: flag -> (RetrainConfig field, argparse keywords, help). Their argparse default is
# None ("not given"): the recipe fills them in.
RECIPE_FLAGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "--epochs": ("epochs", dict(type=int), "passes over the (sub)set"),
    "--batch-size": ("batch_size", dict(type=int), "per-device batch"),
    "--effective-batch": ("effective_batch", dict(type=int),
                          "target of batch x accumulation x processes (not with --accum)"),
    "--accum": ("accum_steps", dict(type=int),
                "gradient accumulation steps (default: enough for the effective batch; not with "
                "--effective-batch)"),
    "--lr": ("lr", dict(type=float), "peak learning rate"),
    "--min-lr": ("min_lr", dict(type=float), "final learning rate of the cosine"),
    "--warmup-steps": ("warmup_steps", dict(type=int), "linear warm-up updates (not with --warmup-epochs)"),
    "--warmup-epochs": ("warmup_epochs", dict(type=float), "linear warm-up in epochs"),
    "--warmup-lr": ("warmup_lr", dict(type=float), "learning rate the warm-up starts from (needs a warm-up)"),
    "--weight-decay": ("weight_decay", dict(type=float), "AdamW weight decay"),
    "--clip-grad": ("clip_grad", dict(type=float), "clip the gradient norm to this"),
    "--label-smoothing": ("label_smoothing", dict(type=float), "label smoothing of the cross-entropy"),
    "--drop-path": ("drop_path", dict(type=float), "stochastic depth rate"),
    "--ema": ("ema", dict(action="store_true"), "keep an EMA of the weights (paper: Vim-B)"),
    "--ema-decay": ("ema_decay", dict(type=float), "EMA decay (needs --ema)"),
    "--distill": ("distill", dict(choices=["none", "soft", "hard"]),
                  "distil from the unreduced model: soft = KL on logits, hard = teacher's top class (DeiT)"),
    "--distill-alpha": ("distill_alpha", dict(type=float), "weight of the distillation loss (needs --distill)"),
    "--distill-tau": ("distill_tau", dict(type=float), "temperature of soft distillation (needs --distill soft)"),
    "--amp": ("amp", dict(choices=["auto", "none", "bf16", "fp16"]),
              "mixed precision (auto: bf16 on GPUs that have it, else fp16; none on CPU)"),
    "--augment": ("augment", dict(choices=["light", "none", "timm"]),
                  "light: random crop + flip with torch ops; timm: RandAugment, mixup/cutmix, random "
                  "erasing (needs timm)"),
    "--crop": ("crop", dict(choices=["auto", "rrc", "pad", "none"]),
               "light crop: random resized (rrc) or padded random crop (auto: pad up to 64 px)"),
    "--hflip": ("hflip", dict(type=float), "horizontal flip probability"),
    "--mixup": ("mixup", dict(type=float), "mixup alpha (needs --augment timm)"),
    "--cutmix": ("cutmix", dict(type=float), "cutmix alpha (needs --augment timm)"),
    "--reprob": ("reprob", dict(type=float), "random erasing probability (needs --augment timm)"),
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


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


def add_args(p: argparse.ArgumentParser) -> None:
    """Data, recipe, run-directory and robustness options of ``vimerge retrain``."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training data: a Fashion-MNIST IDX directory or an ImageFolder "
                   "directory (DIR/train and DIR/val are used when present); auto-detected")
    g.add_argument("--val-data", default="auto", help="evaluation data (default auto: Fashion-MNIST's "
                   "test split or DIR/val; 'none' to skip)")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="train on this fraction of the data, drawn with the seed (Table 8: 0.01, 0.05, 0.1; "
                        "the paper trains 3/fraction epochs to keep the number of updates)")
    g.add_argument("--data-seed", type=int, default=None, help="seed of the subset (default --train-seed)")
    g.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"data loader processes per device (default: {DEFAULT_WORKERS}, half the CPUs, at most 4)")
    g.add_argument("--limit", "--eval-limit", dest="eval_limit", type=positive_int, default=None, metavar="N",
                   help="evaluate on at most N images (needs evaluation data), as eval's --limit")

    g = p.add_argument_group(
        "recipe", "left out, an option takes the recipe's value (--recipe): the preset's re-training "
        "recipe where it has one, else the R-MeeTo paper's (retrain), or the from-scratch recipe (train)")
    g.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="defaults of the options below: auto = the preset's recipe when it has one "
                        "(vim_fmnist), else paper = R-MeeTo's ImageNet recipe; base = vimerge train's "
                        "(default: %(default)s)")
    for flag, (field, kwargs, text) in RECIPE_FLAGS.items():
        shown = recipe_help(field) if not kwargs.get("action") else ""
        shown = f" ({shown})" if shown else ""
        g.add_argument(flag, dest=_dest(flag), default=None, help=(text + shown).replace("%", "%%"),
                       **kwargs)

    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", required=True, metavar="RUN_DIR",
                   help="run directory: checkpoints, log.jsonl, final.pth")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR (an error when it holds nothing to continue)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR (not with --resume)")
    g.add_argument("--train-seed", type=int, default=0, help="seed of data order, augmentation, init")
    g.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this global step (with a checkpoint; --resume continues)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                   help="require TensorBoard logs (default: written when tensorboard is installed)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")


def given_recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe options the user gave, as RetrainConfig fields."""
    given = {}
    for flag, (field, _, _) in RECIPE_FLAGS.items():
        value = getattr(args, _dest(flag))
        if value is not None:
            given[field] = value
    return given


def check_exclusive(args: argparse.Namespace, given: dict[str, Any]) -> None:
    """Refuse pairs of options of which the run could follow only one."""
    if "accum_steps" in given and "effective_batch" in given:
        raise CommandError("--accum and --effective-batch both set the accumulation; give one")
    if "warmup_steps" in given and "warmup_epochs" in given:
        raise CommandError("--warmup-steps and --warmup-epochs both set the warm-up; give one")
    if args.resume and args.overwrite:
        raise CommandError("--resume continues the run in RUN_DIR and --overwrite starts it over; give one")
    if args.pretrained and args.checkpoint:
        raise CommandError("give --checkpoint PATH or --pretrained (the preset's published weights), not both")
    if args.pretrained and get_preset(args.model or common.DEFAULT_MODEL).pretrained is None:
        raise CommandError(f"model {args.model or common.DEFAULT_MODEL!r} has no published weights; pass "
                           f"--checkpoint PATH")


def check_options(args: argparse.Namespace, given: dict[str, Any], config: RetrainConfig) -> None:
    """Refuse every option the resulting run would ignore (an accepted option must act)."""
    flag = {field: f for f, (field, _, _) in RECIPE_FLAGS.items()}

    def needs(field: str, condition: bool, requirement: str) -> None:
        if field in given and not condition:
            raise CommandError(f"{flag[field]} acts only {requirement}; drop it or add what it needs")

    needs("ema_decay", config.ema, "with --ema")
    needs("distill_alpha", config.distill != "none", "with --distill soft or hard")
    needs("distill_tau", config.distill == "soft", "with --distill soft")
    needs("warmup_lr", bool(config.warmup_steps or config.warmup_epochs),
          "with a warm-up (--warmup-steps or --warmup-epochs)")
    for field in ("mixup", "cutmix", "reprob"):
        needs(field, config.augment == "timm", "with --augment timm")
    for field in ("crop", "hflip"):
        needs(field, config.augment != "none", f"with augmentation (the recipe has --augment {config.augment})")
    if config.augment == "timm" and args.data and detect_kind(args.data, "train") == "imagefolder":
        for field in ("crop", "hflip"):
            needs(field, False, "with --augment light (with --augment timm on an image folder the crops "
                  "and flips are timm's)")
    if args.eval_limit is not None and config.val_data is None:
        raise CommandError("--limit acts only with evaluation data; drop it or drop --val-data none")


def recorded(args: argparse.Namespace) -> tuple[str, dict[str, Any], str]:
    """(preset, constructor arguments, reduction spec) the run starts from: ``--model``, ``--set``
    and the reduction options where given, else what ``--checkpoint`` records (weights written by
    vimerge retrain/train come back as they were trained, as in every command), else the command
    line's default model, its preset arguments and no reduction."""
    meta = read_checkpoint(args.checkpoint)[1] if args.checkpoint else {}
    arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    name = get_preset(args.model or arch.get("name") or common.DEFAULT_MODEL).name
    args.model = name
    kwargs = model_overrides(args)
    if arch.get("name") and get_preset(arch["name"]).name == name:
        kwargs = {**dict(arch.get("kwargs") or {}), **kwargs}
    spec = reduction_spec(args, default=None)
    return name, kwargs, stored_spec(meta.get("reduction")) if spec is None else spec


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    """The :class:`~vimerge.train.RetrainConfig` of parsed ``vimerge retrain`` arguments: the
    recipe's values (``--recipe``) under the options given."""
    given = given_recipe_options(args)
    check_exclusive(args, given)
    name, model_kwargs, spec = recorded(args)
    num_classes = model_kwargs.pop("num_classes", None)
    img_size = model_kwargs.pop("img_size", None)
    config = RetrainConfig.from_recipe(
        name, args.recipe, **given,
        checkpoint=args.checkpoint, pretrained=args.pretrained, num_classes=num_classes,
        img_size=img_size, model_kwargs=model_kwargs, scan_backend=args.scan_backend,
        reduce=spec, data=args.data,
        val_data=None if args.val_data in ("none", "") else args.val_data,
        fraction=args.fraction, data_seed=args.data_seed, workers=args.workers,
        eval_limit=args.eval_limit, max_steps=args.max_steps,
        seed=args.train_seed, device=args.device, output=args.output,
        resume="require" if args.resume else False,
        overwrite=args.overwrite, save_every=args.save_every, log_every=args.log_every,
        progress=not args.no_progress, tensorboard=args.tensorboard)
    check_options(args, given, config)
    return config


def run(args: argparse.Namespace) -> int:
    """Exit 0 when finished or stopped at --max-steps, 1 on a non-finite loss or a protected run
    directory, 2 on bad options, data, checkpoint or nothing to resume, 130 on Ctrl-C (after
    saving RUN_DIR/last.pth)."""
    config = config_from_args(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(f"vimerge {args.command}: recipe {config.recipe} (lr {config.lr:g}, min lr "
              f"{config.min_lr:g}, batch {config.batch_size}, effective batch {config.effective_batch}, "
              f"{config.epochs} epoch(s), augment {config.augment}, label smoothing "
              f"{config.label_smoothing:g}); weights: {config.checkpoint or 'random initialisation'}",
              file=sys.stderr)
    try:
        result = retrain(config)
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
