"""Group a stream of (name, tensor) pairs into buckets of bounded size (no vLLM import: Ray drivers use it)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

ALIGNMENT = 64
"""Byte alignment of each tensor inside a packed bucket (a dtype view needs an aligned offset)."""


def aligned_nbytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` takes in a packed bucket."""
    nbytes = tensor.numel() * tensor.element_size()
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of at most `bucket_bytes` packed bytes; a larger tensor forms a bucket alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = aligned_nbytes(tensor) if isinstance(tensor, torch.Tensor) else 0
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def drain(named_tensors: Iterator) -> None:
    """Exhaust a weight stream whose consumer failed: producers such as `iter_hf_weights` run collectives
    on every rank, which would hang if the consuming rank stopped early."""
    for _ in named_tensors:
        pass
