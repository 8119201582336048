"""The studies' throughput protocol: interleaved rounds, best and median, and the speed-up
against the unreduced row timed in the same round (as ``benchmarks/video.py`` times its rows).

One timing of one row swings with whatever else runs on the machine (on the shared development
VM a single pass printed 0.41x for one reduced row and 1.40x for the next). So every row is
timed in each of ``rounds`` rounds, one forward of a fixed batch per row per round, and every
round times all rows, the unreduced ones included, one after the other: a busy spell slows the
rows of that round alike. Per row:

* ``best``: items per second of its fastest round, ``median``: of its median round;
* ``speedup``: the median over rounds of ``unreduced seconds / row seconds``, both from the
  same round (the unreduced row of the row's own model); ``speedups``: every round's ratio.

Before the rounds every row runs ``warmup`` untimed forwards (kernel compilation, allocator
growth). The forwards and the clock are passed in, so the arithmetic is tested on a fake clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TimingPlan:
    """How rows are timed: ``rounds`` interleaved rounds of one forward of ``batch`` items per
    row, after ``warmup`` untimed forwards per row. Raises ValueError for counts below 1 (0 for
    ``warmup``)."""
    rounds: int = 3
    batch: int = 64
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.batch < 1 or self.warmup < 0:
            raise ValueError(f"a timing plan needs rounds >= 1, batch >= 1 and warmup >= 0, got {self}")


def time_rows(forwards: Mapping[str, Callable[[], object]], baselines: Mapping[str, str | None],
              items: Mapping[str, int], plan: TimingPlan, clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Time every row's forward in interleaved rounds.

    Args:
        forwards: row key -> a callable running one forward of the row's model on its batch
            (timed in this order within each round).
        baselines: row key -> the key of the unreduced row its speed-up is measured against
            (None: no speed-up; a baseline's own speed-up is 1).
        items: row key -> images or clips in its forward's batch (``plan.batch``, or fewer when
            the data has fewer).
        plan: rounds and warm-up.
        clock: seconds (``time.perf_counter``).

    Returns:
        row key -> ``{"seconds": [per round], "best", "median"`` (items per second),
        ``"speedup"`` (median over rounds of the row's items per second over its baseline's in
        the same round, None without a baseline), ``"speedups"`` (per round), ``"batch"``
        (items), ``"rounds"``}``.
    """
    missing = {b for b in baselines.values() if b is not None} - set(forwards)
    if missing:
        raise ValueError(f"baseline row(s) {sorted(missing)} are not among the timed rows")
    for forward in forwards.values():
        for _ in range(plan.warmup):
            forward()
    seconds: dict[str, list[float]] = {key: [] for key in forwards}
    for _ in range(plan.rounds):
        for key, forward in forwards.items():
            start = clock()
            forward()
            seconds[key].append(clock() - start)
    out = {}
    for key, times in seconds.items():
        base = baselines.get(key)
        n = items[key]
        ratios = ([(n / t) / (items[base] / b) for b, t in zip(seconds[base], times)] if base is not None else [])
        out[key] = {"seconds": times, "best": n / min(times), "median": n / statistics.median(times),
                    "speedup": statistics.median(ratios) if ratios else None, "speedups": ratios,
                    "batch": n, "rounds": plan.rounds}
    return out


def protocol_text(plan: TimingPlan, unit: str) -> str:
    """The protocol in one paragraph, for a report (``unit``: "image" or "clip")."""
    return (f"Throughput: every row's model (its weights and reduction) is timed on the same batch of "
            f"{plan.batch} test {unit}s, fp32, one forward per row per round, in {plan.rounds} interleaved "
            f"rounds after {plan.warmup} untimed forward(s) per row; every round times all rows, the unreduced "
            f"ones included, so a busy spell of the machine slows a round's rows alike. {unit}s/s: the fastest "
            f"round (the median round in brackets); speed-up: the median over rounds of the unreduced row's "
            f"seconds over the row's, both from the same round and the same model.")


__all__ = ["TimingPlan", "time_rows", "protocol_text"]
