"""Deprecated alias of :mod:`vimerge.train.rundir` (the run directory and its resume state),
kept for one release: the module was renamed so that ``checkpoint`` names one module only,
:mod:`vimerge.models.checkpoint` (weights I/O). Importing it warns (DeprecationWarning)."""

from __future__ import annotations

import warnings

from .rundir import (  # noqa: F401  (the names of the old module)
    RUN_FILES,
    NothingToResume,
    RunDirError,
    load_retrained,
    prepare_run_dir,
    rng_state,
    set_rng_state,
    write_json,
)

warnings.warn("vimerge.train.checkpoint is deprecated and will be removed in the next release: use "
              "vimerge.train.rundir (load_retrained: vimerge.train.load_retrained)", DeprecationWarning, stacklevel=2)
