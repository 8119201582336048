"""What every ``vimerge`` command shares: the model options, the token-reduction options (built
from the registered methods' fields, so a new method's options appear without an edit here),
and :func:`build_model`."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from vimerge.factory import create_model
from vimerge.models import get_preset, list_models
from vimerge.reduce import METHODS, NONE, build, format_spec, list_methods, options_of, parse_spec
from vimerge.reduce.registry import parse_value

DEFAULT_MODEL = "vim_tiny"      # --model when neither the flag nor the checkpoint names one
OPTION_PREFIX = "opt_"          # argparse dest of a method option's shorthand flag
EXTRA_FLAGS = {"r": ("--reduce-r",)}   # --r is ambiguous under torchrun's parser: offer a long spelling


class CommandError(ValueError):
    """A usage mistake the command line reports in one line (exit 2)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the message names the bad value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ------------------------------------------------------------------------------------ shared types


def floats(text: str) -> tuple[float, ...]:
    """A comma list of numbers (``--mean 0.485,0.456,0.406``; one value for grey images)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.5 or 0.485,0.456,0.406; "
                                         f"got {text!r}") from None


def device_arg(text: str) -> str:
    """``--device``: ``auto`` (cuda when available, else cpu), ``cpu``, ``cuda``, ``cuda:N``...;
    a CUDA device this machine does not have is refused with the fix."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: no CUDA device is usable here (torch {torch.__version__}, torch.cuda.is_available() "
                f"is False); use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return text


def writable_path(path: str | os.PathLike, flag: str, *, directory: bool = False) -> Path:
    """Check before any work that ``path`` (a file, or a ``directory``) can be written: its nearest
    existing ancestor is a writable directory (missing parents are created later). Returns the
    path; :class:`CommandError` naming ``flag`` and the fix otherwise."""
    out = Path(path).expanduser()
    if out.exists() and out.is_dir() != directory:
        kind = "a directory" if out.is_dir() else "a file"
        raise CommandError(f"{flag} {path}: is {kind}; give {'a directory' if directory else 'a file name'}")
    parent = out if directory else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        where = out if out.exists() else parent
        raise CommandError(f"{flag} {path}: {where} is not writable; choose another {flag} "
                           f"(or fix its permissions)")
    return out


def model_name(text: str) -> str:
    """``--model``: a registered name or alias; an unknown one is refused with the closest names."""
    try:
        get_preset(text)
    except ValueError:
        names = list_models()
        close = difflib.get_close_matches(text.replace("-", "_").lower(), names, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise argparse.ArgumentTypeError(f"unknown model {text!r}{hint} (registered: {', '.join(names)}; "
                                         f"see vimerge info)") from None
    return text


# ------------------------------------------------------------------------------------ model


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --checkpoint / architecture overrides."""
    g = p.add_argument_group("model")
    g.add_argument("--model", type=model_name, default=None,
                   help="registered model name (see `vimerge info`; default: the model the checkpoint "
                        "records (weights written by vimerge retrain/train), else vim_tiny)")
    g.add_argument("--checkpoint", help="weights: official .pth, plain state dict, .safetensors or hf://")
    g.add_argument("--pretrained", action="store_true",
                   help="load the preset's published weights (shipped for vim_fmnist; hub for the ImageNet Vims)")
    g.add_argument("--ema-weights", dest="ema_weights", action="store_true", default=None,
                   help="load the averaged (EMA/SWA) weights of a checkpoint that holds online and averaged ones "
                        "(default: the online ones, with a warning)")
    g.add_argument("--num-classes", type=int, default=None, help="head size (default: the preset's)")
    g.add_argument("--img-size", type=int, default=None, help="input resolution (default: the preset's)")
    g.add_argument("--num-frames", type=positive_int, default=None, metavar="T",
                   help="frames per clip of a video model (VideoMamba: videomamba_*_k400 take 8; with an image "
                        "preset, e.g. videomamba_tiny, builds its video model; default: the preset's)")
    g.add_argument("--scan-backend", default="auto", help="selective-scan backend (default: auto)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other constructor argument, e.g. --set depth=8 --set embed_dim=96 "
                        "(default: the preset's; `vimerge info` lists them)")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor arguments of ``--set KEY=VALUE`` (plus --num-classes / --img-size)."""
    kwargs: dict[str, Any] = {}
    accepted = constructor_keys(args.model or DEFAULT_MODEL)
    for item in args.set:
        if "=" not in item:
            raise CommandError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if accepted is not None and key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CommandError(f"--set {key}: {args.model or DEFAULT_MODEL} takes no argument {key!r}{hint}; its keys: "
                               f"{', '.join(sorted(accepted))}")
        kwargs[key] = parse_value(value)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if getattr(args, "num_frames", None) is not None:
        if accepted is not None and "num_frames" not in accepted:
            raise CommandError(f"--num-frames: {args.model or DEFAULT_MODEL} is an image model; video models "
                               f"are VideoMamba's (e.g. --model videomamba_tiny_k400)")
        kwargs["num_frames"] = args.num_frames
    return kwargs


def constructor_keys(model: str) -> set[str] | None:
    """The keyword arguments the builder of ``model`` takes (None: any, it has ``**kwargs``)."""
    params = inspect.signature(get_preset(model).builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def build_model(args: argparse.Namespace, spec: str | None = None) -> torch.nn.Module:
    """The model the arguments describe, in eval mode, with the reduction ``spec`` (default: the
    arguments' reduction; when they give none, the one the checkpoint was re-trained with).

    ``--model`` defaults to the preset the checkpoint records, else ``vim_tiny``;
    ``args.model`` is set to the preset built.
    """
    if args.model is not None:
        get_preset(args.model)   # an unknown name fails here, listing the known ones
    model = create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         ema=getattr(args, "ema_weights", None),
                         reduce=reduction_spec(args, default=None) if spec is None else spec,
                         fallback=DEFAULT_MODEL, scan_backend=args.scan_backend, **model_overrides(args))
    args.model = model.preset_name
    return model.eval()


# ------------------------------------------------------------------------------------ reduction


def _caster(f: dataclasses.Field):
    """argparse type of a method option, from its annotation (``int | list[int]`` takes 4 or 0,4,4)."""
    kind = str(f.type)
    flag = "--" + f.name.replace("_", "-")

    def cast(text: str):
        if "list" in kind:
            try:
                values = [int(v) for v in text.split(",")]
            except ValueError:
                hint = "; for a reduction ratio use --ratio" if f.name == "r" else ""
                raise argparse.ArgumentTypeError(f"{flag} takes an integer or a comma list of integers, "
                                                 f"got {text!r}{hint}") from None
            return values[0] if len(values) == 1 else values
        for name, typ in (("int", int), ("float", float)):
            if kind.startswith(name):
                try:
                    return typ(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{flag} takes a number ({name}), got {text!r}") from None
        return text
    return cast


def _flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_reduction_args(p: argparse.ArgumentParser) -> None:
    """``--reduce SPEC``, ``--method`` and a shorthand flag per option of every registered method."""
    g = p.add_argument_group("token reduction")
    g.add_argument("--reduce", metavar="SPEC",
                   help='the reduction as one string, e.g. "rmeeto:r=11,interval=2", "prune:ratio=0.28", '
                        '"stm:ratio=0.28,hsp=false" or "none"; the flags below are shorthands for its options')
    g.add_argument("--method", choices=[NONE, *list_methods()], default=None,
                   help="reduction method (default: rmeeto when --r or --ratio is given, else none)")
    owners: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for method in list_methods():
        for f in options_of(method):
            if f.metadata.get("cli", True):
                owners.setdefault(f.name, []).append(method)
                fields.setdefault(f.name, f)
    for name, f in fields.items():
        meta = f.metadata
        methods = owners[name]
        who = "" if len(methods) == len(METHODS) else f" [{', '.join(methods)}]"
        kwargs: dict[str, Any] = dict(dest=OPTION_PREFIX + name, default=None,
                                      help=(meta.get("help", "") + who).replace("%", "%%"))
        action = meta.get("action") or ("store_true" if f.default is False else None)
        if action:
            kwargs["action"] = action
        else:
            kwargs["type"] = _caster(f)
            kwargs["metavar"] = f.name.upper()
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
        g.add_argument(_flag_of(f), *EXTRA_FLAGS.get(name, ()), **kwargs)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given as shorthand flags."""
    return {k[len(OPTION_PREFIX):]: v for k, v in vars(args).items()
            if k.startswith(OPTION_PREFIX) and v is not None}


def _flag_names(options: dict[str, Any]) -> str:
    flags = {f.name: _flag_of(f) for m in list_methods() for f in options_of(m)}
    return ", ".join(flags.get(k, k) for k in options)


def merge_options(name: str, options: dict[str, Any], flags: dict[str, Any], *, strict: bool = True) -> str:
    """The spec of method ``name`` with ``options`` and the shorthand ``flags`` (flags win).

    With ``strict``, a flag the method does not take is an error (an accepted option must act).
    """
    if name == NONE:
        if flags and strict:
            raise CommandError(f"{_flag_names(flags)} given without a reduction method: add --method or --reduce")
        return NONE
    known = {f.name for f in options_of(name)}
    foreign = {k: v for k, v in flags.items() if k not in known}
    if foreign and strict:
        raise CommandError(f"{_flag_names(foreign)} is not an option of {name} (its options: "
                           f"{', '.join(sorted(known))})")
    merged = {**options, **{k: v for k, v in flags.items() if k in known}}
    if "r" in flags and "ratio" in options:
        merged.pop("ratio")
    if "ratio" in flags and "r" in options:
        merged.pop("r")
    return format_spec(name, merged)


def _implied_method(flags: dict[str, Any]) -> str:
    """The method shorthand flags imply without --method: rmeeto for --r/--ratio (the paper's),
    else the one method that takes every flag given (--final-ratio -> stm), else none."""
    if not flags:
        return NONE
    if set(flags) <= {f.name for f in options_of("rmeeto")} and ("r" in flags or "ratio" in flags):
        return "rmeeto"
    takers = [m for m in list_methods() if set(flags) <= {f.name for f in options_of(m)}]
    return takers[0] if len(takers) == 1 else NONE


def reduction_spec(args: argparse.Namespace, default: str | None = NONE) -> str | None:
    """The reduction the arguments describe, as a spec string (validated); ``default`` when they
    describe none (no --reduce, --method or option flag)."""
    flags = given_options(args)
    spec = getattr(args, "reduce", None)
    method = getattr(args, "method", None)
    if spec is None and method is None and not flags:
        return default
    if spec is not None and method is not None:
        raise CommandError("give the reduction with --reduce SPEC or with --method, not both")
    if spec is not None:
        name, options = parse_spec(spec)
    else:
        name = method or _implied_method(flags)
        options = {}
    result = merge_options(name, options, flags)
    build(result)      # a bad option fails here, before any work starts
    return result


def parse_sweep(text: str, flags: dict[str, Any] | None = None) -> list[str]:
    """``--sweep``: specs separated by ";" -> one spec per row.

    ``"none;rmeeto:r=4,interval=1;stm:ratio=0.28"``; the shorthand ``"rmeeto:0.14,0.28"``
    (bare numbers) gives one row per mean-token ratio. ``flags`` (the shorthand flags given
    beside ``--sweep``) apply to every row whose method takes them; a flag no row takes is an
    error.
    """
    flags = flags or {}
    rows: list[str] = []
    used: set[str] = set()
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise CommandError(f"--sweep: no rows in {text!r}; e.g. \"none;rmeeto:ratio=0.14;stm:ratio=0.28\"")
    for part in parts:
        name, _, rest = part.partition(":")
        name = name.strip()
        items = [v.strip() for v in rest.split(",")] if rest.strip() else []
        if items and all(_is_number(v) for v in items):
            if name == NONE:
                raise CommandError(f"--sweep: 'none' takes no ratios, got {part!r}")
            if name not in METHODS:
                parse_spec(name)   # raises: unknown method, listing the known ones
            variants = [(name, {"ratio": float(v)}) for v in items]
        else:
            variants = [parse_spec(part)]
        for method, options in variants:
            ratio = options.get("ratio")
            if ratio is not None and not 0.0 <= ratio < 1.0:
                raise CommandError(f"--sweep: ratio {ratio} of {method!r} is not in [0, 1)")
            known = {f.name for f in options_of(method)} if method != NONE else set()
            used |= known & set(flags)
            rows.append(merge_options(method, options, flags, strict=False))
    unused = {k: v for k, v in flags.items() if k not in used}
    if unused:
        raise CommandError(f"--sweep: {_flag_names(unused)} is an option of no row's method")
    for spec in rows:
        build(spec)
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
