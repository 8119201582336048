"""``vimerge eval``: top-1/top-5 accuracy and loss of a (reduced) model, one row or a sweep.

    vimerge eval --model vim_tiny --checkpoint vim_t.pth --data /data/imagenet/val
    vimerge eval --model vim_tiny --checkpoint vim_t.pth --data /data/imagenet/val --reduce rmeeto:ratio=0.28
    vimerge eval --model vim_fmnist --pretrained --dataset fashion-mnist \\
        --sweep "none;rmeeto:0.14,0.28;stm:ratio=0.28;prune:r=4,interval=1" --output sweep.json

Weights, data and batches are the same for every row of a sweep: the model is built once and
only its reduction changes between rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from vimerge.data import detect_kind, make_loader, open_dataset
from vimerge.measure.evaluate import evaluate
from vimerge.measure.flops import model_cost
from vimerge.measure.table import markdown_table
from vimerge.reduce import apply, parse_spec

from .common import CommandError, build_model, given_options, parse_sweep, reduction_spec

log = logging.getLogger(__name__)

HELP = ("top-1/top-5 accuracy and loss on an ImageFolder directory or Fashion-MNIST; --sweep for "
        "several reductions")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_args(p: argparse.ArgumentParser) -> None:
    """The data / evaluation / sweep options."""
    g = p.add_argument_group("evaluation data")
    g.add_argument("--data", metavar="DIR",
                   help="an ImageFolder directory (DIR/<class>/<image>, e.g. ImageNet val) or a "
                        "directory with the Fashion-MNIST IDX files (default with --dataset "
                        "fashion-mnist: /usr/share/datasets/fashion-mnist)")
    g.add_argument("--dataset", choices=["auto", "imagefolder", "fashion-mnist"], default="auto",
                   help="how to read --data; auto: Fashion-MNIST when DIR holds its IDX files, "
                        "else ImageFolder (default: auto)")
    g.add_argument("--split", choices=["test", "train"], default="test",
                   help="Fashion-MNIST split (default: test); an ImageFolder DIR is one split")
    g.add_argument("--limit", type=_positive, default=None, metavar="N",
                   help="evaluate N images: Fashion-MNIST's first N, or N spread evenly over the "
                        "ImageFolder's sorted list (every class represented)")
    g.add_argument("--batch-size", type=_positive, default=64, help="images per batch (default: 64)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: 0 for Fashion-MNIST, "
                        "min(8, CPUs - 1) for image files)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: auto: cuda if available)")
    g.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                   help="normalisation mean (default: ImageNet's, or Fashion-MNIST's 0.2860)")
    g.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                   help="normalisation std (default: ImageNet's, or Fashion-MNIST's 0.3530)")
    g.add_argument("--crop-pct", type=float, default=0.875,
                   help="ImageFolder: resize the shorter side to img_size / crop_pct, then centre "
                        "crop (default: 0.875, 256 -> 224)")
    g.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear", "lanczos", "nearest"],
                   help="ImageFolder resize filter (default: bicubic)")
    o = p.add_argument_group("evaluation output")
    o.add_argument("--sweep", metavar="SPECS",
                   help='evaluate several reductions in one run: specs separated by ";", e.g. '
                        '"none;rmeeto:r=4,interval=1;stm:ratio=0.28"; "rmeeto:0.14,0.28" gives one row '
                        "per mean-token ratio; shorthand flags (--interval, --distance...) apply to every "
                        "row whose method takes them")
    o.add_argument("--output", metavar="FILE",
                   help="also write the result: JSON (every field of every row), or a markdown "
                        "table when FILE ends in .md")
    o.add_argument("--json", action="store_true", help="print JSON instead of the summary/table")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _default_workers(kind: str) -> int:
    if kind == "fashion-mnist":
        return 0   # in memory already: worker processes only add overhead
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def sweep_table(rows: list[dict]) -> str:
    """The sweep rows as a markdown table."""
    header = ["reduction", "top-1 (%)", "top-5 (%)", "loss", "GFLOPs (paper)", "GFLOPs (full)",
              "token reduction", "images", "img/s"]
    body = [[f"`{r['reduce']}`", _fmt(r["top1"], ".2f"), _fmt(r["top5"], ".2f"), _fmt(r["loss"], ".4f"),
             _fmt(r["gflops_paper"], ".4g"), _fmt(r["gflops_full"], ".4g"), _fmt(r["reduction_ratio"], ".3f"),
             str(r["images"]), _fmt(r["images_per_second"], ".1f")] for r in rows]
    return markdown_table(header, body)


def _row(spec: str, result: dict, cost: dict) -> dict:
    method, options = parse_spec(spec)
    return {"reduce": spec, "method": method, "ratio": options.get("ratio"), "r": options.get("r"),
            "top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "images": result["images"],
            "correct": result["correct"], **cost, "seconds": result["seconds"],
            "images_per_second": result["images_per_second"]}


def _summary(info: dict, row: dict) -> str:
    where = info["dataset"] + (f" {info['split']}" if info["dataset"] == "fashion-mnist" else "")
    return "\n".join([
        (f"{info['model']} ({row['reduce']}) on {where} {info['data']}: {row['images']} images, "
         f"{info['classes']} classes"),
        (f"top-1 {_fmt(row['top1'], '.2f')} %   top-5 {_fmt(row['top5'], '.2f')} %   "
         f"loss {_fmt(row['loss'], '.4f')}"),
        (f"{row['gflops_paper']:.4g} GFLOPs (paper), {row['gflops_full']:.4g} GFLOPs (full), "
         f"token reduction {row['reduction_ratio']:.3f}; {row['seconds']:.1f} s, "
         f"{_fmt(row['images_per_second'], '.1f')} images/s"),
    ])


def _skipped_text(skipped: list[str]) -> str:
    if not skipped:
        return ""
    return f"skipped {len(skipped)} unreadable file(s):\n" + "\n".join(f"  {path}" for path in skipped)


def run(args: argparse.Namespace) -> int:
    """Build the model, evaluate (one row, or every row of ``--sweep``), print."""
    if args.sweep:
        if args.method is not None or args.reduce is not None:
            raise CommandError("--sweep sets the reduction of each row: drop --method/--reduce")
        specs = parse_sweep(args.sweep, given_options(args))
    else:
        specs = [reduction_spec(args)]
    kind = args.dataset
    if kind == "auto" and args.data is None:
        raise CommandError("give --data DIR (an ImageFolder directory or one with the Fashion-MNIST "
                           "IDX files), or --dataset fashion-mnist for the installed package")
    if kind == "auto":
        kind = detect_kind(args.data, args.split)
    model = build_model(args, specs[0])
    for spec in specs:      # every row's reduction reachable before any evaluation starts
        apply(model, spec)
        model_cost(model)
    device = _resolve_device(args.device)
    if kind == "imagefolder" and args.split != "test":
        log.warning("--split %s is ignored for an ImageFolder directory (it is one split)", args.split)
    dataset = open_dataset(args.data, kind=kind, img_size=model.img_size, channels=model.in_chans,
                           split=args.split, limit=args.limit, mean=args.mean, std=args.std,
                           crop_pct=args.crop_pct, interpolation=args.interpolation)
    classes = list(getattr(dataset, "classes", []))
    if len(classes) > model.num_classes:
        raise CommandError(f"the data set has {len(classes)} classes but the model has {model.num_classes} "
                           f"outputs; pass --num-classes {len(classes)} (with weights trained for them)")
    if 0 < len(classes) < model.num_classes:
        log.warning("the data set has %d classes, the model %d outputs: labels are the data set's "
                    "class indices 0..%d (sorted class folders); make sure they match the model's",
                    len(classes), model.num_classes, len(classes) - 1)
    workers = _default_workers(kind) if args.workers is None else max(0, args.workers)
    loader = make_loader(dataset, args.batch_size, workers, pin_memory=device.type == "cuda")
    info = {"model": args.model, "checkpoint": args.checkpoint, "dataset": kind,
            "data": str(getattr(dataset, "root", args.data)), "split": args.split if kind == "fashion-mnist" else None,
            "classes": len(classes), "img_size": list(model.img_size), "channels": model.in_chans,
            "device": str(device), "batch_size": args.batch_size}

    skipped: list[str] = []
    rows: list[dict] = []
    for i, spec in enumerate(specs):
        apply(model, spec)
        cost = model_cost(model)
        result = evaluate(model, loader, device=device, progress=not args.no_progress, desc=spec,
                          warn_skipped=(i == 0))
        skipped += [p for p in result["skipped"] if p not in skipped]
        if result["images"] == 0:
            raise CommandError(f"no image of {info['data']} could be read ({len(skipped)} skipped)")
        rows.append(_row(spec, result, cost))

    if args.sweep:
        payload = {**info, "images": rows[0]["images"], "skipped": skipped, "rows": rows}
        text = json.dumps(payload, indent=2) if args.json else sweep_table(rows)
    else:
        payload = {**info, **rows[0], "skipped": skipped}
        text = json.dumps(payload, indent=2) if args.json else _summary(info, rows[0])
    print(text)
    if skipped and not args.json:
        print(_skipped_text(skipped))
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".md":
            out.write_text(sweep_table(rows) + "\n" + (_skipped_text(skipped) + "\n" if skipped else ""))
        else:
            out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
