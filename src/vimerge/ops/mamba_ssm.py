"""mamba_ssm's compiled selective scan as a backend, for users who already have a working build.

``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (state-spaces/mamba, CUDA) has our
signature and semantics (u, delta, z (b, d, L); A (d, n); B, C (b, n, L); D, delta_bias (d,);
``delta_bias`` then softplus, the ``D`` skip, the ``silu(z)`` gate), so the backend calls it
once per scan direction with the fp32 tensors the dispatcher hands it and returns fp32.

mamba_ssm is imported lazily, at the first ``check`` or call (importing it pulls in its whole
package), and the outcome is cached; :func:`reset` forgets it (after installing mamba_ssm in a
running process, or in tests).

``auto`` on CUDA prefers it over the other CUDA backends only when it is *measured* faster:
on the first ``auto`` resolution for a CUDA tensor, one forward+backward at a small Vim-S-like
shape (b 4, d 768, n 16, L 197; one warm-up, median of 3) is timed for mamba_ssm and for the
best other usable CUDA backend (``triton``, else ``chunked``); the verdict is cached for the
process and logged on the ``vimerge`` logger (:func:`timings` returns the figures). The
environment variable ``VIMERGE_PREFER_MAMBA_SSM`` (``1`` or ``0``, read at that first use)
skips the measurement and decides. Naming it, ``backend="mamba_ssm"``, always uses it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .reference import selective_scan_reference
from .registry import _BACKENDS, Backend, register_backend

PREFER_ENV = "VIMERGE_PREFER_MAMBA_SSM"
PRIORITY = 3           # above triton (2) and chunked (1) when preferred
TIMING_SHAPE = dict(b=4, d=768, n=16, L=197)

log = logging.getLogger("vimerge")
_STATE: dict[str, object] = {}   # "fn", "reason" (import); "prefer", "timings" (auto on CUDA)


def reset() -> None:
    """Forget the cached import of mamba_ssm and the cached ``auto`` verdict."""
    _STATE.clear()


def _load() -> tuple[Callable[..., Tensor] | None, str | None]:
    """(selective_scan_fn, None) when mamba_ssm's compiled scan imports, else (None, reason)."""
    if "reason" not in _STATE:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            _STATE.update(fn=selective_scan_fn, reason=None)
        except Exception as exc:  # missing, or a build that does not load (ABI, CUDA version)
            _STATE.update(fn=None, reason=(
                f"mamba_ssm's compiled selective scan is not importable ({type(exc).__name__}: "
                f"{exc}); pip install mamba-ssm (a CUDA build), or use 'triton'"))
    return _STATE["fn"], _STATE["reason"]  # type: ignore[return-value]


def _check() -> str | None:
    return _load()[1]


def selective_scan_mamba_ssm(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Tensor | None = None, z: Tensor | None = None,
                             delta_bias: Tensor | None = None,
                             delta_softplus: bool = False) -> Tensor:
    """One direction of the selective scan by ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u, delta, z: (b, d, L) fp32.  A: (d, n).  B, C: (b, n, L).  D, delta_bias: (d,).
    Returns:
        (b, d, L) fp32, :func:`vimerge.ops.reference.selective_scan_reference`'s result.
    """
    fn, reason = _load()
    if fn is None:
        raise RuntimeError(f"scan backend 'mamba_ssm' is not usable here: {reason}")
    if u.shape[-1] == 0:   # the CUDA kernel is not launched for an empty sequence
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out = fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
             return_last_state=False)
    return out.float()


def _time_fwd_bwd(fn: Callable[..., Tensor], repeats: int = 3) -> float:
    """Median seconds of one forward+backward of ``fn`` at ``TIMING_SHAPE`` on the current GPU."""
    b, d, n, L = (TIMING_SHAPE[k] for k in ("b", "d", "n", "L"))
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-torch.rand(d, n, device="cuda", generator=g) * 4 - 0.1,
             B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.5)
    x = {k: v.requires_grad_() for k, v in x.items()}
    times = []
    with torch.enable_grad(), torch.autocast("cuda", enabled=False):
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn(**x, delta_softplus=True).sum().backward()
            torch.cuda.synchronize()
            if i:  # the first run compiles / warms up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure() -> bool:
    """Time mamba_ssm against the best other usable CUDA backend; True when mamba_ssm wins."""
    others = sorted((be for name, be in _BACKENDS.items()
                     if name != "mamba_ssm" and "cuda" in be.auto_priority),
                    key=lambda be: -be.auto_priority["cuda"])
    rival = next((be for be in others if be.check() is None), None)
    if rival is None:
        return True
    mine = _time_fwd_bwd(selective_scan_mamba_ssm)
    theirs = _time_fwd_bwd(rival.fn)
    _STATE["timings"] = {"mamba_ssm": mine, rival.name: theirs}
    log.info("vimerge: selective scan fwd+bwd at %s: mamba_ssm %.2f ms, %s %.2f ms; auto on "
             "CUDA uses %s", TIMING_SHAPE, mine * 1e3, rival.name, theirs * 1e3,
             "mamba_ssm" if mine < theirs else rival.name)
    return mine < theirs


def prefer_on_cuda() -> bool:
    """Whether ``auto`` picks mamba_ssm for CUDA tensors (decided once; see the module doc)."""
    if "prefer" not in _STATE:
        env = os.environ.get(PREFER_ENV)
        if env is not None and env.strip():
            verdict = env.strip().lower() in ("1", "true", "yes", "on")
        elif _load()[0] is None or not torch.cuda.is_available():
            verdict = False
        elif torch.cuda.is_current_stream_capturing():
            return False   # no timing inside a CUDA graph capture; decide on a later call
        else:
            try:
                verdict = _measure()
            except Exception as exc:  # a broken build must not break auto
                log.warning("vimerge: timing mamba_ssm failed (%s: %s); auto will not use it",
                            type(exc).__name__, exc)
                verdict = False
        _STATE["prefer"] = verdict
    return bool(_STATE["prefer"])


def timings() -> dict[str, float]:
    """The seconds measured for ``auto``'s choice on CUDA (empty until measured)."""
    return dict(_STATE.get("timings", {}))  # type: ignore[arg-type]


class _MeasuredPriority(dict):
    """``auto_priority`` holding ``"cuda"`` only while :func:`prefer_on_cuda` says so.

    The dispatcher asks ``device in auto_priority`` and then ``auto_priority[device]``, so the
    measurement happens on the first ``auto`` resolution for a CUDA tensor, never on CPU.
    """

    def __contains__(self, device: object) -> bool:
        return device == "cuda" and prefer_on_cuda()

    def __getitem__(self, device: str) -> int:
        if device in self:
            return PRIORITY
        raise KeyError(device)

    def get(self, device: str, default: int | None = None) -> int | None:  # type: ignore[override]
        return self[device] if device in self else default

    def __repr__(self) -> str:
        return f"{{'cuda': {PRIORITY}}} if measured faster"


register_backend(Backend("mamba_ssm", selective_scan_mamba_ssm, frozenset({"cuda"}),
                         check=_check, auto_priority=_MeasuredPriority()))
