"""Process-group set-up: Megatron's model-parallel state on top of an initialised torch.distributed."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_scope.megatron import cpu_compat


def free_port() -> int:
    """An unused TCP port on localhost (a single process's or a test's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: int | None = None) -> None:
    """`init_process_group` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), its collectives timing
    out after `timeout_minutes` (None: torch's default).

    Backend: nccl with CUDA, gloo without. A single process without torchrun's variables becomes
    a world of one on localhost, so the same entry script runs under `python` and `torchrun`.
    """
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    timeout = None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), timeout=timeout)


def collective_device() -> torch.device:
    """Where a tensor sent through torch.distributed must live: the current CUDA device under NCCL, the CPU
    under gloo (or without a process group)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Megatron's TP/PP/DP groups (their collectives time out after `timeout_minutes`) and its model-parallel RNG
    tracker (CPU shims installed first).

    Data-parallel size is what is left: world_size / (TP * PP).
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel: call torch.distributed.init_process_group first")
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if model_parallel < 1 or world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size ({pipeline_model_parallel_size})"
        )
    cpu_compat.install()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
