"""The refit through vLLM's CUDA IPC and NCCL backends, as far as it runs without a GPU.

IPC (packed): the packing against vLLM's own unpacking (`packed_tensor.unpack_tensor`, what its IPC worker applies
to the mapped buffer), and the protocol of `CudaIPCBuckets` inside `WeightUpdateSession` against a recording `LLM`
that parses each payload as vLLM's `IPCWeightTransferUpdateInfo` and reads every engine device's buffer the way a
worker on that GPU would. Exporting a buffer (`export_cuda_ipc`) is the one CUDA call, replaced here by a registry of
the buffers; the real export runs in `pytest -m gpu tests/integration/test_first_gpu_run.py`.

NCCL: the workers' ranks in the group (vLLM's `NCCLWeightTransferInitInfo`) and the engine side of a broadcast
bucket; the driver's protocol is in tests/integration/test_ray_engine.py, the real broadcast in its `-m gpu` test."""

from __future__ import annotations

import pytest
import torch

transfer = pytest.importorskip("megatron_scope.rollout.vllm_weight_transfer")
from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo  # noqa: E402
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor  # noqa: E402

from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, resolve_weight_transfer  # noqa: E402
from tests.unit.rollout.test_shared_memory import SHAPES, StandInLLM, stand_in_engine  # noqa: E402


def unpacked(buffer: torch.Tensor, info: IPCWeightTransferUpdateInfo) -> dict[str, torch.Tensor]:
    """What vLLM's `packed_ipc_consumer` loads from a mapped buffer: clones of `unpack_tensor`'s views."""
    content = buffer[: sum(info.tensor_sizes)]
    dtypes = [getattr(torch, name) for name in info.dtype_names]
    return {name: t.clone() for name, t in unpack_tensor(content, info.names, info.shapes, dtypes, info.tensor_sizes)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_bucket_unpacks_with_vllms_own_code_to_the_same_bytes(dtype):
    generator = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(3, 5, generator=generator).to(dtype)), ("b", torch.randn(7, generator=generator).to(dtype)),
             ("c", torch.randn(4, 6, generator=generator).to(dtype)[:, ::2])]  # odd sizes; c is not contiguous
    buffer = torch.full((1024,), 255, dtype=torch.uint8)
    meta = transfer.pack_bucket(buffer, named)
    assert meta["tensor_sizes"] == [15 * dtype.itemsize, 7 * dtype.itemsize, 12 * dtype.itemsize]
    info = IPCWeightTransferUpdateInfo(**meta, ipc_handles={"GPU-0": ()})
    loaded = unpacked(buffer, info)
    for name, tensor in named:
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor)


def test_a_bucket_of_two_dtypes_or_past_the_buffer_is_refused():
    buffer = torch.empty(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"one dtype, got \['torch.bfloat16', 'torch.float32'\]"):
        transfer.pack_bucket(buffer, [("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match="a bucket of 68 bytes does not fit the 64-byte IPC buffer"):
        transfer.pack_bucket(buffer, [("a", torch.zeros(17))])


class RecordingIPCLLM:
    """vLLM's `LLM` as `WeightUpdateSession` drives it, reading each update as vLLM's IPC worker would on every GPU
    named in the handles (the registry maps a handle to the buffer it exports)."""

    def __init__(self, registry: dict):
        self.registry, self.calls, self.loaded, self.handles = registry, [], {}, []
        self.llm_engine = StandInLLM().llm_engine

    def start_weight_update(self):
        self.calls.append("start_weight_update")

    def update_weights(self, request):
        info = IPCWeightTransferUpdateInfo(**request["update_info"])  # vLLM's own parsing and length checks
        self.calls.append(("update_weights", info.names))
        self.handles.append(info.ipc_handles)
        for uuid, args in info.ipc_handles.items():
            self.loaded.setdefault(uuid, {}).update(unpacked(self.registry[args], info))

    def finish_weight_update(self):
        self.calls.append("finish_weight_update")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return True


@pytest.fixture
def ipc_engine(monkeypatch, tmp_path):
    """A stand-in engine (vLLM never starts) refitting through CudaIPCBuckets on two "GPUs" (CPU buffers here), with
    a /dev/shm of 1 MiB free, too small for the shared-memory backend."""
    registry = {}

    def export(buffer):
        handle = ("handle", len(registry))
        registry[handle] = buffer
        return f"GPU-{len(registry)}", handle

    monkeypatch.setattr(transfer, "export_cuda_ipc", export)
    engine = stand_in_engine(monkeypatch, tmp_path, free=1 << 20, bucket_bytes=1 << 20)
    engine._llm = RecordingIPCLLM(registry)
    engine._transport = transfer.CudaIPCBuckets([torch.device("cpu"), torch.device("cpu")], 2 << 20)
    return engine


def test_every_engine_gpu_loads_the_whole_update_from_one_export_per_refit(ipc_engine):
    engine, llm = ipc_engine, ipc_engine._llm
    generator = torch.Generator().manual_seed(1)
    weights = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in SHAPES.items()}
    engine.update_weights(iter(weights.items()))
    assert llm.calls == [
        "start_weight_update",
        ("update_weights", ["model.embed_tokens.weight"]),  # 2 MiB in fp32: past the 1 MiB bucket, alone
        ("update_weights", ["model.norm.weight"]),
        "finish_weight_update",
        "reset_prefix_cache",
    ]
    assert llm.handles[0] == llm.handles[1] and len(llm.handles[0]) == 2  # one export per GPU, kept for the refit
    for uuid in llm.handles[0]:  # each GPU's own copy holds every tensor, in the engine's dtype
        assert set(llm.loaded[uuid]) == set(SHAPES)
        for name, tensor in weights.items():
            assert torch.equal(llm.loaded[uuid][name], tensor.to(torch.float32))
    assert engine._weights_valid and engine._transport._buffers == []  # released after finish_weight_update

    engine.update_weights(iter(weights.items()))  # the next refit exports fresh buffers
    assert set(llm.handles[-1]).isdisjoint(llm.handles[0])


def test_a_refused_tensor_releases_the_buffers_and_leaves_the_engine_refusing_to_generate(ipc_engine):
    engine = ipc_engine
    stream = [("model.embed_tokens.weight", torch.ones(SHAPES["model.embed_tokens.weight"])),
              ("model.norm.weight", torch.ones(3))]  # the checkpoint's is (1024,)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), the checkpoint's is \(1024,\)"):
        engine.update_weights(iter(stream))
    assert engine._llm.calls[-2:] == ["finish_weight_update", "reset_prefix_cache"]
    assert engine._transport._buffers == [] and not engine._weights_valid


def test_the_auto_backend_is_ipc_on_cuda_and_shared_memory_elsewhere():
    config = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20)
    assert resolve_weight_transfer(config, cuda=True) == "ipc"
    assert resolve_weight_transfer(config, cuda=False) == "shared_memory"
    shm = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, weight_transfer="shared_memory")
    assert resolve_weight_transfer(shm, cuda=True) == "shared_memory"
    ipc = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, weight_transfer="ipc")
    with pytest.raises(ValueError, match="'ipc' .*--weight-transfer-backend ipc.* needs CUDA"):
        resolve_weight_transfer(ipc, cuda=False)
    with pytest.raises(ValueError, match="weight_transfer must be one of"):
        VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, weight_transfer="gloo")


def test_the_ipc_buffers_need_distinct_gpus(monkeypatch):
    monkeypatch.setattr(transfer, "export_cuda_ipc", lambda buffer: ("GPU-0", ("handle", id(buffer))))
    buckets = transfer.CudaIPCBuckets([torch.device("cpu"), torch.device("cpu")], 64)
    with pytest.raises(ValueError, match="are not distinct GPUs"):
        with buckets.payload([("a", torch.zeros(2))]):
            pass


def test_each_engines_workers_take_their_own_ranks_after_the_driver():
    broadcast = transfer.NCCLBroadcast([2, 1, 4], buffer_bytes=1 << 20, master_address="10.0.0.1", master_port=29555)
    infos = broadcast.worker_init_infos()
    assert broadcast.world_size == 8 and [info["rank_offset"] for info in infos] == [1, 3, 4]
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    parsed = [NCCLWeightTransferInitInfo(**info) for info in infos]  # what vLLM's worker parses
    assert {(p.master_address, p.master_port, p.world_size, p.packed, p.packed_buffer_size_bytes) for p in parsed} == {
        ("10.0.0.1", 29555, 8, True, 1 << 20)}
    with pytest.raises(RuntimeError, match=r"open\(\) must run before send"):
        broadcast.send([("w", torch.zeros(2))])
    with pytest.raises(ValueError, match="engine_world_sizes must name >= 1 worker per engine"):
        transfer.NCCLBroadcast([2, 0], 1, master_address="10.0.0.1", master_port=1)


class RecordingNCCLLLM(StandInLLM):
    """vLLM's `LLM` receiving a broadcast: records what `update_weights` is told to expect."""

    def update_weights(self, request):
        self.calls.append(("update_weights", request["update_info"]))


def test_an_engine_receives_a_checked_broadcast_bucket(monkeypatch, tmp_path):
    engine = stand_in_engine(monkeypatch, tmp_path, free=1 << 20)  # no /dev/shm room needed: nothing is written
    engine._llm, engine._transport = RecordingNCCLLLM(), transfer.NCCLReceiver()
    session = engine.begin_weight_update()
    with pytest.raises(ValueError, match="'model.norm.weight' arrives as bfloat16, the engine runs float32"):
        session.receive(["model.norm.weight"], ["bfloat16"], [[1024]])
    assert engine._llm.calls == []  # refused before vLLM was told to receive anything
    session = engine.begin_weight_update()
    session.receive(["model.embed_tokens.weight"], ["float32"], [[512, 1024]])
    session.receive(["model.norm.weight"], ["float32"], [[1024]])
    session.finish()
    assert engine._llm.calls == [
        "start_weight_update",
        ("update_weights", {"names": ["model.embed_tokens.weight"], "dtype_names": ["float32"], "shapes": [[512, 1024]]}),
        ("update_weights", {"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[1024]]}),
        "finish_weight_update",
        "reset_prefix_cache",
    ]
    assert engine._weights_valid
    with pytest.raises(RuntimeError, match="refits through 'scope_shm', not 'nccl'"):
        engine._transport = transfer.SharedMemoryBuckets()
        engine.join_weight_broadcast({})


def test_nccl_is_for_ray_engines_on_cuda():
    from megatron_scope.config import RolloutConfig

    nccl = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, weight_transfer="nccl")
    with pytest.raises(ValueError, match="'nccl' .*needs CUDA"):
        resolve_weight_transfer(nccl, cuda=False)
    assert resolve_weight_transfer(nccl, cuda=True) == "nccl"
    with pytest.raises(ValueError, match="--weight-transfer-backend nccl broadcasts to Ray engines .*--rollout-placement "
                                         "colocated: use ipc"):
        RolloutConfig(weight_transfer_backend="nccl")
    RolloutConfig(weight_transfer_backend="nccl", placement="ray", engines=2)
