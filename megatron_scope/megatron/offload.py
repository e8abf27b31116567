"""Training state off the GPUs while the engines generate, so their KV cache is not starved by it.

Megatron-LM's --rl-offload-optimizer-during-inference, through megatron-core 0.16's own calls: the optimizer's
state and fp32 main parameters go to host memory (`MegatronOptimizer.offload_to_cpu` / `restore_from_cpu`, which
move CUDA tensors only) and the DDP gradient buffers are released (`offload_grad_buffers` / `restore_grad_buffers`:
the storage is freed and comes back zeroed, as `zero_grad_buffer` leaves it before every step, so nothing is
copied). --rl-offload-teacher-during-inference does the same for the forward-only models (a co-located teacher,
ExOPD's reference, SRPO's EMA teacher): each parameter storage is copied to pinned host memory and freed on the
device, then reallocated and copied back before the scoring pass (this works on any device, so CPU runs exercise
it too).

--teacher-residency scoring (`TeacherTurns`) keeps several co-located teachers' weights in host memory outside
their own scoring passes, so they take turns on the device and none holds memory during the training step.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def distinct_storages(params: Iterable[torch.Tensor], skip: Iterable[torch.Tensor] = ()) -> list[torch.UntypedStorage]:
    """The storages under `params`, each once (tied or shared weights share one), without those under `skip`."""
    skipped = {tensor.untyped_storage().data_ptr() for tensor in skip}
    storages = {}
    for param in params:
        storage = param.untyped_storage()
        if storage.data_ptr() not in skipped:
            storages.setdefault(storage.data_ptr(), storage)
    return list(storages.values())


def _host_copy(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    """A (pinned, with CUDA) host copy of `storage`."""
    host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=torch.cuda.is_available()).untyped_storage()
    host.copy_(storage)
    return host


class FrozenModelOffload:
    """Moves the storages of forward-only models' parameters to host memory and back, bit for bit."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.storages = distinct_storages(params)
        self.host: list[torch.UntypedStorage] | None = None

    def offload(self) -> None:
        """Copy each storage to (pinned, with CUDA) host memory, then free it on the device."""
        self.host = []
        for storage in self.storages:
            self.host.append(_host_copy(storage))
            storage.resize_(0)

    def restore(self) -> None:
        """Reallocate each storage on its device and copy its bytes back."""
        for storage, host in zip(self.storages, self.host):
            storage.resize_(host.nbytes())
            storage.copy_(host)
        self.host = None


class TeacherTurns:
    """--teacher-residency scoring: co-located teachers take turns on the device. Each teacher's parameters, but the
    ones in `kept` (its output layer, which the step's loss applies), are copied once to (pinned, with CUDA) host
    memory and freed on the device; `on_device(name)` brings that teacher's back for its scoring pass and frees them
    after it (the weights are frozen: nothing is copied back to the host)."""

    def __init__(self, teachers: dict, kept: dict[str, list[torch.Tensor]]):
        """`teachers`: name -> this rank's forward-only model; `kept`: name -> the tensors that stay on the device."""
        self.storages = {name: distinct_storages(model.parameters(), skip=kept[name])
                         for name, model in teachers.items()}
        self.host = {name: [_host_copy(storage) for storage in storages] for name, storages in self.storages.items()}
        self._free_all()

    def _free_all(self) -> None:
        for storages in self.storages.values():
            for storage in storages:
                storage.resize_(0)

    @contextlib.contextmanager
    def on_device(self, name: str):
        """Teacher `name`'s weights on the device for the block (every other teacher's stay in host memory)."""
        for storage, host in zip(self.storages[name], self.host[name]):
            storage.resize_(host.nbytes())
            storage.copy_(host)
        try:
            yield
        finally:
            if torch.cuda.is_available():  # its forward's kernels done before the memory goes back to the allocator,
                torch.cuda.current_stream().synchronize()  # which another stream (the step's prefetch) may reuse
            self._free_all()


class RolloutOffload:
    """What --rl-offload-optimizer-during-inference and --rl-offload-teacher-during-inference move off the GPUs
    between a step's end and the next step's scoring (`offload` before the engines wake, `restore` after); without
    either flag both do nothing."""

    def __init__(self, student, optimizer, frozen_params, offload_optimizer: bool, offload_frozen: bool):
        """`student`: the DDP-wrapped student; `optimizer`: its Megatron optimizer; `frozen_params`: the parameters
        of the forward-only models on this rank that stay on the device between steps."""
        self.student, self.optimizer = student, optimizer
        self.offload_optimizer = offload_optimizer
        self.frozen = FrozenModelOffload(frozen_params) if offload_frozen else None
        self.offloaded = False

    def offload(self) -> None:
        if self.offloaded:
            return
        if self.offload_optimizer:
            cuda = torch.cuda.is_available()
            self.optimizer.offload_to_cpu()
            self.student.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        if self.frozen is not None:
            self.frozen.offload()
        self.offloaded = True

    def restore(self) -> None:
        if not self.offloaded:
            return
        if self.offload_optimizer:
            self.optimizer.restore_from_cpu()
            self.student.restore_grad_buffers(synchronize=torch.cuda.is_available())
        if self.frozen is not None:
            self.frozen.restore()
        self.offloaded = False
