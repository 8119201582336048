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

from .plan import FAMILIES, INTERVAL, MODEL

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
    return markdown_table(header, body)


def retrain_table(rows: list[dict]) -> str:
    """The re-trained rows beside the unreduced and training-free top-1 at the same ratio."""
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
    return markdown_table(["ratio", "unreduced top-1", "training-free top-1", "re-trained top-1",
                           "training images", "steps", "training s"], body)


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


__all__ = ["correct_mask", "correct_bits", "claims", "rows_table", "ratio_table", "retrain_table",
           "write_report", "plot_results", "draw_merges"]
