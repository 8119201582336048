"""What a study is: its rows, how they run, its claims and figures (:class:`Study`), run by the
one runner (:func:`vimerge.demo.runner.run_study`).

A study states *what* is measured; the runner does the rest the same way for every study:
evaluating the rows (each a reduction spec applied to base weights, some re-trained first), the
store that makes a killed run resumable, the throughput protocol (:mod:`.timing`), the paired
statistics (:mod:`.stats`), ``results.json``, ``report.md`` and the terminal summary.

To add a study (see ``docs/demo.md``): one module with a subclass of :class:`Study` that sets
``name``, ``title``, ``unit``, ``families``, ``plan`` and ``timing`` and implements
:meth:`~Study.prepare` (data and base weights), :meth:`~Study.rows`,
:meth:`~Study.eval_command`, :meth:`~Study.claims` and :meth:`~Study.figures` (and
:meth:`~Study.retrain_config` when it has re-trained rows); then ``run_study(MyStudy(...),
output)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from vimerge.models import create_backbone
from vimerge.reduce import apply
from vimerge.train import RetrainConfig

from .base import Base
from .timing import TimingPlan

# Reductions happen in every block after the first in every study (R-MeeTo Fig. 1's layer-wise
# setting): with 8 blocks and 50 tokens, reducing every second block cannot pass a ratio of 0.51.
INTERVAL = 1


@dataclass(frozen=True)
class Row:
    """One row of a study.

    ``key``: unique, ``family@setting`` by convention (``rmeeto@0.28``); ``family``: a key of
    :attr:`Study.families`; ``setting``: human-readable; ``target``: the mean-token reduction
    ratio the row is set to (None: the unreduced row, settings of a method's own); ``reduce``:
    the reduction spec (:func:`vimerge.reduce.parse_spec`, ``"none"`` for unreduced);
    ``model``: the preset it runs on (its base weights: ``Prepared.bases[model]``);
    ``retrain``: the base is re-trained with ``reduce`` first (:meth:`Study.retrain_config`);
    ``data``: which of ``Prepared.loaders`` it is evaluated on.
    """
    key: str
    family: str
    setting: str
    target: float | None
    reduce: str
    model: str
    retrain: bool = False
    data: str = "test"

    @property
    def unreduced(self) -> bool:
        """The unreduced row of its model: speed-ups are measured against it."""
        return self.reduce == "none" and not self.retrain


@dataclass
class Prepared:
    """What a study's rows run on (made by :meth:`Study.prepare`).

    ``bases``: preset -> base weights (the first entry is the study's own base);
    ``loaders``: data name -> loader of ``(items, labels)`` batches in a fixed order
    (:func:`vimerge.data.make_loader`); ``identity``: JSON-able facts the results depend on
    beyond the plan and the weights (data directory, clip list), part of the fingerprint that
    decides whether saved rows can be reused; ``setup``: facts for ``results["setup"]``;
    ``extra``: further top-level ``results.json`` entries; ``timings``: seconds of the study's
    own preparation stages; ``train_data``: a dataset re-training uses instead of the data its
    config names (tests); ``context``: anything else the study's own hooks need.
    """
    bases: dict[str, Base]
    loaders: dict[str, Any]
    identity: list = field(default_factory=list)
    setup: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    train_data: Any = None
    context: dict = field(default_factory=dict)


def row_weights(row: dict, bases: dict[str, Base]) -> dict[str, Any]:
    """The :func:`~vimerge.models.create_backbone` weight arguments of a finished row (its
    ``results.json`` dict): its re-trained checkpoint, else its model's base weights."""
    if "retrain" in row:
        return {"checkpoint": str(Path(row["retrain"]["run_dir"]) / "final.pth")}
    return bases[row["model"]].weights()


def build_model(row: dict, bases: dict[str, Base]) -> torch.nn.Module:
    """A finished row's model: its weights (:func:`row_weights`) with its reduction, eval mode."""
    net = create_backbone(row["model"], **row_weights(row, bases))
    apply(net, row["reduce"])
    return net.eval()


class Study:
    """A study: subclass it, set the class attributes and implement the hooks marked "required".

    Attributes:
        name: short name, ``results["study"]`` (``"image"``, ``"video"``).
        title: the heading of ``report.md``.
        unit: what one test item is (``"image"``, ``"clip"``), for tables and sentences.
        families: family -> label, in the order tables and plots list them.
        plan: a frozen dataclass of what is measured (part of the fingerprint).
        timing: the throughput protocol's rounds and batch (:class:`~vimerge.demo.timing.TimingPlan`).
        quick: a ``--quick`` run (said in the report).
    """
    name: str = ""
    title: str = ""
    unit: str = "image"
    families: dict[str, str] = {}
    plan: Any = None
    timing: TimingPlan = TimingPlan()
    quick: bool = False

    # ------------------------------------------------------------------ required
    def prepare(self, *, progress: bool) -> Prepared:
        """Load the data and the base weights (raising with the fix when missing)."""
        raise NotImplementedError

    def rows(self) -> list[Row]:
        """Every row, in the order they run (training-free first by convention)."""
        raise NotImplementedError

    def eval_command(self, row: Row, prepared: Prepared, checkpoint: str | None) -> str:
        """The ``vimerge eval`` command that reproduces ``row`` (``checkpoint``: its re-trained
        weights, None for the base weights)."""
        raise NotImplementedError

    def claims(self, rows: list[dict], prepared: Prepared) -> list[dict]:
        """A verdict per claim (:mod:`vimerge.demo.stats`), from the finished rows."""
        raise NotImplementedError

    def figures(self, rows: list[dict], prepared: Prepared, out: Path) -> list[tuple[str, str]]:
        """Draw the figures into ``out``; returns ``(file name, caption)`` for each."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional
    def retrain_config(self, row: Row, prepared: Prepared, run_dir: Path, *, progress: bool) -> RetrainConfig:
        """The re-training of a ``retrain`` row (``output=run_dir``, ``resume=True``): required
        when the study has re-trained rows."""
        raise NotImplementedError(f"{type(self).__name__} has re-trained rows but no retrain_config")

    def retrain_facts(self, row: Row, prepared: Prepared, config: RetrainConfig) -> dict:
        """Facts recorded with a re-trained row besides the run's own (e.g. the training items)."""
        return {}

    def intro(self, results: dict) -> str:
        """The report's first paragraph (model, data, base weights)."""
        return ""

    def statistic_note(self) -> str:
        """A sentence added to the report's description of the paired statistic."""
        return ""

    def sections(self, results: dict) -> list[str]:
        """The report's study-specific sections (markdown lines), after the claims."""
        return []

    def figure_notes(self) -> str:
        """A paragraph under the report's figures."""
        return ""

    def summary(self, results: dict) -> list[str]:
        """What the terminal shows before the claims (default: nothing; the runner adds the
        table of every row)."""
        return []

    def plan_dict(self) -> dict:
        """The plan as JSON (``results["setup"]["plan"]``, the fingerprint)."""
        return asdict(self.plan) if is_dataclass(self.plan) else dict(self.plan or {})


__all__ = ["INTERVAL", "Row", "Prepared", "Study", "row_weights", "build_model"]
