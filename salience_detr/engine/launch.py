"""``launch`` for multi-process and multi-machine training on CUDA (NCCL) or CPU (GLOO).

detectron2 0.6's ``launch`` asserts that CUDA is available; this one has the same signature plus ``device``, the
configured ``train.device``, and picks the backend from it: ``train.device=cpu`` runs GLOO processes even on a
machine with GPUs (NCCL cannot reduce CPU tensors), and ``--num-gpus 2`` on a CPU machine runs two GLOO processes.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_group_backend(device: str | None) -> str:
    """NCCL for a CUDA ``device``, GLOO for any other; no device given means CUDA when this machine has it."""
    if device is None:
        return "NCCL" if torch.cuda.is_available() else "GLOO"
    if torch.device(device).type != "cuda":
        return "GLOO"
    if not torch.cuda.is_available():
        raise ValueError(f"train.device={device} but PyTorch sees no CUDA device here; add train.device=cpu")
    return "NCCL"


def launch(
    main_func: Callable[..., Any],
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str | None = None,
) -> None:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each of ``num_machines``, joined by
    the process group :func:`process_group_backend` picks for ``device``."""
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto works on one machine only; pass --dist-url tcp://HOST:PORT.")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    backend = process_group_backend(device)
    if backend == "NCCL" and num_processes_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"{num_processes_per_machine} processes per machine but only {torch.cuda.device_count()} GPUs; "
            "lower --num-gpus, or train on the CPU with train.device=cpu"
        )
    if num_processes_per_machine == 1:  # one process per machine (e.g. a CPU cluster): this one, no spawned copy
        try:
            _worker(0, main_func, world_size, 1, machine_rank, dist_url, args, timeout, backend)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return
    mp.start_processes(
        _worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout, backend),
        daemon=False,
        start_method="spawn",
    )


def _worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
    backend: str,
) -> None:
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(
            backend=backend,
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error("Could not join the process group at %s", dist_url)
        raise
    num_machines = world_size // num_processes_per_machine
    for machine in range(num_machines):
        ranks = list(range(machine * num_processes_per_machine, (machine + 1) * num_processes_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    if backend == "NCCL":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    main_func(*args)
