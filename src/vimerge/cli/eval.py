"""``vimerge eval``: top-1/top-5 accuracy and loss of a (reduced) model, one row or a sweep.

    vimerge eval --model vim_tiny --checkpoint vim_t.pth --data /data/imagenet/val
    vimerge eval --model vim_tiny --checkpoint vim_t.pth --data /data/imagenet/val --reduce rmeeto:ratio=0.28
    vimerge eval --model vim_fmnist --pretrained --dataset fashion-mnist \\
        --sweep "none;rmeeto:0.14,0.28;stm:ratio=0.28;prune:r=4,interval=1" --output sweep.json

Weights, data and batches are the same for every row of a sweep: the model is built once and
only its reduction changes between rows. Every row is timed the same way: before the first
timed row, one untimed batch goes through the model with each row's reduction (one-time costs
such as kernel compilation and allocator growth fall there, not in the first row).

Data: ``--data DIR`` is an ImageFolder directory or Fashion-MNIST's IDX files; a dataset root
holding split folders (``train/`` and ``val/``) is read at its ``val`` folder (the rule of
``vimerge retrain``: :func:`vimerge.data.split_dir`). Without ``--data``, a one-channel
28x28 model (``vim_fmnist``) is evaluated on the installed Fashion-MNIST test split.

Video models (VideoMamba, ``videomamba_*_k400`` or ``--num-frames T``): ``--data`` is a folder
of class folders of videos (split folders as above) or an annotation list (``path label`` per
line, paths relative to the list's folder or ``--video-root``), read with PyAV
(:class:`vimerge.data.VideoDataset`); ``--num-clips``/``--num-crops`` evaluate several views
per video (K400's 4 x 3) and average their logits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from typing import Any

import torch

from vimerge.data import FASHION_MNIST_ROOT, VideoDataset, detect_kind, make_loader, open_dataset, split_dir
from vimerge.measure.evaluate import evaluate, view_logits
from vimerge.measure.flops import model_cost
from vimerge.measure.table import markdown_table
from vimerge.reduce import apply, parse_spec, spec_of

from .common import (
    CommandError,
    build_model,
    device_arg,
    floats,
    given_options,
    parse_sweep,
    positive_int,
    reduction_spec,
    writable_path,
)

log = logging.getLogger(__name__)

HELP = ("top-1/top-5 accuracy and loss on an ImageFolder directory or Fashion-MNIST; --sweep for "
        "several reductions")


def add_args(p: argparse.ArgumentParser) -> None:
    """The data / evaluation / sweep options."""
    g = p.add_argument_group("evaluation data")
    g.add_argument("--data", metavar="DIR",
                   help="an ImageFolder directory (DIR/<class>/<image>, e.g. ImageNet val; a root "
                        "with train/ and val/ is read at val/) or a directory with the Fashion-MNIST "
                        f"IDX files (default: {FASHION_MNIST_ROOT}, Debian's dataset-fashion-mnist, for a "
                        "one-channel 28x28 model or with --dataset fashion-mnist)")
    g.add_argument("--dataset", choices=["auto", "imagefolder", "fashion-mnist"], default="auto",
                   help="how to read --data; auto: Fashion-MNIST when DIR holds its IDX files, "
                        "else ImageFolder (default: auto)")
    g.add_argument("--split", choices=["test", "train"], default="test",
                   help="Fashion-MNIST split, or the split folder of an ImageFolder root holding "
                        "train/ and val/ (test: val/) (default: test)")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate N images: Fashion-MNIST's first N, or N spread evenly over the "
                        "ImageFolder's sorted list (every class represented) (default: all)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: 64)")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: 0 for Fashion-MNIST, "
                        "min(8, CPUs - 1) for image files)")
    g.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:1... (default: auto: cuda if available)")
    g.add_argument("--mean", type=floats, default=None, metavar="M[,M,M]",
                   help="normalisation mean (default: ImageNet's, or Fashion-MNIST's 0.2860)")
    g.add_argument("--std", type=floats, default=None, metavar="S[,S,S]",
                   help="normalisation std (default: ImageNet's, or Fashion-MNIST's 0.3530)")
    g.add_argument("--crop-pct", type=float, default=0.875,
                   help="ImageFolder: resize the shorter side to img_size / crop_pct, then centre "
                        "crop (default: 0.875, 256 -> 224)")
    g.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear", "lanczos", "nearest"],
                   help="ImageFolder resize filter (default: bicubic)")
    v = p.add_argument_group("video data (video models)")
    v.add_argument("--num-clips", type=positive_int, default=1,
                   help="temporal clips per video, logits averaged (K400: 4; default: 1)")
    v.add_argument("--num-crops", type=positive_int, default=1,
                   help="spatial crops per clip along the longer side, logits averaged (K400: 3; default: 1)")
    v.add_argument("--video-root", metavar="DIR",
                   help="folder the paths of an annotation list (--data FILE) are relative to "
                        "(default: the list's folder)")
    v.add_argument("--list-separator", default=None, metavar="SEP",
                   help="field separator of an annotation list (default: whitespace; ',' for CSV lists)")
    o = p.add_argument_group("evaluation output")
    o.add_argument("--sweep", metavar="SPECS",
                   help='evaluate several reductions in one run: specs separated by ";", e.g. '
                        '"none;rmeeto:r=4,interval=1;stm:ratio=0.28"; "rmeeto:0.14,0.28" gives one row '
                        "per mean-token ratio; shorthand flags (--interval, --distance...) apply to every "
                        "row whose method takes them")
    o.add_argument("--output", "-o", metavar="FILE",
                   help="also write the result: JSON (every field of every row), or a markdown "
                        "table when FILE ends in .md")
    o.add_argument("--json", action="store_true", help="print JSON instead of the summary/table")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _data_source(args: argparse.Namespace, model) -> tuple[str, str | None]:
    """(kind, directory) of the evaluation data: ``--data`` (a dataset root with split folders
    read at the split's folder), else the installed Fashion-MNIST for a one-channel 28x28 model;
    ``"video"`` for a video model."""
    kind, data = args.dataset, args.data
    if getattr(model, "num_frames", None) is not None:
        if data is None:
            raise CommandError(f"{args.model} is a video model ({model.num_frames} frames): give --data, a folder "
                               f"of class folders of videos or an annotation list ('path label' per line)")
        if kind != "auto":
            raise CommandError(f"--dataset {kind}: {args.model} is a video model and reads videos (drop --dataset)")
        if os.path.isdir(data):
            data = str(split_dir(data, "val" if args.split == "test" else args.split))
        return "video", data
    if args.num_clips > 1 or args.num_crops > 1 or args.video_root or args.list_separator:
        raise CommandError(f"--num-clips/--num-crops/--video-root/--list-separator are for video models; "
                           f"{args.model} takes images")
    if data is None:
        if kind == "imagefolder":
            raise CommandError("--dataset imagefolder needs --data DIR")
        fmnist_like = model.in_chans == 1 and tuple(model.img_size) == (28, 28)
        if kind == "auto" and not fmnist_like:
            raise CommandError(f"give --data DIR (an ImageFolder directory, e.g. ImageNet val, or one with the "
                               f"Fashion-MNIST IDX files): the default, Fashion-MNIST, is for one-channel 28x28 "
                               f"models and {args.model} takes {model.in_chans} channel(s) at "
                               f"{model.img_size[0]}x{model.img_size[1]}")
        return "fashion-mnist", None
    if kind == "auto":
        kind = detect_kind(data, args.split)
    if kind == "imagefolder":
        data = str(split_dir(data, "val" if args.split == "test" else args.split))
    return kind, data


def _warm_up(model, specs: list[str], loader, device: torch.device) -> None:
    """One untimed batch through the model with each row's reduction, before any timed row."""
    for batch in loader:
        images = batch[0] if not isinstance(batch, dict) else batch["images"]
        if images is None or len(images) == 0:
            continue
        images = images.to(device)
        model.to(device).eval()
        with torch.inference_mode():
            for spec in specs:
                apply(model, spec)
                view_logits(model, images)
        return


def run(args: argparse.Namespace) -> int:
    """Build the model, evaluate (one row, or every row of ``--sweep``), print."""
    if args.sweep:
        if args.method is not None or args.reduce is not None:
            raise CommandError("--sweep sets the reduction of each row: drop --method/--reduce")
        specs = parse_sweep(args.sweep, given_options(args))
    else:
        specs = [reduction_spec(args, default=None)]   # None: as the weights were re-trained
    output = writable_path(args.output, "--output") if args.output else None
    model = build_model(args, specs[0])
    specs[0] = spec_of(model.reduction)
    for spec in specs:      # every row's reduction reachable before any evaluation starts
        apply(model, spec)
        model_cost(model)
    kind, data = _data_source(args, model)
    device = torch.device(args.device)
    if kind == "video":
        listing = data if os.path.isfile(data) else None
        dataset = VideoDataset(args.video_root if listing else data, annotations=listing,
                               num_frames=model.num_frames, img_size=model.img_size, channels=model.in_chans,
                               num_clips=args.num_clips, num_crops=args.num_crops, mean=args.mean, std=args.std,
                               limit=args.limit, separator=args.list_separator)
    else:
        dataset = open_dataset(data, kind=kind, img_size=model.img_size, channels=model.in_chans,
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
            "data": str(getattr(dataset, "root", data)), "split": args.split if kind == "fashion-mnist" else None,
            "classes": len(classes), "img_size": list(model.img_size), "channels": model.in_chans,
            "device": str(device), "batch_size": args.batch_size}
    if kind == "video":
        info.update(num_frames=model.num_frames, views=args.num_clips * args.num_crops)

    _warm_up(model, specs, loader, device)
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
    if output is not None:
        out = output
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".md":
            out.write_text(sweep_table(rows) + "\n" + (_skipped_text(skipped) + "\n" if skipped else ""))
        else:
            out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
