"""Diff two studies' ``results.json`` row by row and claim by claim, ignoring timings.

Usage:  python benchmarks/compare_results.py BEFORE/results.json AFTER/results.json

Rows are matched by key (their order is compared too). Every field both rows have must be equal
except the timing fields (``seconds``, ``images_per_second``, ``clips_per_second``, ``speedup``,
``throughput``, a re-training's ``seconds``); the run directories (which carry the output folder
and the fingerprint) are normalised in ``run_dir`` and ``eval_command``. Fields only one side
has are listed, not failed. Claims must match exactly (text, source, verdict, evidence, caveat,
record). Prints one line per difference and a summary; exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TIMING = {"seconds", "images_per_second", "clips_per_second", "speedup", "throughput"}


def normalise(value, out: str):
    """``value`` with the output folder and the 16-hex-digit fingerprint of run directories masked."""
    if isinstance(value, str):
        value = value.replace(out, "<out>")
        return re.sub(r"-[0-9a-f]{16}(?=/|$)", "-<fingerprint>", value)
    if isinstance(value, dict):
        return {k: normalise(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, out) for v in value]
    return value


def compare_rows(a: dict, b: dict, out_a: str, out_b: str) -> tuple[list[str], set[str]]:
    """(differences, fields only one side has) of two rows."""
    diffs, one_sided = [], set(a) ^ set(b)
    for field in sorted(set(a) & set(b) - TIMING):
        va, vb = normalise(a[field], out_a), normalise(b[field], out_b)
        if field == "retrain":
            va, vb = ({k: v for k, v in x.items() if k != "seconds"} for x in (va, vb))
        if va != vb:
            diffs.append(f"{a['key']}.{field}: {str(va)[:120]} != {str(vb)[:120]}")
    return diffs, one_sided


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    args = p.parse_args(argv)
    ra, rb = (json.loads(Path(f).read_text()) for f in (args.before, args.after))
    out_a, out_b = (str(Path(f).resolve().parent) for f in (args.before, args.after))
    diffs: list[str] = []
    keys_a, keys_b = [r["key"] for r in ra["rows"]], [r["key"] for r in rb["rows"]]
    if keys_a != keys_b:
        diffs.append(f"row keys differ: only before {sorted(set(keys_a) - set(keys_b))}, only after "
                     f"{sorted(set(keys_b) - set(keys_a))}, same order: {keys_a == keys_b}")
    by_b = {r["key"]: r for r in rb["rows"]}
    one_sided: set[str] = set()
    compared = 0
    for row in ra["rows"]:
        if row["key"] in by_b:
            d, o = compare_rows(row, by_b[row["key"]], out_a, out_b)
            diffs += d
            one_sided |= o
            compared += 1
    ca, cb = ra["claims"], rb["claims"]
    if len(ca) != len(cb):
        diffs.append(f"{len(ca)} claims before, {len(cb)} after")
    for x, y in zip(ca, cb):
        if x != y:
            diffs.append(f"claim {x['claim']!r}: {x['verdict']} / {y['verdict']}; evidence equal: "
                         f"{x['evidence'] == y['evidence']}")
    for line in diffs:
        print(line)
    verdicts = ", ".join(c["verdict"] for c in cb)
    print(f"{compared} rows compared, {len(ca)} claims ({verdicts}); fields on one side only (not compared): "
          f"{sorted(one_sided) or 'none'}; {len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
