"""``vimerge demo``: the token-reduction study on Fashion-MNIST, from one command.

The small-scale counterpart of the papers' main tables, on real data and a laptop CPU:

1. the base model: the shipped ``vim_fmnist`` weights (``--checkpoint`` to use others; when
   neither exists, it is trained with ``vimerge train``'s recipe into the cache, resumably);
2. training-free rows on the test set: the unreduced baseline; pruning, R-MeeTo merging and
   R-MeeTo with the odd-even shuffle (the token-order ablation, R-MeeTo Table 4) at reduction
   ratios 0.14 / 0.28 / 0.42 / 0.54; STM as BNNM and BNNM+HSP at the same mean-token ratios and
   at its own 15 / 20 / 30 / 40 % settings;
3. R-MeeTo re-trained for a short fixed budget at 0.28 and 0.54;
4. outputs: ``results.json``, ``report.md`` (tables and a verdict per paper claim),
   ``accuracy_vs_ratio.png``, ``accuracy_vs_speed.png`` and ``merged_tokens.png``.

Every row is defined by the ``vimerge eval`` arguments that reproduce it (stored in the JSON as
``eval_command``); the demo builds each row's model from those very arguments, so a row and its
command give the same numbers. Reductions happen in every block after the first
(``--interval 1``, the layer-wise setting of R-MeeTo's Fig. 1): with 8 blocks and 50 tokens,
reducing every second block cannot go past a ratio of 0.51.

A killed demo loses nothing finished: rows are saved as they complete (``rows.partial.json``)
and the re-training runs keep resumable checkpoints, so running the same command again
continues where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL = "vim_fmnist"
INTERVAL = 1


@dataclass(frozen=True)
class Plan:
    """What the study measures. ``test_images`` None: the whole test set (10,000 images)."""
    ratios: tuple[float, ...] = (0.14, 0.28, 0.42, 0.54)
    stm_own: tuple[float, ...] = (0.15, 0.2, 0.3, 0.4)
    order_ratios: tuple[float, ...] = (0.28, 0.54)
    retrain_ratios: tuple[float, ...] = (0.28, 0.54)
    test_images: int | None = None
    retrain_images: int = 8000
    retrain_lr: float = 1e-3
    retrain_batch: int = 64
    batch_size: int = 256
    seed: int = 0
    viz_classes: tuple[int, ...] = (0, 1, 7, 8)   # T-shirt/top, Trouser, Sneaker, Bag


FULL = Plan()
QUICK = Plan(ratios=(0.28, 0.54), stm_own=(0.2, 0.4), order_ratios=(0.54,), test_images=1000,
             retrain_images=2000)

FAMILIES = {   # family -> label in tables and plots
    "baseline": "Unreduced",
    "prune": "Pruning",
    "rmeeto": "R-MeeTo (merge)",
    "rmeeto-shuffled": "R-MeeTo, odd-even shuffled",
    "stm-bnnm": "STM: BNNM",
    "stm-hsp": "STM: BNNM + HSP",
    "rmeeto-retrained": "R-MeeTo re-trained",
}


@dataclass
class RowSpec:
    """One row of the study: the ``vimerge eval`` reduction arguments that define it."""
    key: str
    family: str
    setting: str
    target: float | None
    reduction_args: list[str]
    retrain: bool = False


@dataclass
class Base:
    """The base checkpoint: where it came from and how ``vimerge eval`` names it."""
    path: str
    source: str                 # "shipped", "checkpoint", "cache" or "trained"
    model_args: list[str]
    seconds: float = 0.0
    sidecar: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the plan


def plan_rows(plan: Plan, num_tokens: int, depth: int) -> list[RowSpec]:
    """Every row of the study, in the order they run (training-free first, re-trained last)."""
    from .reduce.schedule import r_for_ratio, reduction_ratio
    from .reduce.stm import settings_for_mean_ratio

    def r_args(t: float, *extra: str) -> tuple[str, list[str]]:
        r = r_for_ratio(t, num_tokens, depth, INTERVAL)
        return f"ratio {t:g}, r={r}", ["--method", "rmeeto", "--r", str(r), "--interval", str(INTERVAL), *extra]

    rows = [RowSpec("baseline", "baseline", "no reduction", None, [])]
    for t in plan.ratios:
        setting, args = r_args(t)
        rows.append(RowSpec(f"prune@{t:g}", "prune", setting, t, ["--method", "prune", *args[2:]]))
        rows.append(RowSpec(f"rmeeto@{t:g}", "rmeeto", setting, t, args))
    for t in plan.order_ratios:
        setting, args = r_args(t, "--shuffle")
        rows.append(RowSpec(f"rmeeto-shuffled@{t:g}", "rmeeto-shuffled", setting, t, args))
    stm: list[tuple[str, str, float | None, dict]] = []
    for t in plan.ratios:   # STM at the tokens R-MeeTo actually keeps at this ratio
        reached = reduction_ratio(r_for_ratio(t, num_tokens, depth, INTERVAL), num_tokens, depth, INTERVAL)
        stm.append((f"{t:g}", f"ratio {t:g}", t, settings_for_mean_ratio(reached, num_tokens, depth)))
    for p in plan.stm_own:
        stm.append((f"own{p:g}", f"STM {round(100 * p)}%", None, {"ratio": p, "per_side": None}))
    for tag, setting, target, opts in stm:
        args = ["--method", "stm", "--ratio", f"{opts['ratio']:g}"]
        if opts["per_side"] is not None:
            args += ["--per-side", str(opts["per_side"])]
            setting += f" (STM {round(100 * opts['ratio'])}%, {opts['per_side']}/side)"
        rows.append(RowSpec(f"stm-bnnm@{tag}", "stm-bnnm", setting, target, [*args, "--no-hsp"]))
        rows.append(RowSpec(f"stm-hsp@{tag}", "stm-hsp", setting, target, args))
    for t in plan.retrain_ratios:
        setting, args = r_args(t)
        rows.append(RowSpec(f"rmeeto-retrained@{t:g}", "rmeeto-retrained", setting, t, args, retrain=True))
    return rows


# ------------------------------------------------------------------------------------ the base model


def cache_dir() -> Path:
    """Where trained bases live: ``$VIMERGE_CACHE`` or ``~/.cache/vimerge``."""
    return Path(os.environ.get("VIMERGE_CACHE", Path.home() / ".cache" / "vimerge")).expanduser()


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_base(checkpoint: str | None, data: str, *, train: bool = False, progress: bool = True,
                 train_data=None, val_data=None) -> Base:
    """The base checkpoint: ``checkpoint``, else the shipped weights, else the cache, else trained.

    Training uses :data:`vimerge.train.recipe.BASE_RECIPE` (``vimerge train``'s defaults) into
    ``cache_dir()/vim_fmnist-base``; it resumes from there when interrupted. ``train=True``
    skips the shipped weights. ``train_data`` / ``val_data``: datasets used instead of ``data``.
    """
    from .models import create_model
    from .models.registry import FMNIST_WEIGHTS

    if checkpoint is not None:
        create_model(MODEL, checkpoint=checkpoint)          # a wrong file fails here, with its reason
        return Base(str(checkpoint), "checkpoint", ["--checkpoint", str(checkpoint)])
    if not train and Path(FMNIST_WEIGHTS).is_file():
        sidecar = Path(FMNIST_WEIGHTS).with_suffix(".json")
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return Base(FMNIST_WEIGHTS, "shipped", ["--pretrained"], sidecar=info)
    run_dir = cache_dir() / f"{MODEL}-base"
    final = run_dir / "final.pth"
    if final.is_file():
        return Base(str(final), "cache", ["--checkpoint", str(final)])
    from .train import RetrainConfig, retrain
    from .train.recipe import BASE_RECIPE
    print(f"training the base {MODEL} from scratch into {run_dir} (resumable: run the demo again to "
          f"continue after an interruption)", file=sys.stderr)
    config = RetrainConfig(model=MODEL, data=data, output=str(run_dir), resume=True, save_every=100,
                           progress=progress, workers=0, **BASE_RECIPE)
    start = time.perf_counter()
    result = retrain(config, train_data=train_data, val_data=val_data)
    seconds = time.perf_counter() - start
    return Base(str(result.final_checkpoint), "trained", ["--checkpoint", str(result.final_checkpoint)],
                seconds=seconds, sidecar={"eval_acc": result.eval_acc, "config": config.to_dict()})


# ------------------------------------------------------------------------------------ one row


def eval_argv(base: Base, data: str, plan: Plan, reduction_args: list[str],
              checkpoint: str | None = None) -> list[str]:
    """The ``vimerge eval`` arguments of a row (``checkpoint`` replaces the base weights)."""
    model = ["--checkpoint", checkpoint] if checkpoint else base.model_args
    argv = ["eval", "--model", MODEL, *model, "--dataset", "fashion-mnist", "--data", str(data),
            "--batch-size", str(plan.batch_size)]
    if plan.test_images is not None:
        argv += ["--limit", str(plan.test_images)]
    return argv + reduction_args


def run_row(spec: RowSpec, argv: list[str], loader, *, progress: bool) -> dict:
    """Build the row's model from its ``vimerge eval`` arguments and evaluate it."""
    import numpy as np

    from .cli import build_model, build_parser, reduction_from_args
    from .measure.evaluate import evaluate, model_cost
    args = build_parser().parse_args(argv)
    model = build_model(args)
    cost = model_cost(model)
    result = evaluate(model, loader, progress=progress, desc=f"{spec.key:<24s}", per_image=True)
    method, options = reduction_from_args(args)
    bits = np.packbits(result["per_image_correct"].numpy().astype(np.uint8)).tobytes().hex()
    return {
        "key": spec.key, "family": spec.family, "label": FAMILIES[spec.family], "setting": spec.setting,
        "target_ratio": spec.target, "method": method, "options": options,
        "reduction_ratio": cost["reduction_ratio"], "token_counts": cost["token_counts"],
        "gflops_paper": cost["gflops_paper"], "gflops_full": cost["gflops_full"],
        "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "correct": result["correct"], "images": result["images"], "seconds": result["seconds"],
        "images_per_second": result["images_per_second"],
        "eval_command": "vimerge " + shlex.join(argv),
        "correct_bits": bits,
    }


def _train_size(data: str) -> int:
    """Images in the training split of the Fashion-MNIST directory ``data`` (from its labels file)."""
    from .data.fashion_mnist import FashionMNISTNotFound, find_file, read_idx
    labels = find_file(data, "train-labels-idx1-ubyte")
    if labels is None:
        raise FashionMNISTNotFound(f"no train-labels-idx1-ubyte(.gz) in {data}: re-training needs the "
                                   f"training split (apt-get install dataset-fashion-mnist, or --data DIR "
                                   f"with all four IDX files)")
    return len(read_idx(labels))


def retrain_row(spec: RowSpec, base: Base, data: str, plan: Plan, out: Path, *, progress: bool,
                train_data=None) -> tuple[str, dict]:
    """Re-train the base with the row's reduction for ``plan.retrain_images`` images (one pass,
    cosine learning rate); returns the final checkpoint and the run's facts. Resumable."""
    from .cli import build_parser, reduction_from_args
    from .train import RetrainConfig, retrain
    args = build_parser().parse_args(["eval", *spec.reduction_args])
    method, options = reduction_from_args(args)
    total = len(train_data) if train_data is not None else _train_size(data)
    config = RetrainConfig(
        model=MODEL, checkpoint=base.path, method=method, reduction=options, data=data, val_data=None,
        fraction=min(1.0, plan.retrain_images / total), epochs=1, batch_size=plan.retrain_batch,
        effective_batch=plan.retrain_batch, lr=plan.retrain_lr, min_lr=1e-5, augment="none",
        label_smoothing=0.1, workers=0, seed=plan.seed, output=str(out), resume=True, save_every=25,
        log_every=1000, progress=progress)
    start = time.perf_counter()
    result = retrain(config, train_data=train_data)
    seconds = time.perf_counter() - start
    facts = {"run_dir": str(out), "status": result.status, "steps": result.global_step,
             "images": min(plan.retrain_images, total), "lr": plan.retrain_lr,
             "batch_size": plan.retrain_batch, "seconds": seconds, "last_loss": result.last_loss}
    return str(Path(out) / "final.pth"), facts


# ------------------------------------------------------------------------------------ the claims


def correct_mask(row: dict):
    """The row's per-image correctness (bool numpy array, test-set order) from its hex bits."""
    import numpy as np
    bits = np.frombuffer(bytes.fromhex(row["correct_bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[:row["images"]].astype(bool)


def _compare(a: dict, b: dict) -> tuple[float, float, str]:
    """(difference in points, its standard error, "a" / "b" / "tie") of two rows' top-1.

    Paired on the same test images: with ``n01`` images only ``a`` gets right and ``n10`` only
    ``b``, the difference is ``(n01 - n10) / n`` and its standard error
    ``sqrt(n01 + n10 - (n01 - n10)^2 / n) / n`` (the normal approximation behind McNemar's
    test). A side wins when the difference exceeds two standard errors.
    """
    ma, mb = correct_mask(a), correct_mask(b)
    n = len(ma)
    only_a, only_b = int((ma & ~mb).sum()), int((~ma & mb).sum())
    d = (only_a - only_b) / n
    se = math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
    d, se = 100 * d, 100 * se
    return d, se, ("a" if d > 2 * se else "b" if d < -2 * se else "tie")


def _verdict(outcomes: list[str]) -> str:
    """reproduced: the claim's side wins every comparison; not reproduced: it wins none and loses
    at least one; mixed: it wins some and loses some; inconclusive: otherwise (ties)."""
    if not outcomes:
        return "not measured"
    if all(o == "a" for o in outcomes):
        return "reproduced"
    if "b" in outcomes:
        return "mixed" if "a" in outcomes else "not reproduced"
    return "inconclusive"


def claims(rows: list[dict]) -> list[dict]:
    """A verdict per paper claim, with the numbers behind it."""
    by = {r["key"]: r for r in rows}
    base = by.get("baseline")
    out = []

    def pairs(fam_a: str, fam_b: str, targets: list[float]) -> list[tuple[str, dict, dict]]:
        return [(f"at {t:g}", by[f"{fam_a}@{t:g}"], by[f"{fam_b}@{t:g}"]) for t in targets
                if f"{fam_a}@{t:g}" in by and f"{fam_b}@{t:g}" in by]

    def claim(text: str, source: str, items: list[tuple[str, dict, dict]], name_a: str, name_b: str,
              note=None) -> None:
        """Compare every (label, a, b); ``note(a, b)`` appends to a comparison's sentence."""
        texts, outcomes = [], []
        for label, a, b in items:
            d, se, o = _compare(a, b)
            outcomes.append(o)
            texts.append(f"{label}: {name_a} {a['top1']:.2f}% vs {name_b} {b['top1']:.2f}% "
                         f"({d:+.2f} points, 2 s.e. = {2 * se:.2f})" + (note(a, b) if note else ""))
        out.append({"claim": text, "source": source, "verdict": _verdict(outcomes), "evidence": texts})

    def recovered(a: dict, b: dict) -> str:
        if not (base and base["top1"] > b["top1"]):
            return ""
        share = (a["top1"] - b["top1"]) / (base["top1"] - b["top1"])
        return f"; {100 * share:.0f}% of the drop from the unreduced {base['top1']:.2f}% recovered"

    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})
    high = [t for t in targets if t >= 0.4] or targets[-1:]
    claim("Merging beats pruning at high reduction ratios", "R-MeeTo Fig. 1b, Sec. 3, Table 18",
          pairs("rmeeto", "prune", high), "merging", "pruning")
    claim("Re-training recovers the accuracy that token reduction loses",
          "R-MeeTo Sec. 4 and Table 1: +35.9 points on Vim-Ti in 3 epochs",
          pairs("rmeeto-retrained", "rmeeto", targets), "re-trained", "training-free", recovered)
    claim("Token order matters: keeping the original order beats the odd-even shuffle",
          "R-MeeTo Tables 4 and 5, re-trained there, training-free here",
          pairs("rmeeto", "rmeeto-shuffled", targets), "ordered", "shuffled")
    claim("Training-free STM (BNNM+HSP) beats training-free R-MeeTo at equal tokens",
          "STM Table 2, Vim-Ti/S/B at 20% reduction", pairs("stm-hsp", "rmeeto", targets),
          "STM (BNNM+HSP)", "R-MeeTo",
          lambda a, b: f"; mean-token ratios {a['reduction_ratio']:.3f} and {b['reduction_ratio']:.3f}")
    hsp = sorted(k.split("@", 1)[1] for k in by if k.startswith("stm-hsp@"))
    claim("Hidden-state protection improves on plain BNNM merging", "STM Sec. 4.2",
          [(f"{by[f'stm-hsp@{k}']['setting']} (mean-token ratio {by[f'stm-hsp@{k}']['reduction_ratio']:.3f})",
            by[f"stm-hsp@{k}"], by[f"stm-bnnm@{k}"]) for k in hsp if f"stm-bnnm@{k}" in by],
          "BNNM+HSP", "BNNM")
    return out


# ------------------------------------------------------------------------------------ report


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows_table(rows: list[dict]) -> str:
    """The main table (markdown): one line per row, keyed so that tests can match the JSON."""
    head = ("| row | method | setting | tokens per block | reduction ratio | top-1 (%) | top-5 (%) "
            "| GFLOPs (paper) | GFLOPs (full) | img/s (CPU) | speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| `{r['key']}` | {r['label']} | {r['setting']} | {' '.join(map(str, r['token_counts']))} | "
            f"{r['reduction_ratio']:.3f} | {_f(r['top1'], '.2f')} | {_f(r['top5'], '.2f')} | "
            f"{r['gflops_paper']:.4f} | {r['gflops_full']:.4f} | {_f(r['images_per_second'], '.0f')} | "
            f"{_f(r.get('speedup'), '.2f')}x |")
    return "\n".join(lines)


def _small_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    """Top-1 of every method at each shared reduction ratio (rows: methods, columns: ratios)."""
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})
    by = {(r["family"], r["target_ratio"]): r for r in rows if not r["key"].split("@")[-1].startswith("own")}
    base = next((r for r in rows if r["family"] == "baseline"), None)
    header = ["method", "0 (unreduced)", *[f"{t:g}" for t in targets]]
    body = []
    for fam, label in FAMILIES.items():
        if fam == "baseline" or not any((fam, t) in by for t in targets):
            continue
        body.append([label, _f(base and base["top1"], ".2f"),
                     *[_f(by[(fam, t)]["top1"], ".2f") if (fam, t) in by else "" for t in targets]])
    reached = [f"{by[('rmeeto', t)]['reduction_ratio']:.3f}" for t in targets]
    body.append(["(reduction ratio reached)", "0", *reached])
    return _small_table(header, body)


def retrain_table(rows: list[dict]) -> str:
    by = {r["key"]: r for r in rows}
    base = by.get("baseline")
    body = []
    for r in rows:
        if r["family"] != "rmeeto-retrained":
            continue
        free = by.get(f"rmeeto@{r['target_ratio']:g}")
        t = r["retrain"]
        body.append([f"{r['target_ratio']:g}", _f(base and base["top1"], ".2f"), _f(free and free["top1"], ".2f"),
                     f"{r['top1']:.2f}", str(t["images"]), str(t["steps"]), f"{t['seconds']:.0f}"])
    return _small_table(["ratio", "unreduced top-1", "training-free top-1", "re-trained top-1",
                         "training images", "steps", "training s"], body)


def write_report(path: Path, results: dict) -> str:
    """``report.md``: setting, claims with verdicts, tables, figures, how to reproduce a row."""
    rows = results["rows"]
    base = results["base"]
    setup = results["setup"]
    lines = [
        "# vimerge demo: token reduction on Fashion-MNIST",
        "",
        f"Model `{MODEL}` ({setup['num_tokens']} tokens: {setup['num_tokens'] - 1} patches of 4x4 pixels "
        f"and the class token, {setup['depth']} blocks), base weights: {base['source']} "
        f"(`{base['path']}`). Evaluated on {setup['test_images']} Fashion-MNIST test images; "
        f"reduction in every block after the first (interval {INTERVAL}). "
        f"{'Quick run (--quick). ' if setup['quick'] else ''}"
        f"Machine: {results['machine']['cpu']}, {results['machine']['threads']} threads; "
        f"total {results['timings']['total']:.0f} s"
        + (f" ({setup['rows_reused']} rows reused from an interrupted or earlier run: their own "
           f"seconds and img/s are in the table)." if setup["rows_reused"] else "."),
        "",
        "## The papers' claims, here",
        "",
    ]
    for c in results["claims"]:
        lines.append(f"- **{c['claim']}** ({c['source']}): **{c['verdict']}**. "
                     + ("; ".join(c["evidence"]) + "." if c["evidence"] else ""))
    lines += ["", "A comparison counts when the difference exceeds two standard errors, paired on "
              "the same test images (McNemar's normal approximation).", "",
              "## Top-1 (%) at each reduction ratio", "", ratio_table(rows), "",
              "## Every row", "", rows_table(rows), "",
              "Reduction ratio: 1 - mean tokens per block / initial tokens (R-MeeTo's definition; "
              "STM rows are set to R-MeeTo's token counts, or to STM's own settings, which count "
              "the tokens gone at the end). GFLOPs (paper): the R-MeeTo convention (Table 2); "
              "(full): every multiply-add of the model. img/s: the evaluation pass on this CPU, "
              f"batch {setup['batch_size']}; speed-up against the unreduced row.", ""]
    if any(r["family"] == "rmeeto-retrained" for r in rows):
        lines += ["## Re-training", "", retrain_table(rows), "",
                  f"One pass over {setup['retrain_images']} training images, AdamW, learning rate "
                  f"{setup['retrain_lr']:g} cosine-decayed, batch {setup['retrain_batch']}, starting "
                  "from the base weights.", ""]
    lines += ["## Figures", "", "![accuracy against reduction ratio](accuracy_vs_ratio.png)", "",
              "![accuracy against speed](accuracy_vs_speed.png)", "",
              "![merged tokens](merged_tokens.png)", "",
              "Merged tokens (R-MeeTo appendix D.5): the patches held by one final token share a "
              "colour.", "", "## Reproduce a row", "", "```bash", rows[-1]["eval_command"], "```", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


# ------------------------------------------------------------------------------------ figures


def plot_results(rows: list[dict], out: Path) -> list[str]:
    """``accuracy_vs_ratio.png`` and ``accuracy_vs_speed.png``."""
    from .viz import line_plot
    base = next(r for r in rows if r["family"] == "baseline")
    series = []   # each method's points in order of reduction, starting at the unreduced model
    for fam, label in FAMILIES.items():
        pts = sorted((r["reduction_ratio"], r["top1"]) for r in rows if r["family"] == fam)
        if fam != "baseline" and pts:
            series.append((label, pts if fam == "rmeeto-retrained" else [(0.0, base["top1"]), *pts]))
    n0 = next(r["token_counts"][0] for r in rows)
    line_plot(series, out / "accuracy_vs_ratio.png",
              xlabel=f"reduction ratio (1 - mean tokens per block / {n0})", ylabel="top-1 accuracy (%)",
              title="Fashion-MNIST test accuracy against token reduction",
              hline=(base["top1"], f"unreduced {base['top1']:.2f}%"))
    speed = [(label, [(r["images_per_second"], r["top1"]) for r in rows if r["family"] == fam])
             for fam, label in FAMILIES.items() if fam != "baseline"]
    line_plot([(label, pts) for label, pts in speed if pts], out / "accuracy_vs_speed.png", lines=False,
              xlabel="images per second (this CPU)", ylabel="top-1 accuracy (%)",
              title="Accuracy against throughput", hline=(base["top1"], f"unreduced {base['top1']:.2f}%"),
              points=[("unreduced", base["images_per_second"], base["top1"])])
    return ["accuracy_vs_ratio.png", "accuracy_vs_speed.png"]


def draw_merges(columns: list[tuple[str, list[str]]], dataset, classes: tuple[int, ...], out: Path) -> str:
    """``merged_tokens.png``: a test image of each class in ``classes``, one column per model."""
    import torch
    from PIL import Image

    from .cli import build_model, build_parser
    from .viz import draw_groups, figure, token_groups
    picks = []
    for c in classes:
        hits = (dataset.targets == c).nonzero()
        if len(hits):
            picks.append(int(hits[0]))
    picks = picks or [0]
    images = torch.stack([dataset.image(i) for i in picks])
    raw = [Image.fromarray(dataset.images[i].numpy()) for i in picks]
    cell = 24
    panels = [[im.convert("RGB").resize((7 * cell, 7 * cell), Image.NEAREST)] for im in raw]
    titles = ["test image"]
    for title, argv in columns:
        model = build_model(build_parser().parse_args(argv))
        groups = token_groups(model, images)
        gw = groups.shape[-1]
        for panel, im, g in zip(panels, raw, groups):
            panel.append(draw_groups(im, g, cell=7 * cell // gw))
        titles.append(f"{title}: {len(set(groups[0].flatten().tolist()) - {-1})} tok")
    figure(panels, titles).save(out / "merged_tokens.png")
    return "merged_tokens.png"


# ------------------------------------------------------------------------------------ the run


def _versions() -> dict:
    import numpy
    import torch
    versions = {"vimerge": __import__("vimerge").__version__, "python": platform.python_version(),
                "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("numba", "matplotlib", "PIL"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:   # noqa: BLE001 - absent or broken: record that
            versions[name] = None
    return versions


def _machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform()}


class _Partial:
    """Rows finished so far, saved atomically after each one (a killed demo keeps them)."""

    def __init__(self, path: Path, fingerprint: str, fresh: bool):
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[str, dict] = {}
        if path.is_file() and not fresh:
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.rows = saved.get("rows", {})
        self.reused = len(self.rows)

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows": self.rows}))
        os.replace(tmp, self.path)


def run_demo(*, data: str | None = None, output: str = "vimerge-demo", quick: bool = False,
             checkpoint: str | None = None, train_base: bool = False, plan: Plan | None = None,
             fresh: bool = False, progress: bool = True, train_data=None) -> dict:
    """Run the study and write its outputs; returns the content of ``results.json``.

    ``plan`` overrides the full/quick plan (tests use small ones); ``train_data`` a dataset used
    instead of the training split for re-training (and base training).
    """
    import torch

    from .data import make_loader
    from .data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
    from .models import create_model

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    plan = plan or (QUICK if quick else FULL)
    data = str(Path(data).expanduser()) if data else DEFAULT_ROOT
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    test = FashionMNIST(data, "test", limit=plan.test_images)      # missing files: the one-line fix
    if plan.retrain_ratios and train_data is None:
        _train_size(data)                                          # fail now, not after the evaluations
    base = resolve_base(checkpoint, data, train=train_base, progress=progress, train_data=train_data)
    timings["base"] = time.perf_counter() - t0

    probe = create_model(MODEL)
    num_tokens, depth = probe.num_patches + 1, len(probe.layers)
    specs = plan_rows(plan, num_tokens, depth)
    base_sha = _sha256(base.path)
    fingerprint = hashlib.sha256(json.dumps(
        [asdict(plan), base_sha, data, len(test), _versions()["vimerge"]]).encode()).hexdigest()[:16]
    partial = _Partial(out / "rows.partial.json", fingerprint, fresh)
    if partial.reused:
        print(f"continuing an interrupted demo in {out}: {partial.reused} row(s) already done "
              f"(--fresh recomputes them)", file=sys.stderr)

    loader = make_loader(test, plan.batch_size, 0)
    with torch.inference_mode():     # compile / load the scan kernels before anything is timed
        probe.eval()(torch.zeros(2, 1, 28, 28))
    timings["warmup"] = time.perf_counter() - t0 - timings["base"]

    t_rows = time.perf_counter()
    retrain_seconds = 0.0
    for spec in specs:
        if spec.key in partial.rows:
            continue
        ckpt, facts = None, None
        if spec.retrain:
            run_dir = out / "retrain" / f"{spec.key.replace('@', '-')}-{fingerprint}"
            t = time.perf_counter()
            ckpt, facts = retrain_row(spec, base, data, plan, run_dir, progress=progress,
                                      train_data=train_data)
            retrain_seconds += time.perf_counter() - t
        argv = eval_argv(base, data, plan, spec.reduction_args, ckpt)
        row = run_row(spec, argv, loader, progress=progress)
        if facts is not None:
            row["retrain"] = facts
        partial.add(row)
    timings["retrain"] = retrain_seconds
    timings["rows"] = time.perf_counter() - t_rows - retrain_seconds

    rows = [partial.rows[s.key] for s in specs]
    base_ips = rows[0]["images_per_second"]
    for r in rows:
        r["speedup"] = r["images_per_second"] / base_ips if base_ips and r["images_per_second"] else None

    t = time.perf_counter()
    files = plot_results(rows, out)
    by = {r["key"]: r for r in rows}
    top = max(plan.ratios)
    columns = [(f"R-MeeTo {t_:g}", shlex.split(by[f"rmeeto@{t_:g}"]["eval_command"])[1:])
               for t_ in sorted({min(plan.ratios), top})]
    if f"rmeeto-retrained@{top:g}" in by:
        columns.append((f"re-trained {top:g}", shlex.split(by[f"rmeeto-retrained@{top:g}"]["eval_command"])[1:]))
    columns.append((f"STM+HSP {top:g}", shlex.split(by[f"stm-hsp@{top:g}"]["eval_command"])[1:]))
    files.append(draw_merges(columns, test, plan.viz_classes, out))
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    results = {
        "setup": {"model": MODEL, "num_tokens": num_tokens, "depth": depth, "interval": INTERVAL,
                  "data": data, "test_images": len(test), "quick": quick, "seed": plan.seed,
                  "batch_size": plan.batch_size, "retrain_images": plan.retrain_images,
                  "retrain_lr": plan.retrain_lr, "retrain_batch": plan.retrain_batch,
                  "plan": asdict(plan), "fingerprint": fingerprint, "rows_reused": partial.reused},
        "base": {**asdict(base), "sha256": base_sha},
        "versions": _versions(),
        "machine": _machine(),
        "timings": timings,
        "rows": rows,
        "claims": claims(rows),
        "files": ["results.json", "report.md", *files],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out / "report.md", results)
    return results


def summary(results: dict) -> str:
    """What the terminal shows at the end: the rows, the claims and where the files are."""
    lines = [rows_table(results["rows"]), ""]
    for c in results["claims"]:
        lines.append(f"[{c['verdict']}] {c['claim']}")
        lines += [f"    {e}" for e in c["evidence"]]
    t = results["timings"]
    lines.append("")
    lines.append(f"total {t['total']:.0f} s (evaluation {t['rows']:.0f} s, re-training {t['retrain']:.0f} s, "
                 f"figures {t['figures']:.0f} s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command line


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="directory with the four Fashion-MNIST IDX files "
                   "(default: /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    p.add_argument("--output", "-o", default="vimerge-demo", metavar="DIR",
                   help="where results.json, report.md and the PNGs go (default: vimerge-demo)")
    p.add_argument("--quick", action="store_true",
                   help="1,000 test images, ratios 0.28 and 0.54, a shorter re-training (under 2 min)")
    p.add_argument("--checkpoint", help="base vim_fmnist weights (default: the shipped ones)")
    p.add_argument("--train-base", action="store_true",
                   help="train the base model from scratch (vimerge train's recipe, about 25 min on 2 "
                        "CPU cores) instead of using the shipped weights")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N test images")
    p.add_argument("--retrain-images", type=int, default=None, metavar="N",
                   help="training images per re-training run (default: 8000, quick 2000)")
    p.add_argument("--fresh", action="store_true", help="recompute rows an interrupted run already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_demo(args: argparse.Namespace) -> int:
    """``vimerge demo``: exit 0 on success, 2 on missing data or a bad checkpoint."""
    from dataclasses import replace

    from .data import DatasetError
    from .models.checkpoint import CheckpointError
    plan = QUICK if args.quick else FULL
    if args.limit is not None:
        if args.limit < 1:
            print("vimerge demo: --limit must be >= 1", file=sys.stderr)
            return 2
        plan = replace(plan, test_images=args.limit)
    if args.retrain_images is not None:
        if args.retrain_images < plan.retrain_batch:
            print(f"vimerge demo: --retrain-images must be at least one batch ({plan.retrain_batch})",
                  file=sys.stderr)
            return 2
        plan = replace(plan, retrain_images=args.retrain_images)
    try:
        results = run_demo(data=args.data, output=args.output, quick=args.quick, checkpoint=args.checkpoint,
                           train_base=args.train_base, plan=plan, fresh=args.fresh,
                           progress=not args.no_progress)
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f"vimerge demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nvimerge demo: interrupted; finished rows and re-training checkpoints are kept in "
              f"{Path(args.output).expanduser()}: run the same command to continue", file=sys.stderr)
        return 130
    print(summary(results))
    print(f"\nwrote {', '.join(results['files'])} to {Path(args.output).expanduser()}")
    return 0


__all__ = ["run_demo", "plan_rows", "resolve_base", "claims", "Plan", "FULL", "QUICK", "cmd_demo",
           "add_demo_args"]
