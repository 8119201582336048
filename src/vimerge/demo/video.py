"""The video study (``vimerge demo --video``): token reduction on VideoMamba clips of real
Fashion-MNIST garments, the small-scale counterpart of R-MeeTo's video results (Tables 13 and
14, appendix D.5), on a laptop CPU.

1. Clips (:mod:`.clips`): test clip ``i`` is test garment ``i`` moving over a 40 x 40 black
   canvas, written once as an MP4 file and read back through :class:`vimerge.data.VideoDataset`
   (decoding included; unreadable files are reported and skipped).
2. The base model ``videomamba_fmnist_video`` (4 frames, 101 tokens): the shipped weights
   (``checkpoint`` to use others; else the cache; else trained with :data:`VIDEO_BASE_RECIPE`).
3. Rows on the test clips, each one reduction spec in every block after the first (interval 1):
   unreduced; R-MeeTo and pruning at the mean-token ratios the image study's rows reach; STM at
   the same ratios; R-MeeTo merging only within frames (``scope=frame``) and only across time
   at one grid cell (``scope=time``); R-MeeTo re-trained briefly at one high ratio. And the image
   study's ``vim_fmnist`` on the same garments (the first test images, unreduced, R-MeeTo,
   pruning at the same ratios), for "video tolerates merging better than images".
4. Claims judged with the image study's paired statistic (:mod:`.report`); outputs
   ``results.json``, ``report.md``, ``accuracy_vs_ratio.png``, ``drop_vs_ratio.png``,
   ``merged_frames.png``.

Rows are kept as they finish (``rows.partial.json``), the re-training run is resumable: running
the same command again continues an interrupted study. Shapes: clips (N, 1, T, 40, 40), images
(N, 1, 28, 28).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm

from vimerge._version import __version__
from vimerge.data import make_loader
from vimerge.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, load_split
from vimerge.data.video import VideoDataset, read_annotations
from vimerge.measure.evaluate import evaluate
from vimerge.measure.flops import model_cost
from vimerge.measure.table import markdown_table
from vimerge.models import create_backbone
from vimerge.reduce import apply, format_spec, parse_spec
from vimerge.reduce.schedule import r_for_ratio, reduction_ratio
from vimerge.reduce.stm import settings_for_mean_ratio
from vimerge.train import RetrainConfig, retrain
from vimerge.viz import draw_groups, figure, line_plot, token_groups

from .clips import ClipGeometry, make_clips
from .plan import INTERVAL
from .plan import MODEL as IMAGE_MODEL
from .report import _compare, _drop_comparison, _verdict, compare_claim, correct_bits, correct_mask
from .run import Base, PartialRows, _sha256, cache_dir, find_base, machine, versions

VIDEO_MODEL = "videomamba_fmnist_video"

# Training the base from scratch (``vimerge train``'s defaults overridden as in the sidecar's
# command): one pass over 16,000 training clips, batch 64, AdamW lr 2e-3 (0.1 epoch warm-up),
# cosine to 1e-5, label smoothing 0.1, no augmentation (the random frame of every segment varies).
VIDEO_BASE_RECIPE: dict[str, Any] = dict(reduce="none", epochs=1, batch_size=64, effective_batch=64, lr=2e-3,
                                         min_lr=1e-5, warmup_epochs=0.1, augment="none", seed=0)
BASE_TRAIN_CLIPS = 16000


@dataclass(frozen=True)
class VideoPlan:
    """What the video study measures.

    ``ratios``: the image study's targets; every video row is set to the mean-token ratio the
    image study's R-MeeTo row reaches (so both models are compared at equal ratios).
    ``scope_ratios``: where flat, frame and time merging are compared (merging only across time
    cannot remove many tokens: 25 cells of 4 frames). ``test_clips``: the first N test garments.
    ``image_rows``: evaluate ``vim_fmnist`` on the same garments (still images).
    """
    ratios: tuple[float, ...] = (0.14, 0.28, 0.42, 0.54)
    scope_ratios: tuple[float, ...] = (0.14, 0.28)
    retrain_ratio: float | None = 0.54
    test_clips: int = 2000
    retrain_clips: int = 4000
    retrain_lr: float = 1e-3
    retrain_batch: int = 64
    batch_size: int = 64
    image_rows: bool = True
    seed: int = 0
    viz_classes: tuple[int, ...] = (0, 1, 7)        # T-shirt/top, Trouser, Sneaker
    geometry: ClipGeometry = field(default_factory=ClipGeometry)


VIDEO_FULL = VideoPlan()
VIDEO_QUICK = VideoPlan(ratios=(0.28, 0.54), scope_ratios=(0.28,), test_clips=300, retrain_clips=1000)

FAMILIES = {   # family -> label in tables and plots
    "baseline": "Unreduced",
    "prune": "Pruning",
    "rmeeto": "R-MeeTo (merge, flat)",
    "stm": "STM (BNNM+HSP)",
    "rmeeto-frame": "R-MeeTo within frames",
    "rmeeto-time": "R-MeeTo across time",
    "rmeeto-retrained": "R-MeeTo re-trained",
    "image-baseline": "Images: vim_fmnist unreduced",
    "image-prune": "Images: pruning",
    "image-rmeeto": "Images: R-MeeTo",
}


@dataclass
class VideoRow:
    """One row: key, family, setting, target ratio, reduction spec; ``retrain``: the base is
    re-trained with ``reduce`` first; ``image``: a ``vim_fmnist`` row on the test images."""
    key: str
    family: str
    setting: str
    target: float | None
    reduce: str
    retrain: bool = False

    @property
    def image(self) -> bool:
        return self.family.startswith("image-")

    @property
    def model(self) -> str:
        return IMAGE_MODEL if self.image else VIDEO_MODEL


def _num_tokens(name: str) -> tuple[int, int, int]:
    """(tokens, blocks, class-token index) of a preset."""
    probe = create_backbone(name)
    return probe.num_tokens, probe.depth, probe.cls_index


def plan_video_rows(plan: VideoPlan) -> list[VideoRow]:
    """Every row, in the order they run (training-free first, the re-trained row last)."""
    n_img, d_img, _ = _num_tokens(IMAGE_MODEL)
    n_vid, d_vid, cls_vid = _num_tokens(VIDEO_MODEL)

    def image_r(t: float) -> int:
        return r_for_ratio(t, n_img, d_img, INTERVAL)

    def video_r(t: float) -> int:     # the video r whose ratio is nearest the image row's
        return r_for_ratio(reduction_ratio(image_r(t), n_img, d_img, INTERVAL), n_vid, d_vid, INTERVAL)

    def spec(method: str, r: int, **extra: Any) -> str:
        return format_spec(method, {"r": r, "interval": INTERVAL, **extra})

    rows = [VideoRow("baseline", "baseline", "no reduction", None, "none")]
    for t in plan.ratios:
        r = video_r(t)
        reached = reduction_ratio(r, n_vid, d_vid, INTERVAL)
        rows.append(VideoRow(f"prune@{t:g}", "prune", f"ratio {t:g}, r={r}", t, spec("prune", r)))
        rows.append(VideoRow(f"rmeeto@{t:g}", "rmeeto", f"ratio {t:g}, r={r}", t, spec("rmeeto", r)))
        stm = settings_for_mean_ratio(reached, n_vid, d_vid, cls_index=cls_vid)
        rows.append(VideoRow(f"stm@{t:g}", "stm", f"ratio {t:g} (STM {round(100 * stm['final_ratio'])}%, "
                             f"{stm['per_side']}/side)", t, format_spec("stm", stm)))
    for t in plan.scope_ratios:
        r = video_r(t)
        for scope in ("frame", "time"):
            rows.append(VideoRow(f"rmeeto-{scope}@{t:g}", f"rmeeto-{scope}", f"ratio {t:g}, r={r}, scope={scope}",
                                 t, spec("rmeeto", r, scope=scope)))
    if plan.image_rows:
        rows.append(VideoRow("image-baseline", "image-baseline", "no reduction", None, "none"))
        for t in plan.ratios:
            r = image_r(t)
            rows.append(VideoRow(f"image-prune@{t:g}", "image-prune", f"ratio {t:g}, r={r}", t, spec("prune", r)))
            rows.append(VideoRow(f"image-rmeeto@{t:g}", "image-rmeeto", f"ratio {t:g}, r={r}", t, spec("rmeeto", r)))
    if plan.retrain_ratio is not None:
        t = plan.retrain_ratio
        r = video_r(t)
        rows.append(VideoRow(f"rmeeto-retrained@{t:g}", "rmeeto-retrained", f"ratio {t:g}, r={r}", t,
                             spec("rmeeto", r), retrain=True))
    return rows


# ------------------------------------------------------------------------------------ data


class ClipTensors(Dataset):
    """Decoded clips kept in memory: ``(clip (C, T, H, W), label)`` pairs."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor):
        self.clips, self.targets = clips, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.clips[index], int(self.targets[index])


@dataclass
class TestClips:
    """The test clips as read back: the annotation list, the decoded clips, the garment index of
    each readable clip (its line in the list) and the files that could not be read."""
    listing: str
    data: ClipTensors
    garments: list[int]
    skipped: dict[str, str]
    seconds: float


def read_test_clips(listing: Path, model, *, progress: bool) -> TestClips:
    """Decode every clip of ``listing`` once through :class:`~vimerge.data.VideoDataset` (the
    evaluation sampling of ``vimerge eval``); unreadable files are reported and left out."""
    start = time.perf_counter()
    reader = VideoDataset(None, annotations=listing, num_frames=model.num_frames, img_size=model.img_size,
                          channels=model.in_chans)
    clips, labels, garments, skipped = [], [], [], {}
    for i in tqdm(range(len(reader)), desc="reading test clips", unit="clip", disable=not progress,
                  file=sys.stderr, dynamic_ncols=True):
        item = reader[i]
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            clips.append(item[0])
            labels.append(item[1])
            garments.append(i)
        else:
            skipped[item.path] = item.reason
            print(f"skipped unreadable clip {item.path} ({item.reason})", file=sys.stderr)
    if not clips:
        raise RuntimeError(f"no clip of {listing} could be read ({len(skipped)} skipped)")
    data = ClipTensors(torch.stack(clips), torch.tensor(labels))
    return TestClips(str(listing), data, garments, skipped, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ base model



def base_train_command(train_list: str | Path, test_list: str | Path, output: str | Path) -> str:
    """The ``vimerge train`` command of :data:`VIDEO_BASE_RECIPE` (the shipped weights')."""
    r = VIDEO_BASE_RECIPE
    return shlex.join(["vimerge", "train", "--model", VIDEO_MODEL, "--data", str(train_list), "--val-data",
                       str(test_list), "--epochs", str(r["epochs"]), "--batch-size", str(r["batch_size"]),
                       "--effective-batch", str(r["effective_batch"]), "--lr", f"{r['lr']:g}", "--min-lr",
                       f"{r['min_lr']:g}", "--warmup-epochs", f"{r['warmup_epochs']:g}", "--augment", r["augment"],
                       "--train-seed", str(r["seed"]), "--output", str(output)])


def resolve_video_base(checkpoint: str | None, data: str, clips: Path, plan: VideoPlan, *, train: bool,
                       progress: bool, test_list: Path) -> Base:
    """``checkpoint``, else the shipped weights, else the cache, else trained from scratch with
    :data:`VIDEO_BASE_RECIPE` on :data:`BASE_TRAIN_CLIPS` training clips (resumable)."""
    found = find_base(VIDEO_MODEL, checkpoint, train=train)
    if found is not None:
        return found
    run_dir = cache_dir() / f"{VIDEO_MODEL}-base"
    train_list = make_clips(clips, "train", BASE_TRAIN_CLIPS, data=data, geometry=plan.geometry, progress=progress)
    print(f"training the base {VIDEO_MODEL} from scratch into {run_dir} (resumable: run the demo again to "
          f"continue after an interruption); the same as\n  {base_train_command(train_list, test_list, run_dir)}",
          file=sys.stderr)
    config = RetrainConfig(model=VIDEO_MODEL, data=str(train_list), val_data=str(test_list), output=str(run_dir),
                           resume=True, save_every=50, progress=progress, workers=1, **VIDEO_BASE_RECIPE)
    start = time.perf_counter()
    result = retrain(config)
    return Base(str(result.final_checkpoint), "trained", ["--checkpoint", str(result.final_checkpoint)],
                seconds=time.perf_counter() - start,
                sidecar={"eval_acc": result.eval_acc, "config": config.to_dict()}, model=VIDEO_MODEL)


# ------------------------------------------------------------------------------------ rows


def video_eval_command(base: Base, listing: str, plan: VideoPlan, spec: str, checkpoint: str | None = None) -> str:
    """The ``vimerge eval`` command of a video row (the same clips, decoded by the command)."""
    weights = ["--checkpoint", checkpoint] if checkpoint else base.model_args
    return shlex.join(["vimerge", "eval", "--model", VIDEO_MODEL, *weights, "--data", listing,
                       "--batch-size", str(plan.batch_size), "--reduce", spec])


def image_eval_command(data: str, images: int, spec: str) -> str:
    """The ``vimerge eval`` command of a ``vim_fmnist`` row on the first ``images`` test images."""
    return shlex.join(["vimerge", "eval", "--model", IMAGE_MODEL, "--pretrained", "--dataset", "fashion-mnist",
                       "--data", data, "--batch-size", "256", "--limit", str(images), "--reduce", spec])


def run_video_row(row: VideoRow, weights: dict[str, Any], command: str, loader, *, progress: bool) -> dict:
    """Build the row's model, evaluate it, return its JSON row."""
    model = create_backbone(row.model, **weights)
    apply(model, row.reduce)
    model.eval()
    cost = model_cost(model)
    result = evaluate(model, loader, progress=progress, desc=f"{row.key:<24s}", per_image=True)
    method, options = parse_spec(row.reduce)
    return {
        "key": row.key, "family": row.family, "label": FAMILIES[row.family], "model": row.model,
        "setting": row.setting, "target_ratio": row.target, "reduce": row.reduce, "method": method,
        "options": options, "reduction_ratio": cost["reduction_ratio"], "token_counts": cost["token_counts"],
        "gflops_paper": cost["gflops_paper"], "gflops_full": cost["gflops_full"],
        "top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "correct": result["correct"],
        "images": result["images"], "seconds": result["seconds"], "clips_per_second": result["images_per_second"],
        "eval_command": command, "correct_bits": correct_bits(result["per_image_correct"].numpy()),
    }


def retrain_video_row(row: VideoRow, base: Base, train_list: Path, plan: VideoPlan, out: Path, *,
                      progress: bool) -> tuple[str, dict]:
    """Re-train the base with the row's reduction: one pass over ``plan.retrain_clips`` training
    clips (cosine learning rate, no augmentation); resumable. Returns the final checkpoint and
    the run's facts."""
    config = RetrainConfig(
        model=VIDEO_MODEL, checkpoint=base.path, reduce=row.reduce, data=str(train_list), val_data=None,
        epochs=1, batch_size=plan.retrain_batch, effective_batch=plan.retrain_batch, lr=plan.retrain_lr,
        min_lr=1e-5, augment="none", label_smoothing=0.1, workers=0, seed=plan.seed, output=str(out),
        resume=True, save_every=10, log_every=1000, progress=progress)
    start = time.perf_counter()
    result = retrain(config)
    facts = {"run_dir": str(out), "status": result.status, "steps": result.global_step, "clips": plan.retrain_clips,
             "lr": plan.retrain_lr, "batch_size": plan.retrain_batch, "seconds": time.perf_counter() - start,
             "last_loss": result.last_loss, "train_list": str(train_list)}
    return str(out / "final.pth"), facts


# ------------------------------------------------------------------------------------ claims


def video_claims(rows: list[dict], garments: list[int]) -> list[dict]:
    """A verdict per claim, with the numbers behind it (the image study's paired statistic).

    ``garments``: the test image of each evaluated clip, to pair image rows with video rows."""
    by = {r["key"]: r for r in rows}
    out: list[dict] = []
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})

    def compare(*args, **kwargs) -> None:
        out.append(compare_claim(*args, **kwargs))

    def pairs(fam_a: str, fam_b: str, ts: list[float]) -> list[tuple[str, dict, dict]]:
        return [(f"at {t:g}", by[f"{fam_a}@{t:g}"], by[f"{fam_b}@{t:g}"]) for t in ts
                if f"{fam_a}@{t:g}" in by and f"{fam_b}@{t:g}" in by]

    # video against images: the drop of each from its own unreduced model, paired per garment
    vb, ib = by.get("baseline"), by.get("image-baseline")
    texts, outcomes = [], []
    if vb is not None and ib is not None:
        for t in targets:
            v, i = by.get(f"rmeeto@{t:g}"), by.get(f"image-rmeeto@{t:g}")
            if v is None or i is None:
                continue
            img_b, img_r = (_select(x, garments) for x in (ib, i))
            d, se, o = _drop_comparison(img_b, img_r, vb, v)     # "a": the images drop more
            outcomes.append(o)
            texts.append(f"at {t:g} (ratios {v['reduction_ratio']:.3f} video, {i['reduction_ratio']:.3f} images): "
                         f"video drops {vb['top1'] - v['top1']:.2f} points ({vb['top1']:.2f}% -> {v['top1']:.2f}%), "
                         f"images {ib['top1'] - i['top1']:.2f} ({ib['top1']:.2f}% -> {i['top1']:.2f}%): the images' "
                         f"drop {d:+.2f} points larger on the same garments (2 s.e. = {2 * se:.2f})")
    out.append({"claim": "Video tolerates merging better than images (a smaller drop at equal mean-token ratios)",
                "source": "R-MeeTo Sec. 4.4, Table 14 (VideoMamba on K400: 0.2-2 points training-free)",
                "verdict": _verdict(outcomes), "evidence": texts,
                "caveat": f"the two models differ ({VIDEO_MODEL}: 101 tokens of 8x8 patches over 4 frames; "
                          f"{IMAGE_MODEL}: 50 tokens of 4x4 patches, a Vim with a middle class token), so the "
                          "comparison is of these two models, not of video against images in general"})

    high = [t for t in targets if t >= 0.4] or targets[-1:]
    compare("Merging beats pruning at high reduction ratios (video)", "R-MeeTo Fig. 1b, Table 18",
            pairs("rmeeto", "prune", high), "merging", "pruning")

    def recovered(a: dict, b: dict) -> str:
        if not (vb and vb["top1"] > b["top1"]):
            return ""
        return (f"; {100 * (a['top1'] - b['top1']) / (vb['top1'] - b['top1']):.0f}% of the drop from the "
                f"unreduced {vb['top1']:.2f}% recovered")
    compare("Re-training recovers the accuracy merging loses (video)", "R-MeeTo Table 13 (K400, r = 88, re-trained)",
            pairs("rmeeto-retrained", "rmeeto", targets), "re-trained", "training-free", recovered)
    out.append(_scope_claim(by))
    return out


def _select(row: dict, garments: list[int]) -> dict:
    """An image row restricted to the garments whose clips were read (paired with the video rows)."""
    mask = correct_mask(row)
    keep = [g for g in garments if g < len(mask)]
    return {**row, "correct_bits": correct_bits(mask[keep]), "images": len(keep)}


def _scope_claim(by: dict) -> dict:
    """Which merging scope (flat, within frames, across time) keeps most accuracy: the scope that
    loses no comparison to another and wins at least one, at every ratio compared."""
    scopes = {"flat": "rmeeto", "frame": "rmeeto-frame", "time": "rmeeto-time"}
    ratios = sorted({float(k.split("@")[1]) for k in by if k.startswith("rmeeto-frame@")})
    texts = []
    record = {s: {"wins": 0, "losses": 0} for s in scopes}
    for t in ratios:
        rows = {s: by.get(f"{fam}@{t:g}") for s, fam in scopes.items()}
        names = [s for s in scopes if rows[s] is not None]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                d, se, o = _compare(rows[a], rows[b])
                if o == "a":
                    record[a]["wins"] += 1
                    record[b]["losses"] += 1
                elif o == "b":
                    record[b]["wins"] += 1
                    record[a]["losses"] += 1
                texts.append(f"at {t:g}: {a} {rows[a]['top1']:.2f}% vs {b} {rows[b]['top1']:.2f}% "
                             f"({d:+.2f} points, 2 s.e. = {2 * se:.2f})")
    best = [s for s, rec in record.items() if rec["losses"] == 0 and rec["wins"] > 0]
    verdict = (f"{best[0]} keeps most" if len(best) == 1 else "no clear winner") if texts else "not measured"
    return {"claim": "Which merging scope keeps most accuracy: flat (the paper's), within frames, or across time",
            "source": "beyond the paper (the VideoMamba issue's scope option)", "verdict": verdict,
            "evidence": texts, "record": record}


# ------------------------------------------------------------------------------------ tables, report


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def video_rows_table(rows: list[dict]) -> str:
    """Every row (markdown), keyed so that tests can match the JSON."""
    return markdown_table(
        ["row", "method", "setting", "tokens per block", "reduction ratio", "top-1 (%)", "GFLOPs (paper)",
         "GFLOPs (full)", "clips/s (CPU)", "speed-up"],
        [[f"`{r['key']}`", r["label"], r["setting"], " ".join(map(str, r["token_counts"])),
          f"{r['reduction_ratio']:.3f}", _f(r["top1"], ".2f"), f"{r['gflops_paper']:.4f}", f"{r['gflops_full']:.4f}",
          _f(r["clips_per_second"], ".0f"), f"{_f(r.get('speedup'), '.2f')}x"] for r in rows])


def video_ratio_table(rows: list[dict]) -> str:
    """Top-1 of every family at each target ratio (video rows and the image rows)."""
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})
    by = {(r["family"], r["target_ratio"]): r for r in rows}
    bases = {"video": by.get(("baseline", None)), "image": by.get(("image-baseline", None))}
    body = []
    for fam, label in FAMILIES.items():
        if fam.endswith("baseline") or not any((fam, t) in by for t in targets):
            continue
        base = bases["image" if fam.startswith("image-") else "video"]
        body.append([label, _f(base and base["top1"], ".2f"),
                     *[_f(by[(fam, t)]["top1"], ".2f") if (fam, t) in by else "" for t in targets]])
    for kind, fam in (("video", "rmeeto"), ("images", "image-rmeeto")):
        if any((fam, t) in by for t in targets):
            body.append([f"(ratio reached, {kind})", "0",
                         *[f"{by[(fam, t)]['reduction_ratio']:.3f}" if (fam, t) in by else "" for t in targets]])
    return markdown_table(["method", "0 (unreduced)", *[f"{t:g}" for t in targets]], body)


def write_video_report(path: Path, results: dict) -> str:
    """``report.md``: the setting, the claims with verdicts, the tables, the figures, a command."""
    rows, setup, base = results["rows"], results["setup"], results["base"]
    t = results["timings"]
    lines = [
        "# vimerge demo --video: token reduction on Fashion-MNIST clips",
        "",
        f"Model `{VIDEO_MODEL}` ({setup['num_tokens']} tokens: {setup['num_frames']} frames of "
        f"{setup['grid'][0]}x{setup['grid'][1]} patches of 8x8 pixels and the class token, {setup['depth']} blocks), "
        f"base weights: {base['source']} (`{base['path']}`). Evaluated on {setup['test_clips']} test clips "
        f"(`{setup['test_list']}`: test garment i moving over a {setup['geometry']['canvas']}x"
        f"{setup['geometry']['canvas']} canvas, MP4 files read back with PyAV)"
        + (f", {len(results['skipped'])} unreadable clip(s) skipped" if results["skipped"] else "")
        + f"; reduction in every block after the first (interval {INTERVAL}). "
        + ("Quick run (--quick). " if setup["quick"] else "")
        + f"Machine: {results['machine']['cpu']}, {results['machine']['threads']} threads; total {t['total']:.0f} s"
        + (f" ({setup['rows_reused']} rows reused from an earlier run)." if setup["rows_reused"] else "."),
        "",
        "## The claims, here",
        "",
    ]
    for c in results["claims"]:
        lines.append(f"- **{c['claim']}** ({c['source']}): **{c['verdict']}**. "
                     + ("; ".join(c["evidence"]) + "." if c["evidence"] else "")
                     + (f" Caveat: {c['caveat']}." if c.get("caveat") else ""))
    lines += ["", "A comparison counts when the difference exceeds two standard errors, paired on the same "
              "clips (McNemar's normal approximation); video against images pairs each clip with its own "
              "garment's still image (difference of the two drops).", "",
              "## Top-1 (%) at each reduction ratio", "", video_ratio_table(rows), "",
              "## Every row", "", video_rows_table(rows), "",
              "Reduction ratio: 1 - mean tokens per block / initial tokens. GFLOPs per clip (images: per image); "
              "paper: R-MeeTo's convention (video: `calc_flops.py`, Table 13), full: every multiply-add. "
              f"clips/s: the evaluation pass on this CPU over clips already decoded (batch {setup['batch_size']}; "
              f"decoding the {setup['test_clips']} test clips took {t['read']:.1f} s); speed-up against the "
              "unreduced row of the same model.", ""]
    retrained = [r for r in rows if "retrain" in r]
    if retrained:
        lines += ["## Re-training", ""]
        for r in retrained:
            f = r["retrain"]
            lines.append(f"`{r['key']}`: one pass over {f['clips']} training clips, AdamW lr {f['lr']:g} cosine to "
                         f"1e-5, batch {f['batch_size']}, from the base weights: {f['steps']} steps, "
                         f"{f['seconds']:.0f} s; top-1 {r['top1']:.2f}%.")
        lines.append("")
    lines += ["## Figures", "", "![accuracy against reduction ratio](accuracy_vs_ratio.png)", "",
              "![accuracy drop, video and images](drop_vs_ratio.png)", "",
              "![merged tokens on the frames](merged_frames.png)", "",
              "Merged tokens (R-MeeTo appendix D.5): one row of frames per clip and configuration; the patches "
              "held by one final token share a colour across all frames.", "",
              "## Reproduce a row", "", "```bash", rows[-1]["eval_command"], "```", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


# ------------------------------------------------------------------------------------ figures


def plot_video(rows: list[dict], out: Path) -> list[str]:
    """``accuracy_vs_ratio.png`` (top-1 of every family) and ``drop_vs_ratio.png`` (accuracy
    drop from each model's unreduced top-1: video merging and pruning against images)."""
    by_fam: dict[str, list[dict]] = {}
    for r in rows:
        by_fam.setdefault(r["family"], []).append(r)
    base = by_fam["baseline"][0]
    ibase = by_fam.get("image-baseline", [None])[0]
    series = []
    for fam, label in FAMILIES.items():
        if fam.endswith("baseline") or fam not in by_fam:
            continue
        own = ibase if fam.startswith("image-") else base
        start = [] if fam.endswith("-retrained") or own is None else [(0.0, own["top1"])]
        series.append((label, start + sorted((r["reduction_ratio"], r["top1"]) for r in by_fam[fam])))
    line_plot(series, out / "accuracy_vs_ratio.png",
              xlabel="reduction ratio (1 - mean tokens per block / initial tokens)", ylabel="top-1 accuracy (%)",
              title="Fashion-MNIST clips (VideoMamba) and images (Vim) against token reduction",
              hline=(base["top1"], f"video unreduced {base['top1']:.2f}%"))
    drops = []
    for fam, own in (("rmeeto", base), ("prune", base), ("rmeeto-frame", base), ("rmeeto-time", base),
                     ("image-rmeeto", ibase), ("image-prune", ibase)):
        if fam in by_fam and own is not None:
            pts = sorted((r["reduction_ratio"], own["top1"] - r["top1"]) for r in by_fam[fam])
            drops.append((("Video: " if not fam.startswith("image-") else "") + FAMILIES[fam], [(0.0, 0.0), *pts]))
    line_plot(drops, out / "drop_vs_ratio.png", xlabel="reduction ratio", ylabel="accuracy drop (points)",
              title="Accuracy lost to token reduction, training-free: clips against still images")
    return ["accuracy_vs_ratio.png", "drop_vs_ratio.png"]


def _label_panel(text: str, size: tuple[int, int]) -> Image.Image:
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    for k, line in enumerate(text.split("\n")):
        draw.text((4, 4 + 14 * k), line, fill=(0, 0, 0))
    return panel


def draw_merged_frames(configs: list[tuple[str, torch.nn.Module]], listing: str, labels: list[int],
                       classes: tuple[int, ...], out: Path, cell: int = 24) -> str:
    """``merged_frames.png``: for the first test clip of each class in ``classes``, a row of its
    frames, then one row per ``(title, reduced video model)`` with the final tokens' groups drawn
    on the frames, one colour per final token shared across the frames it spans."""
    samples = read_annotations(Path(listing), Path(listing).parent)
    picks = [next((i for i, y in enumerate(labels) if y == c), None) for c in classes]
    picks = [i for i in picks if i is not None] or [0]
    model0 = configs[0][1]
    reader = VideoDataset(None, samples=samples, num_frames=model0.num_frames, img_size=model0.img_size,
                          channels=model0.in_chans)
    gh, gw = model0.grid_size
    size = (gw * cell, gh * cell)
    rows = []
    for i in picks:
        try:
            clip, frames = reader.read(samples[i][0], i)
        except Exception as exc:  # noqa: BLE001 - an unreadable clip is left out of the picture
            print(f"merged_frames.png: skipped {samples[i][0]} ({exc})", file=sys.stderr)
            continue
        rows.append([_label_panel(f"clip {i}\nlabel {labels[i]}\nframes", size)]
                    + [f.convert("RGB").resize(size, Image.NEAREST) for f in frames])
        for title, model in configs:
            groups = token_groups(model, clip[None])[0]                    # (T, gh, gw)
            n_final = len(set(groups.flatten().tolist()) - {-1})
            rows.append([_label_panel(f"{title}\n{n_final} tokens", size)]
                        + [draw_groups(f, groups[k], cell=cell) for k, f in enumerate(frames)])
    t = model0.num_frames
    figure(rows, ["", *[f"frame {k + 1} of {t}" for k in range(t)]]).save(out / "merged_frames.png")
    return "merged_frames.png"


# ------------------------------------------------------------------------------------ the run


def run_video_demo(*, data: str | None = None, output: str = "vimerge-demo-video", quick: bool = False,
                   checkpoint: str | None = None, train_base: bool = False, plan: VideoPlan | None = None,
                   clips: str | None = None, fresh: bool = False, progress: bool = True) -> dict:
    """Run the video study and write its outputs; returns the content of ``results.json``.

    ``data``: the Fashion-MNIST IDX directory the garments come from (default: the Debian
    package); ``clips``: where the MP4 clips are written (default ``$VIMERGE_CACHE/fmnist-clips``,
    kept between runs); ``plan`` overrides the full/quick plan (tests use small ones).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    plan = plan or (VIDEO_QUICK if quick else VIDEO_FULL)
    data = str(Path(data).expanduser()) if data else DEFAULT_ROOT
    clip_root = Path(clips).expanduser() if clips else cache_dir() / "fmnist-clips"
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    test_images, test_labels = load_split(data, "test")        # missing files: the one-line fix
    n = min(plan.test_clips, len(test_images))
    test_list = make_clips(clip_root, "test", n, geometry=plan.geometry, images=test_images, labels=test_labels,
                           progress=progress)
    train_list = None
    if plan.retrain_ratio is not None:
        train_list = make_clips(clip_root, "train", plan.retrain_clips, data=data, geometry=plan.geometry,
                                progress=progress)
    timings["clips"] = time.perf_counter() - t0

    t = time.perf_counter()
    base = resolve_video_base(checkpoint, data, clip_root, plan, train=train_base, progress=progress,
                              test_list=test_list)
    timings["base"] = time.perf_counter() - t

    probe = create_backbone(VIDEO_MODEL, **base.weights()).eval()
    test = read_test_clips(test_list, probe, progress=progress)
    timings["read"] = test.seconds
    specs = plan_video_rows(plan)
    base_sha = _sha256(base.path)
    fingerprint = hashlib.sha256(json.dumps(
        [asdict(plan), base_sha, data, str(clip_root), Path(test_list).read_text(), sorted(test.skipped), __version__,
         [s.reduce for s in specs]]).encode()).hexdigest()[:16]
    partial = PartialRows(out / "rows.partial.json", fingerprint, fresh)
    if partial.reused:
        print(f"continuing an interrupted video study in {out}: {partial.reused} row(s) already done "
              f"(--fresh recomputes them)", file=sys.stderr)

    loaders = {"video": make_loader(test.data, plan.batch_size, 0)}
    if plan.image_rows:
        loaders["image"] = make_loader(FashionMNIST(data, "test", limit=n), 256, 0)
    with torch.inference_mode():        # load the scan kernels before anything is timed
        probe(test.data.clips[:2])
        if plan.image_rows:
            create_backbone(IMAGE_MODEL).eval()(torch.zeros(2, 1, 28, 28))

    t_rows = time.perf_counter()
    retrain_seconds = 0.0
    for spec in specs:
        if spec.key in partial.rows:
            continue
        if spec.image:
            row = run_video_row(spec, {"pretrained": True}, image_eval_command(data, n, spec.reduce),
                                loaders["image"], progress=progress)
        else:
            ckpt, facts = None, None
            if spec.retrain:
                assert train_list is not None
                run_dir = out / "retrain" / f"{spec.key.replace('@', '-')}-{fingerprint}"
                t = time.perf_counter()
                ckpt, facts = retrain_video_row(spec, base, train_list, plan, run_dir, progress=progress)
                retrain_seconds += time.perf_counter() - t
            weights = {"checkpoint": ckpt} if ckpt else base.weights()
            row = run_video_row(spec, weights, video_eval_command(base, str(test_list), plan, spec.reduce, ckpt),
                                loaders["video"], progress=progress)
            if facts is not None:
                row["retrain"] = facts
        partial.add(row)
    timings["retrain"] = retrain_seconds
    timings["rows"] = time.perf_counter() - t_rows - retrain_seconds

    rows = [partial.rows[s.key] for s in specs]
    base_speed = {r["model"]: r["clips_per_second"] for r in rows if r["family"].endswith("baseline")}
    for r in rows:
        own = base_speed.get(r["model"])
        r["speedup"] = r["clips_per_second"] / own if own and r["clips_per_second"] else None

    t = time.perf_counter()
    files = plot_video(rows, out)
    files.append(draw_merged_frames(_figure_configs(rows, plan, base), str(test_list),
                                    [int(y) for y in test_labels[:n]], plan.viz_classes, out))
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    results = {
        "setup": {"model": VIDEO_MODEL, "image_model": IMAGE_MODEL if plan.image_rows else None,
                  "num_tokens": probe.num_tokens, "num_frames": probe.num_frames, "grid": list(probe.grid_size),
                  "depth": probe.depth, "interval": INTERVAL, "data": data, "clips": str(clip_root),
                  "test_list": str(test_list), "test_clips": len(test.garments), "listed_clips": n,
                  "train_list": str(train_list) if train_list else None, "quick": quick, "seed": plan.seed,
                  "batch_size": plan.batch_size, "geometry": asdict(plan.geometry), "plan": asdict(plan),
                  "fingerprint": fingerprint, "rows_reused": partial.reused},
        "base": {**asdict(base), "sha256": base_sha},
        "skipped": test.skipped,
        "garments": test.garments,
        "versions": versions(),
        "machine": machine(),
        "timings": timings,
        "rows": rows,
        "claims": video_claims(rows, test.garments),
        "files": ["results.json", "report.md", *files],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_video_report(out / "report.md", results)
    return results


def _figure_configs(rows: list[dict], plan: VideoPlan, base: Base) -> list[tuple[str, torch.nn.Module]]:
    """The merged-frames figure's models: R-MeeTo flat, within frames and across time at the
    highest scope ratio, and flat at the highest ratio."""
    by = {r["key"]: r for r in rows}
    picks = []
    if plan.scope_ratios:
        s = max(plan.scope_ratios)
        picks += [(f"flat {s:g}", by.get(f"rmeeto@{s:g}")), (f"frame {s:g}", by.get(f"rmeeto-frame@{s:g}")),
                  (f"time {s:g}", by.get(f"rmeeto-time@{s:g}"))]
    top = max(plan.ratios)
    picks.append((f"flat {top:g}", by.get(f"rmeeto@{top:g}")))
    configs, seen = [], set()
    for title, row in picks:
        if row is None or row["key"] in seen:
            continue
        seen.add(row["key"])
        model = create_backbone(VIDEO_MODEL, **base.weights())
        apply(model, row["reduce"])
        configs.append((title, model.eval()))
    return configs


def video_summary(results: dict) -> str:
    """What the terminal shows at the end: the tables, the claims, skipped files, timings."""
    lines = [video_ratio_table(results["rows"]), "", video_rows_table(results["rows"]), ""]
    for c in results["claims"]:
        lines.append(f"[{c['verdict']}] {c['claim']}")
        lines += [f"    {e}" for e in c["evidence"]]
    if results["skipped"]:
        lines.append("")
        lines.append(f"skipped {len(results['skipped'])} unreadable clip(s): " + ", ".join(results["skipped"]))
    t = results["timings"]
    lines.append("")
    lines.append(f"total {t['total']:.0f} s (clips {t['clips']:.0f} s, reading {t['read']:.0f} s, evaluation "
                 f"{t['rows']:.0f} s, re-training {t['retrain']:.0f} s, figures {t['figures']:.0f} s)")
    return "\n".join(lines)


__all__ = ["VIDEO_MODEL", "VIDEO_BASE_RECIPE", "BASE_TRAIN_CLIPS", "VideoPlan", "VIDEO_FULL", "VIDEO_QUICK",
           "FAMILIES", "VideoRow", "plan_video_rows", "ClipTensors", "TestClips", "read_test_clips",
           "base_train_command", "resolve_video_base", "video_eval_command", "image_eval_command", "run_video_row",
           "retrain_video_row", "video_claims", "video_rows_table", "video_ratio_table", "write_video_report",
           "plot_video", "draw_merged_frames", "run_video_demo", "video_summary"]
