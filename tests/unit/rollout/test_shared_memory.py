"""Room in /dev/shm for a refit through the "scope_shm" backend (no vLLM engine starts): the peak formula
against a replay of the real bucket files, and the clear error, before anything is written, when the
shared-memory directory is too small (its free space is a stand-in: a container's 64 MiB)."""

from __future__ import annotations

import mmap
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_scope.rollout import shared_memory
from megatron_scope.rollout.buckets import iter_buckets
from megatron_scope.rollout.shared_memory import (
    SharedMemoryTooSmallError,
    bucket_file_bytes,
    check_refit_room,
    packed_model_bytes,
    refit_shm_peak_bytes,
    refit_tensor_bytes,
)
from megatron_scope.rollout.vllm_engine import ModelFacts, VLLMEngineConfig, VLLMRolloutEngine

MIB = 1 << 20
PAGE = mmap.PAGESIZE


# ------------------------------------------------------------------------------------------ the peak formula
def _bucket_file_bytes_in(directory) -> int:
    """Bytes of bucket files in shared memory now: files still linked in `directory`, plus unlinked ones that
    some mapping in this process keeps alive (a tmpfs keeps those pages), each counted once."""
    total = sum(-(-os.path.getsize(os.path.join(directory, f)) // PAGE) * PAGE for f in os.listdir(directory))
    mapped = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(str(directory)) and fields[5].rstrip().endswith(
                    "(deleted)"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mapped[fields[4]] = mapped.get(fields[4], 0) + end - start
    return total + sum(mapped.values())


def replay_refit(stream, bucket_bytes, modules, held=(), directory=None) -> int:
    """Send `stream` as `VLLMRolloutEngine.update_weights` does -- `iter_buckets`, `write_bucket`, the worker's
    `read_bucket`, the file unlinked once the worker returned -- to a stand-in for vLLM's layerwise reload,
    which keeps the loaded views of a module (`modules`: module -> its tensor names) until all of them arrived
    (`info.loaded_weights` in vllm/model_executor/model_loader/reload/layerwise.py), and those of the `held`
    modules (a padded vocabulary) until the update finishes. Returns the most bytes of bucket files in shared
    memory at once, measured right after each file is written (the worker adds no pages by mapping it)."""
    transfer = pytest.importorskip("megatron_scope.rollout.vllm_weight_transfer")
    module_of = {name: module for module, names in modules.items() for name in names}
    pending: dict[str, list] = {}
    arrived: dict[str, set] = {}
    peak = 0
    for bucket in iter_buckets(iter(stream), bucket_bytes):
        payload = transfer.write_bucket(bucket, str(directory))
        peak = max(peak, _bucket_file_bytes_in(directory))
        for name, view in transfer.read_bucket(transfer.SharedMemoryUpdateInfo(**payload)):
            module = module_of[name]
            pending.setdefault(module, []).append(view)
            arrived.setdefault(module, set()).add(name)
            if arrived[module] == set(modules[module]) and module not in held:
                del pending[module]  # vLLM copies the complete module into its parameters and drops the views
        del view
        os.unlink(payload["path"])
    pending.clear()  # finish_weight_update
    assert _bucket_file_bytes_in(directory) == 0
    return peak


def floats(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


needs_proc_maps = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@needs_proc_maps
def test_a_module_straddling_two_buckets_keeps_the_previous_file_mapped(tmp_path):
    bucket = 2 * PAGE
    stream = [(name, floats(PAGE)) for name in ("l0.norm", "l0.q", "l0.k", "l0.v", "l1.norm")]
    # buckets: [l0.norm, l0.q] [l0.k, l0.v] [l1.norm]; while the second is written, q's view of the
    # incomplete qkv module keeps the first mapped
    qkv = {"l0.norm": ["l0.norm"], "qkv": ["l0.q", "l0.k", "l0.v"], "l1.norm": ["l1.norm"]}
    peak = replay_refit(stream, bucket, qkv, directory=tmp_path)
    assert peak == 2 * bucket == refit_shm_peak_bytes(bucket, PAGE, page_bytes=PAGE)
    # the same stream without a module across the boundary holds one file at a time
    alone = {name: [name] for name, _ in stream}
    assert replay_refit(stream, bucket, alone, directory=tmp_path) == bucket


@needs_proc_maps
def test_tensors_larger_than_a_bucket_set_the_file_size(tmp_path):
    bucket = PAGE
    big = 2 * PAGE + 16  # alone in its bucket, 2 * PAGE + 64 bytes aligned: three pages
    stream = [("norm", floats(PAGE // 2)), ("gate", floats(big)), ("up", floats(big)), ("down", floats(PAGE // 2))]
    modules = {"norm": ["norm"], "gate_up": ["gate", "up"], "down": ["down"]}
    peak = replay_refit(stream, bucket, modules, directory=tmp_path)
    assert bucket_file_bytes(bucket, big, PAGE) == 3 * PAGE
    assert peak == 6 * PAGE == refit_shm_peak_bytes(bucket, big, page_bytes=PAGE)


@needs_proc_maps
def test_a_padded_vocabulary_keeps_its_file_until_the_refit_ends(tmp_path):
    bucket = 2 * PAGE
    stream = [(name, floats(PAGE)) for name in ("embed", "l0.norm", "l0.q", "l0.k", "l0.v", "l1.norm")]
    modules = {"embed": ["embed"], "l0.norm": ["l0.norm"], "qkv": ["l0.q", "l0.k", "l0.v"], "l1.norm": ["l1.norm"]}
    # [embed, l0.norm] (held) [q, k] (qkv incomplete) [v, l1.norm]: three files at once
    peak = replay_refit(stream, bucket, modules, held=("embed",), directory=tmp_path)
    assert peak == 6 * PAGE == refit_shm_peak_bytes(bucket, PAGE, {"embed": PAGE}, PAGE)
    assert replay_refit(stream, bucket, modules, directory=tmp_path) == 4 * PAGE  # unpadded: two files


def test_the_held_tensors_are_the_padded_vocabulary_ones():
    shapes = {"model.embed_tokens.weight": (500, 16), "lm_head.weight": (500, 16),
              "model.layers.0.mlp.up_proj.weight": (40, 16), "model.norm.weight": (16,)}
    largest, held = refit_tensor_bytes(shapes, 2, vocab_size=500)
    assert largest == 500 * 16 * 2
    assert held == {"model.embed_tokens.weight": 16000, "lm_head.weight": 16000}
    shapes = {"model.embed_tokens.weight": (512, 16), "model.norm.weight": (16,)}
    assert refit_tensor_bytes(shapes, 4, vocab_size=512) == (512 * 16 * 4, {})  # a multiple of 64: no padding


# ------------------------------------------------------------------------------------------ the checks
def space(size: int, free: int):
    return lambda directory: (size, free, 4096)


def test_the_error_names_the_directory_its_size_the_need_and_the_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(shared_memory, "shm_space", space(64 * MIB, 60 * MIB))
    with pytest.raises(SharedMemoryTooSmallError) as raised:
        check_refit_room(512 * MIB, 10 * MIB, directory=str(tmp_path))
    assert str(raised.value) == (
        f"{tmp_path} is too small for a weight refit through shared memory (the 'scope_shm' weight-transfer "
        "backend): the container's shared memory there is 64.0 MiB (67108864 bytes) with 60.0 MiB (62914560 "
        "bytes) free, and a refit keeps up to 1024.0 MiB (1073741824 bytes) there at once: two bucket files of "
        "up to 512.0 MiB (536870912 bytes) each (the larger of the bucket size, 512.0 MiB (536870912 bytes), set "
        "by --weight-transfer-bucket-mib, and the model's largest tensor, 10.0 MiB (10485760 bytes)). Writing "
        f"past the end of {tmp_path} would kill the process with SIGBUS and no traceback. Give the container at "
        "least 1024 MiB of shared memory (docker run --shm-size=1024m; on Kubernetes an emptyDir with medium: "
        "Memory mounted at /dev/shm), or lower --weight-transfer-bucket-mib to 30 or less. On CUDA, "
        "--weight-transfer-backend ipc (auto's choice there) needs no shared memory.")
    assert not os.listdir(tmp_path)
    assert check_refit_room(30 * MIB, 10 * MIB, directory=str(tmp_path)) == 60 * MIB  # what it suggested fits


def test_when_no_bucket_size_helps_it_says_so_and_counts_the_padded_vocabulary(monkeypatch, tmp_path):
    held = {"model.embed_tokens.weight": 20 * MIB}  # its file stays mapped: 2 x 20 + 20 MiB at once
    monkeypatch.setattr(shared_memory, "shm_space", space(64 * MIB, 60 * MIB))
    assert check_refit_room(8 * MIB, 20 * MIB, held, str(tmp_path)) == 60 * MIB
    (tmp_path / "scope-weights-0123.bin").write_bytes(b"x" * 100)  # left by a run that died
    monkeypatch.setattr(shared_memory, "shm_space", space(64 * MIB, 50 * MIB))
    with pytest.raises(SharedMemoryTooSmallError) as raised:
        check_refit_room(8 * MIB, 20 * MIB, held, str(tmp_path))
    message = str(raised.value)
    assert "keeps up to 60.0 MiB (62914560 bytes) there at once" in message
    assert ("two bucket files of up to 20.0 MiB (20971520 bytes) each (the larger of the bucket size, 8.0 MiB "
            "(8388608 bytes), set by --weight-transfer-bucket-mib, and the model's largest tensor, 20.0 MiB "
            "(20971520 bytes)), plus 20.0 MiB (20971520 bytes) for the files of ['model.embed_tokens.weight'], "
            "whose vocabulary vLLM pads to a multiple of 64, so it keeps them mapped until the refit ends.") in message
    assert "; a smaller --weight-transfer-bucket-mib cannot make it fit." in message
    assert "1 scope-weights-*.bin file(s) of 0.0 MiB (100 bytes) are there now" in message


def test_check_with_room_passes(monkeypatch, tmp_path):
    monkeypatch.setattr(shared_memory, "shm_space", space(2048 * MIB, 1024 * MIB))
    assert check_refit_room(512 * MIB, 100 * MIB, directory=str(tmp_path)) == 1024 * MIB
    assert shared_memory.shm_space(str(tmp_path))[0] > 0  # the real statvfs on a real directory (unpatched)


def test_a_bucket_file_without_room_is_never_created(monkeypatch, tmp_path):
    transfer = pytest.importorskip("megatron_scope.rollout.vllm_weight_transfer")
    monkeypatch.setattr(shared_memory, "shm_space", space(64 * MIB, 8192))
    with pytest.raises(SharedMemoryTooSmallError,
                       match=r"has no room for the next weight bucket file of 0.0 MiB \(12288 bytes\)"):
        transfer.write_bucket([("w", torch.zeros(3000))], str(tmp_path))
    assert not os.listdir(tmp_path)
    payload = transfer.write_bucket([("w", torch.zeros(2000))], str(tmp_path))  # 8000 bytes: two pages fit
    os.unlink(payload["path"])


# ------------------------------------------------------------------------------------------ in the engine
class StandInLLM:
    """vLLM's `LLM` as `WeightUpdateSession` drives it, recording the calls (no engine starts)."""

    def __init__(self):
        self.calls = []
        resources = SimpleNamespace(engine_dead=False, engine_manager=SimpleNamespace(processes=[]))
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(resources=resources))

    def start_weight_update(self):
        self.calls.append("start_weight_update")

    def update_weights(self, request):
        self.calls.append(("update_weights", sorted(request["update_info"]["names"])))

    def finish_weight_update(self):
        self.calls.append("finish_weight_update")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return True


SHAPES = {"model.embed_tokens.weight": (512, 1024), "model.norm.weight": (1024,)}  # largest: 2 MiB in fp32


def stand_in_engine(monkeypatch, directory, free: int, bucket_bytes: int = 512 * MIB):
    monkeypatch.setattr(shared_memory, "shared_memory_dir", lambda: str(directory))
    monkeypatch.setattr(shared_memory, "shm_space", space(64 * MIB, free))
    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)
    engine.config = VLLMEngineConfig("/models/student", kv_cache_bytes=1 << 20, weight_bucket_bytes=bucket_bytes)
    engine.facts = ModelFacts(vocab_size=512, max_position_embeddings=64, num_layers=1, num_kv_heads=1,
                              head_dim=64, dtype=torch.float32, weight_shapes=SHAPES)
    engine._died, engine._weights_valid, engine.name, engine.residency = None, True, "rollout", None
    engine._sleeping = set()  # awake
    engine._llm = StandInLLM()
    from megatron_scope.rollout.vllm_weight_transfer import SharedMemoryBuckets

    engine._transport = SharedMemoryBuckets()
    return engine


def test_a_too_small_shm_stops_the_update_before_anything_is_written(monkeypatch, tmp_path):
    engine = stand_in_engine(monkeypatch, tmp_path, free=1 * MIB)
    consumed = []

    def stream():
        for name, shape in SHAPES.items():
            consumed.append(name)
            yield name, torch.ones(shape)

    with pytest.raises(SharedMemoryTooSmallError, match=(
            rf"^{tmp_path} is too small for a weight refit .* 64.0 MiB \(67108864 bytes\) with 1.0 MiB "
            r"\(1048576 bytes\) free, and a refit keeps up to 2.0 MiB .* set by --weight-transfer-bucket-mib.*; the "
            r"whole model's weights are 2.0 MiB \(2101248 bytes\), less than that, so at most those")):
        engine.update_weights(stream())
    assert consumed == list(SHAPES)  # the stream was drained (other trainer ranks run its collectives)
    assert engine._llm.calls == [] and not os.listdir(tmp_path)  # no vLLM call, no file
    assert engine._weights_valid  # the engine keeps its old weights and may generate
    with pytest.raises(SharedMemoryTooSmallError):
        engine.begin_weight_update()  # the Ray actor's entry point checks too


def test_with_room_the_update_runs_and_leaves_no_file(monkeypatch, tmp_path):
    pytest.importorskip("megatron_scope.rollout.vllm_weight_transfer")
    engine = stand_in_engine(monkeypatch, tmp_path, free=64 * MIB, bucket_bytes=2 * MIB)  # needs 4 MiB
    engine.update_weights((name, torch.ones(shape)) for name, shape in SHAPES.items())
    assert engine._llm.calls == [
        "start_weight_update",
        ("update_weights", ["model.embed_tokens.weight"]),  # 2 MiB: a bucket of its own
        ("update_weights", ["model.norm.weight"]),
        "finish_weight_update",
        "reset_prefix_cache",
    ]
    assert not os.listdir(tmp_path) and engine._weights_valid


def test_a_model_smaller_than_a_bucket_needs_no_more_than_itself(monkeypatch, tmp_path):
    """A tiny model (1 MiB) with 512 MiB buckets fits a 64 MiB /dev/shm: its files hold at most the model."""
    shapes = {"embed": (512, 256), "layer": (256, 256)}
    model = packed_model_bytes(shapes, 4)
    assert model == (512 + 256) * 256 * 4
    assert refit_shm_peak_bytes(512 * MIB, 512 * 256 * 4, page_bytes=PAGE, model_bytes=model) == model + 2 * PAGE
    monkeypatch.setattr(shared_memory, "shm_space", space(64 * MIB, 64 * MIB))
    assert check_refit_room(512 * MIB, 512 * 256 * 4, directory=str(tmp_path), model_bytes=model) == model + 2 * 4096
