"""Move weights between a TP x PP Megatron GPTModel and Hugging Face tensors (names and layouts: hf_mapping.py).

- `iter_hf_weights`: stream the model out as full HF tensors on one destination rank (vLLM weight sync,
  Megatron -> HF conversion).
- `load_hf_weights`: every rank copies its own TP/PP shard in from a full HF state dict.
- `SafetensorsCheckpoint` (lazy reader) and `save_safetensors_checkpoint` (streaming sharded writer): HF files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_scope.megatron import hf_mapping
from megatron_scope.megatron.hf_mapping import ParamMapping
from megatron_scope.megatron.arch import DecoderArch
from megatron_scope.megatron.model import unwrap_model

DEFAULT_BUCKET_BYTES = 512 << 20
_ALIGN = 64  # byte alignment of each tensor inside a bucket (a dtype view needs an aligned offset)
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def local_params(model, arch: DecoderArch) -> list[tuple[ParamMapping, torch.nn.Parameter]]:
    """This rank's parameters with their global mappings, in model order.

    Cross-checks each parameter's TP split against megatron-core's own `partition_dim` attribute.
    """
    gpt = unwrap_model(model)
    result = []
    for name, param in gpt.named_parameters():
        match = _LOCAL_LAYER.match(name)
        if match:
            layer = gpt.decoder.layers[int(match.group(1))].layer_number - 1  # layer_number is global, 1-based
            name = f"decoder.layers.{layer}.{match.group(2)}"
        mapping = hf_mapping.param_mapping(name, arch)
        megatron_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        if megatron_dim != mapping.tp_dim:
            raise RuntimeError(
                f"{name}: megatron-core splits it over TP along dim {megatron_dim}, hf_mapping says {mapping.tp_dim}")
        result.append((mapping, param))
    return result


# --------------------------------------------------------------------------------------------- export
@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one HF tensor lies in a bucket."""

    hf_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _plan_buckets(stage_entries, arch: DecoderArch, bucket_bytes: int) -> list[tuple[list[_Slot], int]]:
    """Greedy buckets of whole parameters: (slots, bucket size in bytes). A bucket is larger than
    bucket_bytes only when one parameter alone is."""
    hf_shapes = hf_mapping.hf_param_shapes(arch)
    buckets: list[tuple[list[_Slot], int]] = []
    slots: list[_Slot] = []
    size = 0
    for name, _shape, dtype in stage_entries:
        mapping = hf_mapping.param_mapping(name, arch)
        if not mapping.exported:
            continue
        param_slots, param_size = [], 0
        for hf_name in mapping.hf_names:
            slot = _Slot(hf_name, hf_shapes[hf_name], dtype, param_size)
            param_slots.append(slot)
            param_size += -(-slot.nbytes // _ALIGN) * _ALIGN
        if slots and size + param_size > bucket_bytes:
            buckets.append((slots, size))
            slots, size = [], 0
        slots.extend(dataclasses.replace(s, offset=s.offset + size) for s in param_slots)
        size += param_size
    if slots:
        buckets.append((slots, size))
    return buckets


def _slot_view(buffer: torch.Tensor, slot: _Slot) -> torch.Tensor:
    return buffer[slot.offset: slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


def _gathered_hf_tensors(params, arch: DecoderArch, leader: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Run on every rank of one stage's TP group: gathers each TP-split parameter to `leader` (one
    `gather` of the local shard per parameter), which yields the full HF tensors; other ranks yield nothing."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    is_leader = dist.get_rank() == leader
    for mapping, param in params:
        if not mapping.exported:
            continue
        shard = param.detach()
        if mapping.tp_dim is None or tp_size == 1:
            full = shard
        else:
            shard = shard.contiguous()
            shards = [torch.empty_like(shard) for _ in range(tp_size)] if is_leader else None
            dist.gather(shard, shards, dst=leader, group=tp_group)
            full = hf_mapping.merge_tp_shards(mapping, shards) if is_leader else None
        if is_leader:
            yield from hf_mapping.to_hf(mapping, full, arch)


def iter_hf_weights(
    model,
    arch: DecoderArch,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dst_rank: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every HF parameter of `arch`, on global rank `dst_rank` only.

    Call it on every rank and exhaust the generator everywhere (other ranks yield nothing). Ranks outside
    `dst_rank`'s model-parallel replica (other DP/CP ranks) return at once without communicating.
    Within the replica it communicates:
      1. once, an `all_gather_object` over the model-parallel group of each rank's (TP rank, PP rank,
         parameter names, shapes, dtypes): every rank derives the same bucket plan from it;
      2. per TP-split parameter, a `gather` of the local shards in each stage's TP group to that stage's
         leader (the rank with `dst_rank`'s TP rank); replicated parameters (norms) are not communicated;
      3. per bucket, one point-to-point `send` of a flat byte buffer (<= bucket_bytes, or one parameter
         if that is larger) from each other stage's leader to `dst_rank`.
    `dst_rank`'s own stage is yielded tensor by tensor without a bucket. Peak extra memory: on a leader,
    one bucket plus one gathered parameter; on `dst_rank`, one bucket plus the tensors the caller keeps.
    Yielded tensors are views into a received bucket or the gathered parameter (no extra copy); vocab
    padding is dropped (embeddings have exactly arch.vocab_size rows, the shape the HF config declares,
    however far the model is padded); with tied embeddings only `model.embed_tokens.weight` is yielded.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    world_size = dist.get_world_size()
    if not 0 <= dst_rank < world_size:
        raise ValueError(f"dst_rank {dst_rank} is outside the world of {world_size} ranks")
    mp_group = parallel_state.get_model_parallel_group()
    mp_ranks = dist.get_process_group_ranks(mp_group)
    if dst_rank not in mp_ranks:
        return
    params = local_params(model, arch)
    me = dist.get_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    entries = [(m.megatron_name, tuple(p.shape), p.dtype) for m, p in params]
    infos = [None] * len(mp_ranks)
    dist.all_gather_object(infos, (me, tp_rank, pp_rank, entries), group=mp_group)

    dst_tp = next(tp for rank, tp, _, _ in infos if rank == dst_rank)
    leaders = {pp: rank for rank, tp, pp, _ in infos if tp == dst_tp}
    stage_entries = {pp: ents for rank, _, pp, ents in infos if rank == leaders[pp]}
    stage_mappings = [hf_mapping.param_mapping(name, arch) for ents in stage_entries.values() for name, _, _ in ents]
    exported = {hf_name for m in stage_mappings if m.exported for hf_name in m.hf_names}
    missing = sorted(set(hf_mapping.hf_param_shapes(arch)) - exported)
    if missing:
        raise ValueError(f"the model does not hold these HF parameters of {arch}: {missing}")
    device = params[0][1].device
    stage_tensors = _gathered_hf_tensors(params, arch, leaders[pp_rank])

    if me == dst_rank:
        for stage in range(pp_size):
            if stage == pp_rank:
                yield from stage_tensors
                continue
            for slots, size in _plan_buckets(stage_entries[stage], arch, bucket_bytes):
                bucket = torch.empty(size, dtype=torch.uint8, device=device)
                dist.recv(bucket, src=leaders[stage])
                for slot in slots:
                    yield slot.hf_name, _slot_view(bucket, slot)
    elif me == leaders[pp_rank]:
        for slots, size in _plan_buckets(stage_entries[pp_rank], arch, bucket_bytes):
            bucket = torch.empty(size, dtype=torch.uint8, device=device)
            for slot in slots:
                hf_name, tensor = next(stage_tensors)
                if hf_name != slot.hf_name or tuple(tensor.shape) != slot.shape:
                    raise RuntimeError(f"bucket plan expects {slot.hf_name} {slot.shape}, "
                                       f"got {hf_name} {tuple(tensor.shape)}")
                _slot_view(bucket, slot).copy_(tensor)
            dist.send(bucket, dst=dst_rank)
    else:
        for _ in stage_tensors:  # non-leader: take part in the TP gathers only
            pass


# --------------------------------------------------------------------------------------------- import
def _hf_shape(hf_tensors: Mapping, name: str) -> tuple[int, ...]:
    if isinstance(hf_tensors, SafetensorsCheckpoint):
        return hf_tensors.shape(name)
    return tuple(hf_tensors[name].shape)


def validate_hf_tensors(hf_tensors: Mapping, arch: DecoderArch) -> None:
    """ValueError naming every missing, unexpected or mis-shaped HF tensor for `arch`'s model."""
    expected = hf_mapping.hf_param_shapes(arch)
    present = {name for name in hf_tensors if not hf_mapping.IGNORED_HF_NAME.match(name)}
    tied_head = arch.tie_word_embeddings and "lm_head.weight" in present
    unexpected = sorted(present - set(expected) - ({"lm_head.weight"} if tied_head else set()))
    missing = sorted(set(expected) - present)
    wrong = {n: (_hf_shape(hf_tensors, n), s) for n, s in expected.items()
             if n in present and _hf_shape(hf_tensors, n) != s}
    if missing or unexpected or wrong:
        raise ValueError(
            f"HF weights do not match {arch}: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes (got, expected) {wrong}")
    if tied_head and not torch.equal(hf_tensors["lm_head.weight"], hf_tensors["model.embed_tokens.weight"]):
        raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")


def checked_local_params(model, arch: DecoderArch) -> list[tuple[ParamMapping, torch.nn.Parameter]]:
    """`local_params`, after checking every shard's shape against `arch` at the current TP size (the
    vocabulary may be padded to any size >= arch.vocab_size); ValueError naming the first that differs."""
    params = local_params(model, arch)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    vocab_rows = [p.shape[0] * tp_size for m, p in params if m.layout == hf_mapping.VOCAB]
    padded_vocab = vocab_rows[0] if vocab_rows else arch.vocab_size
    if padded_vocab < arch.vocab_size:
        raise ValueError(f"model's vocabulary ({padded_vocab} rows) is smaller than arch.vocab_size {arch.vocab_size}")
    for mapping, param in params:
        full_shape = hf_mapping.megatron_full_shape(mapping, arch, padded_vocab)
        expected = hf_mapping.tp_shard_shape(full_shape, mapping, tp_size)
        if tuple(param.shape) != expected:
            raise ValueError(f"{mapping.megatron_name}: model shard has shape {tuple(param.shape)}, "
                             f"{arch} at TP={tp_size} needs {expected}")
    return params


@torch.no_grad()
def load_hf_weights(model, arch: DecoderArch, hf_tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's TP/PP shard of every parameter from a full HF state dict (no communication).

    `hf_tensors`: a dict or a `SafetensorsCheckpoint` (read lazily, tensor by tensor). Each parameter is
    built unsplit from its HF tensors, then sliced to this rank's shard; the model's vocabulary rows beyond
    the checkpoint's (however many: `build_gpt_model(padded_vocab=...)`) become zero; values are cast to the
    parameter's dtype. Names and shapes (of the checkpoint and of the model against `arch`) are all checked
    before any parameter changes.
    """
    params = checked_local_params(model, arch)
    validate_hf_tensors(hf_tensors, arch)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    padded_vocab = unwrap_model(model).vocab_size
    for mapping, param in params:
        full = hf_mapping.from_hf(mapping, hf_tensors.__getitem__, arch, padded_vocab)
        param.copy_(hf_mapping.tp_shard(mapping, full, tp_rank, tp_size))


# --------------------------------------------------------------------------------------------- files
class SafetensorsCheckpoint(Mapping):
    """The tensors of a HF model directory (`model.safetensors` or shards with an index), opened lazily:
    a tensor is read from disk when it is looked up."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = os.fspath(directory)
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {self.directory}")
        self._handles = {f: safe_open(os.path.join(self.directory, f), framework="pt") for f in files}
        self._file_of: dict[str, str] = {}
        for file, handle in self._handles.items():
            for name in handle.keys():
                if name in self._file_of:
                    raise ValueError(f"tensor {name!r} is in both {self._file_of[name]} and {file} ({self.directory})")
                self._file_of[name] = file

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, without reading it."""
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def save_safetensors_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike,
    max_shard_bytes: int = 4 << 30,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Write (name, tensor) pairs as HF safetensors, streaming: `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when they exceed
    max_shard_bytes. Only one shard is held in memory. Returns the written file names."""
    from safetensors.torch import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    shards: list[list[str]] = []
    seen: set[str] = set()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0

    def flush():
        temp = os.path.join(directory, f".shard-{len(shards)}.safetensors.tmp")
        save_file(shard, temp, metadata={"format": "pt"})
        shards.append(list(shard))

    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).clone()  # own storage: no shared views
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        if name in seen:
            raise ValueError(f"tensor {name!r} was given twice")
        seen.add(name)
        shard[name] = tensor
        shard_bytes += nbytes
        total_bytes += nbytes
    if shard or not shards:
        flush()
    count = len(shards)
    names = ["model.safetensors"] if count == 1 else [
        f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for i, final in enumerate(names):
        os.replace(os.path.join(directory, f".shard-{i}.safetensors.tmp"), os.path.join(directory, final))
    if count > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {n: names[i] for i, s in enumerate(shards) for n in s}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


def export_hf_checkpoint(model, arch: DecoderArch, directory: str | os.PathLike, model_type: str = "qwen2") -> None:
    """Write `model` (any TP/PP; call on every rank) as a Hugging Face checkpoint of `model_type`:
    config.json and safetensors, written by global rank 0 from the `iter_hf_weights` stream."""
    config = hf_mapping.hf_config_from_arch(arch, model_type)
    stream = iter_hf_weights(model, arch)
    if dist.get_rank() != 0:
        for _ in stream:
            pass
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2, default=lambda value: str(value).removeprefix("torch."))
    save_safetensors_checkpoint(stream, directory)
