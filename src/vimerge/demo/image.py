"""The image study (``vimerge demo``): token reduction on Fashion-MNIST, the small-scale
counterpart of the papers' main tables, as a :class:`~vimerge.demo.study.Study`.

Rows (every one a reduction spec, so a row is rebuilt anywhere from one string: ``vimerge eval
--reduce SPEC``, :func:`vimerge.reduce.apply`, a re-training config):

* ``vim_fmnist`` training-free: unreduced; pruning, R-MeeTo merging and R-MeeTo with the
  odd-even shuffle (the token-order ablation, R-MeeTo Table 4) at reduction ratios 0.14 / 0.28 /
  0.42 / 0.54; STM as BNNM and BNNM+HSP at the same mean-token ratios and at its own 15 / 20 /
  30 / 40 % settings;
* the same reductions on ``deit_fmnist`` (R-MeeTo Fig. 1a, Table 4), with exactly the Vim rows'
  tokens per block: a DeiT reduces between a block's attention and its MLP from block 0 on, so
  its rows skip block 0 (``r=[0,r,r,...]``);
* re-trained for a short fixed budget at 0.54: R-MeeTo, pruning (Table 18), R-MeeTo shuffled
  on Vim and DeiT (Table 4).

Reductions happen in every block after the first (``interval=1``, R-MeeTo Fig. 1's layer-wise
setting): with 8 blocks and 50 tokens, reducing every second block cannot pass a ratio of 0.51.
Claims are judged with :mod:`.stats`; the figures are drawn by :mod:`.image_figures`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from vimerge.data import make_loader
from vimerge.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, FashionMNISTNotFound, find_file, read_idx
from vimerge.models import create_backbone
from vimerge.reduce import format_spec
from vimerge.reduce.rmeeto import RMeeTo
from vimerge.reduce.schedule import r_for_ratio, reduction_ratio, removals
from vimerge.reduce.stm import settings_for_mean_ratio
from vimerge.train import RetrainConfig

from .base import resolve_base
from .image_figures import (
    draw_merges,
    methods_table,
    plot_accuracy_vs_ratio,
    plot_accuracy_vs_speed,
    plot_methods,
    plot_transformer_vs_mamba,
    retrain_table,
    transformer_table,
)
from .report import ratio_table, rows_table
from .stats import claim, compare, compare_claim, drop_comparison, pairs, recovered_note
from .study import INTERVAL, Prepared, Row, Study, build_model
from .timing import TimingPlan

MODEL = "vim_fmnist"
TRANSFORMER = "deit_fmnist"


@dataclass(frozen=True)
class Plan:
    """What the image study measures. ``test_images`` None: the whole test set (10,000 images);
    ``secondary_images``: the test images of the secondary rows (STM, R-MeeTo shuffled without
    re-training), to keep the full study within 10 minutes (comparisons pair the images both
    rows saw); ``retrain_images``: training images of one re-training run (one pass, AdamW
    ``retrain_lr`` cosine to 1e-5, batch ``retrain_batch``); ``methods``: the other methods
    (ToP-ViM aligned and plain, token recognition, MTR) at R-MeeTo's tokens per block at every
    ratio, as secondary rows."""
    ratios: tuple[float, ...] = (0.14, 0.28, 0.42, 0.54)
    stm_own: tuple[float, ...] = (0.15, 0.2, 0.3, 0.4)
    order_ratios: tuple[float, ...] = (0.28, 0.54)
    retrain_ratios: tuple[float, ...] = (0.54,)
    order_retrain_ratio: float | None = 0.54
    transformer: bool = True
    test_images: int | None = None
    secondary_images: int | None = 2000
    methods: bool = True
    retrain_images: int = 8000
    retrain_lr: float = 1e-3
    retrain_batch: int = 64
    batch_size: int = 256
    seed: int = 0
    viz_classes: tuple[int, ...] = (0, 1, 7, 8)   # T-shirt/top, Trouser, Sneaker, Bag


FULL = Plan()
QUICK = Plan(ratios=(0.28, 0.54), stm_own=(0.2, 0.4), order_ratios=(0.54,), test_images=1000,
             secondary_images=None, retrain_images=2000)

# Throughput: 3 rounds (after 1 untimed forward) of one batch of 64 test images per row: 43 rows
# x 4 x 64 = 11,008 images, 14 s of the full study on the idle 2-core machine (measured
# 2026-12-02: the whole study 460 s, 7 min 43 s wall).
TIMING = TimingPlan(rounds=3, batch=64)

FAMILIES = {   # family -> label in tables and plots
    "baseline": "Unreduced",
    "prune": "Pruning",
    "rmeeto": "R-MeeTo (merge)",
    "rmeeto-shuffled": "R-MeeTo, odd-even shuffled",
    "stm-bnnm": "STM: BNNM",
    "stm-hsp": "STM: BNNM + HSP",
    "topvim": "ToP-ViM (aligned)",
    "topvim-plain": "ToP-ViM plain pruning",
    "evit": "Token recognition (EViT)",
    "mtr": "MTR",
    "rmeeto-retrained": "R-MeeTo re-trained",
    "prune-retrained": "Pruning re-trained",
    "rmeeto-shuffled-retrained": "R-MeeTo shuffled, re-trained",
    "deit-baseline": "DeiT unreduced",
    "deit-prune": "DeiT pruning",
    "deit-rmeeto": "DeiT R-MeeTo (merge)",
    "deit-rmeeto-shuffled": "DeiT R-MeeTo, odd-even shuffled",
    "deit-rmeeto-retrained": "DeiT R-MeeTo re-trained",
    "deit-rmeeto-shuffled-retrained": "DeiT R-MeeTo shuffled, re-trained",
}


# the other methods of the comparison: family, method, options beside the per-block r list
METHOD_ROWS = (("topvim", "topvim", {}), ("topvim-plain", "topvim", {"align": False}), ("evit", "evit", {}),
               ("mtr", "mtr", {}))
COMPARED = ("rmeeto", "prune", "stm-hsp", "stm-bnnm", "topvim", "topvim-plain", "evit", "mtr")


def family_model(family: str) -> str:
    """The model a family's rows run on."""
    return TRANSFORMER if family.startswith("deit-") else MODEL


def _row(key: str, family: str, setting: str, target: float | None, reduce: str, *, retrain: bool = False,
         secondary: bool = False) -> Row:
    return Row(key, family, setting, target, reduce, family_model(family), retrain,
               "secondary" if secondary else "test")


def plan_rows(plan: Plan, num_tokens: int, depth: int) -> list[Row]:
    """Every row of the study, in the order they run (training-free first, re-trained last);
    secondary rows have ``data="secondary"``."""

    def rmeeto(t: float, method: str = "rmeeto", **extra) -> tuple[str, str]:
        r = r_for_ratio(t, num_tokens, depth, INTERVAL)
        return f"ratio {t:g}, r={r}", format_spec(method, {"r": r, "interval": INTERVAL, **extra})

    def deit(t: float, method: str = "rmeeto", **extra) -> tuple[str, str]:
        # the Vim rows' tokens per block: nothing in block 0, r in every later block
        r = r_for_ratio(t, num_tokens, depth, INTERVAL)
        return f"ratio {t:g}, r={r}", format_spec(method, {"r": [0] + [r] * (depth - 1), **extra})

    rows = [_row("baseline", "baseline", "no reduction", None, "none")]
    for t in plan.ratios:
        setting, spec = rmeeto(t)
        rows.append(_row(f"prune@{t:g}", "prune", setting, t, rmeeto(t, "prune")[1]))
        rows.append(_row(f"rmeeto@{t:g}", "rmeeto", setting, t, spec))
    for t in plan.order_ratios:
        setting, spec = rmeeto(t, ordered=False)
        rows.append(_row(f"rmeeto-shuffled@{t:g}", "rmeeto-shuffled", setting, t, spec, secondary=True))
    if plan.methods:      # every other method at exactly R-MeeTo's tokens per block
        for t in plan.ratios:
            r = r_for_ratio(t, num_tokens, depth, INTERVAL)
            counts = RMeeTo(r=r, interval=INTERVAL).token_counts(num_tokens, depth)
            removed = removals(counts, num_tokens)
            setting = f"ratio {t:g}, R-MeeTo's tokens (r={r})"
            for fam, method, extra in METHOD_ROWS:
                rows.append(_row(f"{fam}@{t:g}", fam, setting, t, format_spec(method, {"r": removed, **extra}),
                                 secondary=True))
    if plan.transformer:
        rows.append(_row("deit-baseline", "deit-baseline", "no reduction", None, "none"))
        for t in plan.ratios:
            setting, spec = deit(t)
            rows.append(_row(f"deit-prune@{t:g}", "deit-prune", setting, t, deit(t, "prune")[1]))
            rows.append(_row(f"deit-rmeeto@{t:g}", "deit-rmeeto", setting, t, spec))
        for t in plan.order_ratios:
            setting, spec = deit(t, ordered=False)
            rows.append(_row(f"deit-rmeeto-shuffled@{t:g}", "deit-rmeeto-shuffled", setting, t, spec))
    stm: list[tuple[str, str, float | None, dict]] = []
    for t in plan.ratios:   # STM at the tokens R-MeeTo actually keeps at this ratio
        reached = reduction_ratio(r_for_ratio(t, num_tokens, depth, INTERVAL), num_tokens, depth, INTERVAL)
        stm.append((f"{t:g}", f"ratio {t:g}", t, settings_for_mean_ratio(reached, num_tokens, depth)))
    for p in plan.stm_own:   # STM's own settings: the share of tokens gone after the last block
        stm.append((f"own{p:g}", f"STM {round(100 * p)}%", None, {"final_ratio": p}))
    for tag, setting, target, opts in stm:
        if opts.get("per_side") is not None:
            setting += f" (STM {round(100 * opts['final_ratio'])}%, {opts['per_side']}/side)"
        rows.append(_row(f"stm-bnnm@{tag}", "stm-bnnm", setting, target, format_spec("stm", {**opts, "hsp": False}),
                         secondary=True))
        rows.append(_row(f"stm-hsp@{tag}", "stm-hsp", setting, target, format_spec("stm", opts), secondary=True))
    for t in plan.retrain_ratios:   # merging and pruning after the same short re-training (Table 18)
        setting, spec = rmeeto(t)
        rows.append(_row(f"rmeeto-retrained@{t:g}", "rmeeto-retrained", setting, t, spec, retrain=True))
        rows.append(_row(f"prune-retrained@{t:g}", "prune-retrained", setting, t, rmeeto(t, "prune")[1],
                         retrain=True))
    t = plan.order_retrain_ratio    # token order after re-training, Vim and DeiT (Table 4)
    if t is not None:
        setting, spec = rmeeto(t, ordered=False)
        rows.append(_row(f"rmeeto-shuffled-retrained@{t:g}", "rmeeto-shuffled-retrained", setting, t, spec,
                         retrain=True))
        if plan.transformer:
            for fam, extra in (("deit-rmeeto-retrained", {}), ("deit-rmeeto-shuffled-retrained", {"ordered": False})):
                setting, spec = deit(t, **extra)
                rows.append(_row(f"{fam}@{t:g}", fam, setting, t, spec, retrain=True))
    return rows


def secondary_count(plan: Plan) -> int | None:
    """Test images of a secondary row (None: all)."""
    if plan.secondary_images is not None:
        return min(plan.secondary_images, plan.test_images or plan.secondary_images)
    return plan.test_images


def train_size(data: str) -> int:
    """Images in the training split of the Fashion-MNIST directory ``data`` (from its labels
    file); raises FashionMNISTNotFound naming the fix when it is missing."""
    labels = find_file(data, "train-labels-idx1-ubyte")
    if labels is None:
        raise FashionMNISTNotFound(f"no train-labels-idx1-ubyte(.gz) in {data}: re-training needs the "
                                   f"training split (apt-get install dataset-fashion-mnist, or --data DIR "
                                   f"with all four IDX files)")
    return len(read_idx(labels))


# ------------------------------------------------------------------------------------ claims


def claims(rows: list[dict]) -> list[dict]:
    """A verdict per paper claim, with the numbers behind it."""
    by = {r["key"]: r for r in rows}
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})
    high = [t for t in targets if t >= 0.4] or targets[-1:]
    retrained = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto-retrained"})
    hsp = sorted(k.split("@", 1)[1] for k in by if k.startswith("stm-hsp@"))
    return [
        compare_claim("Merging beats pruning at high reduction ratios", "R-MeeTo Fig. 1b, Sec. 3, Table 18",
                      pairs(by, "rmeeto", "prune", high), "merging", "pruning"),
        compare_claim("Merging beats pruning after the same re-training", "R-MeeTo Table 18",
                      pairs(by, "rmeeto-retrained", "prune-retrained", retrained), "merging re-trained",
                      "pruning re-trained"),
        *transformer_claims(by, targets),
        compare_claim("Re-training recovers the accuracy that token reduction loses",
                      "R-MeeTo Sec. 4 and Table 1: +35.9 points on Vim-Ti in 3 epochs",
                      pairs(by, "rmeeto-retrained", "rmeeto", targets), "re-trained", "training-free",
                      recovered_note(by.get("baseline"))),
        compare_claim("Token order matters: keeping the original order beats the odd-even shuffle",
                      "R-MeeTo Tables 4 and 5, re-trained there, training-free here",
                      pairs(by, "rmeeto", "rmeeto-shuffled", targets), "ordered", "shuffled"),
        compare_claim("Training-free STM (BNNM+HSP) beats training-free R-MeeTo at equal tokens",
                      "STM Table 2, Vim-Ti/S/B at 20% reduction", pairs(by, "stm-hsp", "rmeeto", targets),
                      "STM (BNNM+HSP)", "R-MeeTo",
                      lambda a, b: f"; mean-token ratios {a['reduction_ratio']:.3f} and {b['reduction_ratio']:.3f}"),
        compare_claim("ToP-ViM's hidden-state alignment beats plain pruning with the same scores",
                      "ToP-ViM ablation, Vim-S fine-tuned: 75.4 without, 78.8 with; training-free here",
                      pairs(by, "topvim", "topvim-plain", targets), "aligned", "plain"),
        compare_claim("MTR beats pruning without training", "MTR (arXiv 2507.14042): ViM-B at -40% FLOPs, "
                      "MTR -1.6 top-1 against ToP-ViM's alignment -4.2; here against R-MeeTo's pruning",
                      pairs(by, "mtr", "prune", targets), "MTR", "pruning"),
        compare_claim("MTR beats ToP-ViM without training", "MTR (arXiv 2507.14042): ViM-B at -40% FLOPs, "
                      "MTR -1.6, ToP-ViM (HSA) -4.2 top-1", pairs(by, "mtr", "topvim", targets), "MTR",
                      "ToP-ViM aligned"),
        compare_claim("Hidden-state protection improves on plain BNNM merging", "STM Sec. 4.2",
                      [(f"{by[f'stm-hsp@{k}']['setting']} (mean-token ratio "
                        f"{by[f'stm-hsp@{k}']['reduction_ratio']:.3f})", by[f"stm-hsp@{k}"], by[f"stm-bnnm@{k}"])
                       for k in hsp if f"stm-bnnm@{k}" in by], "BNNM+HSP", "BNNM"),
    ]


def transformer_claims(by: dict[str, dict], targets: list[float]) -> list[dict]:
    """R-MeeTo's Transformer-vs-Mamba claims (Fig. 1a, Table 4); none without the DeiT rows."""
    vim_base, deit_base = by.get("baseline"), by.get("deit-baseline")
    if vim_base is None or deit_base is None:
        return []
    texts, outcomes = [], []
    for fam, name in (("prune", "pruning"), ("rmeeto", "merging")):
        for t in targets:
            v, d = by.get(f"{fam}@{t:g}"), by.get(f"deit-{fam}@{t:g}")
            if v is None or d is None:
                continue
            diff, se, o = drop_comparison(vim_base, v, deit_base, d)
            outcomes.append(o)
            texts.append(f"{name} at {t:g}: Vim drops {vim_base['top1'] - v['top1']:.2f} points "
                         f"({vim_base['top1']:.2f}% -> {v['top1']:.2f}%), DeiT {deit_base['top1'] - d['top1']:.2f} "
                         f"({deit_base['top1']:.2f}% -> {d['top1']:.2f}%): Vim's drop {diff:+.2f} points larger "
                         f"(2 s.e. = {2 * se:.2f})")
    hurts = claim("Token reduction hurts Mamba more than a Transformer", "R-MeeTo Fig. 1a", outcomes, texts)

    # token order: the Vim's ordered rows beat the shuffled ones, the DeiT's tie with them
    texts, outcomes = [], []
    for prefix, model in (("", "Vim"), ("deit-", "DeiT")):
        for stage in ("", "-retrained"):
            for t in targets:
                a, b = by.get(f"{prefix}rmeeto{stage}@{t:g}"), by.get(f"{prefix}rmeeto-shuffled{stage}@{t:g}")
                if a is None or b is None:
                    continue
                d, se, o = compare(a, b)
                if prefix:       # the claim's side for the Transformer: no difference
                    o = "a" if o == "tie" else "b"
                outcomes.append(o)
                texts.append(f"{model} {'re-trained' if stage else 'training-free'} at {t:g}: ordered "
                             f"{a['top1']:.2f}% vs shuffled {b['top1']:.2f}% ({d:+.2f} points, 2 s.e. = {2 * se:.2f})")
    order = claim("Token order matters for Vim but not for DeiT",
                  "R-MeeTo Table 4 (re-trained there; DeiT 0.0-0.1 points apart, Vim up to 5.4)", outcomes, texts)
    return [hurts, order]


# ------------------------------------------------------------------------------------ the study


class ImageStudy(Study):
    """The Fashion-MNIST study on ``vim_fmnist`` (and ``deit_fmnist`` when ``plan.transformer``).

    ``data``: the Fashion-MNIST IDX directory (None: Debian's ``dataset-fashion-mnist``);
    ``checkpoint``: base ``vim_fmnist`` weights (None: the shipped ones, else the cache, else
    trained); ``train_base``: train the bases from scratch; ``train_data``: a dataset used
    instead of the training split for re-training and base training (tests).
    """
    name = "image"
    title = "vimerge demo: token reduction on Fashion-MNIST"
    unit = "image"
    families = FAMILIES

    def __init__(self, plan: Plan = FULL, *, data: str | None = None, checkpoint: str | None = None,
                 train_base: bool = False, train_data=None, quick: bool = False,
                 timing: TimingPlan | None = None):
        self.plan, self.quick, self.timing = plan, quick, timing or TIMING
        self.data = str(Path(data).expanduser()) if data else DEFAULT_ROOT
        self.checkpoint, self.train_base, self.train_data = checkpoint, train_base, train_data
        probe = create_backbone(MODEL)
        self.num_tokens, self.depth = probe.num_tokens, probe.depth

    def rows(self) -> list[Row]:
        return plan_rows(self.plan, self.num_tokens, self.depth)

    def prepare(self, *, progress: bool) -> Prepared:
        plan, data = self.plan, self.data
        test = FashionMNIST(data, "test", limit=plan.test_images)      # missing files: the one-line fix
        if plan.retrain_ratios and self.train_data is None:
            train_size(data)                                           # fail now, not after the evaluations
        bases = {MODEL: resolve_base(self.checkpoint, data, train=self.train_base, progress=progress,
                                     train_data=self.train_data)}
        if plan.transformer:
            bases[TRANSFORMER] = resolve_base(None, data, train=self.train_base, progress=progress,
                                              train_data=self.train_data, model=TRANSFORMER)
        loaders = {"test": make_loader(test, plan.batch_size, 0)}
        n = secondary_count(plan)
        loaders["secondary"] = (loaders["test"] if n == plan.test_images
                                else make_loader(FashionMNIST(data, "test", limit=n), plan.batch_size, 0))
        setup = {"model": MODEL, "transformer": TRANSFORMER if plan.transformer else None,
                 "secondary_images": plan.secondary_images, "num_tokens": self.num_tokens, "depth": self.depth,
                 "interval": INTERVAL, "data": data, "test_images": len(test), "seed": plan.seed,
                 "batch_size": plan.batch_size, "retrain_images": plan.retrain_images,
                 "retrain_lr": plan.retrain_lr, "retrain_batch": plan.retrain_batch}
        return Prepared(bases=bases, loaders=loaders, identity=[data, len(test)], setup=setup,
                        train_data=self.train_data, context={"test": test})

    def eval_command(self, row: Row, prepared: Prepared, checkpoint: str | None) -> str:
        base, plan = prepared.bases[row.model], self.plan
        weights = ["--checkpoint", checkpoint] if checkpoint else base.model_args
        argv = ["vimerge", "eval", "--model", row.model, *weights, "--dataset", "fashion-mnist", "--data", self.data,
                "--batch-size", str(plan.batch_size)]
        limit = secondary_count(plan) if row.data == "secondary" else plan.test_images
        if limit is not None:
            argv += ["--limit", str(limit)]
        return shlex.join(argv + ["--reduce", row.reduce])

    def retrain_config(self, row: Row, prepared: Prepared, run_dir: Path, *, progress: bool) -> RetrainConfig:
        plan = self.plan
        total = len(self.train_data) if self.train_data is not None else train_size(self.data)
        return RetrainConfig(
            model=row.model, checkpoint=prepared.bases[row.model].path, reduce=row.reduce, data=self.data,
            val_data=None, fraction=min(1.0, plan.retrain_images / total), epochs=1, batch_size=plan.retrain_batch,
            effective_batch=plan.retrain_batch, lr=plan.retrain_lr, min_lr=1e-5, augment="none",
            label_smoothing=0.1, workers=0, seed=plan.seed, output=str(run_dir), resume=True, save_every=25,
            log_every=1000, progress=progress)

    def retrain_facts(self, row: Row, prepared: Prepared, config: RetrainConfig) -> dict:
        total = len(self.train_data) if self.train_data is not None else train_size(self.data)
        return {"images": min(self.plan.retrain_images, total)}

    def claims(self, rows: list[dict], prepared: Prepared) -> list[dict]:
        return claims(rows)

    def figures(self, rows: list[dict], prepared: Prepared, out: Path) -> list[tuple[str, str]]:
        plot_accuracy_vs_ratio(rows, FAMILIES, out / "accuracy_vs_ratio.png")
        files = [("accuracy_vs_ratio.png", "accuracy against reduction ratio")]
        plot_accuracy_vs_speed(rows, FAMILIES, out / "accuracy_vs_speed.png")
        files.append(("accuracy_vs_speed.png", "accuracy against speed"))
        if self.plan.methods:
            plot_methods(rows, FAMILIES, COMPARED, out / "methods.png")
            files.append(("methods.png", "every method at equal tokens"))
        if self.plan.transformer:
            plot_transformer_vs_mamba(rows, out / "transformer_vs_mamba.png")
            files.append(("transformer_vs_mamba.png", "accuracy drop, Vim and DeiT"))
        draw_merges(self._merge_columns(rows, prepared), prepared.context["test"], self.plan.viz_classes,
                    out / "merged_tokens.png")
        files.append(("merged_tokens.png", "merged tokens"))
        return files

    def _merge_columns(self, rows: list[dict], prepared: Prepared) -> list[tuple[str, object]]:
        """The merged-token figure's models: R-MeeTo at the lowest and highest ratio, re-trained at
        the highest (when planned) and STM+HSP at the highest."""
        by = {r["key"]: r for r in rows}
        top = max(self.plan.ratios)
        picks = [(f"R-MeeTo {t:g}", by[f"rmeeto@{t:g}"]) for t in sorted({min(self.plan.ratios), top})]
        if f"rmeeto-retrained@{top:g}" in by:
            picks.append((f"re-trained {top:g}", by[f"rmeeto-retrained@{top:g}"]))
        picks.append((f"STM+HSP {top:g}", by[f"stm-hsp@{top:g}"]))
        return [(title, build_model(row, prepared.bases)) for title, row in picks]

    def intro(self, results: dict) -> str:
        setup, base = results["setup"], results["base"]
        return (f"Model `{MODEL}` ({setup['num_tokens']} tokens: {setup['num_tokens'] - 1} patches of 4x4 pixels "
                f"and the class token, {setup['depth']} blocks), base weights: {base['source']} (`{base['path']}`). "
                f"Evaluated on {setup['test_images']} Fashion-MNIST test images; reduction in every block after "
                f"the first (interval {INTERVAL}).")

    def sections(self, results: dict) -> list[str]:
        rows, setup = results["rows"], results["setup"]
        secondary = [r["key"] for r in rows if r["images"] < setup["test_images"]]
        lines = ["## Top-1 (%) at each reduction ratio", "",
                 ratio_table(rows, FAMILIES, [("(reduction ratio reached)", "rmeeto")]), "",
                 "## Every row", "", rows_table(rows, self.unit), "",
                 "Reduction ratio: 1 - mean tokens per block / initial tokens (R-MeeTo's definition; STM rows are "
                 "set to R-MeeTo's token counts, or to STM's own settings, which count the tokens gone at the end). "
                 "GFLOPs (paper): the R-MeeTo convention (Table 2); (full): every multiply-add of the model. "
                 "images/s and speed-up: see Throughput below; speed-up against the unreduced row of the same model."
                 + (f" Secondary rows (STM, and R-MeeTo shuffled without re-training: {', '.join(secondary)}) are "
                    f"evaluated on the first {setup['secondary_images']} test images only, to keep the study within "
                    "10 minutes; comparisons pair the images both rows saw."
                    if setup.get("secondary_images") and secondary else ""), ""]
        if any(r["family"] in ("topvim", "evit", "mtr") for r in rows):
            lines += ["## Every method at equal tokens", "",
                      "Training-free, on exactly R-MeeTo's tokens per block at each ratio (each method given "
                      "R-MeeTo's per-block removals as its `r` list): ToP-ViM (`topvim`, aligned and `align=false`), "
                      "token recognition (`evit`, EViT's keep-and-fuse with the class token's hidden attention), "
                      "MTR (`mtr`), R-MeeTo's pruning and STM (at the same mean-token ratio). GFLOPs: one count "
                      "for all (the paper convention, each method's own scoring included).", "",
                      methods_table(rows, FAMILIES, COMPARED), ""]
        transformer = transformer_table(rows)
        if transformer:
            by = {r["key"]: r for r in rows}
            lines += ["## Mamba against a Transformer", "",
                      f"`{TRANSFORMER}` (a DeiT with the same 50 tokens and 8 blocks; unreduced "
                      f"{by['deit-baseline']['top1']:.2f}%, Vim {by['baseline']['top1']:.2f}%) with the same "
                      "reductions and exactly the Vim rows' tokens per block (a DeiT reduces between its "
                      "attention and its MLP). Accuracy drop in points from each model's own unreduced top-1:",
                      "", transformer, ""]
        if any("retrain" in r for r in rows):
            lines += ["## Re-training", "", retrain_table(rows), "",
                      f"One pass over {setup['retrain_images']} training images, AdamW, learning rate "
                      f"{setup['retrain_lr']:g} cosine-decayed, batch {setup['retrain_batch']}, starting "
                      "from the base weights.", ""]
        return lines

    def figure_notes(self) -> str:
        return ("accuracy_vs_speed.png: colour is the method, a filled marker Vim and a hollow one DeiT, a circle "
                "training-free and a square re-trained. Merged tokens (R-MeeTo appendix D.5): the patches held by "
                "one final token share a colour.")


def image_study(*, quick: bool = False, limit: int | None = None, retrain_images: int | None = None,
                **kwargs) -> ImageStudy:
    """The image study with the full (or quick) plan, ``limit`` test images and ``retrain_images``
    training images per re-training run (None: the plan's); ``kwargs`` go to :class:`ImageStudy`.
    Raises ValueError when ``retrain_images`` is below one batch."""
    plan = QUICK if quick else FULL
    if limit is not None:
        plan = replace(plan, test_images=limit)
    if retrain_images is not None:
        if retrain_images < plan.retrain_batch:
            raise ValueError(f"--retrain-images must be at least one batch ({plan.retrain_batch})")
        plan = replace(plan, retrain_images=retrain_images)
    return ImageStudy(plan, quick=quick, **kwargs)


__all__ = ["MODEL", "TRANSFORMER", "Plan", "FULL", "QUICK", "TIMING", "FAMILIES", "family_model", "plan_rows",
           "secondary_count", "train_size", "claims", "transformer_claims", "ImageStudy", "image_study"]
