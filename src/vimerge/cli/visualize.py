"""``vimerge visualize``: the merged token groups drawn on images (R-MeeTo appendix D.5), or on
the frames of a clip for a video model (``--video``: one row of frames per clip, one colour per
final token, shared across the frames it spans)."""

from __future__ import annotations

import argparse

import torch
from PIL import Image, UnidentifiedImageError

from vimerge.data import DatasetError
from vimerge.data.fashion_mnist import MEAN as FMNIST_MEAN
from vimerge.data.fashion_mnist import STD as FMNIST_STD
from vimerge.data.transforms import EvalTransform
from vimerge.data.video import read_clip
from vimerge.reduce import spec_of
from vimerge.viz import draw_groups, figure, token_groups

from .common import CommandError, build_model, floats, writable_path

HELP = "draw the merged token groups on images (R-MeeTo App. D.5)"


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s)")
    src.add_argument("--video", nargs="+", help="video file(s), for a video model (VideoMamba, --num-frames)")
    p.add_argument("--output", "-o", default="merged_tokens.png", metavar="FILE",
                   help="PNG to write; missing directories are created")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)   # the old spelling
    p.add_argument("--cell", type=int, default=None, help="pixels per patch in the drawing "
                   "(default: about 168 px per image side)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="centre-crop share (default: 1.0 for images already at the model size, else 0.875)")
    p.add_argument("--mean", type=floats, default=None, metavar="M[,M,M]",
                   help="normalisation mean (default: ImageNet's, or Fashion-MNIST's 0.2860 for a "
                        "one-channel 28x28 model)")
    p.add_argument("--std", type=floats, default=None, metavar="S[,S,S]",
                   help="normalisation std (default: ImageNet's, or Fashion-MNIST's 0.3530 for a "
                        "one-channel 28x28 model)")


def run(args: argparse.Namespace) -> int:
    out = writable_path(args.output, "--output")
    model = build_model(args)
    video = getattr(model, "num_frames", None) is not None
    if video != bool(args.video):
        raise CommandError(f"{args.model} is a video model: give --video FILE" if video else
                           f"--video needs a video model (VideoMamba: --model videomamba_tiny_k400 or --num-frames); "
                           f"{args.model} takes images")
    if video:
        return _run_video(args, model, out)
    channels, size = model.in_chans, model.img_size
    fmnist_like = channels == 1 and size == (28, 28)
    mean = args.mean if args.mean is not None else ((FMNIST_MEAN,) if fmnist_like else None)
    std = args.std if args.std is not None else ((FMNIST_STD,) if fmnist_like else None)
    crops, tensors = [], []
    for path in args.image:
        try:
            img = Image.open(path)
            img.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise CommandError(f"cannot read image {path!r} ({exc})") from exc
        crop_pct = args.crop_pct if args.crop_pct else (1.0 if img.size == size[::-1] else 0.875)
        transform = EvalTransform(size, channels=channels, mean=mean, std=std, crop_pct=crop_pct)
        crops.append(transform.resize_and_crop(img))
        tensors.append(transform(img))
    groups = token_groups(model, torch.stack(tensors))
    gh, gw = groups.shape[1:]
    cell = args.cell or max(8, 168 // max(gh, gw))
    rows = [[crop.convert("RGB").resize((gw * cell, gh * cell), Image.BICUBIC),
             draw_groups(crop, g, cell=cell)] for crop, g in zip(crops, groups)]
    n_final = int(groups[0].max()) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, ["image", f"{spec_of(model.reduction)}: {n_final} tokens"]).save(out)
    print(f"wrote {out}: {len(rows)} image(s), {gh * gw} patches -> {n_final} tokens")
    return 0


def _run_video(args: argparse.Namespace, model, out) -> int:
    """One row of frames per clip: the frames, then the same frames with the groups drawn."""
    clips, frames = [], []
    for path in args.video:
        try:
            clip, crops = read_clip(path, model.num_frames, model.img_size, channels=model.in_chans,
                                    mean=args.mean, std=args.std)
        except (OSError, ValueError, DatasetError) as exc:
            raise CommandError(f"cannot read video {path!r} ({exc})") from exc
        clips.append(clip)
        frames.append(crops)
    groups = token_groups(model, torch.stack(clips))                  # (B, T', gh, gw)
    t, gh, gw = groups.shape[1:]
    tubelet = model.num_frames // t
    cell = args.cell or max(6, 112 // max(gh, gw))
    rows = []
    for crops, g in zip(frames, groups):
        shown = [crops[k * tubelet] for k in range(t)]          # the first frame of every tubelet
        rows.append([f.convert("RGB").resize((gw * cell, gh * cell), Image.BICUBIC) for f in shown])
        rows.append([draw_groups(f, g[k], cell=cell) for k, f in enumerate(shown)])
    n_final = int(groups[0].max()) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    titles = [f"{spec_of(model.reduction)}: {n_final} tokens; frames {', '.join(str(k * tubelet) for k in range(t))}"]
    titles += [""] * (t - 1)        # one line over the whole row
    figure(rows, titles).save(out)
    print(f"wrote {out}: {len(clips)} clip(s), {t} x {gh * gw} patches -> {n_final} tokens")
    return 0
