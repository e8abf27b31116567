"""Weight transfer into vLLM engines through vLLM's RL weight-update API (the vLLM-version-specific part).

vLLM 0.32 moves trainer weights into its workers through `vllm.distributed.weight_transfer`: a worker-side
`WeightTransferEngine`, chosen by `WeightTransferConfig(backend=...)` from `WeightTransferEngineFactory`,
driven by `LLM.start_weight_update` / `update_weights` / `finish_weight_update`. An engine here refits through
one of three backends (`VLLMEngineConfig.weight_transfer`), each with its sender in this module, one bucket per
`update_weights`:

- "nccl", vLLM's own NCCL backend in packed mode (`NCCLBroadcast`, the default for Ray engines on CUDA): the
  driver that holds the weights (the rollout leader, on its GPU) is rank 0 of a group whose other ranks are every
  engine's workers (engine k's from 1 + the TP sizes of the engines before it, since each engine is its own vLLM
  instance, not a data-parallel rank of one); each bucket is broadcast with vLLM's `packed_nccl_broadcast_producer`
  while every worker receives it in `update_weights` (the metadata travels by Ray). GPU to GPU across nodes.
  The driver checks every name and shape before it broadcasts anything: a worker that refused a bucket would
  leave the broadcast waiting forever.
- "ipc", vLLM's own CUDA IPC backend in packed mode (`CudaIPCBuckets`, the default on CUDA): every bucket is
  packed into one device buffer per GPU of the engine, exported once per refit as a CUDA IPC handle; each worker
  maps the buffer of its own GPU (looked up by the GPU's UUID) and loads clones of the tensors. Nothing passes
  through host memory. vLLM's trainer-side `IPCTrainerWeightTransferEngine` all-gathers handles over the *default*
  process group, which in a Megatron job holds every rank; here one process (the engine's leader) holds the
  whole bucket and copies it to each GPU of the engine itself, so no other rank takes part. The handles are
  tuples that vLLM's RPC sends only with `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (as vLLM's `rlhf_ipc.py` example
  sets), which the engine sets before vLLM starts.
- "scope_shm", registered here (`SharedMemoryBuckets`; CPU, where vLLM has no IPC, and any engine on the
  sender's node): the sender packs a bucket of (name, tensor) pairs into one file under /dev/shm and sends only
  metadata (path, names, dtypes, shapes, byte offsets) through `update_weights`, so nothing is serialised as
  lists even with vLLM's multiprocess engine; every worker (any vLLM TP size) maps the file and hands zero-copy
  views to the model's own `load_weights`, inside vLLM's layerwise reload (`start_weight_update` /
  `finish_weight_update`), which restores the loader state of parameters that vLLM post-processed at start
  (calling `load_weights` directly fails on those with "'Parameter' object has no attribute 'weight_loader'").

Each shared-memory bucket gets its own file: a layer whose tensors straddle two buckets keeps views of the first
file until the layer is complete, so files are never reused; the sender unlinks a file once the worker has
returned (the mapping lives until the views die). What that keeps in /dev/shm at once, and the checks that
refuse a refit with a clear error before a write could run out of room there (SIGBUS), are in
`shared_memory`. Before the reload ends, layers that no update fills themselves (RotaryEmbedding's computed
cache, a tied LM head) get their live tensors back, which vLLM would otherwise do with a false "Failed to
load weights" warning (`restore_layers_without_own_weights`). After the reload, layers that share a weight
(a tied LM head) re-derive their kernels, which the reload alone leaves stale on CPU
(`refresh_tied_embeddings`).

vLLM imports `WeightSyncWorkerExtension` by name in each worker process (`worker_extension_cls`); importing
this module there is what registers the backend in that process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from typing import Any, Iterator, Sequence

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from megatron_scope.rollout import shared_memory
from megatron_scope.rollout.buckets import aligned_nbytes

BACKEND_NAME = "scope_shm"
IPC_BACKEND = "ipc"
"""vLLM's built-in CUDA IPC backend (`vllm.distributed.weight_transfer.ipc_engine`)."""
NCCL_BACKEND = "nccl"
"""vLLM's built-in NCCL backend (`vllm.distributed.weight_transfer.nccl_engine`)."""
INSECURE_SERIALIZATION_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"
"""Lets vLLM's RPC pickle what msgpack cannot carry: the IPC handles' tuples (set for "ipc" before vLLM starts)."""
WORKER_EXTENSION = f"{__name__}.WeightSyncWorkerExtension"

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.int8, torch.uint8, torch.bool)
}


@dataclasses.dataclass
class SharedMemoryInitInfo(WeightTransferInitInfo):
    """No rendezvous: the sender and the workers share a filesystem namespace (one node)."""


@dataclasses.dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    """One bucket: a file of packed tensors and where each one lies in it."""

    path: str
    """Bucket file (raw bytes, each tensor contiguous at its offset)."""
    names: list[str]
    """Hugging Face parameter names, in file order."""
    dtype_names: list[str]
    """torch dtype of each tensor without the "torch." prefix ("float32", "bfloat16")."""
    shapes: list[list[int]]
    """Shape of each tensor."""
    offsets: list[int]
    """Byte offset of each tensor in the file."""

    def __post_init__(self):
        count = len(self.names)
        for field in ("dtype_names", "shapes", "offsets"):
            if len(getattr(self, field)) != count:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries, names has {count}")
        unknown = sorted(set(self.dtype_names) - set(_DTYPES))
        if unknown:
            raise ValueError(f"unsupported dtypes {unknown} in bucket {self.path}")


def write_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]], directory: str | None = None) -> dict[str, Any]:
    """Pack tensors into a new file in `directory` (default `shared_memory.shared_memory_dir()`); return the
    `update_weights` payload (the caller unlinks the file). Raises `shared_memory.SharedMemoryTooSmallError`,
    creating nothing, when the directory has no room for the file."""
    directory = directory or shared_memory.shared_memory_dir()
    path = os.path.join(directory, f"scope-weights-{uuid.uuid4().hex}.bin")
    total = max(sum(aligned_nbytes(t) for _, t in named_tensors), 1)
    shared_memory.check_bucket_room(total, directory)
    buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    names, dtype_names, shapes, offsets = [], [], [], []
    offset = 0
    try:
        for name, tensor in named_tensors:
            nbytes = tensor.numel() * tensor.element_size()
            source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[offset : offset + nbytes].copy_(source)  # also moves GPU tensors to host
            names.append(name)
            dtype_names.append(str(tensor.dtype).removeprefix("torch."))
            shapes.append(list(tensor.shape))
            offsets.append(offset)
            offset += aligned_nbytes(tensor)
    except BaseException:
        os.unlink(path)
        raise
    return dataclasses.asdict(
        SharedMemoryUpdateInfo(path=path, names=names, dtype_names=dtype_names, shapes=shapes, offsets=offsets)
    )


def read_bucket(info: SharedMemoryUpdateInfo) -> list[tuple[str, torch.Tensor]]:
    """Zero-copy views of a bucket file's tensors (they keep the mapping alive)."""
    size = os.path.getsize(info.path)
    buffer = torch.from_file(info.path, shared=True, size=size, dtype=torch.uint8)
    weights = []
    for name, dtype_name, shape, offset in zip(info.names, info.dtype_names, info.shapes, info.offsets):
        dtype = _DTYPES[dtype_name]
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        if offset + nbytes > size:
            raise ValueError(f"{name}: bytes [{offset}, {offset + nbytes}) lie outside {info.path} ({size} bytes)")
        weights.append((name, buffer[offset : offset + nbytes].view(dtype).view(shape)))
    return weights


class SharedMemoryBuckets:
    """Sender side of "scope_shm": each bucket becomes a file in `shared_memory.shared_memory_dir()`, unlinked once
    the workers have loaded it."""

    backend = BACKEND_NAME
    init_info: dict[str, Any] = {}

    @contextlib.contextmanager
    def payload(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> Iterator[dict[str, Any]]:
        """The `update_weights` payload of one bucket, valid inside the `with` block."""
        payload = write_bucket(named_tensors)
        try:
            yield payload
        finally:
            os.unlink(payload["path"])

    def release(self) -> None:
        """Nothing outlives a bucket."""


def export_cuda_ipc(buffer: torch.Tensor) -> tuple[str, tuple]:
    """(UUID of the buffer's GPU, `rebuild_cuda_tensor` arguments): what vLLM's IPC worker looks a buffer up by and
    maps it from. The arguments do not keep the buffer alive."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    return str(torch.cuda.get_device_properties(buffer.device).uuid), args


def pack_bucket(buffer: torch.Tensor, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """Copy the tensors back to back into the uint8 `buffer`; return the metadata of vLLM's packed IPC update
    (names, dtype_names, shapes, tensor_sizes), which `packed_tensor.unpack_tensor` splits the bytes by.

    vLLM's packed layout has no padding, so every tensor of a bucket must share one dtype (each then starts at a
    multiple of its element size); the engine casts every tensor to its own dtype before bucketing."""
    dtypes = {tensor.dtype for _, tensor in named_tensors}
    if len(dtypes) > 1:
        raise ValueError(f"a packed IPC bucket takes one dtype, got {sorted(map(str, dtypes))}")
    total = sum(tensor.numel() * tensor.element_size() for _, tensor in named_tensors)
    if total > buffer.numel():
        raise ValueError(f"a bucket of {total} bytes does not fit the {buffer.numel()}-byte IPC buffer")
    meta: dict[str, list] = {"names": [], "dtype_names": [], "shapes": [], "tensor_sizes": []}
    offset = 0
    for name, tensor in named_tensors:
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat, non_blocking=True)
        meta["names"].append(name)
        meta["dtype_names"].append(str(tensor.dtype).removeprefix("torch."))
        meta["shapes"].append(list(tensor.shape))
        meta["tensor_sizes"].append(flat.numel())
        offset += flat.numel()
    return meta


class CudaIPCBuckets:
    """Sender side of vLLM's "ipc" backend (packed) for an engine whose workers run on `devices` of this node,
    driven by the one process that holds each whole bucket (the engine's leader; module docstring).

    A refit allocates one uint8 buffer of `capacity_bytes` (>= the largest bucket) per device and exports each once;
    every bucket is packed into the first, copied device to device into the others, and sent as metadata plus the
    same {GPU UUID: handle} map (vLLM's worker keeps one mapping per export across the chunks of an update).
    `release`, after `finish_weight_update` (where the workers drop their mappings), frees the buffers, so the KV
    cache that wakes next finds the memory free."""

    backend = IPC_BACKEND
    init_info: dict[str, Any] = {"packed": True}

    def __init__(self, devices: Sequence[torch.device], capacity_bytes: int):
        if not devices:
            raise ValueError("CudaIPCBuckets needs at least one device")
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be >= 1, got {capacity_bytes}")
        self.devices, self.capacity_bytes = list(devices), capacity_bytes
        self._buffers: list[torch.Tensor] = []
        self._handles: dict[str, tuple] = {}

    @contextlib.contextmanager
    def payload(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> Iterator[dict[str, Any]]:
        """The `update_weights` payload of one bucket (vLLM's `IPCWeightTransferUpdateInfo` fields); the buffers
        hold its bytes until the next bucket."""
        if not self._buffers:
            buffers = [torch.empty(self.capacity_bytes, dtype=torch.uint8, device=d) for d in self.devices]
            handles = dict(export_cuda_ipc(buffer) for buffer in buffers)
            if len(handles) != len(buffers):
                raise ValueError(f"the engine's devices {self.devices} are not distinct GPUs")
            self._buffers, self._handles = buffers, handles
        first, *others = self._buffers
        meta = pack_bucket(first, named_tensors)
        size = sum(meta["tensor_sizes"])
        for buffer in others:
            buffer[:size].copy_(first[:size], non_blocking=True)
        for device in self.devices:  # every byte written before a worker reads it (vLLM's producer does the same)
            _synchronize(device)
        yield {**meta, "ipc_handles": self._handles}

    def release(self) -> None:
        """Free the buffers and let CUDA reclaim what the workers mapped."""
        self._buffers, self._handles = [], {}
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()


class NCCLBroadcast:
    """Driver side of vLLM's "nccl" backend (packed) to engines on other GPUs (module docstring): rank 0 of a group of
    1 + sum(`engine_world_sizes`) ranks, rendezvous at `master_address:master_port` (a TCP store this side serves).

        broadcast = NCCLBroadcast([2, 2], bucket_bytes, master_address=ip)
        joins = [actor.join_weight_broadcast.remote(info) for actor, info in zip(actors, broadcast.worker_init_infos())]
        broadcast.open(); ray.get(joins)               # both sides rendezvous together
        ... per bucket: every engine's update_weights(names, dtype_names, shapes) runs while broadcast.send(bucket)

    Both sides cut a bucket into the same chunks of vLLM's packed layout (`buffer_bytes`, `num_buffers`, shipped
    to the workers in their init info)."""

    backend = NCCL_BACKEND

    def __init__(self, engine_world_sizes: Sequence[int], buffer_bytes: int, master_address: str,
                 master_port: int | None = None, num_buffers: int = 2):
        if not engine_world_sizes or min(engine_world_sizes) < 1:
            raise ValueError(f"engine_world_sizes must name >= 1 worker per engine, got {list(engine_world_sizes)}")
        if buffer_bytes < 1 or num_buffers < 1:
            raise ValueError(f"buffer_bytes and num_buffers must be >= 1, got {buffer_bytes} and {num_buffers}")
        if master_port is None:
            from vllm.utils.network_utils import get_open_port

            master_port = get_open_port()
        self.master_address, self.master_port = master_address, master_port
        self.world_size = 1 + sum(engine_world_sizes)
        self.rank_offsets = [1 + sum(engine_world_sizes[:k]) for k in range(len(engine_world_sizes))]
        self.buffer_bytes, self.num_buffers = buffer_bytes, num_buffers
        self.device: torch.device | None = None
        """Where the bytes leave from (this process's CUDA device, once open)."""
        self._group = None

    def worker_init_infos(self) -> list[dict[str, Any]]:
        """Each engine's `init_weight_transfer_engine` payload (vLLM's `NCCLWeightTransferInitInfo`)."""
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

        return [worker_init_payload(NCCLWeightTransferInitInfo(
            master_address=self.master_address, master_port=self.master_port, rank_offset=offset,
            world_size=self.world_size, packed=True, packed_buffer_size_bytes=self.buffer_bytes,
            packed_num_buffers=self.num_buffers)) for offset in self.rank_offsets]

    def open(self) -> None:
        """Join the group as rank 0 on this process's CUDA device (blocks until every worker joins)."""
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self._group = trainer_init({"master_address": self.master_address, "master_port": self.master_port,
                                    "world_size": self.world_size})
        self.device = torch.device("cuda", torch.cuda.current_device())

    def send(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Broadcast one bucket (CUDA tensors of one dtype) to every worker; returns once it has left."""
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        if self._group is None:
            raise RuntimeError("NCCLBroadcast.open() must run before send()")
        packed_nccl_broadcast_producer(iterator=iter(named_tensors), group=self._group, src=0,
                                       post_iter_func=lambda item: item[1], buffer_size_bytes=self.buffer_bytes,
                                       num_buffers=self.num_buffers)

    def close(self) -> None:
        if self._group is not None:
            self._group.destroy()
            self._group = None


class NCCLReceiver:
    """Engine side of "nccl": the workers join the driver's group when it opens it (`VLLMRolloutEngine.
    join_weight_broadcast`) and receive each bucket inside `update_weights`; nothing is held between buckets."""

    backend = NCCL_BACKEND
    init_info = None
    """Sent by the driver (`NCCLBroadcast.worker_init_infos`), not at start."""

    def release(self) -> None:
        """Nothing to free."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
    """Worker side of "scope_shm": map each bucket file, load it with the model's `load_weights`."""

    init_info_cls = SharedMemoryInitInfo
    update_info_cls = SharedMemoryUpdateInfo

    def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
        """Nothing to set up."""

    def start_weight_update(self) -> None:
        """Put every layer in layerwise-reload mode (buffers weights until a layer is complete)."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        """Load one bucket (tensors move to the model's device inside the weight loaders)."""
        self.model.load_weights(read_bucket(update_info))

    def finish_weight_update(self) -> None:
        """Process layers not yet processed, leave reload mode, rebuild what tied layers derived."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        restore_layers_without_own_weights(self.model)
        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_embeddings(self.model)

    def shutdown(self) -> None:
        """Nothing held between updates."""


def restore_layers_without_own_weights(model: torch.nn.Module) -> list[str]:
    """Take out of reload mode, with their live tensors back, the layers no weight update can fill itself;
    return their class names. Called between the last bucket and `finalize_layerwise_reload`.

    `initialize_layerwise_reload` puts every module that holds parameters or buffers into reload mode: its
    tensors move to the meta device and the module waits for `load_weights` to deliver all their elements.
    Two kinds of module never receive any, so at `finalize_layerwise_reload` vLLM counts them as failed and
    logs "<Class>: Failed to load weights" at WARNING on every update, before putting their old tensors back
    (which is right for them):

    - modules whose only tensors are non-persistent buffers, computed from the config when vLLM starts and in
      no checkpoint or state dict: RotaryEmbedding's `cos_sin_cache` (every RoPE model);
    - a tied LM head (`ParallelLMHead.tie_weights`): its parameter is the embedding's, which the model's
      `load_weights` fills through the embedding (it skips "lm_head.*" when tied).

    Restoring them here does what vLLM's fallback does, without the false warning. A module that holds a
    parameter of its own and received nothing (a weight missing from the update) is left to vLLM, which
    still warns. Deferred attention layers are left alone (vLLM processes them after the others).
    """
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    modules = list(dict.fromkeys(model.modules()))
    infos = {module: get_layerwise_info(module) for module in modules}
    unfilled = {
        module for module, info in infos.items()
        if info.can_load() and info.load_numel <= 0 < info.load_numel_total and info.kernel_tensors is not None
        and not is_deferred_attention_layer(module)
    }  # what vLLM would report as "Failed to load weights"
    # parameters that reach the model through a module that was (or is still being) filled
    delivered: set[int] = set()
    for module, info in infos.items():
        if module in unfilled:
            continue
        delivered.update(id(param) for param in module._parameters.values() if param is not None)
        if info.kernel_tensors is not None:
            delivered.update(id(param) for param in info.kernel_tensors[0].values())
    restored = []
    for module in modules:
        if module not in unfilled:
            continue
        info = infos[module]
        parameters, buffers = info.kernel_tensors
        buffers_computed = set(buffers) <= info.kernel_non_persistent_buffers
        parameters_tied = all(id(param) in delivered for param in parameters.values())
        if not (buffers_computed and parameters_tied):
            continue
        for name in get_layer_tensors(module):
            delattr(module, name)
        for name, param in parameters.items():
            module.register_parameter(name, param)
        for name, buffer in buffers.items():
            module.register_buffer(name, buffer, persistent=False)
        info.reset()
        restored.append(type(module).__name__)
    return restored


def refresh_tied_embeddings(model: torch.nn.Module) -> None:
    """Re-derive the kernels of embedding-like layers that share their weight (a tied LM head).

    vLLM's CPU backend keeps a packed GEMM copy of the LM head's weight (`dispatch_cpu_unquantized_gemm`).
    Layerwise reload rebuilds it only for layers that received tensors; a tied head receives none (its
    weight is the embedding's), so without this it would keep computing logits with the old embedding.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    users: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            users.setdefault(id(weight), []).append(module)
    for modules in users.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`) only so that vLLM imports this module, and with it
    the backend registration below, in every worker process. Adds no methods (the worker already has
    `update_weights`; an extension may not reuse its names)."""


def _register() -> None:
    """Make "scope_shm" known to `WeightTransferEngineFactory` in this process (idempotent)."""
    registry = WeightTransferEngineFactory._registry
    if BACKEND_NAME in registry and registry[BACKEND_NAME]() is SharedMemoryWeightTransferEngine:
        return
    WeightTransferEngineFactory.register_engine(BACKEND_NAME, SharedMemoryWeightTransferEngine)


_register()

