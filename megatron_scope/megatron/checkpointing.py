"""Checkpoints for exact resume, in Megatron-LM's layout:

    <root>/latest_checkpointed_iteration.txt      the last COMPLETE iteration (Megatron-LM's tracker file)
    <root>/iter_0000010/                          dist_checkpointing of {"model", "optimizer"} (any TP/PP on load)
                       scope_state.pt             step, scheduler, data position, rollout seed (rank 0)
                       rng_rank00003.pt           each rank's torch / Megatron-tracker RNG states

A checkpoint is written under `iter_XXXXXXX.tmp`, renamed once every rank has finished, and only then
named in the tracker (replaced atomically), so a run killed mid-save never resumes from a partial one.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_scope.megatron.model import unwrap_model

TRACKER_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "scope_state.pt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def check_writable(root: str) -> None:
    """Raise before training starts if `root` cannot hold checkpoints."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_probe_{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"checkpoint directory {root!r} is not writable: {error}") from error


def latest_iteration(root: str) -> int | None:
    """The iteration named in the tracker file, or None when there is no complete checkpoint."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} should hold an iteration number, found {text!r}")
    iteration = int(text)
    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise FileNotFoundError(f"{tracker} names iteration {iteration} but {checkpoint_dir(root, iteration)} is missing")
    return iteration


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    # The GPTModel itself: DDP's sharded keys gain a "module." prefix that its load_state_dict lacks.
    model_state = unwrap_model(model).sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_checkpoint(root: str, iteration: int, model, optimizer, state: dict) -> str:
    """Save model, optimizer, every rank's RNG and `state` (rank 0's: step, scheduler, data position, ...)."""
    final = checkpoint_dir(root, iteration)
    partial = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), partial)
    torch.save(_rng_state(), os.path.join(partial, f"rng_rank{rank:05d}.pt"))
    if rank == 0:
        torch.save(dict(state, iteration=iteration, world_size=dist.get_world_size()), os.path.join(partial, STATE_FILE))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
        with open(tracker_tmp, "w") as handle:
            handle.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
    dist.barrier()
    return final


def load_checkpoint(root: str, model, optimizer) -> dict | None:
    """Load the latest complete checkpoint under `root` into `model` and `optimizer` (at any TP/PP) and return
    its saved state, or None when there is none. RNG states are restored when the world size matches."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    directory = checkpoint_dir(root, iteration)
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), directory)
    unwrap_model(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    state = torch.load(os.path.join(directory, STATE_FILE), weights_only=False)
    rng_file = os.path.join(directory, f"rng_rank{dist.get_rank():05d}.pt")
    state["rng_restored"] = state["world_size"] == dist.get_world_size() and os.path.isfile(rng_file)
    if state["rng_restored"]:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
