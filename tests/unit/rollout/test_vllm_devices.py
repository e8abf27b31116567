"""A co-located engine's devices: CUDA_VISIBLE_DEVICES narrowed for vLLM's processes while they start, then
restored; a device list that does not match the engine's TP is refused."""

import os

import pytest

from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, _visible_devices


def test_visible_devices_are_narrowed_while_vllm_starts_and_restored(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7,9")
    with _visible_devices((1, 2)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"  # indices into this process's visible devices
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5,7,9"
    with pytest.raises(RuntimeError, match="vLLM failed"):
        with _visible_devices((0,)):
            raise RuntimeError("vLLM failed")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5,7,9"
    with _visible_devices(None):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5,7,9"


def test_devices_must_match_the_engines_tensor_parallelism():
    with pytest.raises(ValueError, match=r"devices \(0,\) must name tensor_parallel_size 2 devices"):
        VLLMEngineConfig("model", kv_cache_bytes=1 << 20, tensor_parallel_size=2, devices=(0,))
