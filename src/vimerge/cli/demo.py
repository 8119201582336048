"""``vimerge demo``: the whole token-reduction study on Fashion-MNIST (see :mod:`vimerge.demo`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from vimerge.data.fashion_mnist import DEFAULT_ROOT
from vimerge.demo import (
    FULL,
    QUICK,
    VIDEO_FULL,
    VIDEO_QUICK,
    run_demo,
    run_video_demo,
    summary,
    video_summary,
)

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
    if args.video:
        return _run_video(args)
    if args.clips is not None:
        raise CommandError("--clips is an option of the video study: add --video")
    plan = QUICK if args.quick else FULL
    if args.limit is not None:
        plan = replace(plan, test_images=args.limit)
    if args.retrain_images is not None:
        if args.retrain_images < plan.retrain_batch:
            raise CommandError(f"--retrain-images must be at least one batch ({plan.retrain_batch})")
        plan = replace(plan, retrain_images=args.retrain_images)
    try:
        results = run_demo(data=args.data, output=args.output, quick=args.quick, checkpoint=args.checkpoint,
                           train_base=args.train_base, plan=plan, fresh=args.fresh,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nvimerge demo: interrupted; finished rows and re-training checkpoints are kept in "
              f"{Path(args.output).expanduser()}: run the same command to continue", file=sys.stderr)
        return 130
    print(summary(results))
    print(f"\nwrote {', '.join(results['files'])} to {Path(args.output).expanduser()}")
    return 0


def _run_video(args: argparse.Namespace) -> int:
    """``vimerge demo --video``: :func:`vimerge.demo.run_video_demo` with the options given."""
    plan = VIDEO_QUICK if args.quick else VIDEO_FULL
    if args.limit is not None:
        plan = replace(plan, test_clips=args.limit)
    if args.retrain_images is not None:
        if args.retrain_images < plan.retrain_batch:
            raise CommandError(f"--retrain-images must be at least one batch ({plan.retrain_batch})")
        plan = replace(plan, retrain_clips=args.retrain_images)
    try:
        results = run_video_demo(data=args.data, output=args.output, quick=args.quick, checkpoint=args.checkpoint,
                                 train_base=args.train_base, plan=plan, clips=args.clips, fresh=args.fresh,
                                 progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\nvimerge demo --video: interrupted; finished rows, clips and re-training checkpoints are kept: run "
              "the same command to continue", file=sys.stderr)
        return 130
    print(video_summary(results))
    print(f"\nwrote {', '.join(results['files'])} to {Path(args.output).expanduser()}")
    return 0
