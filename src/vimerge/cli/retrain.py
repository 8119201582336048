"""``vimerge retrain``: re-train a token-reduced model (the R-MeeTo recipe), also under torchrun.

Under torchrun, spell ``--r`` as ``--reduce-r`` (or use ``--reduce rmeeto:r=11``): torchrun's own
parser rejects ``--r`` as an ambiguous abbreviation of its ``--rdzv-*``/``--role`` options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vimerge.train import NonFiniteLossError, RetrainConfig, RunDirError, retrain
from vimerge.train.recipe import DEFAULT_WORKERS

from .common import model_overrides, reduction_spec

HELP = "re-train a token-reduced model (R-MeeTo recipe); also under torchrun for several GPUs/nodes"


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
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many images")

    g = p.add_argument_group("recipe (retrain defaults: the R-MeeTo paper; train defaults: the shipped vim_fmnist recipe)")
    g.add_argument("--epochs", type=int, default=3, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=128, help="per-device batch (default: %(default)s)")
    g.add_argument("--effective-batch", type=int, default=1024,
                   help="target of batch x accumulation x processes (default: %(default)s)")
    g.add_argument("--accum", type=int, default=None,
                   help="gradient accumulation steps (default: enough for --effective-batch)")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights (paper: Vim-B)")
    g.add_argument("--ema-decay", type=float, default=0.996)
    g.add_argument("--distill", choices=["none", "soft", "hard"], default="none",
                   help="distil from the unreduced model: soft = KL on logits, hard = teacher's "
                        "top class (DeiT)")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation loss")
    g.add_argument("--distill-tau", type=float, default=1.0, help="temperature of soft distillation")
    g.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="mixed precision (auto: bf16 on GPUs that have it, else fp16; none on CPU)")
    g.add_argument("--augment", choices=["light", "none", "timm"], default="light",
                   help="light: random crop + flip with torch ops; timm: RandAugment, mixup/cutmix, "
                        "random erasing (needs timm)")
    g.add_argument("--crop", choices=["auto", "rrc", "pad", "none"], default="auto",
                   help="light crop: random resized (rrc) or padded random crop (auto: pad up to 64 px)")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (timm)")

    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", required=True, metavar="RUN_DIR",
                   help="run directory: checkpoints, log.jsonl, final.pth")
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    g.add_argument("--train-seed", type=int, default=0, help="seed of data order, augmentation, init")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10, help="log every N optimizer steps")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this global step (with a checkpoint; --resume continues)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", dest="tensorboard", action="store_true", default=None,
                   help="require TensorBoard logs (default: written when tensorboard is installed)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    """The :class:`~vimerge.train.RetrainConfig` of parsed ``vimerge retrain`` arguments."""
    model_kwargs = model_overrides(args)
    num_classes = model_kwargs.pop("num_classes", None)
    img_size = model_kwargs.pop("img_size", None)
    return RetrainConfig(
        model=args.model, checkpoint=args.checkpoint, num_classes=num_classes,
        img_size=img_size, model_kwargs=model_kwargs, scan_backend=args.scan_backend,
        reduce=reduction_spec(args), data=args.data,
        val_data=None if args.val_data in ("none", "") else args.val_data,
        fraction=args.fraction, data_seed=args.data_seed, workers=args.workers,
        eval_limit=args.eval_limit, epochs=args.epochs, batch_size=args.batch_size,
        effective_batch=args.effective_batch, accum_steps=args.accum, max_steps=args.max_steps,
        lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        label_smoothing=args.label_smoothing, drop_path=args.drop_path, ema=args.ema,
        ema_decay=args.ema_decay, distill=args.distill, distill_alpha=args.distill_alpha,
        distill_tau=args.distill_tau, amp=args.amp, augment=args.augment, crop=args.crop,
        hflip=args.hflip, mixup=args.mixup, cutmix=args.cutmix, reprob=args.reprob,
        seed=args.train_seed, device=args.device, output=args.output, resume=args.resume,
        overwrite=args.overwrite, save_every=args.save_every, log_every=args.log_every,
        progress=not args.no_progress, tensorboard=args.tensorboard)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when finished or stopped at --max-steps, 1 on a non-finite loss or a protected run
    directory, 2 on bad options, data or checkpoint."""
    config = config_from_args(args)
    try:
        result = retrain(config)
    except (RunDirError, NonFiniteLossError) as exc:
        print(f"vimerge {args.command}: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: v for k, v in vars(result).items() if k != "model"}
        print(json.dumps(summary, default=str))
    return 0
