"""Throughput of a (token-reduced) model: the R-MeeTo paper's Table 12 protocol, on any machine.

:func:`measure` times the forward pass on random images (warm-up, then repeated timed runs;
median and spread) and reports images/s, peak memory and the share of the time spent in the
reduction itself. ``vimerge bench`` (``vimerge/cli/bench.py``) runs it at several ratios.

Peak memory is measured the same way for every row, whatever ran before: the warm-up runs
first, then the counter is reset (CUDA: ``reset_peak_memory_stats``, peak of the allocated
bytes during the timed runs; CPU: the freed heap is returned to the OS, the resident-set
high-water mark reset, and the peak is its rise above the resident set at the start of the
timed runs). One-time costs (kernel compilation, thread pools) fall in the warm-up, not in a
row's peak; run :func:`warm_up` on every configuration first when comparing several.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..tokens import input_shape
from .memory import reset_peak, rss_mb, trim_heap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ReduceTimer:
    """Wraps a reducer's ``reduce`` to add up the time spent in it."""

    def __init__(self, reducer, device: torch.device):
        self.reducer, self.device, self.seconds = reducer, device, 0.0
        self.inner = reducer.reduce

        def timed(state, model):
            _sync(device)
            start = time.perf_counter()
            out = self.inner(state, model)
            _sync(device)
            self.seconds += time.perf_counter() - start
            return out

        reducer.reduce = timed

    def restore(self) -> None:
        self.reducer.reduce = self.inner


def _runner(model, batch_size: int, dtype: str, dev: torch.device):
    images = torch.randn(input_shape(model, batch_size), device=dev)     # images, or clips of a video model
    autocast = torch.autocast(dev.type, dtype=DTYPES[dtype]) if dtype != "fp32" else None

    def run() -> None:
        with torch.inference_mode():
            if autocast is not None:
                with autocast:
                    model(images)
            else:
                model(images)
        _sync(dev)
    return run


def warm_up(model, *, batch_size: int, dtype: str = "fp32", device: str = "cpu") -> None:
    """One untimed forward of ``model`` (with its active reduction) on random images."""
    _runner(model, batch_size, dtype, torch.device(device))()


def measure(model, *, batch_size: int, dtype: str = "fp32", device: str = "cpu", warmup: int = 1,
            repeats: int = 5) -> dict:
    """Time ``model`` (with its active reduction) on random images; returns one table row.

    ``warmup`` untimed forwards, then the peak-memory counter is reset and ``repeats`` timed
    forwards run (see the module docstring for how the peak is measured).
    """
    dev = torch.device(device)
    run = _runner(model, batch_size, dtype, dev)
    for _ in range(warmup):
        run()
    timer = _ReduceTimer(model.reduction, dev) if model.reduction is not None else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    trim_heap()
    base = rss_mb("VmRSS") if dev.type == "cpu" else None
    exact = dev.type == "cpu" and reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if timer is not None:
        reduce_share = timer.seconds / sum(times)
        timer.restore()
    else:
        reduce_share = 0.0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = (rss_mb("VmHWM") - base) if exact and base is not None else None
    med = statistics.median(times)
    return dict(img_s=batch_size / med, img_s_min=batch_size / max(times), img_s_max=batch_size / min(times),
                batch_ms=med * 1e3, reduce_share=reduce_share, peak_mb=peak)


__all__ = ["measure", "warm_up", "DTYPES"]
