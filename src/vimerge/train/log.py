"""The run log: one JSON object a line in ``log.jsonl``, mirrored to TensorBoard when available.

Every record gets a ``time`` (Unix seconds) and carries an ``event`` (``start``, ``resume``,
``step``, ``epoch``, ``stopped``, ``interrupted``, ``nonfinite``, ``end``). TensorBoard receives the numeric
fields of each record as ``<event>/<field>`` scalars at the record's ``step``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Append records to ``path`` (only where ``enabled``: rank 0 of a run).

    ``tensorboard``: None writes TensorBoard logs to ``path.parent / "tb"`` when the
    ``tensorboard`` package is installed; True requires it; False never writes them.
    """

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool | None = None):
        path = Path(path)
        self.enabled = enabled
        self.file = open(path, "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency
                self.tb = SummaryWriter(str(path.parent / "tb"))
            except ImportError:
                if tensorboard:
                    self.close()
                    raise ImportError("tensorboard=True (--tensorboard) needs the tensorboard package: "
                                      "pip install tensorboard") from None

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self.tb.add_scalar(f"{record.get('event', 'x')}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
