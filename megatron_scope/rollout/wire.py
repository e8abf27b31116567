"""Rollouts between ranks as one flat byte buffer: the per-token data in flat tensors with offsets, the rest pickled.

`pack` lays a list of `RolloutGroup`s out as one uint8 tensor: prompt and response token ids (int32; vocabulary ids),
the sampler's log-probs (float64: `Completion.log_probs` are Python floats, so the round trip is exact), SRPO's
self-teacher prompts, and the teacher's and reference's `SequenceScores` (float32 log-probs, int32 top-k ids), each
list concatenated into one flat tensor and cut by int64 offsets; only the small per-group and per-response metadata
(prompt id, outcomes, verdicts, finish reasons and version runs, weight version, prefix lengths, which optional
fields are present, each score's k) travels as a pickled object. `unpack` rebuilds the groups exactly. `deliver`
moves packed shares from a rollout leader to the ranks that train on them with tensor collectives (gloo on CPU, NCCL
on CUDA).
"""

from __future__ import annotations

import itertools
import pickle
from array import array
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_scope.rollout.batch import RolloutGroup
from megatron_scope.rollout.engine import Completion, SequenceScores

# The flat tensors of a packed rollout, in buffer order: (name, dtype). "meta" is the pickled metadata's bytes.
SEGMENTS = (("meta", torch.uint8), ("prompt_offsets", torch.int64), ("prompt_tokens", torch.int32),
            ("response_offsets", torch.int64), ("response_tokens", torch.int32), ("response_log_probs", torch.float64),
            ("self_teacher_offsets", torch.int64), ("self_teacher_tokens", torch.int32),
            *((f"{model}_{what}", dtype) for model in ("teacher", "reference")
              for what, dtype in (("log_probs", torch.float32), ("topk_ids", torch.int32),
                                  ("topk_log_probs", torch.float32))))
ALIGN = 8  # bytes: every segment starts at a multiple, so it is viewed in its dtype without a copy
INT32_MAX = 2**31 - 1


def _flat(values: Iterable, typecode: str, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a 1-D tensor of `dtype`, read into an `array` of C type `typecode` (a C loop; `torch.tensor` of
    a Python list is several times slower)."""
    values = array(typecode, values)
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.empty(0, dtype=dtype)


def _ids(lists: Sequence[Sequence[int]], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [n + 1] int64, the concatenated ids int32) of `lists`; ValueError for an id outside [0, 2**31)."""
    try:
        flat = _flat(itertools.chain.from_iterable(lists), "i", torch.int32)
        if flat.numel() and flat.min() < 0:
            raise OverflowError
    except OverflowError:
        bad = [t for ids in lists for t in ids if not 0 <= t <= INT32_MAX]
        raise ValueError(f"{what}: token ids outside [0, 2**31): {bad[:5]}") from None
    offsets = torch.tensor([0] + [len(ids) for ids in lists], dtype=torch.int64).cumsum(0)
    return offsets, flat


def _cut(flat: list, offsets: list[int]) -> list[list]:
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _scores(groups: Sequence[RolloutGroup], field: str) -> tuple[list[list[int] | None], list[torch.Tensor]]:
    """Each group's top-k width per response (None: the group has no such scores) and the flat log-probs, top-k ids
    and top-k log-probs of the groups' `field` (teacher_scores or reference_scores)."""
    ks, parts = [], ([], [], [])
    for group in groups:
        scored = getattr(group, field)
        if scored is None:
            ks.append(None)
            continue
        ks.append([])
        for completion, scores in zip(group.completions, scored, strict=True):
            rows, k = len(completion.token_ids), scores.topk_ids.shape[-1]
            if scores.topk_ids.shape != (rows, k) or scores.topk_log_probs.shape != (rows, k):
                raise ValueError(f"prompt {group.prompt_id!r}: {field} of a {rows}-token response has top-k of "
                                 f"shapes {tuple(scores.topk_ids.shape)} and {tuple(scores.topk_log_probs.shape)}, "
                                 f"not ({rows}, k)")
            ks[-1].append(k)
            parts[0].append(scores.log_probs.reshape(-1).to(torch.float32))
            parts[1].append(scores.topk_ids.reshape(-1).to(torch.int32))
            parts[2].append(scores.topk_log_probs.reshape(-1).to(torch.float32))
    dtypes = (torch.float32, torch.int32, torch.float32)
    return ks, [torch.cat(p).cpu() if p else torch.empty(0, dtype=d) for p, d in zip(parts, dtypes)]


def pack(groups: Sequence[RolloutGroup], extra: object = None) -> torch.Tensor:
    """`groups` (and `extra`, any small picklable object) as one 1-D uint8 CPU tensor: a header of each segment's
    element count (int64), then the segments of `SEGMENTS`, each 8-byte aligned. ValueError for a token id outside
    int32 or a top-k that is not [response tokens, k]."""
    completions = [c for g in groups for c in g.completions]
    prompts = [g.prompt_token_ids for g in groups]
    self_teacher = [p for g in groups for p in g.self_teacher_prompts or () if p is not None]
    teacher_ks, teacher = _scores(groups, "teacher_scores")
    reference_ks, reference = _scores(groups, "reference_scores")
    routed = [None if g.self_teacher_prompts is None else [p is not None for p in g.self_teacher_prompts]
              for g in groups]
    meta = [(g.prompt_id, list(g.correct), g.verdicts, [(c.finish_reason, c.versions) for c in g.completions],
             g.weight_version, g.prefix_lengths, *per_group)
            for g, *per_group in zip(groups, routed, teacher_ks, reference_ks)]
    segments = [torch.frombuffer(bytearray(pickle.dumps((meta, extra))), dtype=torch.uint8),
                *_ids(prompts, "prompt"), *_ids([c.token_ids for c in completions], "response"),
                _flat(itertools.chain.from_iterable(c.log_probs for c in completions), "d", torch.float64),
                *_ids(self_teacher, "self-teacher prompt"), *teacher, *reference]
    header = torch.tensor([s.numel() for s in segments], dtype=torch.int64)
    chunks = [header.view(torch.uint8)]
    for segment in segments:
        data = segment.contiguous().view(torch.uint8)
        chunks += [data, torch.zeros(-data.numel() % ALIGN, dtype=torch.uint8)]
    return torch.cat(chunks)


def _segments(buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named segments of a packed buffer, as views into it."""
    counts = buffer[: 8 * len(SEGMENTS)].view(torch.int64).tolist()
    segments, at = {}, 8 * len(SEGMENTS)
    for (name, dtype), count in zip(SEGMENTS, counts):
        nbytes = count * dtype.itemsize
        segments[name] = buffer[at : at + nbytes].view(dtype)
        at += nbytes + -nbytes % ALIGN
    if at != buffer.numel():
        raise ValueError(f"a packed rollout of {buffer.numel()} bytes whose header describes {at}")
    return segments


def _unscores(ks: list[int] | None, lengths: list[int], flat: list[torch.Tensor], at: list[int]) -> list | None:
    """The SequenceScores of one group's responses (`lengths` tokens each, top-k widths `ks`) read from `flat`
    (log-probs, top-k ids, top-k log-probs) at positions `at`, which advance past them."""
    if ks is None:
        return None
    scores = []
    for rows, k in zip(lengths, ks, strict=True):
        log_probs = flat[0][at[0] : at[0] + rows]
        ids, topk = (t[at[1] : at[1] + rows * k].reshape(rows, k) for t in flat[1:])
        scores.append(SequenceScores(log_probs, ids, topk))
        at[0], at[1] = at[0] + rows, at[1] + rows * k
    return scores


def unpack(buffer: torch.Tensor) -> tuple[list[RolloutGroup], object]:
    """(groups, extra) from `pack`'s buffer (a CPU uint8 tensor): equal to what was packed (token ids as lists,
    log-probs bit for bit; the scores' tensors are views into copies of its segments, not into `buffer`)."""
    segments = _segments(buffer)
    meta, extra = pickle.loads(segments["meta"].numpy().tobytes())
    prompts = _cut(segments["prompt_tokens"].tolist(), segments["prompt_offsets"].tolist())
    offsets = segments["response_offsets"].tolist()
    tokens = _cut(segments["response_tokens"].tolist(), offsets)
    log_probs = _cut(segments["response_log_probs"].tolist(), offsets)
    self_teacher = iter(_cut(segments["self_teacher_tokens"].tolist(), segments["self_teacher_offsets"].tolist()))
    flat = {model: [segments[f"{model}_{what}"].clone() for what in ("log_probs", "topk_ids", "topk_log_probs")]
            for model in ("teacher", "reference")}
    at = {"teacher": [0, 0], "reference": [0, 0]}
    groups, response = [], 0
    for prompt, (prompt_id, correct, verdicts, reasons, version, prefix_lengths, routed, teacher_ks,
                 reference_ks) in zip(prompts, meta, strict=True):
        completions = [Completion(tokens[response + j], log_probs[response + j], reason, versions)
                       for j, (reason, versions) in enumerate(reasons)]
        response += len(reasons)
        lengths = [len(c.token_ids) for c in completions]
        groups.append(RolloutGroup(
            prompt_id, prompt, completions, correct,
            teacher_scores=_unscores(teacher_ks, lengths, flat["teacher"], at["teacher"]),
            self_teacher_prompts=None if routed is None else [next(self_teacher) if r else None for r in routed],
            prefix_lengths=prefix_lengths,
            reference_scores=_unscores(reference_ks, lengths, flat["reference"], at["reference"]),
            verdicts=verdicts, weight_version=version))
    return groups, extra


def deliver(shares: Sequence[torch.Tensor] | None, device: torch.device, replica_group, replica_source: int,
            scatter_group=None, scatter_source: int | None = None) -> torch.Tensor:
    """This rank's packed share (a CPU uint8 tensor), in two stages.

    1. With `scatter_group` (the leader and the replicas' first ranks): `scatter_source` holds `shares`, one per
       rank of the group in group order, and scatters them: 1 broadcast of [group size] int64 sizes, 1 scatter of
       uint8 buffers padded to the largest share.
    2. Every rank of `replica_group`: `replica_source` (which holds `shares`, one, or got its share in stage 1)
       broadcasts it: 1 broadcast of its size, 1 of its bytes (nothing when the group is this rank alone).
    Tensors travel on `device` (CUDA under NCCL)."""
    rank = dist.get_rank()
    share = shares[0] if shares is not None and len(shares) == 1 else None
    if scatter_group is not None:
        sizes = torch.tensor([len(s) for s in shares] if rank == scatter_source else
                             [0] * dist.get_world_size(scatter_group), dtype=torch.int64, device=device)
        dist.broadcast(sizes, src=scatter_source, group=scatter_group)
        width = int(sizes.max())
        padded = None
        if rank == scatter_source:
            padded = [torch.zeros(width, dtype=torch.uint8, device=device) for _ in shares]
            for buffer, s in zip(padded, shares):
                buffer[: len(s)] = s.to(device)
        received = torch.empty(width, dtype=torch.uint8, device=device)
        dist.scatter(received, padded, src=scatter_source, group=scatter_group)
        share = received[: int(sizes[dist.get_group_rank(scatter_group, rank)])]
    if dist.get_world_size(replica_group) == 1:
        return share.cpu()
    size = torch.tensor([len(share) if rank == replica_source else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=replica_source, group=replica_group)
    if rank == replica_source:
        share = share.to(device)
    else:
        share = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(share, src=replica_source, group=replica_group)
    return share.cpu()
