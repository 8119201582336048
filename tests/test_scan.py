"""Every selective-scan backend against the reference loop, and the dispatcher."""

import warnings

import pytest
import torch

from scan_cases import make_inputs, rel_err, scan_loop_float64
from vimerge.ops import available_backends, selective_scan
from vimerge.ops import dispatch as scan_module
from vimerge.ops.reference import selective_scan_reference

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "reference"]   # every registered backend


def test_reference_matches_independent_float64_loop():
    x = make_inputs(2, 3, 4, 33)
    out = selective_scan_reference(**x, delta_softplus=True)
    assert rel_err(out, scan_loop_float64(**x, delta_softplus=True)) < 1e-6


def test_hand_computed_two_steps():
    # d = n = 1, A = -1, delta = 1 (no softplus), B = C = 1, u = (1, 2):
    # h1 = 1 * 1 = 1, y1 = 1; h2 = e^-1 * 1 + 2 = 2.3679, y2 = 2.3679 (+ D*u with D=0.5)
    u = torch.tensor([[[1.0, 2.0]]])
    ones = torch.ones(1, 1, 2)
    out = selective_scan(u, ones, -torch.ones(1, 1), ones, ones, D=torch.tensor([0.5]),
                         backend="reference")
    expected = torch.tensor([[[1.0 + 0.5, torch.e ** -1 + 2.0 + 1.0]]])
    torch.testing.assert_close(out, expected)


def run_with_gradients(x: dict, backend: str, softplus: bool = True):
    """The reference and ``backend`` on their own copies of the inputs ``x``, the same random
    output gradient back-propagated through both: (out, ref, backend inputs, reference inputs),
    the inputs' ``.grad`` filled."""
    ref_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    be_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    ref = selective_scan(**ref_in, delta_softplus=softplus, backend="reference")
    out = selective_scan(**be_in, delta_softplus=softplus, backend=backend)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    return out, ref, be_in, ref_in


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L", [1, 2, 7, 64, 197, 1000])
@pytest.mark.parametrize("n", [4, 16])   # 16: the numba kernels' fixed-size state path (N_STATE)
def test_backend_matches_reference(backend, L, n):
    out, ref, be_in, ref_in = run_with_gradients(make_inputs(2, 3, n, L, seed=L), backend)
    assert rel_err(out, ref) < 1e-5
    for name in NAMES:
        if L == 1 and name == "A":  # h_0 = 0, so dA is exactly zero for one step
            assert ref_in[name].grad.abs().max() == 0
            continue
        assert rel_err(be_in[name].grad, ref_in[name].grad) < 1e-4, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_without_optional_inputs(backend):
    x = make_inputs(2, 3, 4, 20)
    for k in ("D", "z", "delta_bias"):
        x.pop(k)
    ref = selective_scan(**x, backend="reference")
    out = selective_scan(**x, backend=backend)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,L", [(4, 20), (16, 197)])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("gate", [False, True])
def test_backend_gradients_with_and_without_the_gate(backend, n, L, softplus, gate):
    """Without z the numba backward skips y in its recompute pass (the fused mixer's case);
    both paths compute the per-step gradients in flat loops, with or without softplus."""
    x = make_inputs(2, 3, n, L, seed=n + L)
    if not gate:
        x.pop("z")
    if not softplus:      # keep delta + bias positive, as a time step must be
        x["delta"] = x["delta"].abs() + 0.1
        x["delta_bias"] = x["delta_bias"].abs()
    out, ref, be_in, ref_in = run_with_gradients(x, backend, softplus)
    assert rel_err(out, ref) < 1e-5
    for name in ref_in:
        assert rel_err(be_in[name].grad, ref_in[name].grad) < 1e-4, name


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("delta_scale,bias", [(50.0, 30.0), (1e-4, -30.0)])
def test_long_sequences_and_extreme_deltas_stay_finite(backend, delta_scale, bias):
    x = make_inputs(1, 2, 16, 4096, delta_scale=delta_scale)
    x["delta_bias"] = torch.full((2,), bias)
    x["A"] = x["A"] * 4  # down to about -16, so exp(delta * A) underflows to 0
    inputs = {k: v.clone().requires_grad_() for k, v in x.items()}
    out = selective_scan(**inputs, delta_softplus=True, backend=backend)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name in NAMES:
        assert torch.isfinite(inputs[name].grad).all(), name
    if backend != "reference":
        ref = selective_scan(**x, delta_softplus=True, backend="reference")
        assert rel_err(out.detach(), ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_delta_across_the_softplus_range(backend):
    # raw time steps from -25 to 25 cross softplus' exp tail and its linear threshold (20)
    x = make_inputs(1, 3, 4, 101)
    x["delta"] = torch.linspace(-25, 25, 101).repeat(1, 3, 1)
    x["delta_bias"] = torch.tensor([0.0, 0.3, -0.3])
    x["A"] = x["A"] * 0.01  # keep some memory even at dt = 25
    ref_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    be_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    ref = selective_scan(**ref_in, delta_softplus=True, backend="reference")
    out = selective_scan(**be_in, delta_softplus=True, backend=backend)
    assert rel_err(out, ref) < 1e-5
    ref.sum().backward()
    out.sum().backward()
    for name in ("delta", "delta_bias", "u"):
        assert rel_err(be_in[name].grad, ref_in[name].grad) < 1e-4, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_inputs_compute_in_fp32(backend):
    x = make_inputs(2, 3, 4, 16)
    half = {k: v.bfloat16() for k, v in x.items()}
    out = selective_scan(**half, delta_softplus=True, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = selective_scan(**{k: v.float() for k, v in half.items()}, delta_softplus=True,
                         backend="reference")
    assert rel_err(out.float(), ref) < 1e-2  # only the final cast to bf16 loses precision


def test_auto_prefers_numba_on_cpu_and_falls_back_with_a_notice(monkeypatch):
    assert "reference" in available_backends()
    if "numba" in available_backends("cpu"):
        assert scan_module.resolve_backend("auto", "cpu").name == "numba"
    numba_backend = scan_module._BACKENDS["numba"]
    monkeypatch.setattr(numba_backend, "check", lambda: "numba missing (simulated)")
    monkeypatch.setattr(scan_module, "_NOTICED", set())
    assert "numba" not in available_backends("cpu")
    x = make_inputs(1, 2, 3, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = selective_scan(**x, delta_softplus=True)
        selective_scan(**x, delta_softplus=True)
    notices = [w for w in caught if issubclass(w.category, scan_module.ScanBackendNotice)]
    assert len(notices) == 1 and "recompute" in str(notices[0].message)
    assert rel_err(out, selective_scan_reference(**x, delta_softplus=True)) < 1e-5
    with pytest.raises(RuntimeError, match="not usable"):
        selective_scan(**x, backend="numba")


def test_bad_inputs_give_clear_errors():
    x = make_inputs(2, 3, 4, 8)
    with pytest.raises(ValueError, match="unknown scan backend 'nope'"):
        selective_scan(**x, backend="nope")
    bad = dict(x, B=x["B"][:, :, :5])
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**bad)


def test_device_mismatch_is_reported(monkeypatch):
    gpu_only = scan_module.Backend("gpu_only", selective_scan_reference, frozenset({"cuda"}))
    monkeypatch.setitem(scan_module._BACKENDS, "gpu_only", gpu_only)
    with pytest.raises(ValueError, match="runs on \\['cuda'\\]"):
        selective_scan(**make_inputs(1, 2, 3, 4), backend="gpu_only")
    assert "gpu_only" not in available_backends("cpu")
