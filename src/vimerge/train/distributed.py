"""torch.distributed set-up for re-training: torchrun's environment, NCCL on GPU, gloo on CPU.

A single process (no ``WORLD_SIZE`` in the environment) runs without a process group. Under
``torchrun`` every process reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` and joins the default group (``env://``).

Threads on CPU: the processes of one machine share its cores. A process of a CPU group sets
torch's intra-op threads (which the numba scan backend follows) to
``max(1, cores // LOCAL_WORLD_SIZE)`` (:func:`threads_per_process`; cores: the CPUs this
process may run on), unless ``OMP_NUM_THREADS`` is set: then that value is kept. Note that
``torchrun --nproc_per_node N`` (N > 1) itself sets ``OMP_NUM_THREADS=1`` for its processes
when it is not set; to give each process ``cores // N`` threads, set it yourself, e.g.
``OMP_NUM_THREADS=$(( $(nproc) / 2 )) torchrun --nproc_per_node 2 -m vimerge retrain ...``.
Without this, every process keeps a thread per core, and N processes on one CPU contend
(reported: 127 s against 14 s an epoch with 2 processes on 2 cores). What to expect on CPU: N
processes on one machine are not faster than one process using all its cores (the same work,
plus the gradient all-reduce); a CPU group is for checking a multi-GPU set-up, or for
several machines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_process(cores: int, local_world_size: int, environ: dict[str, str] | None = None) -> int:
    """Intra-op threads for each of ``local_world_size`` processes sharing ``cores`` CPUs:
    ``OMP_NUM_THREADS`` when set (a positive integer), else ``max(1, cores // local_world_size)``."""
    environ = os.environ if environ is None else environ
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given:
        try:
            if int(given) >= 1:
                return int(given)
        except ValueError:
            pass
    return max(1, cores // max(1, local_world_size))


def set_cpu_threads(world_size: int, environ: dict[str, str] | None = None) -> int:
    """Set torch's threads for a process of a CPU group (see the module docstring); returns them."""
    environ = os.environ if environ is None else environ
    local = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    threads = threads_per_process(available_cores(), local, environ)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def setup(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (or the one already initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local, pick_device(device, local), dist.get_backend(), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=pick_device(device, 0))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        set_cpu_threads(world)
    kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank, world, local, dev, backend, True)


def cleanup(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over processes (in place; returned)."""
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every process's ``obj``, indexed by rank (on every process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
