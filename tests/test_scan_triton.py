"""The Triton selective scan against the reference loop: on CPU in Triton's interpreter, on CUDA
for real (those tests skip without a GPU).

Triton decides between compiling and interpreting when a kernel is decorated, i.e. when
``vimerge.ops`` is imported, and conftest has imported vimerge before this module runs. So the
Triton side of the CPU tests runs in one subprocess started with ``TRITON_INTERPRET=1``: this
file is also its script (``python test_scan_triton.py IN OUT``). The parent makes the inputs
and the output gradients, the worker runs them through ``selective_scan(..., backend="triton")``
and saves outputs and input gradients, and the parent compares them with the reference loop run
here. Shapes are tiny: the interpreter runs ``tl.associative_scan`` element by element.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scan_cases import make_inputs, rel_err
from vimerge.ops import available_backends, resolve_backend, selective_scan
from vimerge.ops import triton as triton_backend
from vimerge.ops.registry import _BACKENDS

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
HERE = Path(__file__).resolve().parent


def _case(name: str, b: int, d: int, n: int, L: int, *, seed: int = 0, softplus: bool = True,
          dtype: torch.dtype = torch.float32, drop: tuple[str, ...] = (), layout: str = "contiguous",
          blocks: tuple[int, int] | None = None, delta_scale: float = 0.5,
          bias: float | None = None, a_scale: float = 1.0) -> dict:
    x = make_inputs(b, d, n, L, seed=seed, delta_scale=delta_scale)
    if bias is not None:
        x["delta_bias"] = torch.full((d,), bias)
    x["A"] = x["A"] * a_scale
    for k in drop:
        x.pop(k)
    x = {k: v.to(dtype) for k, v in x.items()}
    g = torch.Generator().manual_seed(seed + 1)
    return dict(name=name, inputs=x, softplus=softplus, layout=layout, blocks=blocks,
                grad=torch.randn(b, d, L, generator=g).to(dtype))


def _softplus_range_case() -> dict:
    # raw time steps from -25 to 25 cross softplus' exp tail and its linear threshold (20)
    c = _case("softplus_range", 1, 3, 4, 101, seed=5)
    c["inputs"]["delta"] = torch.linspace(-25, 25, 101).repeat(1, 3, 1)
    c["inputs"]["delta_bias"] = torch.tensor([0.0, 0.3, -0.3])
    c["inputs"]["A"] = c["inputs"]["A"] * 0.01    # keep some memory even at dt = 25
    return c


def _strided_case() -> dict:
    # inputs with the model's strides (see _as_model_passes) and an output gradient with a
    # zero stride, as ``out.sum().backward()`` makes
    c = _case("strided_views", 2, 3, 4, 40, seed=40, layout="model")
    c["grad"] = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(2)).expand(2, 3, 40)
    return c


CASES = [
    _case("L1", 2, 3, 4, 1, seed=1),
    _case("L7", 2, 3, 4, 7, seed=7),
    _case("L33", 2, 3, 4, 33, seed=33),            # three chunks, the last one step long
    _case("L100", 1, 3, 4, 100, seed=100),
    _case("L1500", 1, 2, 2, 1500, seed=1500),      # the longer one: 94 chunks
    _case("huge_delta", 1, 2, 4, 300, seed=3, delta_scale=50.0, bias=30.0, a_scale=4.0),
    _case("tiny_delta", 1, 2, 4, 300, seed=4, delta_scale=1e-4, bias=-30.0, a_scale=4.0),
    _softplus_range_case(),
    _case("no_optional_inputs", 2, 3, 4, 20, seed=20, softplus=False,
          drop=("D", "z", "delta_bias")),
    _strided_case(),
    _case("channel_blocks", 2, 6, 3, 40, seed=41, blocks=(4, 4)),   # 2 blocks, n not a power of 2
    _case("bf16", 2, 3, 4, 20, seed=21, dtype=torch.bfloat16),
]
FP32 = [c["name"] for c in CASES if c["inputs"]["u"].dtype == torch.float32]


def _as_model_passes(t: torch.Tensor) -> torch.Tensor:
    """The same values with the model's strides: (b, L, x) memory seen as (b, x, L)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _run_worker(cases_path: str, out_path: str) -> None:
    """Run every case with the triton backend (in a process with TRITON_INTERPRET=1)."""
    torch.set_num_threads(1)
    results = {"devices": sorted(_BACKENDS["triton"].devices),
               "cpu_backends": available_backends("cpu"),
               "auto_cpu": resolve_backend("auto", "cpu").name,
               "interpret": triton_backend.INTERPRET, "cases": {}, "seconds": {}}
    for case in torch.load(cases_path):
        leaves = {k: v.clone().requires_grad_() for k, v in case["inputs"].items()}
        args = {k: (_as_model_passes(v) if case["layout"] == "model" and v.dim() == 3 else v)
                for k, v in leaves.items()}
        start = time.perf_counter()
        if case["blocks"] is None:
            out = selective_scan(**args, delta_softplus=case["softplus"], backend="triton")
        else:
            out = triton_backend.selective_scan_triton(
                **args, delta_softplus=case["softplus"], block_d=case["blocks"][0],
                block_t=case["blocks"][1])
        out.backward(case["grad"])
        results["seconds"][case["name"]] = time.perf_counter() - start
        results["cases"][case["name"]] = {"out": out.detach(),
                                          **{k: v.grad for k, v in leaves.items()}}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Outputs and gradients of every case computed by the triton backend in the interpreter."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases_path, out_path = folder / "cases.pt", folder / "results.pt"
    torch.save(CASES, cases_path)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, str(cases_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out_path)


def _reference(case: dict) -> dict:
    leaves = {k: v.clone().requires_grad_() for k, v in case["inputs"].items()}
    out = selective_scan(**leaves, delta_softplus=case["softplus"], backend="reference")
    out.backward(case["grad"])
    return {"out": out.detach(), **{k: v.grad for k, v in leaves.items()}}


def test_interpreter_registers_triton_for_cpu_but_auto_keeps_the_cpu_kernels(interpreted):
    assert interpreted["interpret"] is True
    assert interpreted["devices"] == ["cpu", "cuda"]
    assert "triton" in interpreted["cpu_backends"]
    assert interpreted["auto_cpu"] != "triton"


@pytest.mark.parametrize("name", FP32)
def test_matches_reference_outputs_and_every_gradient(interpreted, name):
    case = next(c for c in CASES if c["name"] == name)
    got, ref = interpreted["cases"][name], _reference(case)
    assert torch.isfinite(got["out"]).all()
    assert got["out"].dtype == torch.float32
    assert rel_err(got["out"], ref["out"]) < 1e-5
    assert set(got) - {"out"} == set(case["inputs"])      # a gradient for every input given
    for k in case["inputs"]:
        assert torch.isfinite(got[k]).all(), k
        assert got[k].shape == case["inputs"][k].shape, k
        if case["inputs"]["u"].shape[-1] == 1 and k == "A":  # h_0 = 0: dA is exactly zero
            assert ref[k].abs().max() == 0 and got[k].abs().max() == 0
            continue
        assert rel_err(got[k], ref[k]) < 1e-4, k


def test_bf16_inputs_are_scanned_in_fp32(interpreted):
    case = next(c for c in CASES if c["name"] == "bf16")
    got = interpreted["cases"]["bf16"]
    assert got["out"].dtype == torch.bfloat16
    exact = _reference({**case, "inputs": {k: v.float() for k, v in case["inputs"].items()},
                        "grad": case["grad"].float()})
    # only the final cast of the output (and of the gradients) to bf16 loses precision
    assert rel_err(got["out"].float(), exact["out"]) < 8e-3
    for k in NAMES:
        assert got[k].dtype == torch.bfloat16, k
        assert rel_err(got[k].float(), exact[k]) < 1e-2, k


def test_registration_in_this_process():
    be = _BACKENDS["triton"]
    expected = {"cuda", "cpu"} if triton_backend.INTERPRET else {"cuda"}
    assert be.devices == frozenset(expected)
    assert dict(be.auto_priority) == {"cuda": 2}          # above chunked, never auto on CPU
    assert _BACKENDS["chunked"].auto_priority["cuda"] < be.auto_priority["cuda"]
    if not triton_backend.INTERPRET:
        x = make_inputs(1, 2, 3, 4)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            triton_backend.selective_scan_triton(**x)


def test_without_triton_the_backend_says_why():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from vimerge.ops import available_backends, resolve_backend\n"
            "from vimerge.ops.registry import _BACKENDS\n"
            "reason = _BACKENDS['triton'].check()\n"
            "assert 'triton' not in available_backends(), available_backends()\n"
            "try:\n"
            "    resolve_backend('triton', 'cuda')\n"
            "except RuntimeError as exc:\n"
            "    print(exc)\n"
            "print('REASON', reason)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("REASON triton is not importable") and "pip install triton" in lines[-1]
    assert "not usable here: triton is not importable" in lines[0]


# ---- real GPU ------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_pair(b: int, d: int, n: int, L: int, seed: int, **kw) -> tuple[dict, dict, dict]:
    x = {k: v.cuda() for k, v in make_inputs(b, d, n, L, seed=seed, **kw).items()}
    ref_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    tri_in = {k: v.clone().requires_grad_() for k, v in x.items()}
    return x, ref_in, tri_in


@cuda
@pytest.mark.parametrize("b,L", [(16, 197), (2, 1569), (4, 1), (4, 333)])
def test_cuda_matches_reference_at_vim_shapes(b, L):
    pytest.importorskip("triton")
    _, ref_in, tri_in = _cuda_pair(b, 768, 16, L, seed=L)
    ref = selective_scan(**ref_in, delta_softplus=True, backend="reference")
    out = selective_scan(**tri_in, delta_softplus=True, backend="triton")
    assert rel_err(out, ref) < 1e-4     # Triton's exp/log are the GPU's fast approximations
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for k in NAMES:
        if L == 1 and k == "A":
            continue
        assert rel_err(tri_in[k].grad, ref_in[k].grad) < 1e-3, k


@cuda
def test_cuda_extreme_deltas_long_sequence_and_auto():
    pytest.importorskip("triton")
    assert resolve_backend("auto", "cuda").name in ("triton", "mamba_ssm")
    x, _, tri_in = _cuda_pair(1, 64, 16, 4096, seed=9, delta_scale=50.0)
    tri_in["delta_bias"] = torch.full((64,), 30.0, device="cuda", requires_grad=True)
    out = selective_scan(**tri_in, delta_softplus=True, backend="triton")
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    for k in NAMES:
        assert torch.isfinite(tri_in[k].grad).all(), k
    half = {k: v.detach().bfloat16() for k, v in tri_in.items()}
    out16 = selective_scan(**half, delta_softplus=True, backend="triton")
    ref16 = selective_scan(**{k: v.float() for k, v in half.items()}, delta_softplus=True,
                           backend="reference")
    assert out16.dtype == torch.bfloat16 and rel_err(out16.float(), ref16) < 1e-2


if __name__ == "__main__":   # the interpreter worker (see the module docstring)
    _run_worker(sys.argv[1], sys.argv[2])
