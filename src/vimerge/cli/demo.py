"""``vimerge demo``: the whole token-reduction study on Fashion-MNIST (see :mod:`vimerge.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vimerge.data.fashion_mnist import DEFAULT_ROOT
from vimerge.demo import image_study, run_study, summary, video_study

from .common import CommandError, positive_int, writable_path

HELP = ("the whole token-reduction study on Fashion-MNIST: accuracy, FLOPs and speed of pruning, "
        "R-MeeTo, STM and re-training, with report and plots (--video: the same on VideoMamba clips)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="directory with the four Fashion-MNIST IDX files "
                   f"(default: {DEFAULT_ROOT}, Debian's dataset-fashion-mnist)")
    p.add_argument("--video", action="store_true",
                   help="the video study: VideoMamba (videomamba_fmnist_video) on MP4 clips of moving Fashion-MNIST "
                        "garments; merging, pruning, STM, merging within frames / across time, re-training, and "
                        "vim_fmnist on the same garments (about 10 min, --quick 2)")
    p.add_argument("--clips", metavar="DIR", default=None,
                   help="--video: where the clips are written once and kept (default: $VIMERGE_CACHE/fmnist-clips, "
                        "VIMERGE_CACHE defaulting to ~/.cache/vimerge)")
    p.add_argument("--output", "-o", default=None, metavar="DIR",
                   help="where results.json, report.md and the PNGs go (default: vimerge-demo, with --video "
                        "vimerge-demo-video)")
    p.add_argument("--quick", action="store_true",
                   help="1,000 test images, ratios 0.28 and 0.54, a shorter re-training (under 2 min); with --video "
                        "300 test clips, ratios 0.28 and 0.54, scopes at 0.28, 1,000 re-training clips")
    p.add_argument("--checkpoint", help="base vim_fmnist weights (--video: videomamba_fmnist_video weights) (default: the shipped ones)")
    p.add_argument("--train-base", action="store_true",
                   help="train the base models from scratch (vimerge train's recipe: vim_fmnist about 25 min "
                        "on 2 CPU cores, deit_fmnist about 10) instead of using the shipped weights")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate the first N test images (default: all 10,000, --quick 1,000); --video: the clips of the "
                        "first N test garments (default 2,000, --quick 300)")
    p.add_argument("--retrain-images", type=int, default=None, metavar="N",
                   help="training images per re-training run (default: 8000, quick 2000); --video: training clips "
                        "(default 4000, quick 1000)")
    p.add_argument("--fresh", action="store_true", help="recompute rows an interrupted run already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 2 on missing data, a bad checkpoint or a bad option, 130 when interrupted."""
    if args.output is None:
        args.output = "vimerge-demo-video" if args.video else "vimerge-demo"
    writable_path(args.output, "--output", directory=True)
    if args.clips is not None and not args.video:
        raise CommandError("--clips is an option of the video study: add --video")
    options = dict(quick=args.quick, limit=args.limit, retrain_images=args.retrain_images, data=args.data,
                   checkpoint=args.checkpoint, train_base=args.train_base)
    try:
        study = video_study(clips=args.clips, **options) if args.video else image_study(**options)
    except ValueError as exc:          # an option out of range (--retrain-images below one batch)
        raise CommandError(str(exc)) from exc
    try:
        results = run_study(study, args.output, fresh=args.fresh, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nvimerge demo{' --video' if args.video else ''}: interrupted; finished rows"
              f"{', clips' if args.video else ''} and re-training checkpoints are kept in "
              f"{Path(args.output).expanduser()}: run the same command to continue", file=sys.stderr)
        return 130
    print(summary(study, results))
    print(f"\nwrote {', '.join(results['files'])} to {Path(args.output).expanduser()}")
    return 0
