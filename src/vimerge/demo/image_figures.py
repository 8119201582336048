"""The image study's own tables and figures: the Vim-against-DeiT drop table, the re-training
table, accuracy against reduction ratio and against throughput, the Fig. 1a drop plot and the
merged-token figure.

One look tells every row of the plots apart (:func:`style`): colour is the method (pruning,
R-MeeTo, R-MeeTo shuffled, STM BNNM, STM BNNM+HSP, ToP-ViM aligned and plain, token recognition,
MTR; the last four with a marker of their own too), fill the model (filled: Vim, hollow: DeiT),
marker the stage (circle: training-free, square: re-trained), a star the unreduced models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from vimerge.measure.table import markdown_table
from vimerge.viz import draw_groups, figure, token_groups

from .report import fmt, unreduced_rows
from .stats import compare

METHOD_COLOURS = {"prune": "tab:blue", "rmeeto": "tab:orange", "rmeeto-shuffled": "tab:green",
                  "stm-bnnm": "tab:red", "stm-hsp": "tab:purple", "baseline": "black", "topvim": "tab:brown",
                  "topvim-plain": "tab:pink", "evit": "tab:olive", "mtr": "tab:cyan"}
# the methods compared at equal tokens get a marker of their own as well (colour-blind readers)
METHOD_MARKERS = {"topvim": "^", "topvim-plain": "v", "evit": "D", "mtr": "P"}


def style(family: str) -> dict:
    """Matplotlib keywords of a family's markers and line: colour by method, filled for Vim and
    hollow for DeiT (``deit-`` families), a square for re-trained families, a star for the
    unreduced ones."""
    deit = family.startswith("deit-")
    method = family.removeprefix("deit-").removesuffix("-retrained")
    colour = METHOD_COLOURS.get(method, "tab:gray")
    marker = ("*" if method == "baseline" else "s" if family.endswith("-retrained")
              else METHOD_MARKERS.get(method, "o"))
    return {"color": colour, "marker": marker, "markersize": 13 if marker == "*" else 7,
            "markerfacecolor": "white" if deit else colour, "markeredgecolor": colour, "markeredgewidth": 1.6,
            "linestyle": "--" if deit else "-"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------------ tables


def retrain_table(rows: list[dict]) -> str:
    """The re-trained rows beside the unreduced and training-free top-1 at the same ratio."""
    by = {r["key"]: r for r in rows}
    bases = unreduced_rows(rows)
    body = []
    for r in rows:
        if "retrain" not in r:
            continue
        base = bases.get(r["model"])
        free = by.get(f"{r['family'].removesuffix('-retrained')}@{r['target_ratio']:g}")
        t = r["retrain"]
        body.append([r["key"], r["label"], f"{r['target_ratio']:g}", fmt(base and base["top1"], ".2f"),
                     fmt(free and free["top1"], ".2f"), f"{r['top1']:.2f}", str(t["images"]), str(t["steps"]),
                     f"{t['seconds']:.0f}"])
    return markdown_table(["row", "method", "ratio", "unreduced top-1", "training-free top-1", "re-trained top-1",
                           "training images", "steps", "training s"], body)


def transformer_table(rows: list[dict]) -> str:
    """Accuracy drop (points from each model's unreduced top-1) of Vim and DeiT at each ratio;
    empty without the DeiT rows."""
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
            cells += [fmt(v and vb["top1"] - v["top1"], ".2f"), fmt(d and db["top1"] - d["top1"], ".2f")]
        body.append(cells)
    return markdown_table(["ratio", "Vim pruning", "DeiT pruning", "Vim merging", "DeiT merging",
                           "Vim merging, shuffled", "DeiT merging, shuffled"], body)


# ------------------------------------------------------------------------------------ plots


def methods_table(rows: list[dict], families: dict[str, str], compared: tuple[str, ...],
                  reference: str = "rmeeto") -> str:
    """Every method at equal tokens: one line per (method, ratio) with the mean-token ratio reached,
    top-1, GFLOPs (paper convention), images/s (best of the throughput rounds) and the paired
    top-1 difference from ``reference`` at that ratio (points, 2 standard errors, on the images
    both rows saw; "+" / "-" where it exceeds 2 s.e.)."""
    by = {(r["family"], r["target_ratio"]): r for r in rows if r["target_ratio"] is not None}
    targets = sorted({t for f, t in by if f == reference})
    body = []
    for t in targets:
        ref = by.get((reference, t))
        for fam in compared:
            row = by.get((fam, t))
            if row is None:
                continue
            tp = row.get("throughput") or {}
            if fam == reference or ref is None:
                diff = "-"
            else:
                d, se, win = compare(row, ref)
                diff = f"{d:+.2f} ± {2 * se:.2f}" + {"a": " (+)", "b": " (-)", "tie": ""}[win]
            body.append([f"{t:g}", families.get(fam, fam), f"{row['reduction_ratio']:.3f}", fmt(row["top1"], ".2f"),
                         f"{row['gflops_paper']:.4f}", f"{tp['best']:.0f}" if tp else "-", str(row["images"]), diff])
    return markdown_table(["ratio", "method", "ratio reached", "top-1 (%)", "GFLOPs (paper)", "images/s",
                           "test images", f"vs {families.get(reference, reference)} (points, ± 2 s.e.)"], body)


def plot_methods(rows: list[dict], families: dict[str, str], compared: tuple[str, ...], path: Path) -> None:
    """Every method at equal tokens: top-1 against the reduction ratio (left) and against GFLOPs
    (paper convention, right), each from the unreduced model's point."""
    plt = _pyplot()
    base = next((r for r in rows if r["family"] == "baseline"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=120, sharey=True)
    for fam in compared:
        own = [r for r in rows if r["family"] == fam and r["target_ratio"] is not None]
        if not own:
            continue
        for ax, key in zip(axes, ("reduction_ratio", "gflops_paper")):
            pts = sorted((r[key], r["top1"]) for r in own)
            if base is not None:
                pts = [(0.0 if key == "reduction_ratio" else base[key], base["top1"])] + pts
            xs, ys = zip(*pts)
            ax.plot(xs, ys, linewidth=1.3, label=families.get(fam, fam), **style(fam))
    n0 = rows[0]["token_counts"][0]
    axes[0].set_xlabel(f"reduction ratio (1 - mean tokens per block / {n0})")
    axes[1].set_xlabel("GFLOPs per image (paper convention)")
    axes[1].invert_xaxis()
    axes[0].set_ylabel("top-1 accuracy (%)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle("Every method at R-MeeTo's tokens per block, training-free (vim_fmnist)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _family_rows(rows: list[dict], families: dict[str, str]) -> list[tuple[str, str, list[dict]]]:
    return [(fam, label, [r for r in rows if r["family"] == fam]) for fam, label in families.items()
            if any(r["family"] == fam for r in rows)]


def plot_accuracy_vs_ratio(rows: list[dict], families: dict[str, str], path: Path) -> None:
    """Top-1 against reduction ratio, every family in its :func:`style`; training-free
    families start at their model's unreduced top-1."""
    plt = _pyplot()
    bases = unreduced_rows(rows)
    fig, ax = plt.subplots(figsize=(11, 5.6), dpi=120)
    for fam, label, own in _family_rows(rows, families):
        base = bases.get(own[0]["model"])
        if fam.endswith("baseline"):
            ax.plot([0.0], [own[0]["top1"]], linestyle="none", label=f"{label} {own[0]['top1']:.2f}%",
                    **{k: v for k, v in style(fam).items() if k != "linestyle"})
            continue
        pts = sorted((r["reduction_ratio"], r["top1"]) for r in own)
        if not fam.endswith("-retrained") and base is not None:
            pts = [(0.0, base["top1"])] + pts
        xs, ys = zip(*pts)
        ax.plot(xs, ys, linewidth=1.3, label=label, **style(fam))
    n0 = rows[0]["token_counts"][0]
    ax.set_xlabel(f"reduction ratio (1 - mean tokens per block / {n0})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Fashion-MNIST test accuracy against token reduction")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_speed(rows: list[dict], families: dict[str, str], path: Path) -> None:
    """Top-1 against throughput (``row["throughput"]``: a marker at the fastest round, a whisker
    to the median round), every family in its :func:`style`, one legend entry per family;
    training-free families joined in order of reduction ratio from their unreduced model."""
    plt = _pyplot()
    bases = unreduced_rows(rows)
    fig, ax = plt.subplots(figsize=(11, 5.6), dpi=120)
    for fam, label, own in _family_rows(rows, families):
        own = sorted(own, key=lambda r: r["reduction_ratio"])
        kw = style(fam)
        line = kw.pop("linestyle")
        xs, ys = [r["throughput"]["best"] for r in own], [r["top1"] for r in own]
        lo = [r["throughput"]["best"] - r["throughput"]["median"] for r in own]
        base = bases.get(own[0]["model"])
        if not fam.endswith("-retrained") and not fam.endswith("baseline") and base is not None:
            ax.plot([base["throughput"]["best"], *xs], [base["top1"], *ys], color=kw["color"], linestyle=line,
                    linewidth=0.8, alpha=0.45)
        ax.errorbar(xs, ys, xerr=[lo, [0.0] * len(xs)], linestyle="none", elinewidth=1, capsize=0,
                    ecolor=kw["color"], label=label + (f" {own[0]['top1']:.2f}%" if fam.endswith("baseline") else ""),
                    **kw)
    unit = "images"
    ax.set_xlabel(f"{unit} per second on this CPU (marker: fastest of the interleaved rounds; whisker: median)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy against throughput (colour: method; filled: Vim, hollow: DeiT; square: re-trained)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_transformer_vs_mamba(rows: list[dict], path: Path) -> None:
    """R-MeeTo Fig. 1a: accuracy drop against reduction ratio, pruning and merging, Vim and DeiT
    side by side (one panel each, the same axes, the methods in their :func:`style` colours)."""
    plt = _pyplot()
    bases = unreduced_rows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=120, sharey=True)
    for ax, (prefix, name) in zip(axes, (("", "Vim"), ("deit-", "DeiT"))):
        model = next((r["model"] for r in rows if r["family"] == prefix + "baseline"), None)
        base = bases.get(model)
        for fam, label in (("prune", "pruning"), ("rmeeto", "merging (R-MeeTo)"),
                           ("rmeeto-shuffled", "merging, odd-even shuffled")):
            pts = sorted((r["reduction_ratio"], base["top1"] - r["top1"]) for r in rows
                         if base is not None and r["family"] == prefix + fam)
            if pts:
                xs, ys = zip(*[(0.0, 0.0), *pts])
                ax.plot(xs, ys, linewidth=1.6, label=label, **style(prefix + fam))
        ax.set_title(f"{name} ({model}, unreduced {base['top1']:.2f}%)" if base else name)
        ax.set_xlabel(f"reduction ratio (1 - mean tokens per block / {rows[0]['token_counts'][0]})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("accuracy drop (points)")
    fig.suptitle("Token reduction without re-training: Mamba against a Transformer (R-MeeTo Fig. 1a)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_merges(columns: list[tuple[str, torch.nn.Module]], dataset, classes: tuple[int, ...], path: Path) -> None:
    """``merged_tokens.png``: the first test image of each class in ``classes``, one column per
    ``(title, reduced model)``, the patches held by one final token in one colour."""
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
    figure(panels, titles).save(path)


__all__ = ["METHOD_COLOURS", "style", "retrain_table", "transformer_table", "plot_accuracy_vs_ratio",
           "plot_accuracy_vs_speed", "plot_transformer_vs_mamba", "draw_merges"]
