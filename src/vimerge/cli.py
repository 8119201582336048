"""The ``vimerge`` command line. Each sub-command lives in a small function here."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models import list_models, model_defaults
    from .ops import available_backends, resolve_backend

    info = {
        "vimerge": __import__("vimerge").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "scan_backends": available_backends(),
        "auto_backend_cpu": resolve_backend("auto", "cpu").name,
        "models": {name: model_defaults(name) for name in list_models()},
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key != "models":
                print(f"{key:18s} {value}")
        print("models")
        for name, cfg in info["models"].items():
            print(f"  {name:12s} " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    return 0


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --checkpoint / architecture overrides, shared by every command."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vim_tiny", help="registered model name (see `vimerge info`)")
    g.add_argument("--checkpoint", help="weights: official .pth, plain state dict, .safetensors or hf://")
    g.add_argument("--pretrained", action="store_true",
                   help="load the preset's published weights (shipped for vim_fmnist; hub for the ImageNet Vims)")
    g.add_argument("--num-classes", type=int, default=None, help="head size (default: the preset's 1000)")
    g.add_argument("--img-size", type=int, default=None, help="input resolution (default: the preset's)")
    g.add_argument("--scan-backend", default="auto", help="selective-scan backend (default: auto)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other constructor argument, e.g. --set depth=8 --set embed_dim=96")


def add_reduction_args(p: argparse.ArgumentParser) -> None:
    """Token-reduction options (see the README's table), shared by every command."""
    g = p.add_argument_group("token reduction")
    g.add_argument("--method", choices=["none", "rmeeto", "prune", "stm"], default=None,
                   help="reduction method (default: rmeeto when --r or --ratio is given, else none)")
    g.add_argument("--r", help="tokens removed per reducing block, or a comma list, one per block")
    g.add_argument("--ratio", type=float, help="target reduction ratio instead of --r")
    g.add_argument("--interval", type=int, default=2, help="reduce every k blocks (R-MeeTo)")
    g.add_argument("--odd", action="store_true", help="reduce odd blocks (R-MeeTo)")
    g.add_argument("--distance", default="cosine", choices=["cosine", "l1", "l2"])
    g.add_argument("--mode", default="sum", choices=["sum", "mean", "max", "min"], help="merge operation")
    g.add_argument("--kth", type=int, default=1, help="merge into the k-th closest partner")
    g.add_argument("--grouping", default="odd-even", choices=["odd-even", "front-behind", "random"])
    g.add_argument("--metric", default="X", choices=["X", "B", "C", "delta", "y"])
    g.add_argument("--shuffle", action="store_true", help="odd-even shuffle after merging (Table 4)")
    g.add_argument("--shuffle-ratio", type=float, default=0.0)
    g.add_argument("--select", default="top", choices=["top", "random"])
    g.add_argument("--pair", default="best", choices=["best", "random"])
    g.add_argument("--per-side", type=int, default=None, help="STM: tokens merged per side per block")
    g.add_argument("--no-hsp", action="store_true", help="STM: plain BNNM without hidden-state protection")
    g.add_argument("--seed", type=int, default=None, help="seed of the random reduction options")


def reduction_from_args(args: argparse.Namespace) -> tuple[str, dict]:
    """(method, options) for :func:`vimerge.apply` from parsed reduction arguments."""
    method = args.method or ("rmeeto" if (args.r is not None or args.ratio is not None) else "none")
    if method == "none":
        return method, {}
    amount: dict = {}
    if args.r is not None:
        values = [int(v) for v in str(args.r).split(",")]
        amount["r"] = values[0] if len(values) == 1 else values
    if args.ratio is not None:
        amount["ratio"] = args.ratio
    if method == "stm":
        opts = dict(amount, hsp=not args.no_hsp)
        if args.per_side is not None:
            opts["per_side"] = args.per_side
        return method, opts
    return method, dict(amount, interval=args.interval, odd=args.odd, distance=args.distance, mode=args.mode,
                        kth=args.kth, grouping=args.grouping, metric=args.metric, ordered=not args.shuffle,
                        shuffle_ratio=args.shuffle_ratio, select=args.select, pair=args.pair, seed=args.seed)


def build_model(args: argparse.Namespace):
    """The model the arguments describe, with its reduction applied (eval mode)."""
    from .models import create_model
    from .reduce import apply
    kwargs = dict(_parse_value_pair(item) for item in args.set)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    model = create_model(args.model, checkpoint=args.checkpoint, pretrained=getattr(args, "pretrained", False),
                         scan_backend=args.scan_backend, **kwargs)
    method, options = reduction_from_args(args)
    if method != "none":
        apply(model, method, **options)
    return model.eval()


def _parse_value_pair(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise SystemExit(f"vimerge: --set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), _parse_value(value.strip())


def _cmd_flops(args: argparse.Namespace) -> int:
    from .measure import count_flops
    from .reduce import token_counts
    model = build_model(args)
    n0 = model.num_patches + 1
    counts = token_counts(model)
    result = {"model": args.model, "method": reduction_from_args(args)[0],
              "gflops_paper": count_flops(model, "paper") / 1e9, "gflops_full": count_flops(model, "full") / 1e9,
              "reduction_ratio": 1 - sum(counts) / (len(counts) * n0), "token_counts": counts}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} ({result['method']}): {result['gflops_paper']:.2f} GFLOPs (paper convention), "
              f"{result['gflops_full']:.2f} GFLOPs (full count); reduction ratio "
              f"{result['reduction_ratio']:.3f}")
        print("tokens per block: " + " ".join(map(str, counts)))
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from .data.transforms import EvalTransform
    from .viz import draw_groups, figure, token_groups
    model = build_model(args)
    channels = model.patch_embed.proj.in_channels
    size = model.patch_embed.img_size
    fmnist_like = channels == 1 and size == (28, 28)
    mean = args.mean if args.mean is not None else ((0.2860,) if fmnist_like else None)
    std = args.std if args.std is not None else ((0.3530,) if fmnist_like else None)
    crops, tensors = [], []
    for path in args.image:
        try:
            img = Image.open(path)
            img.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise SystemExit(f"vimerge visualize: cannot read image {path!r} ({exc})")
        crop_pct = args.crop_pct if args.crop_pct else (1.0 if img.size == size[::-1] else 0.875)
        transform = EvalTransform(size, channels=channels, mean=mean, std=std, crop_pct=crop_pct)
        crops.append(transform.resize_and_crop(img))
        tensors.append(transform(img))
    groups = token_groups(model, torch.stack(tensors))
    gh, gw = groups.shape[1:]
    cell = args.cell or max(8, 168 // max(gh, gw))
    rows = [[crop.convert("RGB").resize((gw * cell, gh * cell), Image.BICUBIC),
             draw_groups(crop, g, cell=cell)] for crop, g in zip(crops, groups)]
    method, options = reduction_from_args(args)
    amount = ", ".join(f"{k}={v}" for k, v in options.items() if k in ("r", "ratio"))
    n_final = int(groups[0].max()) + 1
    figure(rows, ["image", f"{method} {amount}: {n_final} tokens"]).save(args.out)
    print(f"wrote {args.out}: {len(rows)} image(s), {gh * gw} patches -> {n_final} tokens")
    return 0


def _model_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A sub-command that takes the model and token-reduction options."""
    parser = sub.add_parser(name, help=help)
    add_model_args(parser)
    add_reduction_args(parser)
    parser.set_defaults(func=func)
    return parser


def _lazy(module: str, name: str):
    """A command function imported only when the command runs (keeps --help fast)."""
    def run(args: argparse.Namespace) -> int:
        import importlib
        return getattr(importlib.import_module(f".{module}", __package__), name)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vimerge",
        description="Token reduction for Vision Mamba: faster Vims, accuracy rebuilt in minutes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, scan backends usable here, registered models")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)

    flops = _model_command(sub, "flops", "FLOPs per image (paper and full conventions) and tokens per block",
                           _cmd_flops)
    flops.add_argument("--json", action="store_true", help="print JSON")

    from .measure.bench import add_bench_args
    from .measure.evaluate import add_eval_args
    from .train.options import add_train_args, set_base_recipe_defaults

    add_eval_args(_model_command(sub, "eval", "top-1/top-5 accuracy and loss on an ImageFolder directory or "
                                 "Fashion-MNIST; --sweep for several methods and ratios",
                                 _lazy("measure.evaluate", "run_eval")))
    add_bench_args(_model_command(sub, "bench", "images/s, speed-up, FLOPs and peak memory at several "
                                  "reduction ratios (the R-MeeTo paper's Table 12 for this machine)",
                                  _lazy("measure.bench", "run_bench")))
    add_train_args(_model_command(sub, "retrain", "re-train a token-reduced Vim (R-MeeTo recipe); also "
                                  "under torchrun for several GPUs/nodes", _lazy("train.options", "cmd_retrain")))
    train = _model_command(sub, "train", "train a Vim from scratch (default: the recipe of the shipped "
                           "vim_fmnist weights); resumable, also under torchrun",
                           _lazy("train.options", "cmd_retrain"))
    add_train_args(train)
    set_base_recipe_defaults(train)

    from .demo import add_demo_args
    demo = sub.add_parser("demo", help="the whole token-reduction study on Fashion-MNIST: accuracy, "
                          "FLOPs and speed of pruning, R-MeeTo, STM and re-training, with report and plots")
    add_demo_args(demo)
    demo.set_defaults(func=_lazy("demo", "cmd_demo"))

    vis = _model_command(sub, "visualize", "draw the merged token groups on images (R-MeeTo App. D.5)",
                         _cmd_visualize)
    vis.add_argument("--image", nargs="+", required=True, help="image file(s)")
    vis.add_argument("--out", default="merged_tokens.png", help="PNG to write")
    vis.add_argument("--cell", type=int, default=None, help="pixels per patch in the drawing "
                     "(default: about 168 px per image side)")
    vis.add_argument("--crop-pct", type=float, default=None,
                     help="centre-crop share (default 1.0 for images already at the model size, else 0.875)")
    vis.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean")
    vis.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
