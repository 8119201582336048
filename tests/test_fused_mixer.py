"""The fused CPU mixer (vimerge.ops.fused_mixer, issue 24 item 1) against the step-by-step mixer.

The step-by-step path (nn.Conv1d, flip, x_proj, dt_proj, the reference scan loop, flip back)
is the independent expectation: every test runs the same weights through both and compares
values (1e-5), gradients of every parameter and of the input (1e-4) and the scan records a
reducer reads.
"""

import pytest
import torch

import vimerge
from vimerge.models import mamba as vim_module
from vimerge.models.mamba import BiMambaMixer
from vimerge.ops import Direction, fused_bimamba_v2, fused_mixer_reason

pytest.importorskip("numba")

FWD_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)


def _mixer(width: int, d_state: int, average: bool) -> BiMambaMixer:
    """A mixer whose every parameter is moved off its initial value (conv biases, D, ... not
    trivially 0 or 1), so that a wrong term in either direction shows."""
    mixer = BiMambaMixer(width, d_state=d_state, average=average)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return mixer


def _run(mixer: BiMambaMixer, hidden: torch.Tensor, fused: bool, backend: str):
    mixer.fused, mixer.scan_backend = fused, backend
    x = hidden.clone().requires_grad_()
    out = mixer(x)
    grads = torch.autograd.grad(out, [x, *mixer.parameters()], torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), dict(zip(["input", *(n for n, _ in mixer.named_parameters())], grads))


# (batch, tokens, width, d_state, average): odd lengths, L = 1, L = 2 (fewer tokens than the
# conv's 4 taps), batch 1, Vim's average and VideoMamba's sum; width 40 gives d_inner 80, more
# than one 32-channel block of the backward kernel and not a multiple of it.
SHAPES = [(2, 7, 16, 4, True), (1, 1, 16, 4, True), (1, 2, 8, 3, False), (3, 13, 40, 16, True),
          (2, 50, 24, 16, False)]


@pytest.mark.parametrize("batch,tokens,width,d_state,average", SHAPES)
def test_fused_matches_step_by_step_values_and_gradients(batch, tokens, width, d_state, average):
    mixer = _mixer(width, d_state, average)
    hidden = torch.randn(batch, tokens, width)
    ref_out, ref_grads = _run(mixer, hidden, fused=False, backend="reference")
    out, grads = _run(mixer, hidden, fused=True, backend="numba")
    assert out.shape == (batch, tokens, width)
    torch.testing.assert_close(out, ref_out, **FWD_TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == 1 + len(list(mixer.parameters()))
    for name, g in grads.items():
        if tokens > 1:                      # (at L = 1 the state starts at 0: A gets none)
            assert g.abs().max() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(g, ref_grads[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_matches_the_unfused_numba_scan():
    """The same mixer with the unfused numba scan (what the model ran before) agrees too."""
    mixer = _mixer(16, 8, True)
    hidden = torch.randn(2, 9, 16)
    ref_out, ref_grads = _run(mixer, hidden, fused=False, backend="numba")
    out, grads = _run(mixer, hidden, fused=True, backend="numba")
    torch.testing.assert_close(out, ref_out, **FWD_TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **GRAD_TOL)


def test_fused_path_is_taken_on_cpu_with_numba(monkeypatch):
    """With the default backend the mixer never calls the step-by-step scan; with another
    backend, or ``fused = False``, it does."""
    calls = []
    real = vim_module.selective_scan
    monkeypatch.setattr(vim_module, "selective_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    mixer = _mixer(8, 4, True)
    hidden = torch.randn(1, 5, 8)
    for backend in ("auto", "numba"):
        assert fused_mixer_reason(hidden, backend) is None
        mixer.scan_backend = backend
        mixer(hidden)
    assert calls == []
    mixer.scan_backend = "reference"
    assert "not numba" in fused_mixer_reason(hidden, "reference")
    mixer(hidden)
    assert len(calls) == 2                  # one per direction
    mixer.scan_backend, mixer.fused = "numba", False
    mixer(hidden)
    assert len(calls) == 4


def test_record_path_gives_the_step_by_step_records():
    mixer = _mixer(16, 4, True)
    hidden = torch.randn(2, 11, 16)
    records = []
    for fused, backend in ((False, "reference"), (True, "numba")):
        mixer.fused, mixer.scan_backend, mixer.record = fused, backend, True
        with torch.no_grad():
            mixer(hidden)
        records.append(mixer.last_record)
    ref, got = records
    assert got is not None
    torch.testing.assert_close(got.output, ref.output, **FWD_TOL)
    for r, g in ((ref.forward, got.forward), (ref.backward, got.backward)):
        for field in ("delta", "B", "C", "A", "delta_bias"):
            assert getattr(g, field).shape == getattr(r, field).shape, field
            torch.testing.assert_close(getattr(g, field), getattr(r, field), **FWD_TOL)
        torch.testing.assert_close(g.dt(), r.dt(), **FWD_TOL)


def test_bad_input_names_the_expected_shape():
    mixer = _mixer(8, 4, True)
    with pytest.raises(ValueError, match=r"xz must be \(batch, tokens, 32\)"):
        fused_bimamba_v2(torch.randn(1, 3, 30), *_directions(mixer), d_state=4)


def _directions(mixer):
    return [Direction(getattr(mixer, "conv1d" + s).weight, getattr(mixer, "conv1d" + s).bias,
                      getattr(mixer, "x_proj" + s).weight, getattr(mixer, "dt_proj" + s).weight,
                      getattr(mixer, "dt_proj" + s).bias, getattr(mixer, a), getattr(mixer, "D" + s))
            for s, a in (("", "A_log"), ("_b", "A_b_log"))]


def _set_fused(model, fused: bool) -> None:
    for block in model.layers:
        block.mixer.fused = fused


@pytest.mark.parametrize("spec", ["none", "rmeeto:r=4"])
def test_vim_fmnist_logits_agree_on_the_shipped_weights(spec, monkeypatch):
    """End to end on the shipped checkpoint: both paths give the same logits (and, with
    R-MeeTo, which reads the recorded scans, the same merges); the default path is the fused
    one (the step-by-step scan is never called), the other calls it twice per block."""
    calls = []
    real = vim_module.selective_scan
    monkeypatch.setattr(vim_module, "selective_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = vimerge.create_model("vim_fmnist", pretrained=True, reduce=spec).eval()
    assert model.scan_backend == "auto"
    images = torch.randn(4, 1, 28, 28)
    logits = []
    for fused in (False, True):
        _set_fused(model, fused)
        calls.clear()
        with torch.inference_mode():
            logits.append(model(images))
        assert len(calls) == (0 if fused else 2 * model.depth)
    torch.testing.assert_close(logits[1], logits[0], **FWD_TOL)
    assert not torch.equal(logits[0][0], logits[0][1])     # distinct images, distinct logits


def test_fused_path_under_bf16_autocast():
    """Under CPU autocast the projections run in bf16; the fused kernels get fp32 copies and the
    result stays within bf16 rounding of the fp32 one (as the step-by-step path does)."""
    mixer = _mixer(16, 4, True)
    hidden = torch.randn(2, 9, 16)
    with torch.no_grad():
        ref = mixer(hidden)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = mixer(hidden).float()
            mixer.fused = False
            low_step = mixer(hidden).float()
    assert float((low - ref).norm() / ref.norm()) < 0.05
    assert float((low - low_step).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("d_state", [4, 16])
def test_gaps_inference_matches_step_by_step(d_state, monkeypatch):
    """ToP-ViM's alignment (gaps: pruned positions before/after each token) through the fused
    kernels under no_grad agrees with the step-by-step mixer's ``decay_scale`` path (reference
    scan), and takes no step-by-step scan; with gradients the mixer stays step by step."""
    mixer = _mixer(24, d_state, True)
    hidden = torch.randn(3, 13, 24)
    gaps = torch.randint(0, 4, (3, 13, 2))
    mixer.fused, mixer.scan_backend = False, "reference"
    with torch.no_grad():
        ref = mixer(hidden, gaps)
        plain = mixer(hidden)
    calls = []
    real = vim_module.selective_scan
    monkeypatch.setattr(vim_module, "selective_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    mixer.fused, mixer.scan_backend = True, "numba"
    with torch.no_grad():
        got = mixer(hidden, gaps)
    assert calls == []
    torch.testing.assert_close(got, ref, **FWD_TOL)
    assert (got - plain).abs().max() > 1e-3            # the gaps change the output
    out = mixer(hidden, gaps)                          # with autograd: the step-by-step path
    assert len(calls) == 2
    torch.testing.assert_close(out.detach(), ref, **FWD_TOL)


def test_stretch_is_refused_with_gradients_or_a_wrong_shape():
    mixer = _mixer(8, 4, True)
    xz = torch.randn(1, 5, 32, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        fused_bimamba_v2(xz, *_directions(mixer), d_state=4, stretch=torch.ones(1, 2, 5))
    with torch.no_grad(), pytest.raises(ValueError, match=r"stretch must be \(batch, 2, tokens\) = \(1, 2, 5\)"):
        fused_bimamba_v2(xz, *_directions(mixer), d_state=4, stretch=torch.ones(1, 5, 2))
