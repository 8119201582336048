"""Pictures of merged tokens (R-MeeTo appendix D.5): the patches of every final token share a colour.

``token_groups`` runs a reduced model with source tracking and says, for every patch of the
grid (of every frame of a clip), which final token holds it; ``draw_groups`` paints those groups over the image (a colour
per group, blended with the picture, and a dark line where neighbouring patches belong to
different groups); ``figure`` lays several images and configurations out in one PNG.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .tokens import protected_positions, token_frames


def token_groups(model, images: Tensor) -> Tensor:
    """(B, C, H, W) images -> (B, grid_h, grid_w) index of the final token holding each patch;
    for a video model, (B, C, T, H, W) clips -> (B, token_frames, grid_h, grid_w), the ids shared
    by all frames of a clip (a token merged across frames has one id, drawn in one colour).

    Final tokens are numbered in their output order; the class token (and Mamba-Reg's
    registers: ``protected_positions``) is left out. A patch
    that no final token holds (pruned) gets -1.
    """
    with torch.no_grad():
        state = model.forward_tokens(images, track_source=True)
    source = state.source                                     # (B, N_final, N0)
    owner = source.argmax(dim=1)                              # (B, N0): final token of each
    owner = owner.masked_fill(source.sum(dim=1) == 0, -1)     # pruned patches
    protected = set(protected_positions(model))                # class token, registers
    keep = [t for t in range(source.shape[-1]) if t not in protected]
    gh, gw = model.grid_size
    if getattr(model, "num_frames", None) is not None:
        return owner[:, keep].reshape(-1, token_frames(model), gh, gw)
    return owner[:, keep].reshape(-1, gh, gw)


PRUNED = (60, 60, 60)


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct, reproducible colours (golden-ratio hue steps)."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2), 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def draw_groups(image: Image.Image, groups: Tensor, cell: int = 16, alpha: float = 0.55) -> Image.Image:
    """Paint (grid_h, grid_w) group ids over ``image`` (resized to the grid, ``cell`` px a patch).

    Group -1 (pruned patches) is painted dark grey."""
    gh, gw = groups.shape
    base = image.convert("RGB").resize((gw * cell, gh * cell), Image.NEAREST if image.width <= gw * 4
                                       else Image.BICUBIC)
    ids = groups.tolist()
    colours = palette(int(groups.max()) + 1) + [PRUNED]        # index -1: pruned
    overlay = Image.new("RGB", base.size)
    draw = ImageDraw.Draw(overlay)
    for y in range(gh):
        for x in range(gw):
            draw.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], fill=colours[ids[y][x]])
    out = Image.blend(base, overlay, alpha)
    lines = ImageDraw.Draw(out)
    for y in range(gh):
        for x in range(gw):
            if x + 1 < gw and ids[y][x] != ids[y][x + 1]:
                lines.line([(x + 1) * cell, y * cell, (x + 1) * cell, (y + 1) * cell], fill=(20, 20, 20))
            if y + 1 < gh and ids[y][x] != ids[y + 1][x]:
                lines.line([x * cell, (y + 1) * cell, (x + 1) * cell, (y + 1) * cell], fill=(20, 20, 20))
    return out


def figure(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], pad: int = 6) -> Image.Image:
    """A grid of equally sized panels with one title per column."""
    w, h = rows[0][0].size
    title_h = 14
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad + title_h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((pad + c * (w + pad), 2), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            sheet.paste(panel, (pad + c * (w + pad), title_h + pad + r * (h + pad)))
    return sheet


def line_plot(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], path, *, xlabel: str, ylabel: str,
              title: str, hline: tuple[float, str] | None = None,
              points: Sequence[tuple[str, float, float]] = (), lines: bool = True) -> None:
    """A PNG of labelled lines (matplotlib, headless): ``series`` is ``[(label, [(x, y), ...])]``;
    ``hline`` a dashed reference ``(y, label)``; ``points`` single marked ``(label, x, y)``;
    ``lines=False`` draws the series' markers only (a scatter plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for i, (label, pts) in enumerate(series):
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.6 if lines else 0,
                markersize=5 if lines else 7, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="0.3", linestyle="--", linewidth=1, label=hline[1])
    for label, x, y in points:
        ax.plot([x], [y], marker="*", markersize=12, color="black", linestyle="none", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
