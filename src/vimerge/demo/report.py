"""What every study's report shares: the table of every row, the top-1-at-each-ratio table, the
accuracy-against-ratio plot, ``report.md`` around the study's own sections, and the terminal
summary. The study-specific tables and figures live in the study's module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vimerge.measure.table import markdown_table
from vimerge.viz import line_plot

from .study import Study
from .timing import TimingPlan, protocol_text


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, ``-`` for None."""
    return "-" if value is None else format(value, spec)


def unreduced_rows(rows: list[dict]) -> dict[str, dict]:
    """Model -> its unreduced training-free row (the first one)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["reduce"] == "none" and "retrain" not in r:
            out.setdefault(r["model"], r)
    return out


def rows_header(unit: str) -> list[str]:
    """The columns of :func:`rows_table`."""
    return ["row", "method", "setting", "tokens per block", "reduction ratio", "top-1 (%)", "top-5 (%)",
            "GFLOPs (paper)", "GFLOPs (full)", f"{unit}s/s best (median)", "speed-up"]


def rows_table(rows: list[dict], unit: str = "image") -> str:
    """Every row (markdown), keyed by ``row`` so that tests can match the JSON; throughput as
    measured by :mod:`.timing` (``row["throughput"]``), when it has been."""
    body = []
    for r in rows:
        tp = r.get("throughput") or {}
        speed = f"{tp['best']:.0f} ({tp['median']:.0f})" if tp else "-"
        body.append([f"`{r['key']}`", r["label"], r["setting"], " ".join(map(str, r["token_counts"])),
                     f"{r['reduction_ratio']:.3f}", fmt(r["top1"], ".2f"), fmt(r["top5"], ".2f"),
                     f"{r['gflops_paper']:.4f}", f"{r['gflops_full']:.4f}", speed, f"{fmt(r.get('speedup'), '.2f')}x"])
    return markdown_table(rows_header(unit), body)


def ratio_table(rows: list[dict], families: dict[str, str], reached: list[tuple[str, str]],
                reference: str = "rmeeto") -> str:
    """Top-1 of every family at each target ratio of the ``reference`` family (rows: families,
    columns: ratios; the first column: the unreduced row of the family's model), then one line
    per ``(label, family)`` of ``reached`` with the mean-token ratio that family reached."""
    targets = sorted({r["target_ratio"] for r in rows if r["family"] == reference})
    by = {(r["family"], r["target_ratio"]): r for r in rows if r["target_ratio"] is not None}
    bases = unreduced_rows(rows)
    body = []
    for fam, label in families.items():
        found = [by[(fam, t)] for t in targets if (fam, t) in by]
        if not found:
            continue
        base = bases.get(found[0]["model"])
        body.append([label, fmt(base and base["top1"], ".2f"),
                     *[fmt(by[(fam, t)]["top1"], ".2f") if (fam, t) in by else "" for t in targets]])
    for label, fam in reached:
        if any((fam, t) in by for t in targets):
            body.append([label, "0", *[f"{by[(fam, t)]['reduction_ratio']:.3f}" if (fam, t) in by else ""
                                       for t in targets]])
    return markdown_table(["method", "0 (unreduced)", *[f"{t:g}" for t in targets]], body)


def plot_accuracy_vs_ratio(rows: list[dict], families: dict[str, str], path: Path, *, title: str,
                           xlabel: str, hline_label: str) -> None:
    """Top-1 against reduction ratio, one line per family (families of training-free rows start
    at their model's unreduced top-1), the first model's unreduced top-1 as a dashed line."""
    bases = unreduced_rows(rows)
    series = []
    for fam, label in families.items():
        own = [r for r in rows if r["family"] == fam]
        if not own or any(r["reduce"] == "none" and "retrain" not in r for r in own):
            continue
        base = bases.get(own[0]["model"])
        start = [] if any("retrain" in r for r in own) or base is None else [(0.0, base["top1"])]
        series.append((label, start + sorted((r["reduction_ratio"], r["top1"]) for r in own)))
    first = next(iter(bases.values()))
    line_plot(series, path, xlabel=xlabel, ylabel="top-1 accuracy (%)", title=title,
              hline=(first["top1"], f"{hline_label} {first['top1']:.2f}%"))


# ------------------------------------------------------------------------------------ report.md


def write_report(path: Path, study: Study, results: dict) -> str:
    """``report.md``: the study's introduction, the claims with their verdicts, the study's
    sections, the throughput protocol, the figures and the command of the last row."""
    setup, t = results["setup"], results["timings"]
    intro = study.intro(results)
    lines = [f"# {study.title}", "",
             (intro + " " if intro else "") + ("Quick run (--quick). " if setup["quick"] else "")
             + f"Machine: {results['machine']['cpu']}, {results['machine']['threads']} threads; total {t['total']:.0f} s"
             + (f" ({setup['rows_reused']} rows reused from an interrupted or earlier run: their own seconds "
                "are in results.json)." if setup["rows_reused"] else "."),
             "", "## The claims, here", ""]
    for c in results["claims"]:
        lines.append(f"- **{c['claim']}** ({c['source']}): **{c['verdict']}**. "
                     + ("; ".join(c["evidence"]) + "." if c["evidence"] else "")
                     + (f" Caveat: {c['caveat']}." if c.get("caveat") else ""))
    note = study.statistic_note()
    lines += ["", f"A comparison counts when the difference exceeds two standard errors, paired on the same "
              f"test {study.unit}s (McNemar's normal approximation)." + (" " + note if note else ""), ""]
    lines += study.sections(results)
    lines += ["## Throughput", "", protocol_text(TimingPlan(**setup["timing"]), study.unit), ""]
    lines += ["## Figures", ""]
    for f in results["figures"]:
        lines += [f"![{f['caption']}]({f['file']})", ""]
    notes = study.figure_notes()
    if notes:
        lines += [notes, ""]
    lines += ["## Reproduce a row", "", "```bash", results["rows"][-1]["eval_command"], "```", ""]
    text = "\n".join(lines)
    Path(path).write_text(text)
    return text


TIMING_NAMES = {"rows": "evaluation", "retrain": "re-training"}


def summary(study: Study, results: dict) -> str:
    """What the terminal shows at the end: the study's tables, every row, the claims, the timings."""
    lines = [*study.summary(results), rows_table(results["rows"], study.unit), ""]
    for c in results["claims"]:
        lines.append(f"[{c['verdict']}] {c['claim']}")
        lines += [f"    {e}" for e in c["evidence"]]
    t = results["timings"]
    parts = ", ".join(f"{TIMING_NAMES.get(k, k)} {v:.0f} s" for k, v in t.items() if k != "total")
    lines += ["", f"total {t['total']:.0f} s ({parts})"]
    return "\n".join(lines)


__all__ = ["fmt", "unreduced_rows", "rows_header", "rows_table", "ratio_table", "plot_accuracy_vs_ratio",
           "write_report", "summary"]
