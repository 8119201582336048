"""The ``mamba_ssm`` backend against a stand-in for mamba_ssm's compiled selective scan.

mamba_ssm needs a CUDA build, so these tests put a module imitating its interface,
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn(u, delta, A, B, C, D=None, z=None,
delta_bias=None, delta_softplus=False, return_last_state=False)``, into ``sys.modules``. The
stand-in records every call and computes with the independent float64 loop of scan_cases.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from scan_cases import make_inputs, rel_err, scan_loop_float64
from vimerge.ops import available_backends, dispatch, resolve_backend, selective_scan
from vimerge.ops import mamba_ssm as backend
from vimerge.ops.registry import _BACKENDS

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


class StandIn:
    """``selective_scan_fn`` as mamba_ssm exposes it, recording its calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
        self.calls.append(dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                               delta_softplus=delta_softplus, return_last_state=return_last_state))
        assert u.dim() == 3 and B.dim() == 3 and C.dim() == 3 and A.dim() == 2
        out = scan_loop_float64(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)
        return out


@pytest.fixture
def stand_in(monkeypatch):
    """Install the stand-in as mamba_ssm; forget the backend's cached import before and after."""
    fn = StandIn()
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = fn
    ops = types.ModuleType("mamba_ssm.ops")
    ops.selective_scan_interface = interface
    pkg = types.ModuleType("mamba_ssm")
    pkg.ops = ops
    for name, module in (("mamba_ssm", pkg), ("mamba_ssm.ops", ops),
                         ("mamba_ssm.ops.selective_scan_interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(backend.PREFER_ENV, raising=False)
    backend.reset()
    yield fn
    backend.reset()


@pytest.fixture
def absent(monkeypatch):
    """mamba_ssm not importable, whatever is installed."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    monkeypatch.delenv(backend.PREFER_ENV, raising=False)
    backend.reset()
    yield
    backend.reset()


@pytest.fixture
def on_cpu_too(monkeypatch):
    """Let the dispatcher hand CPU tensors to the backend (the stand-in computes on CPU)."""
    monkeypatch.setattr(_BACKENDS["mamba_ssm"], "devices", frozenset({"cpu", "cuda"}))


def test_registered_when_present(stand_in):
    assert "mamba_ssm" in available_backends()
    assert "mamba_ssm" in available_backends("cuda")
    assert "mamba_ssm" not in available_backends("cpu")
    assert resolve_backend("mamba_ssm", "cuda").fn is backend.selective_scan_mamba_ssm


def test_absent_gives_a_clear_reason(absent):
    reason = _BACKENDS["mamba_ssm"].check()
    assert reason.startswith("mamba_ssm's compiled selective scan is not importable")
    assert "\n" not in reason and "pip install mamba-ssm" in reason
    assert "mamba_ssm" not in available_backends()
    with pytest.raises(RuntimeError, match="'mamba_ssm' is not usable here: mamba_ssm's compiled"):
        resolve_backend("mamba_ssm", "cuda")
    with pytest.raises(RuntimeError, match="not importable"):
        backend.selective_scan_mamba_ssm(**make_inputs(1, 2, 3, 4))
    assert not backend.prefer_on_cuda()


@pytest.mark.parametrize("L", [1, 13, 64])
def test_one_call_with_our_arguments_and_our_semantics(stand_in, on_cpu_too, L):
    x = make_inputs(2, 3, 4, L, seed=L)
    ref_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    got_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    ref = selective_scan(**ref_in, delta_softplus=True, backend="reference")
    out = selective_scan(**got_in, delta_softplus=True, backend="mamba_ssm")
    assert len(stand_in.calls) == 1
    call = stand_in.calls[0]
    for k in NAMES:   # the very values, fp32, in mamba_ssm's shapes
        assert call[k].dtype == torch.float32, k
        assert call[k].shape == x[k].shape, k
        assert torch.equal(call[k].detach(), x[k]), k
    assert call["delta_softplus"] is True and call["return_last_state"] is False
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for k in NAMES:
        if L == 1 and k == "A":
            continue
        assert rel_err(got_in[k].grad, ref_in[k].grad) < 1e-4, k


def test_optional_inputs_stay_none_and_low_precision_is_cast(stand_in, on_cpu_too):
    x = make_inputs(2, 3, 4, 9)
    for k in ("D", "z", "delta_bias"):
        x.pop(k)
    out = selective_scan(**{k: v.bfloat16() for k, v in x.items()}, backend="mamba_ssm")
    call = stand_in.calls[0]
    assert call["D"] is None and call["z"] is None and call["delta_bias"] is None
    assert call["delta_softplus"] is False and call["u"].dtype == torch.float32
    assert out.dtype == torch.bfloat16
    ref = selective_scan(**{k: v.bfloat16().float() for k, v in x.items()}, backend="reference")
    assert rel_err(out.float(), ref) < 1e-2


def test_empty_sequence_does_not_reach_the_kernel(stand_in, on_cpu_too):
    out = selective_scan(**make_inputs(2, 3, 4, 0), delta_softplus=True, backend="mamba_ssm")
    assert out.shape == (2, 3, 0) and stand_in.calls == []


def test_the_model_calls_it_once_per_direction(stand_in, on_cpu_too, tiny_model):
    model = tiny_model("vim_tiny", depth=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.scan_backend = "reference"
        ref = model(x)
        model.scan_backend = "mamba_ssm"
        out = model(x)
    d_inner, tokens = model.layers[0].mixer.d_inner, model.num_tokens
    assert len(stand_in.calls) == 2 * 2                   # two blocks, two directions each
    for call in stand_in.calls:
        assert call["u"].shape == (2, d_inner, tokens)
        assert call["B"].shape == (2, model.layers[0].mixer.d_state, tokens)
    assert rel_err(out, ref) < 1e-4


def test_auto_never_picks_it_on_cpu(stand_in, on_cpu_too, monkeypatch):
    monkeypatch.setenv(backend.PREFER_ENV, "1")
    assert resolve_backend("auto", "cpu").name != "mamba_ssm"
    selective_scan(**make_inputs(1, 2, 3, 5), delta_softplus=True)
    assert stand_in.calls == []


def test_auto_on_cuda_follows_the_override(stand_in, monkeypatch):
    monkeypatch.setenv(backend.PREFER_ENV, "1")
    assert resolve_backend("auto", "cuda").name == "mamba_ssm"
    backend.reset()
    monkeypatch.setenv(backend.PREFER_ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dispatch.ScanBackendNotice)
        assert resolve_backend("auto", "cuda").name != "mamba_ssm"


@pytest.mark.parametrize("mine,theirs,expected", [(1.0, 2.0, True), (3.0, 2.0, False)])
def test_auto_on_cuda_prefers_it_only_when_measured_faster(stand_in, monkeypatch, mine, theirs,
                                                           expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_BACKENDS["chunked"], "check", lambda: None)
    if "triton" in _BACKENDS:   # the rival is the best other usable CUDA backend
        monkeypatch.setattr(_BACKENDS["triton"], "check", lambda: "simulated: unavailable")
    timed = []

    def fake_time(fn, repeats=3):
        timed.append(fn)
        return mine if fn is backend.selective_scan_mamba_ssm else theirs

    monkeypatch.setattr(backend, "_time_fwd_bwd", fake_time)
    assert backend.prefer_on_cuda() is expected
    assert timed == [backend.selective_scan_mamba_ssm, _BACKENDS["chunked"].fn]
    assert backend.timings() == {"mamba_ssm": mine, "chunked": theirs}
    backend.prefer_on_cuda()
    assert len(timed) == 2                                # measured once, then cached
    monkeypatch.setattr(dispatch, "_NOTICED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dispatch.ScanBackendNotice)
        picked = resolve_backend("auto", "cuda").name
    assert (picked == "mamba_ssm") is expected


def test_a_failing_measurement_keeps_auto_away(stand_in, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def broken(fn, repeats=3):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(backend, "_time_fwd_bwd", broken)
    assert backend.prefer_on_cuda() is False
