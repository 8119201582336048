"""The training recipe: configuration (its option rules and command-line flags), learning-rate
schedule, parameter groups, EMA.

:class:`RetrainConfig` is every option of a run, re-training or training from scratch; each field
declared with :func:`option` carries its flag, help and rule, from which ``vimerge retrain`` /
``vimerge train`` build their options (``cli/retrain.py``) and which the configuration checks on
construction (:meth:`RetrainConfig.validate`), so a new option is one field.

Defaults follow the R-MeeTo paper (Sec. 4.1 and App. B): AdamW, learning rate cosine-decayed
per optimizer step from 2e-5 to 1e-6, weight decay 0.05, effective batch 1024 (per-device batch
x gradient accumulation x world size), 3 epochs; EMA with decay 0.996 as for Vim-B.

That recipe is made for ImageNet. A preset may carry the recipe that suits it
(``register_model(..., retrain_recipe={...})``; ``vim_fmnist``: one pass, lr 1e-3 cosine to 1e-5,
batch 64, no augmentation); :func:`recipe_defaults` resolves which one applies and
:meth:`RetrainConfig.from_recipe` builds a configuration from it (``vimerge retrain`` does, so a
flag the user gives wins over the recipe, and the recipe over the paper's defaults).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, InitVar, asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from ..data import detect_kind
from ..models import get_preset, pretrained_uri
from ..reduce import format_spec, parse_spec, stored_spec
from .loss import DISTILL_TYPES

DEFAULT_WORKERS = min(4, (os.cpu_count() or 2) // 2)  # data loader processes per device

AMP_MODES = ("auto", "none", "bf16", "fp16")
AUGMENTS = ("light", "none", "timm")
CROPS = ("auto", "rrc", "pad", "none")
RECIPES = ("auto", "paper", "base")    # see recipe_defaults


def option(default: Any = MISSING, *, help: str | None = None, flag: str | None = None,
           aliases: tuple[str, ...] = (), group: str = "recipe", choices: tuple[str, ...] | None = None,
           needs: tuple[Callable[[RetrainConfig], bool], str] | None = None,
           default_factory: Any = MISSING) -> Any:
    """A :class:`RetrainConfig` field and what the command line and the rules need to know of it.

    ``help`` (with it the field is a flag of ``vimerge retrain``/``train``: ``flag``, default
    ``--field-name``, plus ``aliases``, in argument group ``group``; ``"recipe"`` fields take the
    recipe's value when left out), ``choices`` (the values allowed, checked here and by the
    parser), ``needs``: ``(condition on the configuration, what it needs in words)``, a value
    that differs from the recipe's default is refused when the condition fails (an option the
    run would ignore). A new training option is this one field.
    """
    metadata = {"help": help, "flag": flag, "aliases": aliases, "group": group, "choices": choices,
                "needs": needs}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _warm_up(c: RetrainConfig) -> bool:
    return bool(c.warmup_steps or c.warmup_epochs)


_WITH_TIMM = (lambda c: c.augment == "timm", "augment='timm' (--augment timm)")
_WITH_AUGMENT = (lambda c: c.augment != "none", "augmentation (augment='light' or 'timm', --augment)")


@dataclass
class RetrainConfig:
    """Everything a re-training (or training) run needs; :func:`vimerge.train.retrain` takes one.

    Model: ``model`` (registered name), ``checkpoint`` (weights to start from and, with
    ``distill``, the teacher), ``pretrained`` (start from the preset's published weights: it
    sets ``checkpoint`` to :func:`vimerge.models.pretrained_uri`, so that the configuration
    records where the weights came from), ``num_classes`` / ``img_size`` (None: the data's classes / the
    preset's size), ``model_kwargs`` (other constructor arguments), ``scan_backend``.
    Reduction: ``reduce``, a reduction spec such as ``"rmeeto:r=11"`` or ``"none"`` (see
    :func:`vimerge.reduce.apply`); stored in its canonical spelling. The default is the paper's
    R-MeeTo r = 11 (Vim-S/B); ``vimerge retrain`` given no reduction option passes the
    reduction the checkpoint records, else ``"none"``. The keywords ``method=`` and
    ``reduction=`` of earlier releases are still taken (one release, with a DeprecationWarning):
    ``method="rmeeto", reduction={"r": 4}`` is ``reduce="rmeeto:r=4"``.
    Data: ``data`` (Fashion-MNIST IDX directory, ImageFolder or video directory, auto-detected),
    ``val_data`` ("auto": Fashion-MNIST's test split, or DIR/val next to DIR/train), ``fraction``
    of the training set (Table 8; the subset is drawn with ``data_seed``, default ``seed``).
    Steps: ``batch_size`` per device, ``accum_steps`` (None: the fewest that reach
    ``effective_batch`` with the world size; given, it decides and ``effective_batch`` follows),
    ``epochs``, ``max_steps`` (stop after this global optimizer step with a checkpoint, as an
    interruption would). Warm-up: ``warmup_steps`` or ``warmup_epochs`` (not both).
    Loss (:mod:`vimerge.train.loss`): cross-entropy with ``label_smoothing`` (soft-target
    cross-entropy under timm's mixup/cutmix). ``distill`` adds a teacher, the loaded model
    *without* reduction (frozen): ``"soft"`` is ``tau**2 * KL(teacher || student)`` on logits
    softened by ``distill_tau``, ``"hard"`` the cross-entropy on the teacher's top class; the
    loss is ``(1 - distill_alpha) * ce + distill_alpha * kd``. The paper re-trains with plain
    cross-entropy, so the default is ``"none"``.
    Run: ``output`` (the run directory), ``resume`` (``"require"``: continue the run in
    ``output``, an error (:class:`~vimerge.train.rundir.NothingToResume`) when it holds
    nothing to continue, as ``vimerge retrain --resume``; True: continue it when there is one,
    else start a new run there (logged at info level)), ``overwrite`` (start over; not with
    ``resume``). ``recipe`` records where the defaults came from (``"paper"``, ``"base"`` or
    ``"preset:NAME"``, see :meth:`from_recipe`).

    Paths (``checkpoint``, ``data``, ``val_data``, ``output``) may be ``str`` or ``os.PathLike``;
    they are kept (and recorded in ``config.json`` and the log) as strings.

    Rules, checked on construction (ValueError naming the field and its flag): values in range
    and choices; pairs that exclude each other; a value that the run would ignore is refused
    (``ema_decay`` without ``ema``, ``mixup`` without ``augment="timm"``...: each field's
    ``needs``, see :func:`option`), where "given" means different from the default of the
    configuration's ``recipe``.
    """

    # model and reduction
    model: str = "vim_tiny"
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    scan_backend: str = "auto"
    reduce: str = "rmeeto:r=11"
    # data
    data: str | None = None
    val_data: str | None = "auto"
    fraction: float = option(1.0, group="data", help="train on this fraction of the data, drawn with the "
                             "seed (Table 8: 0.01, 0.05, 0.1; the paper trains 3/fraction epochs to keep the "
                             "number of updates)")
    data_seed: int | None = option(None, group="data", help="seed of the subset (default --train-seed)")
    workers: int = option(DEFAULT_WORKERS, group="data",
                          help="data loader processes per device (half the CPUs, at most 4)")
    eval_batch_size: int | None = None
    eval_limit: int | None = option(None, flag="--limit", aliases=("--eval-limit",), group="data",
                                    help="evaluate on at most N images, as eval's --limit",
                                    needs=(lambda c: c.val_data is not None,
                                           "evaluation data (val_data=..., --val-data)"))
    # steps
    epochs: int = option(3, help="passes over the (sub)set")
    batch_size: int = option(128, help="per-device batch")
    effective_batch: int = option(1024, help="target of batch x accumulation x processes (not with --accum)")
    accum_steps: int | None = option(None, flag="--accum", help="gradient accumulation steps (default: "
                                     "enough for the effective batch; not with --effective-batch)")
    max_steps: int | None = option(None, group="run", help="stop after this global step (with a "
                                   "checkpoint; --resume continues)")
    # optimisation
    lr: float = option(2e-5, help="peak learning rate")
    min_lr: float = option(1e-6, help="final learning rate of the cosine")
    warmup_steps: int = option(0, help="linear warm-up updates (not with --warmup-epochs)")
    warmup_epochs: float = option(0.0, help="linear warm-up in epochs")
    warmup_lr: float = option(1e-6, help="learning rate the warm-up starts from (needs a warm-up)",
                              needs=(_warm_up, "a warm-up (warmup_steps= or warmup_epochs=, --warmup-steps "
                                     "or --warmup-epochs)"))
    weight_decay: float = option(0.05, help="AdamW weight decay")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = option(None, help="clip the gradient norm to this")
    label_smoothing: float = option(0.1, help="label smoothing of the cross-entropy")
    drop_path: float | None = option(None, help="stochastic depth rate")
    ema: bool = option(False, help="keep an EMA of the weights (paper: Vim-B)")
    ema_decay: float = option(0.996, help="EMA decay (needs --ema)", needs=(lambda c: c.ema, "ema=True (--ema)"))
    distill: str = option("none", choices=DISTILL_TYPES, help="distil from the unreduced model: soft = KL on "
                          "logits, hard = teacher's top class (DeiT)")
    distill_alpha: float = option(0.5, help="weight of the distillation loss (needs --distill)",
                                  needs=(lambda c: c.distill != "none", "distill='soft' or 'hard' (--distill)"))
    distill_tau: float = option(1.0, help="temperature of soft distillation (needs --distill soft)",
                                needs=(lambda c: c.distill == "soft", "distill='soft' (--distill soft)"))
    amp: str = option("auto", choices=AMP_MODES,
                      help="mixed precision (auto: bf16 on GPUs that have it, else fp16; none on CPU)")
    # augmentation
    augment: str = option("light", choices=AUGMENTS, help="light: random crop + flip with torch ops; timm: "
                          "RandAugment, mixup/cutmix, random erasing (needs timm)")
    crop: str = option("auto", choices=CROPS, needs=_WITH_AUGMENT, help="light crop: random resized (rrc) "
                       "or padded random crop (auto: pad up to 64 px)")
    crop_padding: int | None = None
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = option(0.5, help="horizontal flip probability", needs=_WITH_AUGMENT)
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    mixup: float = option(0.8, help="mixup alpha (needs --augment timm)", needs=_WITH_TIMM)
    cutmix: float = option(1.0, help="cutmix alpha (needs --augment timm)", needs=_WITH_TIMM)
    reprob: float = option(0.25, help="random erasing probability (needs --augment timm)", needs=_WITH_TIMM)
    # run
    seed: int = option(0, flag="--train-seed", group="run", help="seed of data order, augmentation, init")
    device: str = "auto"
    output: str = "runs/retrain"
    resume: bool | str = False
    overwrite: bool = False
    save_every: int = option(0, group="run", help="also checkpoint every N steps")
    log_every: int = option(10, group="run", help="log every N optimizer steps")
    eval_every: int = 1
    progress: bool = True
    tensorboard: bool | None = None
    dist_backend: str = "auto"
    recipe: str = "paper"
    # the keywords of earlier releases (deprecated; see the class docstring)
    method: InitVar[str | None] = None
    reduction: InitVar[dict[str, Any] | None] = None

    def __post_init__(self, method: str | None = None, reduction: dict[str, Any] | None = None) -> None:
        if method is not None or reduction is not None:
            self.reduce = _deprecated_reduction(method, reduction, self.reduce)
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.fspath(value))
        self.betas = tuple(self.betas)            # type: ignore[assignment]
        self.rrc_scale = tuple(self.rrc_scale)    # type: ignore[assignment]
        self.reduce = canonical_spec(self.reduce)
        if self.pretrained:
            uri = pretrained_uri(self.model)
            if uri is None:
                raise ValueError(f"model {self.model!r} has no published weights: pass "
                                 f"checkpoint=PATH (--checkpoint) instead of pretrained (--pretrained)")
            if self.checkpoint is None:
                self.checkpoint = uri
            elif self.checkpoint != uri:
                raise ValueError(f"give checkpoint= ({self.checkpoint}; --checkpoint) or pretrained=True "
                                 f"(--pretrained: the weights of {self.model}, {uri}), not both")
        self.validate()

    def validate(self, given: Iterable[str] = ()) -> None:
        """Check ranges, choices, exclusive pairs and that every given value acts (the class
        docstring); raises ValueError naming the field (and its ``vimerge retrain`` flag).
        ``given``: fields set explicitly, checked even where they equal the recipe's value
        (:meth:`from_recipe` passes the values it was given)."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} ({flag_of(f)}) must be one of {', '.join(choices)}, got "
                                 f"{getattr(self, f.name)!r}")
        checks = [
            (0.0 < self.fraction <= 1.0, f"fraction (--fraction) must be in (0, 1], got {self.fraction}"),
            (self.epochs >= 1, f"epochs (--epochs) must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size (--batch-size) must be >= 1, got {self.batch_size}"),
            (self.accum_steps is None or self.accum_steps >= 1, "accum_steps (--accum) must be >= 1"),
            (self.effective_batch >= 1, "effective_batch (--effective-batch) must be >= 1"),
            (self.eval_limit is None or self.eval_limit >= 1, "eval_limit (--limit) must be >= 1"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay (--ema-decay) must be in [0, 1), got {self.ema_decay}"),
            (0.0 <= self.distill_alpha <= 1.0, "distill_alpha (--distill-alpha) must be in [0, 1]"),
            (self.min_lr <= self.lr, f"min_lr ({self.min_lr}; --min-lr) must not exceed lr ({self.lr}; --lr)"),
            (self.resume in (True, False, "require"),
             f"resume must be True, False or 'require', got {self.resume!r}"),
            (not (self.resume and self.overwrite),
             "resume (--resume) continues the run in output and overwrite (--overwrite) starts it over; "
             "give one"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        given = self.given() | set(given)
        for a, b, what in (("accum_steps", "effective_batch", "the accumulation"),
                           ("warmup_steps", "warmup_epochs", "the warm-up")):
            if a in given and b in given and getattr(self, a) and getattr(self, b):
                raise ValueError(f"{a}= ({FLAGS[a]}) and {b}= ({FLAGS[b]}) both set {what}; give one")
        for f in fields(self):
            needs = f.metadata.get("needs")
            if needs and f.name in given and not needs[0](self):
                raise ValueError(f"{f.name}= ({flag_of(f)}) acts only with {needs[1]}; drop it or add "
                                 f"what it needs")
        if (self.augment == "timm" and self.data and {"crop", "hflip"} & given
                and detect_kind(self.data, "train") == "imagefolder"):
            name = "crop" if "crop" in given else "hflip"
            raise ValueError(f"{name}= ({FLAGS[name]}) acts only with augment='light' (--augment light): "
                             f"with augment='timm' on an image folder the crops and flips are timm's")

    def given(self) -> set[str]:
        """The fields whose value differs from the default of this configuration's recipe."""
        baseline = {**DEFAULTS, **recipe_values(self.recipe)}
        return {f.name for f in fields(self) if getattr(self, f.name) != baseline.get(f.name, MISSING)}

    @classmethod
    def from_recipe(cls, model: str = "vim_tiny", recipe: str = "auto", **given: Any) -> RetrainConfig:
        """The configuration of ``model`` with the defaults of ``recipe`` (see
        :func:`recipe_defaults`) under the values ``given``; ``recipe`` records which applied."""
        label, values = recipe_defaults(model, recipe)
        config = cls(model=model, recipe=label, **{**values, **given})
        config.validate(given)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists, paths strings)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrainConfig:
        """The configuration ``to_dict`` wrote; also reads the ``method`` + ``reduction``
        pair of configurations written before ``reduce`` existed (without a warning: the file
        is not the user's code)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        if "reduce" not in d and ("method" in d or "reduction" in d):
            values["reduce"] = stored_spec({"method": d.get("method", "rmeeto"), "options": d.get("reduction")})
        return cls(**values)


# fields that name files or directories (str or os.PathLike given, str kept)
PATH_FIELDS = ("checkpoint", "data", "val_data", "output")
DEFAULTS: dict[str, Any] = {f.name: (f.default if f.default is not MISSING else f.default_factory())
                            for f in fields(RetrainConfig)}


def flag_of(f: Field) -> str:
    """The command-line flag of a :class:`RetrainConfig` field (``--name-with-dashes`` unless its
    metadata names another)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


FLAGS: dict[str, str] = {f.name: flag_of(f) for f in fields(RetrainConfig)}


def _deprecated_reduction(method: str | None, reduction: dict[str, Any] | None, reduce: str) -> str:
    """The ``reduce`` spec of the ``method=`` / ``reduction=`` keywords of earlier releases, with a
    DeprecationWarning that names it."""
    if reduce != DEFAULTS["reduce"]:
        raise ValueError(f"give reduce= ({reduce!r}) or the deprecated method= / reduction=, not both")
    method = method or "rmeeto"
    if reduction is None:     # the old defaults: R-MeeTo with r = 11
        reduction = {"r": 11} if method == "rmeeto" else {}
    spec = canonical_spec(stored_spec({"method": method, "options": reduction}))
    given = ", ".join(f"{k}={v!r}" for k, v in (("method", method), ("reduction", reduction)))
    warnings.warn(f"RetrainConfig({given}) is deprecated and will be removed in the next release: "
                  f"use reduce={spec!r}", DeprecationWarning, stacklevel=4)
    return spec


def canonical_spec(spec: str) -> str:
    """``spec`` in the canonical spelling of :func:`vimerge.reduce.format_spec` (``"none"``
    stays ``"none"``); raises ValueError on a malformed spec."""
    name, options = parse_spec(spec)
    return "none" if name == "none" else format_spec(name, options)


# Training a base model from scratch (``vimerge train``; the demo's fallback when no base checkpoint
# exists): the recipe that made the shipped ``vim_fmnist`` weights (89.64% Fashion-MNIST test
# top-1 after 3 epochs, 24 min on the 2-core development CPU; see assets/vim_fmnist.json).
BASE_RECIPE: dict[str, Any] = dict(reduce="none", epochs=3, batch_size=128,
                                   effective_batch=128, lr=3e-3, min_lr=1e-5, warmup_epochs=0.1,
                                   augment="none", seed=0)


def recipe_values(label: str) -> dict[str, Any]:
    """The field values of the recipe a configuration records (``"paper"``, ``"base"``,
    ``"preset:NAME"``; a preset this installation lacks: none)."""
    if label == "base":
        return dict(BASE_RECIPE)
    if label.startswith("preset:"):
        try:
            return dict(get_preset(label[len("preset:"):]).retrain_recipe or {})
        except ValueError:
            return {}
    return {}


def recipe_defaults(model: str, recipe: str = "auto") -> tuple[str, dict[str, Any]]:
    """``(label, field values)`` of a re-training recipe for ``model``.

    ``"paper"``: the R-MeeTo paper's ImageNet recipe (the :class:`RetrainConfig` defaults, no
    values); ``"base"``: :data:`BASE_RECIPE` (training from scratch, ``vimerge train``);
    ``"auto"``: the preset's ``retrain_recipe`` when it has one (label ``"preset:NAME"``), else
    the paper's.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "base":
        return "base", dict(BASE_RECIPE)
    preset = get_preset(model)
    if recipe == "auto" and preset.retrain_recipe:
        return f"preset:{preset.name}", dict(preset.retrain_recipe)
    return "paper", {}


# fields a resumed run may change; everything else comes from the checkpoint's configuration
RESUME_MUTABLE = ("output", "resume", "overwrite", "workers", "max_steps", "device", "progress",
                  "tensorboard", "save_every", "log_every", "eval_every", "eval_batch_size",
                  "eval_limit", "dist_backend", "data", "val_data", "checkpoint", "pretrained",
                  "scan_backend")


# ---------------------------------------------------------------------------------------------
# batch arithmetic


def resolve_accum(batch_size: int, world_size: int, effective_batch: int,
                  accum_steps: int | None = None) -> tuple[int, int]:
    """``(accum_steps, effective_batch)``: the given accumulation, or the fewest steps whose
    ``batch_size * accum * world_size`` reaches ``effective_batch`` (the result may exceed it
    when it is not a multiple of ``batch_size * world_size``)."""
    per_step = batch_size * world_size
    accum = accum_steps if accum_steps is not None else max(1, math.ceil(effective_batch / per_step))
    return accum, per_step * accum


# ---------------------------------------------------------------------------------------------
# learning rate


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int = 0,
          warmup_lr: float = 1e-6) -> float:
    """Learning rate of optimizer update ``step`` (0-based) of ``total_steps``.

    Warm-up: updates ``0 .. warmup_steps - 1`` rise linearly from ``warmup_lr`` towards ``lr``
    (``warmup_lr + (lr - warmup_lr) * step / warmup_steps``). Then a cosine from ``lr`` (first
    update after warm-up) to exactly ``min_lr`` (last update)::

        lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W - 1))) / 2
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    span = total_steps - warmup_steps - 1
    if span <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule:
    """Sets the optimizer's learning rate per update from :func:`lr_at`; ``step()`` after each
    update. Its state is the number of updates done."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, lr: float, min_lr: float,
                 warmup_steps: int = 0, warmup_lr: float = 1e-6):
        self.optimizer = optimizer
        self.total_steps, self.lr, self.min_lr = total_steps, lr, min_lr
        self.warmup_steps, self.warmup_lr = warmup_steps, warmup_lr
        self.last_step = 0
        self._apply()

    def get_lr(self) -> float:
        return lr_at(self.last_step, self.total_steps, self.lr, self.min_lr, self.warmup_steps,
                     self.warmup_lr)

    def _apply(self) -> None:
        value = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


# ---------------------------------------------------------------------------------------------
# parameter groups


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters trained without weight decay: the backbone's own ``no_weight_decay()`` (for
    Vim: A_log / A_b_log / D / D_b, the position embedding, the class token) plus every
    parameter with at most one dimension (biases, norms)."""
    names = set(model.no_weight_decay())
    names.update(name for name, p in model.named_parameters() if p.ndim <= 1)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, ``decay`` and ``no_decay`` (each lists its parameter ``names``)."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append((name, p))
    return [{"name": "decay", "params": [p for _, p in decay], "names": [n for n, _ in decay],
             "weight_decay": weight_decay},
            {"name": "no_decay", "params": [p for _, p in no_decay],
             "names": [n for n, _ in no_decay], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: RetrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, config.weight_decay)
    kwargs: dict[str, Any] = {}
    if any(p.is_cuda for g in groups for p in g["params"]):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, **kwargs)


# ---------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's weights, updated after every optimizer step::

        ema = decay * ema + (1 - decay) * weights

    Floating-point parameters and buffers are averaged in fp32; other buffers are copied.
    ``module`` is a full copy of the model (with its reduction) for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.996):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay
        src = model.state_dict()
        for name, ema_t in self.module.state_dict().items():
            t = src[name].detach()
            if ema_t.is_floating_point():
                ema_t.mul_(d).add_(t.to(ema_t.dtype), alpha=1.0 - d)
            else:
                ema_t.copy_(t)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def group_names(groups: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    return {g["name"]: list(g["names"]) for g in groups}
