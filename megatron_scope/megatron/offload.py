"""Training state off the GPUs while the engines generate, so their KV cache is not starved by it.

Megatron-LM's --rl-offload-optimizer-during-inference, through megatron-core 0.16's own calls: the optimizer's
state and fp32 main parameters go to host memory (`MegatronOptimizer.offload_to_cpu` / `restore_from_cpu`, which
move CUDA tensors only) and the DDP gradient buffers are released (`offload_grad_buffers` / `restore_grad_buffers`:
the storage is freed and comes back zeroed, as `zero_grad_buffer` leaves it before every step, so nothing is
copied). --rl-offload-teacher-during-inference does the same for the forward-only models (a co-located teacher,
ExOPD's reference, SRPO's EMA teacher): each parameter storage is copied to pinned host memory and freed on the
device, then reallocated and copied back before the scoring pass (this works on any device, so CPU runs exercise
it too).
"""

from __future__ import annotations

import torch


class FrozenModelOffload:
    """Moves the parameter storages of forward-only models to host memory and back, bit for bit."""

    def __init__(self, models):
        storages = {}
        for model in models:
            for param in model.parameters():
                storage = param.untyped_storage()
                storages.setdefault(storage.data_ptr(), storage)  # tied or shared weights: one storage, once
        self.storages = list(storages.values())
        self.host: list[torch.UntypedStorage] | None = None

    def offload(self) -> None:
        """Copy each storage to (pinned, with CUDA) host memory, then free it on the device."""
        pin = torch.cuda.is_available()
        self.host = []
        for storage in self.storages:
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
            host.copy_(storage)
            self.host.append(host)
            storage.resize_(0)

    def restore(self) -> None:
        """Reallocate each storage on its device and copy its bytes back."""
        for storage, host in zip(self.storages, self.host):
            storage.resize_(host.nbytes())
            storage.copy_(host)
        self.host = None


class RolloutOffload:
    """What --rl-offload-optimizer-during-inference and --rl-offload-teacher-during-inference move off the GPUs
    between a step's end and the next step's scoring (`offload` before the engines wake, `restore` after); without
    either flag both do nothing."""

    def __init__(self, student, optimizer, frozen_models, offload_optimizer: bool, offload_frozen: bool):
        """`student`: the DDP-wrapped student; `optimizer`: its Megatron optimizer; `frozen_models`: the
        forward-only models on this rank."""
        self.student, self.optimizer = student, optimizer
        self.offload_optimizer = offload_optimizer
        self.frozen = FrozenModelOffload(frozen_models) if offload_frozen else None
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
