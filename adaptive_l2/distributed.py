"""Multi-process training on GPUs (NCCL) or CPUs (gloo), spawned here or by torchrun.

fast-reid's `launch` asserts CUDA and NCCL and creates fast-reid's local process group inside its
own worker, so it cannot run CPU processes, and a process started by torchrun has no local group
(`comm.get_local_rank()` then asserts; `adaptive_l2.compat.create_local_group` makes one).
`launch` here uses fast-reid's for GPUs, its own gloo spawn for CPUs, and joins a torchrun job
(env:// rendezvous, several nodes) when started by one.
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fastreid.engine import launch as fastreid_launch
from fastreid.utils import comm

from adaptive_l2.compat import create_local_group

logger = logging.getLogger(__name__)


def started_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _backend(use_cuda: bool) -> str:
    return "nccl" if use_cuda else "gloo"


def join_torchrun(use_cuda: bool) -> None:
    """Initialise the process group of a torchrun job (one process per GPU or CPU slot)."""
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ["LOCAL_WORLD_SIZE"])
    world_size = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=_backend(use_cuda), init_method="env://")
    create_local_group(world_size, local_size, dist.get_rank() // local_size)
    comm.synchronize()


def leave_process_group() -> None:
    """Tear the process group down before the interpreter exits.

    The run's DDP reducer is freed first (collected while its group lives: freeing it after the
    group deadlocks gloo's destructor), then every process leaves together. Left to interpreter
    exit, gloo's worker threads can still be joinable and abort the process ("terminate called
    without an active exception") after a successful run."""
    if not dist.is_initialized():
        return
    gc.collect()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cpu_worker(local_rank: int, main_func: Callable, world_size: int, num_processes: int,
                machine_rank: int, dist_url: str, args: Sequence) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))
    rank = machine_rank * num_processes + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank)
    create_local_group(world_size, num_processes, machine_rank)
    comm.synchronize()
    main_func(*args)
    leave_process_group()  # after a success only: a failed process must not wait for the others


def launch(main_func: Callable, num_processes: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Sequence = (), use_cuda: bool = True) -> None:
    """Run `main_func(*args)` in `num_processes` processes per machine (1: in this process)."""
    if started_by_torchrun():
        join_torchrun(use_cuda)
        main_func(*args)
        leave_process_group()
        return
    world_size = num_machines * num_processes
    if world_size == 1:
        main_func(*args)
        return
    if use_cuda:
        fastreid_launch(main_func, num_processes, num_machines, machine_rank, dist_url, args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT")
        from fastreid.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_cpu_worker, nprocs=num_processes, daemon=False,
             args=(main_func, world_size, num_processes, machine_rank, dist_url, tuple(args)))
