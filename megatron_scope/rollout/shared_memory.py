"""Room in shared memory for a weight refit through the "scope_shm" backend (no vLLM import).

The backend (`vllm_weight_transfer`) writes each weight bucket as a new file in /dev/shm, a tmpfs: its pages
are taken as the file is written, and a write past the tmpfs size kills the writer with SIGBUS and no Python
traceback. Docker and Kubernetes give a container 64 MiB there by default. So before a refit writes anything,
`check_refit_room` compares the directory's free space with what one refit keeps there at once
(`refit_shm_peak_bytes`) and raises `SharedMemoryTooSmallError` naming the directory, its size and free
bytes, the bytes needed, the bucket size and `BUCKET_FLAG`, the flag that sets it; `check_bucket_room`
repeats the comparison for each file just before it is written (what the peak formula cannot see: other
processes' use, modules spanning more than two buckets).

What a refit keeps in shared memory at once, from the code:
- a bucket (`buckets.iter_buckets`) holds tensors of at most `bucket_bytes` packed bytes (`aligned_nbytes`),
  or one larger tensor alone, so one file takes at most max(bucket_bytes, aligned largest tensor) bytes,
  rounded up to whole pages (`bucket_file_bytes`);
- the sender maps its file only while writing it and unlinks it once the workers have returned from the
  bucket's `update_weights`; the workers' views (`read_bucket`) keep the whole file mapped, and a mapped
  tmpfs file keeps its pages after the unlink;
- vLLM's layerwise reload buffers the loaded views of a module (`info.loaded_weights` in
  `vllm/model_executor/model_loader/reload/layerwise.py`) until all its elements have arrived, then copies
  them and drops them. Megatron streams each vLLM module's tensors together (q, k, v of `qkv_proj` from one
  `linear_qkv`; gate and up of `gate_up_proj` from one `linear_fc1`), so a module that straddles a bucket
  boundary keeps the previous file mapped while the next one is written: two files at once;
- a vocabulary embedding (`embed_tokens`, an untied `lm_head`) whose vocabulary is not a multiple of 64 is
  padded by vLLM (`pad_vocab_size`); the padding rows are never loaded, so the module is processed only when
  the update finishes and keeps its file mapped for the whole refit.

Hence `refit_shm_peak_bytes` = 2 x `bucket_file_bytes(bucket_bytes, largest tensor)` + one file per padded
vocabulary tensor: an upper bound whenever every vLLM module spans at most two buckets, which holds when each
module's packed bytes fit in one bucket or it has at most two tensors (dense models at the default 512 MiB).
It is reached when the module straddling two files holds the largest tensor; where the largest tensor is a
module of its own (an unpadded embedding or LM head larger than a bucket) the real peak is lower, down to
that file plus one bucket. Modules spanning more than two buckets (a fused MoE layer's experts; q, k and v
each near the bucket size) keep every file they touch mapped, more than this, and engines on one node share
/dev/shm: `check_bucket_room` turns those cases into an error before the write instead of a SIGBUS.
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
from typing import Mapping

from megatron_scope.rollout.buckets import ALIGNMENT

VOCAB_PADDING = 64
"""vLLM pads an embedding's vocabulary to a multiple of this (DEFAULT_VOCAB_PADDING_SIZE in vLLM 0.32's
vocab_parallel_embedding.py)."""
BUCKET_FLAG = "--weight-transfer-bucket-mib"
"""The flag that sets `VLLMEngineConfig.weight_bucket_bytes` (the bucket size of the shared-memory refit)."""
BUCKET_FILE_GLOB = "scope-weights-*.bin"
"""Names of the bucket files `vllm_weight_transfer.write_bucket` creates."""
_MIB = 1 << 20


class SharedMemoryTooSmallError(RuntimeError):
    """The shared-memory directory has no room for a weight refit (raised before anything is written)."""


def shared_memory_dir() -> str:
    """Where bucket files go: /dev/shm (RAM) when it exists, else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def shm_space(directory: str) -> tuple[int, int, int]:
    """(size, free bytes, page bytes) of the filesystem holding `directory` (os.statvfs; what non-root may use)."""
    stat = os.statvfs(directory)
    return stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize, stat.f_frsize or 1


def _round_up(nbytes: int, unit: int) -> int:
    return -(-nbytes // unit) * unit


def bucket_file_bytes(bucket_bytes: int, tensor_bytes: int, page_bytes: int = 4096) -> int:
    """Most bytes one bucket file takes: max(bucket_bytes, `tensor_bytes` aligned to 64), in whole pages
    (a tensor larger than a bucket travels alone, `buckets.iter_buckets`)."""
    if bucket_bytes < 1 or tensor_bytes < 0 or page_bytes < 1:
        raise ValueError(f"need bucket_bytes >= 1, tensor_bytes >= 0, page_bytes >= 1; got {bucket_bytes}, "
                         f"{tensor_bytes}, {page_bytes}")
    return _round_up(max(bucket_bytes, _round_up(tensor_bytes, ALIGNMENT), 1), page_bytes)


def refit_shm_peak_bytes(bucket_bytes: int, largest_tensor_bytes: int,
                         held_tensor_bytes: Mapping[str, int] | None = None, page_bytes: int = 4096,
                         model_bytes: int | None = None) -> int:
    """Most shared-memory bytes a refit keeps at once (module docstring):
    2 x bucket_file_bytes(bucket_bytes, largest_tensor_bytes) -- the file being written and the previous one,
    kept mapped by a module that straddles them -- plus bucket_file_bytes(bucket_bytes, n) for each tensor in
    `held_tensor_bytes` (name -> bytes; padded vocabulary tensors, whose files stay mapped until the refit ends);
    at most `model_bytes` (the whole model packed, `packed_model_bytes`) plus a page for each of those files: a
    model smaller than a bucket needs no more than itself.
    """
    held = sum(bucket_file_bytes(bucket_bytes, n, page_bytes) for n in (held_tensor_bytes or {}).values())
    peak = 2 * bucket_file_bytes(bucket_bytes, largest_tensor_bytes, page_bytes) + held
    if model_bytes is not None:
        peak = min(peak, _round_up(model_bytes, page_bytes) + (2 + len(held_tensor_bytes or {})) * page_bytes)
    return peak


def packed_model_bytes(weight_shapes: Mapping[str, tuple[int, ...]], itemsize: int) -> int:
    """The bytes of every tensor of `weight_shapes` at `itemsize` bytes per element, each aligned as a bucket packs
    it (`buckets.aligned_nbytes`)."""
    return sum(_round_up(math.prod(shape) * itemsize, ALIGNMENT) for shape in weight_shapes.values())


def refit_tensor_bytes(weight_shapes: Mapping[str, tuple[int, ...]], itemsize: int,
                       vocab_size: int) -> tuple[int, dict[str, int]]:
    """(largest tensor's bytes, {name: bytes} of the tensors whose files vLLM keeps mapped to the end of a
    refit) for a checkpoint's `weight_shapes` sent at `itemsize` bytes per element. The held ones are the
    2-D tensors of `vocab_size` rows when vLLM pads that vocabulary (not a multiple of `VOCAB_PADDING`)."""
    sizes = {name: math.prod(shape) * itemsize for name, shape in weight_shapes.items()}
    padded = vocab_size % VOCAB_PADDING != 0
    held = {name: sizes[name] for name, shape in weight_shapes.items()
            if padded and len(shape) == 2 and shape[0] == vocab_size}
    return max(sizes.values(), default=0), held


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.1f} MiB ({nbytes} bytes)"


def _leftovers(directory: str) -> str:
    """A sentence on bucket files present in `directory` (left by a run that died, or another engine's refit)."""
    files = glob.glob(os.path.join(directory, BUCKET_FILE_GLOB))
    if not files:
        return ""
    total = 0
    for path in files:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return (f" {len(files)} {BUCKET_FILE_GLOB} file(s) of {_mib(total)} are there now (left by a run that "
            "died, or another engine's refit in progress): delete those a dead run left.")


def check_refit_room(bucket_bytes: int, largest_tensor_bytes: int,
                     held_tensor_bytes: Mapping[str, int] | None = None, directory: str | None = None,
                     model_bytes: int | None = None) -> int:
    """Raise `SharedMemoryTooSmallError` unless `directory` (default `shared_memory_dir()`) has room for
    `refit_shm_peak_bytes`; return that peak. Reads only the filesystem's statistics (writes nothing)."""
    directory = directory or shared_memory_dir()
    size, free, page = shm_space(directory)
    needed = refit_shm_peak_bytes(bucket_bytes, largest_tensor_bytes, held_tensor_bytes, page, model_bytes)
    if needed <= free:
        return needed
    file_bytes = bucket_file_bytes(bucket_bytes, largest_tensor_bytes, page)
    uncapped = refit_shm_peak_bytes(bucket_bytes, largest_tensor_bytes, held_tensor_bytes, page)
    held = ""
    if held_tensor_bytes:
        held = (f", plus {_mib(uncapped - 2 * file_bytes)} for the files of {sorted(held_tensor_bytes)}, whose "
                f"vocabulary vLLM pads to a multiple of {VOCAB_PADDING}, so it keeps them mapped until the refit ends")
    if needed < uncapped:  # the whole model is smaller than that
        held = f"; the whole model's weights are {_mib(model_bytes)}, less than that, so at most those"
    fitting_mib = _largest_fitting_bucket_mib(free, largest_tensor_bytes, held_tensor_bytes, page,
                                              bucket_bytes // _MIB, model_bytes)
    smaller = (f", or lower {BUCKET_FLAG} to {fitting_mib} or less" if fitting_mib
               else f"; a smaller {BUCKET_FLAG} cannot make it fit")
    raise SharedMemoryTooSmallError(
        f"{directory} is too small for a weight refit through shared memory (the 'scope_shm' weight-transfer "
        f"backend): the container's shared memory there is {_mib(size)} with {_mib(free)} free, and a refit "
        f"keeps up to {_mib(needed)} there at once: two bucket files of up to {_mib(file_bytes)} each (the "
        f"larger of the bucket size, {_mib(bucket_bytes)}, set by {BUCKET_FLAG}, and the model's largest tensor, "
        f"{_mib(largest_tensor_bytes)}){held}. Writing past the end of {directory} would kill the process with "
        f"SIGBUS and no traceback. Give the container at least {-(-needed // _MIB)} MiB of shared memory (docker "
        f"run --shm-size={-(-needed // _MIB)}m; on Kubernetes an emptyDir with medium: Memory mounted at "
        f"/dev/shm){smaller}. On CUDA, --weight-transfer-backend ipc (auto's choice there) needs no shared "
        f"memory.{_leftovers(directory)}"
    )


def _largest_fitting_bucket_mib(free: int, largest_tensor_bytes: int, held_tensor_bytes, page: int,
                                below_mib: int, model_bytes: int | None) -> int:
    """Largest bucket size in whole MiB (as the flag takes it), under `below_mib`, whose refit fits in `free`
    bytes; 0 if none (the peak only grows with the bucket size)."""
    low, high = 0, below_mib - 1
    while low < high:
        middle = (low + high + 1) // 2
        if refit_shm_peak_bytes(middle * _MIB, largest_tensor_bytes, held_tensor_bytes, page, model_bytes) <= free:
            low = middle
        else:
            high = middle - 1
    return low


def check_bucket_room(nbytes: int, directory: str) -> None:
    """Raise `SharedMemoryTooSmallError` unless `directory` has room for a bucket file of `nbytes` (checked
    just before each file is created: a refit whose modules span more than two buckets, or shared memory
    taken by other processes since `check_refit_room`)."""
    size, free, page = shm_space(directory)
    needed = _round_up(max(nbytes, 1), page)
    if needed > free:
        raise SharedMemoryTooSmallError(
            f"{directory} has no room for the next weight bucket file of {_mib(needed)}: the container's shared "
            f"memory there is {_mib(size)} with {_mib(free)} free (files of earlier buckets stay mapped while a "
            f"vLLM module spanning them is incomplete). Writing it would kill the process with SIGBUS. Give the "
            f"container more shared memory (docker run --shm-size; on Kubernetes an emptyDir with medium: Memory "
            f"at /dev/shm) or lower {BUCKET_FLAG}.{_leftovers(directory)}"
        )
