"""Accuracy of a (token-reduced) Vim on an evaluation set, and sweeps over methods and ratios.

>>> from vimerge.data import open_dataset, make_loader
>>> loader = make_loader(open_dataset("/data/imagenet/val", img_size=224), batch_size=64)
>>> evaluate(model, loader)["top1"]
76.1

The ``vimerge eval`` command (:func:`add_eval_args`, :func:`run_eval`)::

    vimerge eval --checkpoint vim_t.pth --data /data/imagenet/val
    vimerge eval --checkpoint vim_t.pth --data /data/imagenet/val --method rmeeto --ratio 0.28
    vimerge eval --checkpoint vim_t.pth --data /data/imagenet/val \\
        --sweep "none;rmeeto:0.14,0.28;prune:0.28,0.54" --output sweep.json
    vimerge eval --checkpoint fmnist.pth --dataset fashion-mnist --num-classes 10 \\
        --img-size 28 --set in_chans=1 --set patch_size=7 --set stride=7 --limit 1000

Accuracies are percentages; ``loss`` is the mean cross-entropy (natural log) per image.
Weights, data and batches are the same for every row of a sweep: the model is built once and
only its reduction changes between rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

_CLI_METHODS = ("rmeeto", "prune", "stm")   # methods whose options come from the CLI's reduction flags


# --------------------------------------------------------------------------- evaluation loop


def _unpack(batch: Any):
    """(images, labels, skipped records) of a batch: a vimerge Batch or a plain (images, labels)."""
    if isinstance(batch, dict):
        return batch["images"], batch["labels"], list(batch.get("skipped", ()))
    if len(batch) == 3:
        return batch[0], batch[1], list(batch[2])
    images, labels = batch
    return images, labels, []


def _skip_record(item: Any) -> tuple[str, str]:
    if isinstance(item, str):
        return item, "unreadable"
    path, reason = item
    return str(path), str(reason)


def evaluate(model, loader: Iterable, *, device: Any = "cpu", progress: bool = True,
             desc: str = "eval", warn_skipped: bool = True, per_image: bool = False) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` over ``loader``.

    Args:
        model: a classifier (logits (B, classes)); moved to ``device`` and run in eval mode
            (its previous train/eval mode is restored afterwards).
        loader: batches of ``(images, labels)`` or ``(images, labels, skipped)`` as made by
            :func:`vimerge.data.make_loader` (skipped: records ``(path, reason)`` of files that
            could not be read; ``images`` may be None when a whole batch was unreadable).
        device: where to run.
        progress: show a tqdm progress bar (on stderr).
        desc: the bar's label.
        warn_skipped: log a warning per skipped file.
        per_image: also return ``per_image_correct``, a bool tensor (images,) in loader order
            (for paired comparisons of two models on the same images).

    Returns:
        ``{"top1", "top5", "loss", "images", "correct", "skipped", "seconds",
        "images_per_second"}``: accuracies in percent (``top5`` None with fewer than 5
        classes; all metrics None when no image was evaluated), ``loss`` the mean natural-log
        cross-entropy, ``skipped`` the paths of the files left out.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    num_classes = None
    skipped: dict[str, str] = {}
    hits: list = []
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    try:
        with torch.inference_mode():
            for batch in loader:
                images, labels, batch_skipped = _unpack(batch)
                for item in batch_skipped:
                    path, reason = _skip_record(item)
                    if path not in skipped:
                        skipped[path] = reason
                        if warn_skipped:
                            log.warning("skipped unreadable image %s (%s)", path, reason)
                if images is None or len(images) == 0:
                    bar.update(len(batch_skipped))
                    continue
                images = images.to(device, non_blocking=True)
                labels = torch.as_tensor(labels).to(device, dtype=torch.long)
                logits = model(images).float()
                num_classes = logits.shape[-1]
                if int(labels.max()) >= num_classes or int(labels.min()) < 0:
                    raise ValueError(f"label {int(labels.max())} is outside the model's "
                                     f"{num_classes} outputs; build the model with the data set's "
                                     f"number of classes (--num-classes)")
                loss_sum += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
                right = logits.argmax(-1) == labels
                correct1 += int(right.sum())
                if per_image:
                    hits.append(right.cpu())
                if num_classes >= 5:
                    top5 = logits.topk(5, dim=-1).indices
                    correct5 += int((top5 == labels[:, None]).any(-1).sum())
                n += len(labels)
                bar.update(len(labels) + len(batch_skipped))
                bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    ok = n > 0
    extra = {"per_image_correct": torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)} if per_image else {}
    return {
        "top1": 100.0 * correct1 / n if ok else None,
        "top5": 100.0 * correct5 / n if ok and num_classes >= 5 else None,
        "loss": loss_sum / n if ok else None,
        "images": n,
        "correct": correct1,
        "skipped": list(skipped),
        "skipped_reasons": dict(skipped),
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
        **extra,
    }


# --------------------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The data / evaluation / sweep options of ``vimerge eval``."""
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
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: auto: cuda if "
                                                    "available)")
    g.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                   help="normalisation mean (default: ImageNet's, or Fashion-MNIST's 0.2860)")
    g.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                   help="normalisation std (default: ImageNet's, or Fashion-MNIST's 0.3530)")
    g.add_argument("--crop-pct", type=float, default=0.875,
                   help="ImageFolder: resize the shorter side to img_size / crop_pct, then centre "
                        "crop (default: 0.875, 256 -> 224)")
    g.add_argument("--interpolation", default="bicubic",
                   choices=["bicubic", "bilinear", "lanczos", "nearest"],
                   help="ImageFolder resize filter (default: bicubic)")
    o = p.add_argument_group("evaluation output")
    o.add_argument("--sweep", metavar="SPEC",
                   help='evaluate several reductions in one run, e.g. "none;rmeeto:0.14,0.28;'
                        'prune:0.28,0.54" (METHOD:RATIO,... separated by ";"); the other '
                        "reduction flags (--interval, --distance...) apply to every row")
    o.add_argument("--output", metavar="FILE",
                   help="also write the result: JSON (every field of every row), or a markdown "
                        "table when FILE ends in .md")
    o.add_argument("--json", action="store_true", help="print JSON instead of the summary/table")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_sweep(spec: str) -> list[tuple[str, float | None]]:
    """``"none;rmeeto:0.14,0.28"`` -> ``[("none", None), ("rmeeto", 0.14), ("rmeeto", 0.28)]``.

    Methods are checked against the registered ones (:data:`vimerge.reduce.METHODS`).
    """
    from ..reduce import METHODS
    rows: list[tuple[str, float | None]] = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        method, _, values = part.partition(":")
        method, values = method.strip(), values.strip()
        if method == "none":
            if values:
                raise ValueError(f"--sweep: 'none' takes no ratios, got {part!r}")
            rows.append(("none", None))
            continue
        if method not in METHODS:
            raise ValueError(f"--sweep: unknown method {method!r}; available: "
                             f"{', '.join(['none', *sorted(METHODS)])}")
        if not values:
            raise ValueError(f"--sweep: give the ratios of {method!r}, e.g. {method}:0.14,0.28")
        for text in values.split(","):
            try:
                ratio = float(text)
            except ValueError:
                raise ValueError(f"--sweep: {text.strip()!r} in {part!r} is not a ratio") from None
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"--sweep: ratio {ratio} of {method!r} is not in [0, 1)")
            rows.append((method, ratio))
    if not rows:
        raise ValueError(f"--sweep: no rows in {spec!r}; e.g. \"none;rmeeto:0.14,0.28\"")
    return rows


def _resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _default_workers(kind: str) -> int:
    if kind == "fashion-mnist":
        return 0   # in memory already: worker processes only add overhead
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _apply_row(model, args: argparse.Namespace, method: str, ratio: float | None) -> None:
    """Replace the model's reduction by ``method`` at ``ratio`` (the CLI's other options kept)."""
    from ..cli import reduction_from_args
    from ..reduce import apply, remove
    remove(model)
    if method == "none":
        return
    if method in _CLI_METHODS:
        row_args = argparse.Namespace(**vars(args))
        row_args.method, row_args.ratio, row_args.r = method, ratio, None
        _, options = reduction_from_args(row_args)
    else:
        options = {"ratio": ratio}
    apply(model, method, **options)


def model_cost(model) -> dict:
    """GFLOPs (both conventions), mean-token reduction ratio and tokens per block."""
    from ..reduce import token_counts
    from .flops import count_flops
    counts = token_counts(model)
    n0 = model.num_patches + 1
    return {"gflops_paper": count_flops(model, "paper") / 1e9,
            "gflops_full": count_flops(model, "full") / 1e9,
            "reduction_ratio": 1 - sum(counts) / (len(counts) * n0) if counts else 0.0,
            "token_counts": counts}


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The sweep rows as a markdown table."""
    head = ("| method | ratio | top-1 (%) | top-5 (%) | loss | GFLOPs (paper) | GFLOPs (full) "
            "| token reduction | images | img/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['ratio'], '.3g')} | {_fmt(r['top1'], '.2f')} | "
            f"{_fmt(r['top5'], '.2f')} | {_fmt(r['loss'], '.4f')} | {_fmt(r['gflops_paper'], '.4g')} | "
            f"{_fmt(r['gflops_full'], '.4g')} | {_fmt(r['reduction_ratio'], '.3f')} | {r['images']} | "
            f"{_fmt(r['images_per_second'], '.1f')} |")
    return "\n".join(lines)


def _row(method: str, ratio: float | None, result: dict, cost: dict, options: dict | None = None) -> dict:
    row = {"method": method, "ratio": ratio, "top1": result["top1"], "top5": result["top5"],
           "loss": result["loss"], "images": result["images"], "correct": result["correct"], **cost,
           "seconds": result["seconds"], "images_per_second": result["images_per_second"]}
    row["r"] = (options or {}).get("r")
    return row


def _summary(info: dict, row: dict) -> str:
    where = info["dataset"] + (f" {info['split']}" if info["dataset"] == "fashion-mnist" else "")
    setting = row["method"]
    if row.get("ratio") is not None:
        setting += f", ratio {row['ratio']:g}"
    if row.get("r") is not None:
        setting += f", r {row['r']}"
    lines = [
        (f"{info['model']} ({setting}) on {where} {info['data']}: {row['images']} images, "
         f"{info['classes']} classes"),
        (f"top-1 {_fmt(row['top1'], '.2f')} %   top-5 {_fmt(row['top5'], '.2f')} %   "
         f"loss {_fmt(row['loss'], '.4f')}"),
        (f"{row['gflops_paper']:.4g} GFLOPs (paper), {row['gflops_full']:.4g} GFLOPs (full), "
         f"token reduction {row['reduction_ratio']:.3f}; {row['seconds']:.1f} s, "
         f"{_fmt(row['images_per_second'], '.1f')} images/s"),
    ]
    return "\n".join(lines)


def _skipped_text(skipped: list[str]) -> str:
    if not skipped:
        return ""
    return (f"skipped {len(skipped)} unreadable file(s):\n"
            + "\n".join(f"  {path}" for path in skipped))


def run_eval(args: argparse.Namespace) -> int:
    """``vimerge eval``: build the model, evaluate (one row, or every row of ``--sweep``), print."""
    from ..cli import build_model, reduction_from_args
    from ..data import DatasetError, detect_kind, make_loader, open_dataset

    def fail(message: str) -> int:
        print(f"vimerge eval: error: {message}", file=sys.stderr)
        return 2

    verbose = bool(getattr(args, "verbose", False))
    try:
        sweep = parse_sweep(args.sweep) if args.sweep else None
        if sweep and (args.method is not None or args.r is not None or args.ratio is not None):
            raise ValueError("--sweep sets the method and ratio of each row: drop --method/--r/--ratio")
        kind = args.dataset
        if kind == "auto" and args.data is None:
            raise ValueError("give --data DIR (an ImageFolder directory or one with the Fashion-MNIST "
                             "IDX files), or --dataset fashion-mnist for the installed package")
        if kind == "auto":
            kind = detect_kind(args.data, args.split)
        model = build_model(args)
        device = _resolve_device(args.device)
        img_size = tuple(model.patch_embed.img_size)
        channels = model.patch_embed.proj.in_channels
        if kind == "imagefolder" and args.split != "test":
            log.warning("--split %s is ignored for an ImageFolder directory (it is one split)", args.split)
        dataset = open_dataset(args.data, kind=kind, img_size=img_size, channels=channels,
                               split=args.split, limit=args.limit, mean=args.mean, std=args.std,
                               crop_pct=args.crop_pct, interpolation=args.interpolation)
    except (DatasetError, ValueError) as exc:
        if verbose:
            raise
        return fail(str(exc))

    classes = list(getattr(dataset, "classes", []))
    num_outputs = getattr(model, "num_classes", None)
    if num_outputs is not None and len(classes) > num_outputs:
        return fail(f"the data set has {len(classes)} classes but the model has {num_outputs} outputs; "
                    f"pass --num-classes {len(classes)} (with weights trained for them)")
    if num_outputs is not None and 0 < len(classes) < num_outputs:
        log.warning("the data set has %d classes, the model %d outputs: labels are the data set's "
                    "class indices 0..%d (sorted class folders); make sure they match the model's",
                    len(classes), num_outputs, len(classes) - 1)
    workers = _default_workers(kind) if args.workers is None else max(0, args.workers)
    loader = make_loader(dataset, args.batch_size, workers, pin_memory=device.type == "cuda")
    info = {"model": args.model, "checkpoint": args.checkpoint, "dataset": kind,
            "data": str(getattr(dataset, "root", args.data)), "split": args.split if kind == "fashion-mnist" else None,
            "classes": len(classes), "img_size": list(img_size), "channels": channels,
            "device": str(device), "batch_size": args.batch_size}
    progress = not args.no_progress

    skipped: list[str] = []
    rows: list[dict] = []
    plan = sweep if sweep else [None]
    for i, entry in enumerate(plan):
        if entry is None:
            method, options = reduction_from_args(args)
            ratio = args.ratio
            desc = method if method == "none" else f"{method} {ratio if ratio is not None else args.r}"
        else:
            method, ratio = entry
            options = {}
            desc = method if ratio is None else f"{method} {ratio:g}"
        try:
            if entry is not None:
                _apply_row(model, args, method, ratio)
            cost = model_cost(model)  # resolves ratio -> r: an unreachable ratio fails here, not mid-run
        except ValueError as exc:
            if verbose:
                raise
            return fail(f"{desc}: {exc}")
        result = evaluate(model, loader, device=device, progress=progress, desc=desc,
                          warn_skipped=(i == 0))
        for path in result["skipped"]:
            if path not in skipped:
                skipped.append(path)
        if result["images"] == 0:
            return fail(f"no image of {info['data']} could be read ({len(skipped)} skipped)")
        rows.append(_row(method, ratio, result, cost, options))

    if sweep:
        payload = {**info, "images": rows[0]["images"], "skipped": skipped, "rows": rows}
        text = json.dumps(payload, indent=2) if args.json else markdown_table(rows)
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
            out.write_text(markdown_table(rows) + "\n" + (_skipped_text(skipped) + "\n" if skipped else ""))
        else:
            out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


__all__ = ["evaluate", "add_eval_args", "run_eval", "parse_sweep", "markdown_table", "model_cost"]
