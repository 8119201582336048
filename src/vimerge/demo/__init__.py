"""The token-reduction studies (``vimerge demo``), run by one runner.

A study (:class:`~vimerge.demo.study.Study`) states its rows, claims and figures;
:func:`~vimerge.demo.runner.run_study` runs any of them the same way: base weights, the rows
(each a reduction spec, some re-trained first), a resumable store of finished rows, the
throughput protocol (:mod:`.timing`), the paired statistics (:mod:`.stats`), ``results.json``,
``report.md`` and the figures.

* :mod:`.image`: the Fashion-MNIST study on ``vim_fmnist`` and ``deit_fmnist`` (``vimerge demo``):
  pruning, R-MeeTo, R-MeeTo shuffled, STM BNNM and BNNM+HSP, re-training (figures:
  :mod:`.image_figures`);
* :mod:`.video`: the VideoMamba study on clips of moving garments (``vimerge demo --video``,
  clips made and read back by :mod:`.clips`, figures: :mod:`.video_figures`).

Shared parts: :mod:`.study` (the protocol and rows), :mod:`.runner`, :mod:`.base` (base
weights), :mod:`.stats`, :mod:`.timing`, :mod:`.report` (``report.md``, common tables and plots).
"""

from .base import Base, cache_dir, find_base, resolve_base
from .image import FAMILIES, FULL, MODEL, QUICK, TRANSFORMER, ImageStudy, Plan, claims, image_study, plan_rows
from .report import rows_table, summary, write_report
from .runner import run_study
from .stats import compare, compare_claim, correct_bits, correct_mask, drop_comparison, paired, verdict
from .study import INTERVAL, Prepared, Row, Study
from .timing import TimingPlan, time_rows
from .video import VIDEO_FULL, VIDEO_QUICK, VideoPlan, VideoStudy, plan_video_rows, video_study

__all__ = ["Study", "Row", "Prepared", "run_study", "summary", "write_report", "rows_table", "TimingPlan", "time_rows",
           "Base", "cache_dir", "find_base", "resolve_base", "INTERVAL",
           "correct_bits", "correct_mask", "paired", "compare", "drop_comparison", "verdict", "compare_claim",
           "ImageStudy", "image_study", "Plan", "FULL", "QUICK", "FAMILIES", "MODEL", "TRANSFORMER", "plan_rows",
           "claims", "VideoStudy", "video_study", "VideoPlan", "VIDEO_FULL", "VIDEO_QUICK", "plan_video_rows"]
