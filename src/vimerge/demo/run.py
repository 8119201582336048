"""Running the study: the base model, each row's evaluation, the re-trained rows, the store of
finished rows that makes a killed demo resumable, provenance, and :func:`run_demo` itself.

Every row is one reduction spec (see :mod:`.plan`) applied to the base weights; the row stores the
``vimerge eval`` command that reproduces it (``eval_command``), built from the same weights and
spec, so a row and its command give the same numbers.

A killed demo loses nothing finished: rows are saved as they complete (``rows.partial.json``)
and the re-training runs keep resumable checkpoints, so running the same command again
continues where it stopped (``fresh=True`` starts over).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from vimerge._version import __version__
from vimerge.data import make_loader
from vimerge.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, FashionMNISTNotFound, find_file, read_idx
from vimerge.measure.evaluate import evaluate
from vimerge.measure.flops import model_cost
from vimerge.models import create_backbone, pretrained_uri
from vimerge.reduce import apply, parse_spec
from vimerge.train import RetrainConfig, retrain
from vimerge.train.recipe import BASE_RECIPE

from .plan import FAMILIES, FULL, INTERVAL, MODEL, QUICK, TRANSFORMER, Plan, RowSpec, plan_rows
from .report import (
    claims,
    correct_bits,
    draw_merges,
    plot_results,
    plot_transformer_vs_mamba,
    rows_table,
    write_report,
)

# ------------------------------------------------------------------------------------ the base model


@dataclass
class Base:
    """The base checkpoint: where it came from and how ``vimerge eval`` names it (``model_args``)."""
    path: str
    source: str                 # "shipped", "checkpoint", "cache" or "trained"
    model_args: list[str]
    seconds: float = 0.0
    sidecar: dict[str, Any] = field(default_factory=dict)
    model: str = MODEL

    def weights(self) -> dict[str, Any]:
        """The :func:`vimerge.models.create_backbone` arguments that load these weights."""
        return {"pretrained": True} if self.source == "shipped" else {"checkpoint": self.path}


def cache_dir() -> Path:
    """Where trained bases live: ``$VIMERGE_CACHE`` or ``~/.cache/vimerge``."""
    return Path(os.environ.get("VIMERGE_CACHE", Path.home() / ".cache" / "vimerge")).expanduser()


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_base(model: str, checkpoint: str | None, *, train: bool = False) -> Base | None:
    """``model``'s base weights without training: ``checkpoint`` (checked by loading it), else the
    shipped weights (skipped when ``train``), else ``cache_dir()/<model>-base/final.pth``; None
    when there are none (the caller trains one into that cache directory)."""
    if checkpoint is not None:
        create_backbone(model, checkpoint=checkpoint)          # a wrong file fails here, with its reason
        return Base(str(checkpoint), "checkpoint", ["--checkpoint", str(checkpoint)], model=model)
    shipped = pretrained_uri(model)                         # the weights shipped in vimerge/assets
    if not train and shipped is not None and Path(shipped).is_file():
        sidecar = Path(shipped).with_suffix(".json")
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return Base(shipped, "shipped", ["--pretrained"], sidecar=info, model=model)
    final = cache_dir() / f"{model}-base" / "final.pth"
    if final.is_file():
        return Base(str(final), "cache", ["--checkpoint", str(final)], model=model)
    return None


def resolve_base(checkpoint: str | None, data: str, *, train: bool = False, progress: bool = True,
                 train_data=None, val_data=None, model: str = MODEL) -> Base:
    """The base checkpoint of ``model``: ``checkpoint``, else the shipped weights, else the cache,
    else trained.

    Training uses :data:`vimerge.train.recipe.BASE_RECIPE` (``vimerge train``'s defaults) into
    ``cache_dir()/<model>-base``; it resumes from there when interrupted. ``train=True``
    skips the shipped weights. ``train_data`` / ``val_data``: datasets used instead of ``data``.
    """
    found = find_base(model, checkpoint, train=train)
    if found is not None:
        return found
    run_dir = cache_dir() / f"{model}-base"
    print(f"training the base {model} from scratch into {run_dir} (resumable: run the demo again to "
          f"continue after an interruption)", file=sys.stderr)
    config = RetrainConfig(model=model, data=data, output=str(run_dir), resume=True, save_every=100,
                           progress=progress, workers=0, **BASE_RECIPE)
    start = time.perf_counter()
    result = retrain(config, train_data=train_data, val_data=val_data)
    seconds = time.perf_counter() - start
    return Base(str(result.final_checkpoint), "trained", ["--checkpoint", str(result.final_checkpoint)],
                seconds=seconds, sidecar={"eval_acc": result.eval_acc, "config": config.to_dict()}, model=model)


# ------------------------------------------------------------------------------------ one row


def build_model(weights: dict[str, Any], spec: str, model: str = MODEL) -> torch.nn.Module:
    """``model`` (default ``vim_fmnist``) with ``weights`` (:meth:`Base.weights`) and the
    reduction ``spec`` (eval mode)."""
    net = create_backbone(model, **weights)
    apply(net, spec)
    return net.eval()


def row_images(spec: RowSpec, plan: Plan) -> int | None:
    """Test images a row is evaluated on (None: all): the first ``secondary_images`` for a
    secondary row, else ``test_images``."""
    if spec.secondary and plan.secondary_images is not None:
        return min(plan.secondary_images, plan.test_images or plan.secondary_images)
    return plan.test_images


def eval_command(base: Base, data: str, plan: Plan, spec: str, checkpoint: str | None = None,
                 limit: int | None = None) -> str:
    """The ``vimerge eval`` command of a row on ``base.model`` (``checkpoint`` replaces the base
    weights; ``limit``: the row's test images, default the plan's)."""
    model = ["--checkpoint", checkpoint] if checkpoint else base.model_args
    argv = ["vimerge", "eval", "--model", base.model, *model, "--dataset", "fashion-mnist", "--data", str(data),
            "--batch-size", str(plan.batch_size)]
    limit = plan.test_images if limit is None else limit
    if limit is not None:
        argv += ["--limit", str(limit)]
    return shlex.join(argv + ["--reduce", spec])


def run_row(spec: RowSpec, weights: dict[str, Any], command: str, loader, *, progress: bool) -> dict:
    """Build the row's model (``weights`` + ``spec.reduce``), evaluate it, return its JSON row."""
    model = build_model(weights, spec.reduce, spec.model)
    cost = model_cost(model)
    result = evaluate(model, loader, progress=progress, desc=f"{spec.key:<24s}", per_image=True)
    method, options = parse_spec(spec.reduce)
    return {
        "key": spec.key, "family": spec.family, "label": FAMILIES[spec.family], "model": spec.model,
        "setting": spec.setting,
        "target_ratio": spec.target, "reduce": spec.reduce, "method": method, "options": options,
        "reduction_ratio": cost["reduction_ratio"], "token_counts": cost["token_counts"],
        "gflops_paper": cost["gflops_paper"], "gflops_full": cost["gflops_full"],
        "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "correct": result["correct"], "images": result["images"], "seconds": result["seconds"],
        "images_per_second": result["images_per_second"],
        "eval_command": command,
        "correct_bits": correct_bits(result["per_image_correct"].numpy()),
    }


# ------------------------------------------------------------------------------------ re-trained rows


def _train_size(data: str) -> int:
    """Images in the training split of the Fashion-MNIST directory ``data`` (from its labels file)."""
    labels = find_file(data, "train-labels-idx1-ubyte")
    if labels is None:
        raise FashionMNISTNotFound(f"no train-labels-idx1-ubyte(.gz) in {data}: re-training needs the "
                                   f"training split (apt-get install dataset-fashion-mnist, or --data DIR "
                                   f"with all four IDX files)")
    return len(read_idx(labels))


def retrain_row(spec: RowSpec, base: Base, data: str, plan: Plan, out: Path, *, progress: bool,
                train_data=None) -> tuple[str, dict]:
    """Re-train the base with the row's reduction for ``plan.retrain_images`` images (one pass,
    cosine learning rate); returns the final checkpoint and the run's facts. Resumable."""
    total = len(train_data) if train_data is not None else _train_size(data)
    config = RetrainConfig(
        model=spec.model, checkpoint=base.path, reduce=spec.reduce, data=data, val_data=None,
        fraction=min(1.0, plan.retrain_images / total), epochs=1, batch_size=plan.retrain_batch,
        effective_batch=plan.retrain_batch, lr=plan.retrain_lr, min_lr=1e-5, augment="none",
        label_smoothing=0.1, workers=0, seed=plan.seed, output=str(out), resume=True, save_every=25,
        log_every=1000, progress=progress)
    start = time.perf_counter()
    result = retrain(config, train_data=train_data)
    seconds = time.perf_counter() - start
    facts = {"run_dir": str(out), "status": result.status, "steps": result.global_step,
             "images": min(plan.retrain_images, total), "lr": plan.retrain_lr,
             "batch_size": plan.retrain_batch, "seconds": seconds, "last_loss": result.last_loss}
    return str(Path(out) / "final.pth"), facts


# ------------------------------------------------------------------------------------ provenance


def versions() -> dict:
    """vimerge, Python, torch, numpy and the optional packages (None when absent or broken)."""
    found = {"vimerge": __version__, "python": platform.python_version(),
             "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("numba", "matplotlib", "PIL"):
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
    """Rows finished so far, saved atomically after each one (a killed demo keeps them).

    Rows saved under another ``fingerprint`` (other plan, base, data, rows or version) are ignored.
    """

    def __init__(self, path: Path, fingerprint: str, fresh: bool):
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[str, dict] = {}
        if path.is_file() and not fresh:
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                self.rows = saved.get("rows", {})
        self.reused = len(self.rows)

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows": self.rows}))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------ the run


def run_demo(*, data: str | None = None, output: str = "vimerge-demo", quick: bool = False,
             checkpoint: str | None = None, train_base: bool = False, plan: Plan | None = None,
             fresh: bool = False, progress: bool = True, train_data=None) -> dict:
    """Run the study and write its outputs; returns the content of ``results.json``.

    ``plan`` overrides the full/quick plan (tests use small ones); ``train_data`` a dataset used
    instead of the training split for re-training (and base training).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    plan = plan or (QUICK if quick else FULL)
    data = str(Path(data).expanduser()) if data else DEFAULT_ROOT
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    test = FashionMNIST(data, "test", limit=plan.test_images)      # missing files: the one-line fix
    if plan.retrain_ratios and train_data is None:
        _train_size(data)                                          # fail now, not after the evaluations
    base = resolve_base(checkpoint, data, train=train_base, progress=progress, train_data=train_data)
    bases = {MODEL: base}
    if plan.transformer:
        bases[TRANSFORMER] = resolve_base(None, data, train=train_base, progress=progress,
                                          train_data=train_data, model=TRANSFORMER)
    timings["base"] = time.perf_counter() - t0

    probe = create_backbone(MODEL)
    num_tokens, depth = probe.num_tokens, probe.depth
    specs = plan_rows(plan, num_tokens, depth)
    base_sha = _sha256(base.path)
    shas = {name: _sha256(b.path) for name, b in bases.items()}
    fingerprint = hashlib.sha256(json.dumps(
        [asdict(plan), shas, data, len(test), __version__, [s.reduce for s in specs]]).encode()).hexdigest()[:16]
    partial = PartialRows(out / "rows.partial.json", fingerprint, fresh)
    if partial.reused:
        print(f"continuing an interrupted demo in {out}: {partial.reused} row(s) already done "
              f"(--fresh recomputes them)", file=sys.stderr)

    loaders = {plan.test_images: make_loader(test, plan.batch_size, 0)}
    for spec in specs:
        n = row_images(spec, plan)
        if n not in loaders:
            loaders[n] = make_loader(FashionMNIST(data, "test", limit=n), plan.batch_size, 0)
    with torch.inference_mode():     # compile / load the scan kernels before anything is timed
        probe.eval()(torch.zeros(2, 1, 28, 28))
        if plan.transformer:
            create_backbone(TRANSFORMER).eval()(torch.zeros(2, 1, 28, 28))
    timings["warmup"] = time.perf_counter() - t0 - timings["base"]

    t_rows = time.perf_counter()
    retrain_seconds = 0.0
    for spec in specs:
        if spec.key in partial.rows:
            continue
        ckpt, facts = None, None
        own = bases[spec.model]
        if spec.retrain:
            run_dir = out / "retrain" / f"{spec.key.replace('@', '-')}-{fingerprint}"
            t = time.perf_counter()
            ckpt, facts = retrain_row(spec, own, data, plan, run_dir, progress=progress,
                                      train_data=train_data)
            retrain_seconds += time.perf_counter() - t
        weights = {"checkpoint": ckpt} if ckpt else own.weights()
        n = row_images(spec, plan)
        row = run_row(spec, weights, eval_command(own, data, plan, spec.reduce, ckpt, n), loaders[n],
                      progress=progress)
        if facts is not None:
            row["retrain"] = facts
        partial.add(row)
    timings["retrain"] = retrain_seconds
    timings["rows"] = time.perf_counter() - t_rows - retrain_seconds

    rows = [partial.rows[s.key] for s in specs]
    base_ips = {r.get("model", MODEL): r["images_per_second"] for r in rows if r["family"].endswith("baseline")}
    for r in rows:   # against the unreduced row of the same model
        own_ips = base_ips.get(r.get("model", MODEL))
        r["speedup"] = r["images_per_second"] / own_ips if own_ips and r["images_per_second"] else None

    t = time.perf_counter()
    files = plot_results(rows, out)
    if plan.transformer:
        files.append(plot_transformer_vs_mamba(rows, out))
    files.append(draw_merges(_figure_columns(rows, plan, base), test, plan.viz_classes, out))
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    results = {
        "setup": {"model": MODEL, "transformer": TRANSFORMER if plan.transformer else None,
                  "secondary_images": plan.secondary_images, "num_tokens": num_tokens, "depth": depth, "interval": INTERVAL,
                  "data": data, "test_images": len(test), "quick": quick, "seed": plan.seed,
                  "batch_size": plan.batch_size, "retrain_images": plan.retrain_images,
                  "retrain_lr": plan.retrain_lr, "retrain_batch": plan.retrain_batch,
                  "plan": asdict(plan), "fingerprint": fingerprint, "rows_reused": partial.reused},
        "base": {**asdict(base), "sha256": base_sha},
        "bases": {name: {**asdict(b), "sha256": shas[name]} for name, b in bases.items()},
        "versions": versions(),
        "machine": machine(),
        "timings": timings,
        "rows": rows,
        "claims": claims(rows),
        "files": ["results.json", "report.md", *files],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out / "report.md", results)
    return results


def _figure_columns(rows: list[dict], plan: Plan, base: Base) -> list[tuple[str, torch.nn.Module]]:
    """The merged-token figure's models: R-MeeTo at the lowest and highest ratio, re-trained at
    the highest (when planned) and STM+HSP at the highest."""
    by = {r["key"]: r for r in rows}
    top = max(plan.ratios)
    picks = [(f"R-MeeTo {t:g}", by[f"rmeeto@{t:g}"]) for t in sorted({min(plan.ratios), top})]
    if f"rmeeto-retrained@{top:g}" in by:
        picks.append((f"re-trained {top:g}", by[f"rmeeto-retrained@{top:g}"]))
    picks.append((f"STM+HSP {top:g}", by[f"stm-hsp@{top:g}"]))
    columns = []
    for title, row in picks:
        weights = ({"checkpoint": str(Path(row["retrain"]["run_dir"]) / "final.pth")} if "retrain" in row
                   else base.weights())
        columns.append((title, build_model(weights, row["reduce"])))
    return columns


def summary(results: dict) -> str:
    """What the terminal shows at the end: the rows, the claims and where the files are."""
    lines = [rows_table(results["rows"]), ""]
    for c in results["claims"]:
        lines.append(f"[{c['verdict']}] {c['claim']}")
        lines += [f"    {e}" for e in c["evidence"]]
    t = results["timings"]
    lines.append("")
    lines.append(f"total {t['total']:.0f} s (evaluation {t['rows']:.0f} s, re-training {t['retrain']:.0f} s, "
                 f"figures {t['figures']:.0f} s)")
    return "\n".join(lines)


__all__ = ["Base", "cache_dir", "find_base", "resolve_base", "build_model", "row_images", "eval_command", "run_row", "retrain_row",
           "versions", "machine", "PartialRows", "run_demo", "summary"]
