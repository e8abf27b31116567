"""Bucketing of a weight stream and the shared-memory bucket files of the "scope_shm" vLLM backend."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_scope.rollout import shared_memory
from megatron_scope.rollout.buckets import aligned_nbytes, iter_buckets


def test_buckets_are_bounded_and_keep_order():
    tensors = [(f"t{i}", torch.zeros(size)) for i, size in enumerate([10, 20, 300, 5, 5, 40])]  # float32
    buckets = list(iter_buckets(iter(tensors), bucket_bytes=256))
    assert [name for bucket in buckets for name, _ in bucket] == [name for name, _ in tensors]
    for bucket in buckets:
        size = sum(aligned_nbytes(t) for _, t in bucket)
        assert size <= 256 or len(bucket) == 1  # only a tensor larger than a bucket travels alone
    assert [len(b) for b in buckets] == [2, 1, 2, 1]  # 64+128 | 1216 alone | 64+64 | 192
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1, got 0"):
        list(iter_buckets(tensors, 0))


def test_bucket_file_round_trip_is_exact_and_zero_copy():
    vllm_weight_transfer = pytest.importorskip("megatron_scope.rollout.vllm_weight_transfer")
    generator = torch.Generator().manual_seed(0)
    named = [
        ("a", torch.randn(3, 5, generator=generator)),
        ("b", torch.randn(7, generator=generator).to(torch.bfloat16)),
        ("c", torch.randn(4, 6, generator=generator)[:, ::2]),  # not contiguous
    ]
    payload = vllm_weight_transfer.write_bucket(named)
    try:
        assert os.path.dirname(payload["path"]) == shared_memory.shared_memory_dir()
        assert all(offset % 64 == 0 for offset in payload["offsets"])
        loaded = vllm_weight_transfer.read_bucket(vllm_weight_transfer.SharedMemoryUpdateInfo(**payload))
    finally:
        os.unlink(payload["path"])
    assert [name for name, _ in loaded] == ["a", "b", "c"]
    for (_, expected), (_, got) in zip(named, loaded):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    with pytest.raises(ValueError, match="dtype_names has 1 entries, names has 2"):
        vllm_weight_transfer.SharedMemoryUpdateInfo(path="x", names=["a", "b"], dtype_names=["float32"],
                                                    shapes=[[1], [1]], offsets=[0, 64])
