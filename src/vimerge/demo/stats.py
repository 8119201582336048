"""The paired statistics every study judges its claims with, and the claim records they make.

Each row stores which test items (images or clips) it got right, as packed bits
(:func:`correct_bits`). Two rows evaluated on the same items are compared per item, so the
comparison has the power of a paired test:

* :func:`paired`: mean and standard error of per-item differences ``d`` (in points):
  mean ``100 sum(d) / n``, standard error ``100 sqrt(sum(d^2) - sum(d)^2 / n) / n``;
* :func:`compare`: ``d = a - b`` of two rows' 0/1 correctness. With ``n01`` items only ``a``
  gets right and ``n10`` only ``b``, that is ``(n01 - n10) / n`` with standard error
  ``sqrt(n01 + n10 - (n01 - n10)^2 / n) / n``, the normal approximation behind McNemar's test;
* :func:`drop_comparison`: the difference of two accuracy drops, ``(a base - a row) - (b base -
  b row)`` per item (R-MeeTo Fig. 1a's "reduction hurts Mamba more than a Transformer").

A side wins a comparison when the difference exceeds two standard errors; rows evaluated on
different numbers of items are paired on the first ``n`` both saw. :func:`verdict` turns the
outcomes of a claim's comparisons into one word.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np


def correct_bits(correct: np.ndarray) -> str:
    """Per-item correctness (bool array (n,), loader order) packed to a hex string."""
    return np.packbits(np.asarray(correct).astype(np.uint8)).tobytes().hex()


def correct_mask(row: dict) -> np.ndarray:
    """The inverse of :func:`correct_bits`: a row's per-item correctness, bool (``row["images"]``,)."""
    bits = np.frombuffer(bytes.fromhex(row["correct_bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[:row["images"]].astype(bool)


def select_items(row: dict, keep: Sequence[int]) -> dict:
    """``row`` restricted to the items ``keep`` (indices into its correctness, those past its
    end left out), e.g. an image row restricted to the garments whose clips could be read."""
    mask = correct_mask(row)
    keep = [k for k in keep if k < len(mask)]
    return {**row, "correct_bits": correct_bits(mask[keep]), "images": len(keep)}


def paired(diff: np.ndarray) -> tuple[float, float, str]:
    """(mean, standard error, winner) of per-item differences ``diff`` (n,), in points.

    Winner ``"a"`` when the mean exceeds two standard errors, ``"b"`` when it is below minus
    two, else ``"tie"`` (also for n = 0).
    """
    n = len(diff)
    if n == 0:
        return 0.0, 0.0, "tie"
    total, squares = float(diff.sum()), float((np.asarray(diff, dtype=float) ** 2).sum())
    d = 100 * total / n
    se = 100 * math.sqrt(max(squares - total ** 2 / n, 0.0)) / n
    return d, se, ("a" if d > 2 * se else "b" if d < -2 * se else "tie")


def compare(a: dict, b: dict) -> tuple[float, float, str]:
    """(top-1 difference ``a - b`` in points, its standard error, winner) of two rows, paired on
    the first ``min(a.images, b.images)`` items (McNemar's normal approximation)."""
    ma, mb = correct_mask(a), correct_mask(b)
    n = min(len(ma), len(mb))
    return paired(ma[:n].astype(int) - mb[:n].astype(int))


def drop_comparison(a_base: dict, a_row: dict, b_base: dict, b_row: dict) -> tuple[float, float, str]:
    """Is model a's accuracy drop larger than model b's? Per item ``(a base - a row) - (b base -
    b row)`` (each 0/1), paired on the items all four rows saw; winner ``"a"``: a drops more."""
    masks = [correct_mask(r).astype(int) for r in (a_base, a_row, b_base, b_row)]
    n = min(len(m) for m in masks)
    ab, ar, bb, br = (m[:n] for m in masks)
    return paired((ab - ar) - (bb - br))


def verdict(outcomes: Sequence[str]) -> str:
    """One word for a claim whose side is ``"a"`` in every comparison: *reproduced* (a wins every
    comparison), *not reproduced* (a wins none and loses at least one), *mixed* (wins some,
    loses some), *inconclusive* (only ties), *not measured* (no comparison)."""
    if not outcomes:
        return "not measured"
    if all(o == "a" for o in outcomes):
        return "reproduced"
    if "b" in outcomes:
        return "mixed" if "a" in outcomes else "not reproduced"
    return "inconclusive"


def claim(text: str, source: str, outcomes: Sequence[str], evidence: Sequence[str], **extra) -> dict:
    """A claim record: ``{"claim", "source", "verdict", "evidence", **extra}`` (``extra``: e.g.
    a ``caveat`` the report prints with the verdict)."""
    return {"claim": text, "source": source, "verdict": verdict(outcomes), "evidence": list(evidence), **extra}


def compare_claim(text: str, source: str, items: Iterable[tuple[str, dict, dict]], name_a: str, name_b: str,
                  note: Callable[[dict, dict], str] | None = None) -> dict:
    """A claim judged by :func:`compare` on every ``(label, a, b)`` of ``items``, the claim's
    side being ``a``; ``note(a, b)`` is appended to a comparison's sentence."""
    texts, outcomes = [], []
    for label, a, b in items:
        d, se, o = compare(a, b)
        outcomes.append(o)
        texts.append(f"{label}: {name_a} {a['top1']:.2f}% vs {name_b} {b['top1']:.2f}% "
                     f"({d:+.2f} points, 2 s.e. = {2 * se:.2f})" + (note(a, b) if note else ""))
    return claim(text, source, outcomes, texts)


def pairs(by: dict[str, dict], family_a: str, family_b: str, targets: Iterable[float]) -> list[tuple[str, dict, dict]]:
    """``("at t", by["family_a@t"], by["family_b@t"])`` for every target ratio ``t`` where both rows exist."""
    return [(f"at {t:g}", by[f"{family_a}@{t:g}"], by[f"{family_b}@{t:g}"]) for t in targets
            if f"{family_a}@{t:g}" in by and f"{family_b}@{t:g}" in by]


def recovered_note(base: dict | None) -> Callable[[dict, dict], str]:
    """A :func:`compare_claim` note for "re-trained ``a`` against training-free ``b``": the share
    of ``b``'s drop from the unreduced ``base`` that re-training won back."""
    def note(a: dict, b: dict) -> str:
        if not (base and base["top1"] > b["top1"]):
            return ""
        share = (a["top1"] - b["top1"]) / (base["top1"] - b["top1"])
        return f"; {100 * share:.0f}% of the drop from the unreduced {base['top1']:.2f}% recovered"
    return note


__all__ = ["correct_bits", "correct_mask", "select_items", "paired", "compare", "drop_comparison", "verdict",
           "claim", "compare_claim", "pairs", "recovered_note"]
