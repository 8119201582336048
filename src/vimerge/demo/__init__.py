"""The token-reduction study on Fashion-MNIST, from one call (``vimerge demo`` on the command line).

The small-scale counterpart of the papers' main tables, on real data and a laptop CPU:

1. the base model: the shipped ``vim_fmnist`` weights (``checkpoint`` to use others; when
   neither exists, it is trained with ``vimerge train``'s recipe into the cache, resumably);
2. training-free rows on the test set: the unreduced baseline; pruning, R-MeeTo merging and
   R-MeeTo with the odd-even shuffle (the token-order ablation, R-MeeTo Table 4) at reduction
   ratios 0.14 / 0.28 / 0.42 / 0.54; STM as BNNM and BNNM+HSP at the same mean-token ratios and
   at its own 15 / 20 / 30 / 40 % settings;
3. R-MeeTo re-trained for a short fixed budget at 0.28 and 0.54;
4. outputs: ``results.json``, ``report.md`` (tables and a verdict per paper claim),
   ``accuracy_vs_ratio.png``, ``accuracy_vs_speed.png`` and ``merged_tokens.png``.

``vimerge demo --video`` (:mod:`.video`, clips made by :mod:`.clips`) runs the same kind of
study on VideoMamba clips of moving Fashion-MNIST garments (R-MeeTo Tables 13-14, App. D.5).

Modules: :mod:`.plan` (what is measured: the plan and its rows, each a reduction spec),
:mod:`.run` (base model, rows, re-training, resumable store, provenance, :func:`run_demo`),
:mod:`.report` (paired statistic, claims, tables, ``report.md``, plots, merged-token figure).
"""

from .plan import FAMILIES, FULL, INTERVAL, MODEL, QUICK, Plan, RowSpec, plan_rows
from .report import claims, correct_mask, rows_table, write_report
from .run import Base, cache_dir, eval_command, resolve_base, run_demo, summary
from .video import VIDEO_FULL, VIDEO_QUICK, VideoPlan, run_video_demo, video_summary

__all__ = ["run_demo", "plan_rows", "resolve_base", "claims", "summary", "Plan", "FULL", "QUICK",
           "FAMILIES", "RowSpec", "Base", "MODEL", "INTERVAL", "cache_dir", "eval_command",
           "correct_mask", "rows_table", "write_report", "run_video_demo", "video_summary", "VideoPlan",
           "VIDEO_FULL", "VIDEO_QUICK"]
