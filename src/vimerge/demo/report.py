"""What the demo concludes and shows: the paired statistic, a verdict per paper claim, the
markdown tables, ``report.md``, the two plots and the merged-token figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vimerge.measure.table import markdown_table
from vimerge.viz import draw_groups, figure, line_plot, token_groups

from .plan import FAMILIES, INTERVAL, MODEL, TRANSFORMER, family_model

# ------------------------------------------------------------------------------------ the claims


def correct_mask(row: dict) -> np.ndarray:
    """The row's per-image correctness (bool numpy array, test-set order) from its hex bits."""
    bits = np.frombuffer(bytes.fromhex(row["correct_bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[:row["images"]].astype(bool)


def correct_bits(correct: np.ndarray) -> str:
    """The inverse of :func:`correct_mask`: per-image correctness packed to a hex string."""
    return np.packbits(np.asarray(correct).astype(np.uint8)).tobytes().hex()


def _compare(a: dict, b: dict) -> tuple[float, float, str]:
    """(difference in points, its standard error, "a" / "b" / "tie") of two rows' top-1.

    Paired on the same test images: with ``n01`` images only ``a`` gets right and ``n10`` only
    ``b``, the difference is ``(n01 - n10) / n`` and its standard error
    ``sqrt(n01 + n10 - (n01 - n10)^2 / n) / n`` (the normal approximation behind McNemar's
    test). A side wins when the difference exceeds two standard errors.
    """
    ma, mb = correct_mask(a), correct_mask(b)
    n = min(len(ma), len(mb))          # rows on fewer images: the first n test images of both
    return _paired(ma[:n].astype(int) - mb[:n].astype(int))


def _paired(diff: np.ndarray) -> tuple[float, float, str]:
    """(mean, its standard error, "a" / "b" / "tie") of per-image differences ``diff``, in
    points: mean ``sum(d) / n``, standard error ``sqrt(sum(d^2) - sum(d)^2 / n) / n``. For 0/1
    correctness this is :func:`_compare`'s McNemar approximation; it also covers differences of
    differences (a drop against another drop)."""
    n = len(diff)
    if n == 0:
        return 0.0, 0.0, "tie"
    total, squares = float(diff.sum()), float((diff.astype(float) ** 2).sum())
    d = 100 * total / n
    se = 100 * math.sqrt(max(squares - total ** 2 / n, 0.0)) / n
    return d, se, ("a" if d > 2 * se else "b" if d < -2 * se else "tie")


def _drop_comparison(vim_base: dict, vim_row: dict, deit_base: dict, deit_row: dict) -> tuple[float, float, str]:
    """Is the Vim's accuracy drop larger than the DeiT's? Per image, ``(vim base - vim row) -
    (deit base - deit row)`` (each 0/1), paired on the images all four rows saw; "a": Vim drops
    more."""
    masks = [correct_mask(r).astype(int) for r in (vim_base, vim_row, deit_base, deit_row)]
    n = min(len(m) for m in masks)
    vb, vr, db, dr = (m[:n] for m in masks)
    return _paired((vb - vr) - (db - dr))


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


def compare_claim(text: str, source: str, items: list[tuple[str, dict, dict]], name_a: str, name_b: str,
                  note=None) -> dict:
    """A claim judged on paired comparisons: every ``(label, a, b)`` in ``items`` by
    :func:`_compare`, the claim's side being ``a``; ``note(a, b)`` appends to a comparison's
    sentence. Returns ``{"claim", "source", "verdict", "evidence"}``."""
    texts, outcomes = [], []
    for label, a, b in items:
        d, se, o = _compare(a, b)
        outcomes.append(o)
        texts.append(f"{label}: {name_a} {a['top1']:.2f}% vs {name_b} {b['top1']:.2f}% "
                     f"({d:+.2f} points, 2 s.e. = {2 * se:.2f})" + (note(a, b) if note else ""))
    return {"claim": text, "source": source, "verdict": _verdict(outcomes), "evidence": texts}


def claims(rows: list[dict]) -> list[dict]:
    """A verdict per paper claim, with the numbers behind it."""
    by = {r["key"]: r for r in rows}
    base = by.get("baseline")
    bases = {MODEL: base, TRANSFORMER: by.get("deit-baseline")}
    out = []

    def pairs(fam_a: str, fam_b: str, targets: list[float]) -> list[tuple[str, dict, dict]]:
        return [(f"at {t:g}", by[f"{fam_a}@{t:g}"], by[f"{fam_b}@{t:g}"]) for t in targets
                if f"{fam_a}@{t:g}" in by and f"{fam_b}@{t:g}" in by]

    def claim(*args, **kwargs) -> None:
        out.append(compare_claim(*args, **kwargs))

    def recovered(a: dict, b: dict) -> str:
        own = bases.get(family_model(b["family"]))
        if not (own and own["top1"] > b["top1"]):
            return ""
        share = (a["top1"] - b["top1"]) / (own["top1"] - b["top1"])
        return f"; {100 * share:.0f}% of the drop from the unreduced {own['top1']:.2f}% recovered"

    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})
    high = [t for t in targets if t >= 0.4] or targets[-1:]
    claim("Merging beats pruning at high reduction ratios", "R-MeeTo Fig. 1b, Sec. 3, Table 18",
          pairs("rmeeto", "prune", high), "merging", "pruning")
    retrained = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto-retrained"})
    claim("Merging beats pruning after the same re-training", "R-MeeTo Table 18",
          pairs("rmeeto-retrained", "prune-retrained", retrained), "merging re-trained", "pruning re-trained")
    _transformer_claims(by, targets, out)
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


def _transformer_claims(by: dict, targets: list[float], out: list[dict]) -> None:
    """R-MeeTo's Transformer-vs-Mamba claims (Fig. 1a, Table 4), when the DeiT rows exist."""
    vim_base, deit_base = by.get("baseline"), by.get("deit-baseline")
    if vim_base is None or deit_base is None:
        return
    texts, outcomes = [], []
    for fam, name in (("prune", "pruning"), ("rmeeto", "merging")):
        for t in targets:
            v, d = by.get(f"{fam}@{t:g}"), by.get(f"deit-{fam}@{t:g}")
            if v is None or d is None:
                continue
            diff, se, o = _drop_comparison(vim_base, v, deit_base, d)
            outcomes.append(o)
            texts.append(f"{name} at {t:g}: Vim drops {vim_base['top1'] - v['top1']:.2f} points "
                         f"({vim_base['top1']:.2f}% -> {v['top1']:.2f}%), DeiT {deit_base['top1'] - d['top1']:.2f} "
                         f"({deit_base['top1']:.2f}% -> {d['top1']:.2f}%): Vim's drop {diff:+.2f} points larger "
                         f"(2 s.e. = {2 * se:.2f})")
    out.append({"claim": "Token reduction hurts Mamba more than a Transformer", "source": "R-MeeTo Fig. 1a",
                "verdict": _verdict(outcomes), "evidence": texts})

    # token order: the Vim's ordered rows beat the shuffled ones, the DeiT's tie with them
    texts, outcomes = [], []
    for prefix, model in (("", "Vim"), ("deit-", "DeiT")):
        for stage in ("", "-retrained"):
            for t in targets:
                a, b = by.get(f"{prefix}rmeeto{stage}@{t:g}"), by.get(f"{prefix}rmeeto-shuffled{stage}@{t:g}")
                if a is None or b is None:
                    continue
                d, se, o = _compare(a, b)
                if prefix:       # the claim's side for the Transformer: no difference
                    o = "a" if o == "tie" else "b"
                outcomes.append(o)
                texts.append(f"{model} {'re-trained' if stage else 'training-free'} at {t:g}: ordered "
                             f"{a['top1']:.2f}% vs shuffled {b['top1']:.2f}% ({d:+.2f} points, 2 s.e. = {2 * se:.2f})")
    out.append({"claim": "Token order matters for Vim but not for DeiT",
                "source": "R-MeeTo Table 4 (re-trained there; DeiT 0.0-0.1 points apart, Vim up to 5.4)",
                "verdict": _verdict(outcomes), "evidence": texts})


# ------------------------------------------------------------------------------------ tables


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


ROWS_HEADER = ["row", "method", "setting", "tokens per block", "reduction ratio", "top-1 (%)", "top-5 (%)",
               "GFLOPs (paper)", "GFLOPs (full)", "img/s (CPU)", "speed-up"]


def rows_table(rows: list[dict]) -> str:
    """The main table (markdown): one line per row, keyed so that tests can match the JSON."""
    return markdown_table(ROWS_HEADER, [
        [f"`{r['key']}`", r["label"], r["setting"], " ".join(map(str, r["token_counts"])),
         f"{r['reduction_ratio']:.3f}", _f(r["top1"], ".2f"), _f(r["top5"], ".2f"),
         f"{r['gflops_paper']:.4f}", f"{r['gflops_full']:.4f}", _f(r["images_per_second"], ".0f"),
         f"{_f(r.get('speedup'), '.2f')}x"] for r in rows])


def ratio_table(rows: list[dict]) -> str:
    """Top-1 of every method at each shared reduction ratio (rows: methods, columns: ratios)."""
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "rmeeto"})
    by = {(r["family"], r["target_ratio"]): r for r in rows if not r["key"].split("@")[-1].startswith("own")}
    bases = {family_model(r["family"]): r for r in rows if r["family"].endswith("baseline")}
    header = ["method", "0 (unreduced)", *[f"{t:g}" for t in targets]]
    body = []
    for fam, label in FAMILIES.items():
        if fam.endswith("baseline") or not any((fam, t) in by for t in targets):
            continue
        base = bases.get(family_model(fam))
        body.append([label, _f(base and base["top1"], ".2f"),
                     *[_f(by[(fam, t)]["top1"], ".2f") if (fam, t) in by else "" for t in targets]])
    reached = [f"{by[('rmeeto', t)]['reduction_ratio']:.3f}" for t in targets]
    body.append(["(reduction ratio reached)", "0", *reached])
    return markdown_table(header, body)


def retrain_table(rows: list[dict]) -> str:
    """The re-trained rows beside the unreduced and training-free top-1 at the same ratio."""
    by = {r["key"]: r for r in rows}
    bases = {family_model(r["family"]): r for r in rows if r["family"].endswith("baseline")}
    body = []
    for r in rows:
        if not r["family"].endswith("-retrained"):
            continue
        base = bases.get(family_model(r["family"]))
        free = by.get(f"{r['family'][:-len('-retrained')]}@{r['target_ratio']:g}")
        t = r["retrain"]
        body.append([r["key"], r["label"], f"{r['target_ratio']:g}", _f(base and base["top1"], ".2f"),
                     _f(free and free["top1"], ".2f"), f"{r['top1']:.2f}", str(t["images"]), str(t["steps"]),
                     f"{t['seconds']:.0f}"])
    return markdown_table(["row", "method", "ratio", "unreduced top-1", "training-free top-1", "re-trained top-1",
                           "training images", "steps", "training s"], body)


def transformer_table(rows: list[dict]) -> str:
    """Accuracy drop (points from each model's unreduced top-1) of Vim and DeiT at each ratio."""
    by = {r["key"]: r for r in rows}
    vb, db = by.get("baseline"), by.get("deit-baseline")
    if vb is None or db is None:
        return ""
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == "deit-rmeeto"})
    body = []
    for t in targets:
        cells = [f"{t:g}"]
        for fam in ("prune", "rmeeto", "rmeeto-shuffled"):
            v, d = by.get(f"{fam}@{t:g}"), by.get(f"deit-{fam}@{t:g}")
            cells += [_f(v and vb["top1"] - v["top1"], ".2f"), _f(d and db["top1"] - d["top1"], ".2f")]
        body.append(cells)
    return markdown_table(["ratio", "Vim pruning", "DeiT pruning", "Vim merging", "DeiT merging",
                           "Vim merging, shuffled", "DeiT merging, shuffled"], body)


# ------------------------------------------------------------------------------------ report.md


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
              f"batch {setup['batch_size']}; speed-up against the unreduced row of the same model."
              + (f" Secondary rows (STM, and R-MeeTo shuffled without re-training: "
                 f"{', '.join(r['key'] for r in rows if r['images'] < setup['test_images'])}) are "
                 f"evaluated on the first {setup['secondary_images']} test images only, to keep the "
                 "study within 10 minutes; comparisons pair the images both rows saw." if setup.get("secondary_images") and any(
                     r["images"] < setup["test_images"] for r in rows) else ""), ""]
    transformer = transformer_table(rows)
    if transformer:
        by = {r["key"]: r for r in rows}
        lines += ["## Mamba against a Transformer", "",
                  f"`{TRANSFORMER}` (a DeiT with the same 50 tokens and 8 blocks; unreduced "
                  f"{by['deit-baseline']['top1']:.2f}%, Vim {by['baseline']['top1']:.2f}%) with the same "
                  "reductions and exactly the Vim rows' tokens per block (a DeiT reduces between its "
                  "attention and its MLP). Accuracy drop in points from each model's own unreduced top-1:",
                  "", transformer, "", "![accuracy drop, Vim and DeiT](transformer_vs_mamba.png)", ""]
    if any(r["family"].endswith("-retrained") for r in rows):
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
    base = next(r for r in rows if r["family"] == "baseline")
    bases = {family_model(r["family"]): r for r in rows if r["family"].endswith("baseline")}
    series = []   # each method's points in order of reduction, starting at its unreduced model
    for fam, label in FAMILIES.items():
        pts = sorted((r["reduction_ratio"], r["top1"]) for r in rows if r["family"] == fam)
        if not fam.endswith("baseline") and pts:
            start = [] if fam.endswith("-retrained") else [(0.0, bases[family_model(fam)]["top1"])]
            series.append((label, start + pts))
    n0 = next(r["token_counts"][0] for r in rows)
    line_plot(series, out / "accuracy_vs_ratio.png",
              xlabel=f"reduction ratio (1 - mean tokens per block / {n0})", ylabel="top-1 accuracy (%)",
              title="Fashion-MNIST test accuracy against token reduction",
              hline=(base["top1"], f"unreduced {base['top1']:.2f}%"))
    speed = [(label, [(r["images_per_second"], r["top1"]) for r in rows if r["family"] == fam])
             for fam, label in FAMILIES.items() if not fam.endswith("baseline")]
    line_plot([(label, pts) for label, pts in speed if pts], out / "accuracy_vs_speed.png", lines=False,
              xlabel="images per second (this CPU)", ylabel="top-1 accuracy (%)",
              title="Accuracy against throughput", hline=(base["top1"], f"unreduced {base['top1']:.2f}%"),
              points=[("unreduced", base["images_per_second"], base["top1"])])
    return ["accuracy_vs_ratio.png", "accuracy_vs_speed.png"]


def plot_transformer_vs_mamba(rows: list[dict], out: Path) -> str:
    """``transformer_vs_mamba.png`` (R-MeeTo Fig. 1a): accuracy drop against reduction ratio,
    pruning and merging, Vim and DeiT side by side (one panel each, the same axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = {family_model(r["family"]): r for r in rows if r["family"].endswith("baseline")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120, sharey=True)
    for ax, (prefix, model, name) in zip(axes, (("", MODEL, "Vim"), ("deit-", TRANSFORMER, "DeiT"))):
        base = bases.get(model)
        for fam, label, marker in (("prune", "pruning", "o"), ("rmeeto", "merging (R-MeeTo)", "s"),
                                   ("rmeeto-shuffled", "merging, odd-even shuffled", "^")):
            pts = sorted((r["reduction_ratio"], base["top1"] - r["top1"]) for r in rows
                         if base is not None and r["family"] == prefix + fam)
            if pts:
                xs, ys = zip(*[(0.0, 0.0), *pts])
                ax.plot(xs, ys, marker=marker, linewidth=1.6, label=label)
        ax.set_title(f"{name} ({model}, unreduced {base['top1']:.2f}%)" if base else name)
        ax.set_xlabel(f"reduction ratio (1 - mean tokens per block / {rows[0]['token_counts'][0]})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("accuracy drop (points)")
    fig.suptitle("Token reduction without re-training: Mamba against a Transformer (R-MeeTo Fig. 1a)")
    fig.tight_layout()
    fig.savefig(out / "transformer_vs_mamba.png")
    plt.close(fig)
    return "transformer_vs_mamba.png"


def draw_merges(columns: list[tuple[str, torch.nn.Module]], dataset, classes: tuple[int, ...], out: Path) -> str:
    """``merged_tokens.png``: a test image of each class in ``classes``, one column per
    ``(title, reduced model)``."""
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
    for title, model in columns:
        groups = token_groups(model, images)
        gw = groups.shape[-1]
        for panel, im, g in zip(panels, raw, groups):
            panel.append(draw_groups(im, g, cell=7 * cell // gw))
        titles.append(f"{title}: {len(set(groups[0].flatten().tolist()) - {-1})} tok")
    figure(panels, titles).save(out / "merged_tokens.png")
    return "merged_tokens.png"


__all__ = ["correct_mask", "correct_bits", "compare_claim", "claims", "rows_table", "ratio_table", "retrain_table",
           "transformer_table", "write_report", "plot_results", "plot_transformer_vs_mamba", "draw_merges"]
