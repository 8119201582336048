"""The one study runner: plan -> rows -> throughput -> claims -> figures -> ``results.json`` and
``report.md``, the same for every :class:`~vimerge.demo.study.Study`.

1. ``study.prepare()``: data and base weights; ``study.rows()``: the rows.
2. Rows are evaluated in order (a re-trained row is re-trained first, resumably, under
   ``OUTPUT/retrain/``); each finished row is saved at once to ``OUTPUT/rows.partial.json``,
   so a killed run loses nothing finished: the same call continues where it stopped
   (``fresh=True`` starts over). Saved rows are reused only under the same fingerprint (study,
   plan, base weights, data identity, rows, vimerge version).
3. Throughput: every row timed by the interleaved-rounds protocol of :mod:`.timing` (also
   saved, and reused on a rerun).
4. ``study.claims()``, ``study.figures()``, then ``results.json`` and ``report.md``
   (:func:`~vimerge.demo.report.write_report`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy
import torch

from vimerge._version import __version__
from vimerge.measure.evaluate import evaluate
from vimerge.measure.flops import model_cost
from vimerge.models import create_backbone
from vimerge.reduce import apply, parse_spec
from vimerge.tokens import input_shape
from vimerge.train import retrain

from .base import sha256
from .report import write_report
from .stats import correct_bits
from .study import Prepared, Row, Study, build_model
from .timing import time_rows

# ------------------------------------------------------------------------------------ provenance


def versions() -> dict:
    """vimerge, Python, torch, numpy and the optional packages (None when absent or broken)."""
    found = {"vimerge": __version__, "python": platform.python_version(),
             "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("numba", "matplotlib", "PIL", "av"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:   # noqa: BLE001 - absent or broken: record that
            found[name] = None
    return found


def machine() -> dict:
    """The CPU, its cores, torch's threads and the platform."""
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


# ------------------------------------------------------------------------------------ finished rows


class PartialRows:
    """Rows finished so far (and the throughput once measured), saved atomically after each
    addition so that a killed run keeps them. A file saved under another ``fingerprint`` is
    ignored; ``fresh`` ignores the file."""

    def __init__(self, path: Path, fingerprint: str, fresh: bool):
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[str, dict] = {}
        self.timing: dict | None = None
        if path.is_file() and not fresh:
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.rows = saved.get("rows", {})
                self.timing = saved.get("timing")
        self.reused = len(self.rows)

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self.timing = None                  # a new row: the throughput is measured again
        self._save()

    def set_timing(self, timing: dict) -> None:
        self.timing = timing
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows": self.rows, "timing": self.timing}))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------ one row


def evaluate_row(row: Row, weights: dict, command: str, loader, families: dict[str, str], *,
                 progress: bool) -> dict:
    """Build ``row``'s model (``weights`` + ``row.reduce``), evaluate it on ``loader`` and return
    its ``results.json`` row: spec, tokens per block, FLOPs in both conventions, top-1 / top-5 /
    loss, the per-item correctness (``correct_bits``) and the ``vimerge eval`` command."""
    model = create_backbone(row.model, **weights)
    apply(model, row.reduce)
    model.eval()
    cost = model_cost(model)
    result = evaluate(model, loader, progress=progress, desc=f"{row.key:<24s}", per_image=True)
    method, options = parse_spec(row.reduce)
    return {
        "key": row.key, "family": row.family, "label": families[row.family], "model": row.model,
        "setting": row.setting, "target_ratio": row.target, "reduce": row.reduce, "method": method,
        "options": options, "data": row.data, "reduction_ratio": cost["reduction_ratio"],
        "token_counts": cost["token_counts"], "gflops_paper": cost["gflops_paper"],
        "gflops_full": cost["gflops_full"], "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "correct": result["correct"], "images": result["images"], "seconds": result["seconds"],
        "eval_command": command, "correct_bits": correct_bits(result["per_image_correct"].numpy()),
    }


def retrain_row(study: Study, row: Row, prepared: Prepared, run_dir: Path, *, progress: bool) -> tuple[str, dict]:
    """Re-train the base with ``row``'s reduction (``study.retrain_config``), resumably in
    ``run_dir``; returns the final checkpoint and the run's facts."""
    config = study.retrain_config(row, prepared, run_dir, progress=progress)
    start = time.perf_counter()
    result = retrain(config, train_data=prepared.train_data)
    facts = {"run_dir": str(run_dir), "status": result.status, "steps": result.global_step,
             **study.retrain_facts(row, prepared, config), "lr": config.lr, "batch_size": config.batch_size,
             "seconds": time.perf_counter() - start, "last_loss": result.last_loss}
    return str(Path(run_dir) / "final.pth"), facts


# ------------------------------------------------------------------------------------ throughput


def first_items(dataset, count: int) -> torch.Tensor:
    """The first ``count`` inputs of ``dataset`` (fewer when it is smaller), stacked."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


def measure_throughput(study: Study, specs: list[Row], finished: dict[str, dict], prepared: Prepared) -> dict:
    """Every row timed by :func:`~vimerge.demo.timing.time_rows` (``study.timing``), each on the
    first ``study.timing.batch`` items of its own data; speed-ups against the unreduced row of
    the same model. Returns row key -> timing record."""
    batches = {name: first_items(loader.dataset, study.timing.batch) for name, loader in prepared.loaders.items()
               if any(r.data == name for r in specs)}
    unreduced = {}
    for r in specs:
        if r.unreduced:
            unreduced.setdefault(r.model, r.key)
    forwards, items = {}, {}
    with torch.inference_mode():
        for r in specs:
            model, x = build_model(finished[r.key], prepared.bases), batches[r.data]
            forwards[r.key] = (lambda m=model, x=x: m(x))
            items[r.key] = len(x)
        return time_rows(forwards, {r.key: unreduced.get(r.model) for r in specs}, items, study.timing)


# ------------------------------------------------------------------------------------ the run


def fingerprint(study: Study, specs: list[Row], prepared: Prepared, shas: dict[str, str]) -> str:
    """16 hex digits naming what the saved rows depend on."""
    facts = [study.name, study.plan_dict(), shas, prepared.identity, __version__,
             [(r.key, r.model, r.reduce, r.retrain, r.data) for r in specs]]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:16]


def run_study(study: Study, output: str | os.PathLike, *, fresh: bool = False, progress: bool = True) -> dict:
    """Run ``study`` and write ``results.json``, ``report.md`` and its figures to ``output``;
    returns the content of ``results.json``.

    Interrupted (KeyboardInterrupt, a crash), the rows finished so far and the re-training
    checkpoints stay in ``output``; the same call continues (``fresh=True``: recompute all).
    """
    t0 = time.perf_counter()
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    prepared = study.prepare(progress=progress)
    timings: dict[str, float] = {**prepared.timings}
    timings["prepare"] = time.perf_counter() - t0
    specs = study.rows()
    keys = [r.key for r in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{study.name}: row keys must be unique, got {sorted(k for k in keys if keys.count(k) > 1)}")
    shas = {name: sha256(b.path) for name, b in prepared.bases.items()}
    fp = fingerprint(study, specs, prepared, shas)
    partial = PartialRows(out / "rows.partial.json", fp, fresh)
    if partial.reused:
        print(f"continuing an interrupted {study.name} study in {out}: {partial.reused} row(s) already done "
              f"(--fresh recomputes them)", file=sys.stderr)

    t = time.perf_counter()
    with torch.inference_mode():     # compile / load the scan kernels before anything is timed
        for name in dict.fromkeys(r.model for r in specs):
            net = create_backbone(name).eval()
            net(torch.zeros(input_shape(net, 2)))
    timings["warmup"] = time.perf_counter() - t

    t_rows, retrain_seconds = time.perf_counter(), 0.0
    for spec in specs:
        if spec.key in partial.rows:
            continue
        ckpt, facts = None, None
        base = prepared.bases[spec.model]
        if spec.retrain:
            t = time.perf_counter()
            ckpt, facts = retrain_row(study, spec, prepared, out / "retrain" / f"{spec.key.replace('@', '-')}-{fp}",
                                      progress=progress)
            retrain_seconds += time.perf_counter() - t
        weights = {"checkpoint": ckpt} if ckpt else base.weights()
        row = evaluate_row(spec, weights, study.eval_command(spec, prepared, ckpt), prepared.loaders[spec.data],
                           study.families, progress=progress)
        if facts is not None:
            row["retrain"] = facts
        partial.add(row)
    timings["retrain"] = retrain_seconds
    timings["rows"] = time.perf_counter() - t_rows - retrain_seconds

    t = time.perf_counter()
    if partial.timing is None:
        partial.set_timing(measure_throughput(study, specs, partial.rows, prepared))
    timings["throughput"] = time.perf_counter() - t
    rows = []
    for spec in specs:
        row = {**partial.rows[spec.key], "throughput": partial.timing[spec.key]}
        row["speedup"] = row["throughput"]["speedup"]
        rows.append(row)

    t = time.perf_counter()
    figures = study.figures(rows, prepared, out)
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    first = next(iter(prepared.bases.values()))
    results = {
        "study": study.name,
        "setup": {**prepared.setup, "quick": study.quick, "plan": study.plan_dict(), "timing": asdict(study.timing),
                  "fingerprint": fp, "rows_reused": partial.reused},
        "base": {**asdict(first), "sha256": shas[first.model]},
        "bases": {name: {**asdict(b), "sha256": shas[name]} for name, b in prepared.bases.items()},
        **prepared.extra,
        "versions": versions(),
        "machine": machine(),
        "timings": timings,
        "rows": rows,
        "claims": study.claims(rows, prepared),
        "figures": [{"file": f, "caption": c} for f, c in figures],
        "files": ["results.json", "report.md", *[f for f, _ in figures]],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out / "report.md", study, results)
    return results


__all__ = ["versions", "machine", "PartialRows", "evaluate_row", "retrain_row", "first_items",
           "measure_throughput", "fingerprint", "run_study"]
