"""The Triton scan kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90), no GPU needed.

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
runs Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, then the ``ptxas`` shipped in Triton's
wheel) and gives a cubin and its metadata, on a machine without a GPU. Each launch variant the
dispatcher can produce is a separate compilation (the ``tl.constexpr`` arguments), taken from
``vimerge.ops.triton.launch_configs``, which builds them with the same functions as the
launches: no hand-written list to drift.

What is checked for every variant compiled: it compiles to a non-empty cubin for the target,
with the launch's ``num_warps``, and the shared memory it asks for at launch
(``metadata.shared``, what Triton's launcher compares with the device's limit before raising
``OutOfResources``) fits one thread block of the device: 163 KiB on compute capability 8.0
(A100: 164 KiB per SM), 227 KiB on 9.0 (H100: 228 KiB per SM), the 1 KiB difference being
what CUDA reserves per block (CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability": maximum shared memory per thread block, 8.0: 163 KB, 9.0: 227 KB).

Which variants (state sizes up to the largest ``d_state`` of the registered presets, 16):

* every CI run (:func:`ci_subset`): every combination of the optional inputs (D, z,
  delta_bias, softplus, forward saving its chunk states) at the models' block shape (16, 16, 16:
  the largest tiles), and, with every optional input on (the models' call), the smallest block
  shape and every shape that differs from the largest in one block size: 68 of the 3072
  variants per target, 136 compilations;
* ``VIMERGE_TRITON_COMPILE_ALL=1``: all 3072 per target, 6144 compilations. Not for CI: on the
  loaded 2-core VM (load 15-20) where this was written a compilation took 5.5 to 13 s on
  average (1906 s for 348 of them; 1746 s for the 136 of the CI set, 896 s wall with 2
  workers), so hours; timings there say little about an idle CI machine.

The compilations run in a process pool over the CPUs this process may use. Skips cleanly
without triton or without its CUDA backend and ptxas.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time

import pytest

triton = pytest.importorskip("triton")

from vimerge.models.registry import list_models, model_defaults  # noqa: E402
from vimerge.ops import triton as triton_backend  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    _PTXAS = get_ptxas(90).path
    _MISSING = None if _PTXAS and os.path.isfile(_PTXAS) else "Triton's ptxas is missing"
except Exception as exc:  # noqa: BLE001 - any way the CUDA backend is absent
    _MISSING = f"Triton's CUDA backend is not usable here ({type(exc).__name__}: {exc})"

pytestmark = pytest.mark.skipif(_MISSING is not None or triton_backend._IMPORT_ERROR is not None,
                                reason=_MISSING or str(triton_backend._IMPORT_ERROR))

# the most shared memory one thread block may use, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = sorted(SHARED_LIMIT)
ALL = os.environ.get("VIMERGE_TRITON_COMPILE_ALL", "0").strip().lower() in ("1", "true", "yes")


def max_d_state() -> int:
    """The largest state size of any registered preset (the Vim and VideoMamba ones)."""
    sizes = [model_defaults(name).get("d_state") for name in list_models()]
    return max(s for s in sizes if s)


def signature(kernel) -> dict[str, str]:
    """The argument types of a launch: every ``*_ptr`` an fp32 tensor (the dispatcher hands fp32
    tensors to every backend), every other runtime argument a 32-bit integer (sizes, strides)."""
    out = {}
    for p in kernel.params:
        if p.is_constexpr:
            out[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            out[p.name] = "*fp32"
        else:
            out[p.name] = "i32"
    return out


def compile_one(job: tuple[int, triton_backend.LaunchConfig]) -> dict:
    """Compile one launch variant for one compute capability (runs in a worker process)."""
    capability, config = job
    kernel = getattr(triton_backend, config.kernel)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature(kernel), dict(config.constexprs)),
                              target=GPUTarget("cuda", capability, 32), options={"num_warps": config.num_warps})
    return dict(capability=capability, config=config, seconds=time.perf_counter() - start,
                shared=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
                cubin=len(compiled.asm.get("cubin", b"")), target=compiled.metadata.target)


def ci_subset(configs: list[triton_backend.LaunchConfig]) -> list[triton_backend.LaunchConfig]:
    """Every combination of the optional inputs at the largest block shape (the one the models
    launch, the largest tiles), and with every optional input on: the smallest shape and each
    shape that differs from the largest in one block size (each size of each block once)."""
    def blocks(c):
        return c.constexprs["BLOCK_D"], c.constexprs["BLOCK_N"], c.constexprs["BLOCK_T"]
    shapes = {blocks(c) for c in configs}
    largest, smallest = max(shapes), min(shapes)
    axes = {s for s in shapes if sum(a != b for a, b in zip(s, largest)) <= 1} | {smallest}
    flags = ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "SAVE_STATES")
    return [c for c in configs if blocks(c) == largest
            or (blocks(c) in axes and all(c.constexprs.get(f, True) for f in flags))]


def compile_all(jobs: list[tuple[int, triton_backend.LaunchConfig]]) -> list[dict]:
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    # spawn: no fork of a process that holds torch's threads; each worker imports vimerge once
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(compile_one, jobs, chunksize=4))


def test_launch_configs_are_every_variant_the_dispatcher_builds():
    configs = triton_backend.launch_configs(max_d_state())
    shapes = triton_backend.block_shapes(16)
    # powers of two from 2 up to the caps: BLOCK_D, BLOCK_T <= 16 (the defaults), BLOCK_N <= 16
    assert shapes == [(bd, bn, bt) for bd in (2, 4, 8, 16) for bn in (2, 4, 8, 16) for bt in (2, 4, 8, 16)]
    assert triton_backend._blocks(768, 16, 197, 16, 16) == (16, 16, 16)        # a model's call
    assert triton_backend._blocks(3, 5, 7, 16, 16) == (4, 8, 8)
    assert triton_backend._blocks(1, 1, 1, 16, 16) == (2, 2, 2)
    fwd = [c for c in configs if c.kernel == "_fwd_kernel"]
    bwd = [c for c in configs if c.kernel == "_bwd_kernel"]
    assert len(fwd) == 64 * 2 ** 5 and len(bwd) == 64 * 2 ** 4
    assert {c.num_warps for c in fwd} == {triton_backend.NUM_WARPS_FWD}
    assert {c.num_warps for c in bwd} == {triton_backend.NUM_WARPS_BWD}
    kernel_args = {name: {p.name for p in getattr(triton_backend, name).params if p.is_constexpr}
                   for name in ("_fwd_kernel", "_bwd_kernel")}
    assert all(set(c.constexprs) == kernel_args[c.kernel] for c in configs)   # every constexpr set
    assert len(ci_subset(configs)) == (1 + 3 * 3 + 1) * 2 + (32 + 16) - 2      # 68


def test_the_kernels_compile_for_a100_and_h100_within_their_shared_memory():
    configs = triton_backend.launch_configs(max_d_state())
    chosen = configs if ALL else ci_subset(configs)
    jobs = [(cc, c) for cc in TARGETS for c in chosen]
    start = time.perf_counter()
    results = compile_all(jobs)
    wall = time.perf_counter() - start
    assert len(results) == len(jobs)
    for r in results:
        where = f"{r['config'].kernel} {r['config'].constexprs} for sm_{r['capability']}"
        assert r["cubin"] > 0, f"no cubin for {where}"
        assert r["target"].arch == r["capability"] and r["num_warps"] == r["config"].num_warps, where
        assert r["shared"] <= SHARED_LIMIT[r["capability"]], (
            f"{where} needs {r['shared']} bytes of shared memory, more than the "
            f"{SHARED_LIMIT[r['capability']]} one block may use")
    most = max(results, key=lambda r: r["shared"])
    print(f"\n{len(results)} compilations in {wall:.0f} s wall ({sum(r['seconds'] for r in results):.0f} s "
          f"of compiling); most shared memory: {most['shared']} bytes ({most['config'].kernel} "
          f"{most['config'].constexprs}, sm_{most['capability']})")
