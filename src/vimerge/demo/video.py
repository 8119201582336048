"""The video study (``vimerge demo --video``): token reduction on VideoMamba clips of real
Fashion-MNIST garments, the small-scale counterpart of R-MeeTo's video results (Tables 13 and
14, appendix D.5), as a :class:`~vimerge.demo.study.Study`.

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
4. Claims judged with the shared paired statistic (:mod:`.stats`); figures
   ``accuracy_vs_ratio.png``, ``drop_vs_ratio.png``, ``merged_frames.png``.

Shapes: clips (N, 1, T, 40, 40), images (N, 1, 28, 28).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vimerge.data import make_loader
from vimerge.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, load_split
from vimerge.models import create_backbone
from vimerge.reduce import apply, format_spec
from vimerge.reduce.schedule import r_for_ratio, reduction_ratio
from vimerge.reduce.stm import settings_for_mean_ratio
from vimerge.train import RetrainConfig, retrain

from .base import Base, cache_dir, find_base
from .clips import ClipGeometry, make_clips, read_test_clips
from .report import plot_accuracy_vs_ratio, ratio_table, rows_table
from .stats import claim, compare, compare_claim, drop_comparison, pairs, recovered_note, select_items
from .study import INTERVAL, Prepared, Row, Study
from .timing import TimingPlan
from .video_figures import draw_merged_frames, plot_drop_vs_ratio

VIDEO_MODEL = "videomamba_fmnist_video"
IMAGE_MODEL = "vim_fmnist"

# Training the base from scratch (``vimerge train``'s defaults overridden as in the sidecar's
# command): one pass over 16,000 training clips, batch 64, AdamW lr 2e-3 (0.1 epoch warm-up),
# cosine to 1e-5, label smoothing 0.1, no augmentation (the random frame of every segment varies).
VIDEO_BASE_RECIPE: dict[str, Any] = dict(reduce="none", epochs=1, batch_size=64, effective_batch=64, lr=2e-3,
                                         min_lr=1e-5, warmup_epochs=0.1, augment="none", seed=0)
BASE_TRAIN_CLIPS = 16000

# Throughput: 3 rounds (after 1 untimed forward) of one batch of 32 clips per row (27 rows: 3,456 clips).
TIMING = TimingPlan(rounds=3, batch=32)


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


def _row(key: str, family: str, setting: str, target: float | None, reduce: str, retrain: bool = False) -> Row:
    image = family.startswith("image-")
    return Row(key, family, setting, target, reduce, IMAGE_MODEL if image else VIDEO_MODEL, retrain,
               "image" if image else "video")


def _num_tokens(name: str) -> tuple[int, int, int]:
    """(tokens, blocks, class-token index) of a preset."""
    probe = create_backbone(name)
    return probe.num_tokens, probe.depth, probe.cls_index


def plan_video_rows(plan: VideoPlan) -> list[Row]:
    """Every row, in the order they run (training-free first, the re-trained row last); image
    rows have ``data="image"``, video rows ``data="video"``."""
    n_img, d_img, _ = _num_tokens(IMAGE_MODEL)
    n_vid, d_vid, cls_vid = _num_tokens(VIDEO_MODEL)

    def image_r(t: float) -> int:
        return r_for_ratio(t, n_img, d_img, INTERVAL)

    def video_r(t: float) -> int:     # the video r whose ratio is nearest the image row's
        return r_for_ratio(reduction_ratio(image_r(t), n_img, d_img, INTERVAL), n_vid, d_vid, INTERVAL)

    def spec(method: str, r: int, **extra: Any) -> str:
        return format_spec(method, {"r": r, "interval": INTERVAL, **extra})

    rows = [_row("baseline", "baseline", "no reduction", None, "none")]
    for t in plan.ratios:
        r = video_r(t)
        reached = reduction_ratio(r, n_vid, d_vid, INTERVAL)
        rows.append(_row(f"prune@{t:g}", "prune", f"ratio {t:g}, r={r}", t, spec("prune", r)))
        rows.append(_row(f"rmeeto@{t:g}", "rmeeto", f"ratio {t:g}, r={r}", t, spec("rmeeto", r)))
        stm = settings_for_mean_ratio(reached, n_vid, d_vid, cls_index=cls_vid)
        rows.append(_row(f"stm@{t:g}", "stm", f"ratio {t:g} (STM {round(100 * stm['final_ratio'])}%, "
                         f"{stm['per_side']}/side)", t, format_spec("stm", stm)))
    for t in plan.scope_ratios:
        r = video_r(t)
        for scope in ("frame", "time"):
            rows.append(_row(f"rmeeto-{scope}@{t:g}", f"rmeeto-{scope}", f"ratio {t:g}, r={r}, scope={scope}",
                             t, spec("rmeeto", r, scope=scope)))
    if plan.image_rows:
        rows.append(_row("image-baseline", "image-baseline", "no reduction", None, "none"))
        for t in plan.ratios:
            r = image_r(t)
            rows.append(_row(f"image-prune@{t:g}", "image-prune", f"ratio {t:g}, r={r}", t, spec("prune", r)))
            rows.append(_row(f"image-rmeeto@{t:g}", "image-rmeeto", f"ratio {t:g}, r={r}", t, spec("rmeeto", r)))
    if plan.retrain_ratio is not None:
        t = plan.retrain_ratio
        r = video_r(t)
        rows.append(_row(f"rmeeto-retrained@{t:g}", "rmeeto-retrained", f"ratio {t:g}, r={r}", t,
                         spec("rmeeto", r), retrain=True))
    return rows


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


# ------------------------------------------------------------------------------------ claims


def claims(rows: list[dict], garments: list[int]) -> list[dict]:
    """A verdict per claim, with the numbers behind it. ``garments``: the test image of each
    evaluated clip, to pair image rows with video rows."""
    by = {r["key"]: r for r in rows}
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})

    # video against images: the drop of each from its own unreduced model, paired per garment
    vb, ib = by.get("baseline"), by.get("image-baseline")
    texts, outcomes = [], []
    if vb is not None and ib is not None:
        for t in targets:
            v, i = by.get(f"rmeeto@{t:g}"), by.get(f"image-rmeeto@{t:g}")
            if v is None or i is None:
                continue
            img_b, img_r = (select_items(x, garments) for x in (ib, i))
            d, se, o = drop_comparison(img_b, img_r, vb, v)     # "a": the images drop more
            outcomes.append(o)
            texts.append(f"at {t:g} (ratios {v['reduction_ratio']:.3f} video, {i['reduction_ratio']:.3f} images): "
                         f"video drops {vb['top1'] - v['top1']:.2f} points ({vb['top1']:.2f}% -> {v['top1']:.2f}%), "
                         f"images {ib['top1'] - i['top1']:.2f} ({ib['top1']:.2f}% -> {i['top1']:.2f}%): the images' "
                         f"drop {d:+.2f} points larger on the same garments (2 s.e. = {2 * se:.2f})")
    high = [t for t in targets if t >= 0.4] or targets[-1:]
    return [
        claim("Video tolerates merging better than images (a smaller drop at equal mean-token ratios)",
              "R-MeeTo Sec. 4.4, Table 14 (VideoMamba on K400: 0.2-2 points training-free)", outcomes, texts,
              caveat=f"the two models differ ({VIDEO_MODEL}: 101 tokens of 8x8 patches over 4 frames; "
                     f"{IMAGE_MODEL}: 50 tokens of 4x4 patches, a Vim with a middle class token), so the "
                     "comparison is of these two models, not of video against images in general"),
        compare_claim("Merging beats pruning at high reduction ratios (video)", "R-MeeTo Fig. 1b, Table 18",
                      pairs(by, "rmeeto", "prune", high), "merging", "pruning"),
        compare_claim("Re-training recovers the accuracy merging loses (video)",
                      "R-MeeTo Table 13 (K400, r = 88, re-trained)", pairs(by, "rmeeto-retrained", "rmeeto", targets),
                      "re-trained", "training-free", recovered_note(vb)),
        scope_claim(by),
    ]


def scope_claim(by: dict[str, dict]) -> dict:
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
                d, se, o = compare(rows[a], rows[b])
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


# ------------------------------------------------------------------------------------ the study


class VideoStudy(Study):
    """The video study on ``videomamba_fmnist_video`` (and ``vim_fmnist`` on the same garments).

    ``data``: the Fashion-MNIST IDX directory the garments come from (None: the Debian package);
    ``clips``: where the MP4 clips are written (None: ``$VIMERGE_CACHE/fmnist-clips``, kept
    between runs); ``checkpoint``: base weights (None: shipped, else cache, else trained);
    ``train_base``: train the base from scratch.
    """
    name = "video"
    title = "vimerge demo --video: token reduction on Fashion-MNIST clips"
    unit = "clip"
    families = FAMILIES

    def __init__(self, plan: VideoPlan = VIDEO_FULL, *, data: str | None = None, clips: str | None = None,
                 checkpoint: str | None = None, train_base: bool = False, quick: bool = False,
                 timing: TimingPlan | None = None):
        self.plan, self.quick, self.timing = plan, quick, timing or TIMING
        self.data = str(Path(data).expanduser()) if data else DEFAULT_ROOT
        self.clip_root = Path(clips).expanduser() if clips else cache_dir() / "fmnist-clips"
        self.checkpoint, self.train_base = checkpoint, train_base

    def rows(self) -> list[Row]:
        return plan_video_rows(self.plan)

    def prepare(self, *, progress: bool) -> Prepared:
        plan, data, timings = self.plan, self.data, {}
        t = time.perf_counter()
        test_images, test_labels = load_split(data, "test")        # missing files: the one-line fix
        n = min(plan.test_clips, len(test_images))
        test_list = make_clips(self.clip_root, "test", n, geometry=plan.geometry, images=test_images,
                               labels=test_labels, progress=progress)
        train_list = None
        if plan.retrain_ratio is not None:
            train_list = make_clips(self.clip_root, "train", plan.retrain_clips, data=data, geometry=plan.geometry,
                                    progress=progress)
        timings["clips"] = time.perf_counter() - t
        t = time.perf_counter()
        base = resolve_video_base(self.checkpoint, data, self.clip_root, plan, train=self.train_base,
                                  progress=progress, test_list=test_list)
        timings["base"] = time.perf_counter() - t
        probe = create_backbone(VIDEO_MODEL, **base.weights()).eval()
        test = read_test_clips(test_list, probe, progress=progress)
        timings["read"] = test.seconds
        bases = {VIDEO_MODEL: base}
        loaders = {"video": make_loader(test.data, plan.batch_size, 0)}
        if plan.image_rows:
            image_base = find_base(IMAGE_MODEL, None)
            if image_base is None:
                raise FileNotFoundError(f"no {IMAGE_MODEL} weights (shipped or in {cache_dir()}): reinstall vimerge, "
                                        "or run `vimerge demo --train-base` once")
            bases[IMAGE_MODEL] = image_base
            loaders["image"] = make_loader(FashionMNIST(data, "test", limit=n), 256, 0)
        setup = {"model": VIDEO_MODEL, "image_model": IMAGE_MODEL if plan.image_rows else None,
                 "num_tokens": probe.num_tokens, "num_frames": probe.num_frames, "grid": list(probe.grid_size),
                 "depth": probe.depth, "interval": INTERVAL, "data": data, "clips": str(self.clip_root),
                 "test_list": str(test_list), "test_clips": len(test.garments), "listed_clips": n,
                 "train_list": str(train_list) if train_list else None, "seed": plan.seed,
                 "batch_size": plan.batch_size, "geometry": asdict(plan.geometry)}
        identity = [data, str(self.clip_root), Path(test_list).read_text(), sorted(test.skipped)]
        return Prepared(bases=bases, loaders=loaders, identity=identity, setup=setup, timings=timings,
                        extra={"skipped": test.skipped, "garments": test.garments},
                        context={"test_list": str(test_list), "train_list": train_list, "garments": test.garments,
                                 "labels": [int(y) for y in test_labels[:n]], "listed": n})

    def eval_command(self, row: Row, prepared: Prepared, checkpoint: str | None) -> str:
        if row.data == "image":
            return shlex.join(["vimerge", "eval", "--model", IMAGE_MODEL, *prepared.bases[IMAGE_MODEL].model_args,
                               "--dataset", "fashion-mnist", "--data", self.data, "--batch-size", "256", "--limit",
                               str(prepared.context["listed"]), "--reduce", row.reduce])
        weights = ["--checkpoint", checkpoint] if checkpoint else prepared.bases[VIDEO_MODEL].model_args
        return shlex.join(["vimerge", "eval", "--model", VIDEO_MODEL, *weights, "--data",
                           prepared.context["test_list"], "--batch-size", str(self.plan.batch_size),
                           "--reduce", row.reduce])

    def retrain_config(self, row: Row, prepared: Prepared, run_dir: Path, *, progress: bool) -> RetrainConfig:
        plan = self.plan
        return RetrainConfig(
            model=VIDEO_MODEL, checkpoint=prepared.bases[VIDEO_MODEL].path, reduce=row.reduce,
            data=str(prepared.context["train_list"]), val_data=None, epochs=1, batch_size=plan.retrain_batch,
            effective_batch=plan.retrain_batch, lr=plan.retrain_lr, min_lr=1e-5, augment="none",
            label_smoothing=0.1, workers=0, seed=plan.seed, output=str(run_dir), resume=True, save_every=10,
            log_every=1000, progress=progress)

    def retrain_facts(self, row: Row, prepared: Prepared, config: RetrainConfig) -> dict:
        return {"clips": self.plan.retrain_clips, "train_list": str(prepared.context["train_list"])}

    def claims(self, rows: list[dict], prepared: Prepared) -> list[dict]:
        return claims(rows, prepared.context["garments"])

    def figures(self, rows: list[dict], prepared: Prepared, out: Path) -> list[tuple[str, str]]:
        plot_accuracy_vs_ratio(rows, FAMILIES, out / "accuracy_vs_ratio.png",
                               title="Fashion-MNIST clips (VideoMamba) and images (Vim) against token reduction",
                               xlabel="reduction ratio (1 - mean tokens per block / initial tokens)",
                               hline_label="video unreduced")
        plot_drop_vs_ratio(rows, FAMILIES, out / "drop_vs_ratio.png")
        draw_merged_frames(self._frame_configs(rows, prepared), prepared.context["test_list"],
                           prepared.context["labels"], self.plan.viz_classes, out / "merged_frames.png")
        return [("accuracy_vs_ratio.png", "accuracy against reduction ratio"),
                ("drop_vs_ratio.png", "accuracy drop, video and images"),
                ("merged_frames.png", "merged tokens on the frames")]

    def _frame_configs(self, rows: list[dict], prepared: Prepared) -> list[tuple[str, Any]]:
        """The merged-frames figure's models: R-MeeTo flat, within frames and across time at the
        highest scope ratio, and flat at the highest ratio (base weights)."""
        by = {r["key"]: r for r in rows}
        picks = []
        if self.plan.scope_ratios:
            s = max(self.plan.scope_ratios)
            picks += [(f"flat {s:g}", by.get(f"rmeeto@{s:g}")), (f"frame {s:g}", by.get(f"rmeeto-frame@{s:g}")),
                      (f"time {s:g}", by.get(f"rmeeto-time@{s:g}"))]
        top = max(self.plan.ratios)
        picks.append((f"flat {top:g}", by.get(f"rmeeto@{top:g}")))
        configs, seen = [], set()
        for title, row in picks:
            if row is None or row["key"] in seen:
                continue
            seen.add(row["key"])
            model = create_backbone(VIDEO_MODEL, **prepared.bases[VIDEO_MODEL].weights())
            apply(model, row["reduce"])
            configs.append((title, model.eval()))
        return configs

    def intro(self, results: dict) -> str:
        setup, base = results["setup"], results["base"]
        return (f"Model `{VIDEO_MODEL}` ({setup['num_tokens']} tokens: {setup['num_frames']} frames of "
                f"{setup['grid'][0]}x{setup['grid'][1]} patches of 8x8 pixels and the class token, {setup['depth']} "
                f"blocks), base weights: {base['source']} (`{base['path']}`). Evaluated on {setup['test_clips']} test "
                f"clips (`{setup['test_list']}`: test garment i moving over a {setup['geometry']['canvas']}x"
                f"{setup['geometry']['canvas']} canvas, MP4 files read back with PyAV)"
                + (f", {len(results['skipped'])} unreadable clip(s) skipped" if results["skipped"] else "")
                + f"; reduction in every block after the first (interval {INTERVAL}).")

    def statistic_note(self) -> str:
        return ("Video against images pairs each clip with its own garment's still image (difference of the two "
                "drops).")

    def sections(self, results: dict) -> list[str]:
        rows, setup, t = results["rows"], results["setup"], results["timings"]
        lines = ["## Top-1 (%) at each reduction ratio", "", self._ratio_table(rows), "",
                 "## Every row", "", rows_table(rows, self.unit), "",
                 "Reduction ratio: 1 - mean tokens per block / initial tokens. GFLOPs per clip (images: per image); "
                 "paper: R-MeeTo's convention (video: `calc_flops.py`, Table 13), full: every multiply-add. "
                 f"clips/s and speed-up: see Throughput below (the clips already decoded; decoding the "
                 f"{setup['test_clips']} test clips took {t['read']:.1f} s); speed-up against the unreduced row of "
                 "the same model (image rows: images/s).", ""]
        retrained = [r for r in rows if "retrain" in r]
        if retrained:
            lines += ["## Re-training", ""]
            for r in retrained:
                f = r["retrain"]
                lines.append(f"`{r['key']}`: one pass over {f['clips']} training clips, AdamW lr {f['lr']:g} cosine "
                             f"to 1e-5, batch {f['batch_size']}, from the base weights: {f['steps']} steps, "
                             f"{f['seconds']:.0f} s; top-1 {r['top1']:.2f}%.")
            lines.append("")
        return lines

    def _ratio_table(self, rows: list[dict]) -> str:
        return ratio_table(rows, FAMILIES, [("(ratio reached, video)", "rmeeto"), ("(ratio reached, images)",
                                                                                   "image-rmeeto")])

    def figure_notes(self) -> str:
        return ("Merged tokens (R-MeeTo appendix D.5): one row of frames per clip and configuration; the patches "
                "held by one final token share a colour across all frames.")

    def summary(self, results: dict) -> list[str]:
        lines = [self._ratio_table(results["rows"]), ""]
        if results["skipped"]:
            lines += [f"skipped {len(results['skipped'])} unreadable clip(s): " + ", ".join(results["skipped"]), ""]
        return lines


def video_study(*, quick: bool = False, limit: int | None = None, retrain_images: int | None = None,
                **kwargs) -> VideoStudy:
    """The video study with the full (or quick) plan, the clips of the first ``limit`` test
    garments and ``retrain_images`` training clips (None: the plan's); ``kwargs`` go to
    :class:`VideoStudy`. Raises ValueError when ``retrain_images`` is below one batch."""
    plan = VIDEO_QUICK if quick else VIDEO_FULL
    if limit is not None:
        plan = replace(plan, test_clips=limit)
    if retrain_images is not None:
        if retrain_images < plan.retrain_batch:
            raise ValueError(f"--retrain-images must be at least one batch ({plan.retrain_batch})")
        plan = replace(plan, retrain_clips=retrain_images)
    return VideoStudy(plan, quick=quick, **kwargs)


__all__ = ["VIDEO_MODEL", "IMAGE_MODEL", "VIDEO_BASE_RECIPE", "BASE_TRAIN_CLIPS", "TIMING", "VideoPlan", "VIDEO_FULL",
           "VIDEO_QUICK", "FAMILIES", "plan_video_rows", "base_train_command", "resolve_video_base", "claims",
           "scope_claim", "VideoStudy", "video_study"]
