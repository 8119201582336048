"""The video study's own figures: the accuracy drop of clips against still images, and the
merged tokens drawn on the frames of a few test clips (R-MeeTo appendix D.5)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vimerge.data.video import VideoDataset, read_annotations
from vimerge.viz import draw_groups, figure, line_plot, token_groups

from .report import unreduced_rows

DROP_FAMILIES = ("rmeeto", "prune", "rmeeto-frame", "rmeeto-time", "image-rmeeto", "image-prune")


def plot_drop_vs_ratio(rows: list[dict], families: dict[str, str], path: Path) -> None:
    """Accuracy drop from each model's unreduced top-1 against reduction ratio: the video
    families of :data:`DROP_FAMILIES` (labelled "Video: ...") and the image ones."""
    bases = unreduced_rows(rows)
    drops = []
    for fam in DROP_FAMILIES:
        own = [r for r in rows if r["family"] == fam]
        base = bases.get(own[0]["model"]) if own else None
        if base is None:
            continue
        pts = sorted((r["reduction_ratio"], base["top1"] - r["top1"]) for r in own)
        drops.append((("" if fam.startswith("image-") else "Video: ") + families[fam], [(0.0, 0.0), *pts]))
    line_plot(drops, path, xlabel="reduction ratio", ylabel="accuracy drop (points)",
              title="Accuracy lost to token reduction, training-free: clips against still images")


def _label_panel(text: str, size: tuple[int, int]) -> Image.Image:
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    for k, line in enumerate(text.split("\n")):
        draw.text((4, 4 + 14 * k), line, fill=(0, 0, 0))
    return panel


def draw_merged_frames(configs: list[tuple[str, torch.nn.Module]], listing: str, labels: list[int],
                       classes: tuple[int, ...], path: Path, cell: int = 24) -> None:
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
    out_rows = []
    for i in picks:
        try:
            clip, frames = reader.read(samples[i][0], i)
        except Exception as exc:  # noqa: BLE001 - an unreadable clip is left out of the picture
            print(f"merged_frames.png: skipped {samples[i][0]} ({exc})", file=sys.stderr)
            continue
        out_rows.append([_label_panel(f"clip {i}\nlabel {labels[i]}\nframes", size)]
                        + [f.convert("RGB").resize(size, Image.NEAREST) for f in frames])
        for title, model in configs:
            groups = token_groups(model, clip[None])[0]                    # (T, gh, gw)
            n_final = len(set(groups.flatten().tolist()) - {-1})
            out_rows.append([_label_panel(f"{title}\n{n_final} tokens", size)]
                            + [draw_groups(f, groups[k], cell=cell) for k, f in enumerate(frames)])
    t = model0.num_frames
    figure(out_rows, ["", *[f"frame {k + 1} of {t}" for k in range(t)]]).save(path)


__all__ = ["DROP_FAMILIES", "plot_drop_vs_ratio", "draw_merged_frames"]
