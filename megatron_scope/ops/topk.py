"""Vocab-parallel top-k on logits shards: a teacher's top-k summary, and the KL against such a summary.

`vocab_parallel_topk` keeps a teacher's k most likely global ids, their log-probs and the log-mass of the rest
of the vocabulary per token, k + 1 values instead of the [tokens, V/TP] logits (what a remote teacher sends);
`vocab_parallel_topk_kl` is the student's KL against such a summary, the vocabulary outside the k ids lumped
into one tail outcome (or, `renormalize=True`, both distributions renormalised over the k ids).

Tails are log-sum-exps over the entries outside the k ids, never `log(1 - Σ_k p_k)`: with a confident teacher
(top-1 probability 1 - 1e-7) that difference cancels to 0 or below in fp32, and a zero tail makes the KL
+inf and its gradient NaN.
Logits shards, `group` and `vocab_size` follow the conventions of `vocab_parallel`, whose shard plumbing
(validation, sharded log-sum-exp, log-probs at global ids) these ops build on.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from megatron_scope.ops.vocab_parallel import (
    _gather_log_probs,
    _rows,
    _shard_of,
    _vocab_size_of,
    id_range_check,
    vocab_parallel_logsumexp,
)

__all__ = ["vocab_parallel_topk", "vocab_parallel_topk_kl", "tail_log_mass_from_topk", "FP32_TAIL_FLOOR"]


def _accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


#: The smallest tail mass `tail_log_mass_from_topk` reports: fp32's unit roundoff. A top-k of fp32 log-probs
#: (vLLM's) cannot tell a smaller tail from 0, and a teacher tail of exactly 0 makes the reverse KL +inf.
FP32_TAIL_FLOOR = 2.0**-24


def uniform_topk(shape: tuple, k: int, ids_dtype: torch.dtype = torch.int64, device=None):
    """(ids, log_probs, tail_log_mass) of a top-k where no teacher scored (prompt and padding positions): ids
    0..k-1 and the uniform distribution over the k + 1 outcomes (the k ids and the tail), so it passes
    `topk_value_checks`; the loss mask zeroes whatever a loss makes of it."""
    ids = torch.arange(k, dtype=ids_dtype, device=device).expand(*shape, k).clone()
    log_probs = torch.full((*shape, k), -math.log(k + 1), device=device)
    return ids, log_probs, torch.full(shape, -math.log(k + 1), device=device)


def tail_log_mass_from_topk(topk_log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ_k exp(lp_k)) in float64, at least log(FP32_TAIL_FLOOR): the tail of a teacher known only by its
    top-k log-probs (a vLLM teacher's). Exact to the rounding of those log-probs; `vocab_parallel_topk` gives the
    tail directly instead."""
    head = torch.logsumexp(topk_log_probs.double(), dim=-1)
    return torch.log((-torch.expm1(head.clamp(max=0.0))).clamp(min=FP32_TAIL_FLOOR))


def _owned_mask(ids: torch.Tensor, shard, rows: int) -> torch.Tensor:
    """[rows, V/TP] bool: True at this shard's columns of the global `ids` [rows, k]."""
    local = ids - shard.vocab_start
    owned = (local >= 0) & (local < shard.local_vocab)
    mask = torch.zeros(rows, shard.local_vocab, dtype=torch.bool, device=ids.device)
    row_index = torch.arange(rows, device=ids.device)[:, None].expand_as(local)
    mask[row_index[owned], local[owned]] = True
    return mask


def _complement_log_mass(logits: torch.Tensor, ids: torch.Tensor, group, vocab_size, log_normalizer=None):
    """log Σ_{v ∉ ids} softmax(logits)_v per token, from the shards directly (differentiable): the log-sum-exp of
    the logits with the k ids masked to -inf, minus the log-normaliser. Builds one masked copy of the shard."""
    shard = _shard_of(logits, group, vocab_size)
    rows = _rows(logits, shard.local_vocab)
    mask = _owned_mask(ids.reshape(-1, ids.shape[-1]).long(), shard, rows.shape[0])
    rest = vocab_parallel_logsumexp(rows.masked_fill(mask, float("-inf")), group, vocab_size)
    if log_normalizer is None:
        log_normalizer = vocab_parallel_logsumexp(rows, group, vocab_size)
    return (rest - log_normalizer.reshape(rest.shape)).view(ids.shape[:-1])


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q), 0 where p = 0 (gradient-safe: the unused branch never meets inf)."""
    positive = log_p > float("-inf")
    safe_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    diff = torch.where(positive, safe_log_p - log_q, torch.zeros_like(log_p))
    return torch.where(positive, torch.exp(safe_log_p) * diff, torch.zeros_like(log_p))


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, group=None, vocab_size: int | None = None):
    """The k most likely global ids per token and their log-probs log softmax(logits)[id], largest first.

    Each rank takes the top-k of its shard (padded ids >= vocab_size excluded), the [tokens, k] candidates
    of all ranks are all-gathered and the top-k of those kept; the normaliser is `vocab_parallel_logsumexp`.
    Forward only (a teacher's summary for `vocab_parallel_topk_kl`): it keeps k + 1 values per token instead
    of the [tokens, V/TP] logits. Ties between equal logits resolve to the lower id only within a rank.
    Returns (ids int64, log_probs fp32), each `logits.shape[:-1] + (k,)`, and tail_log_mass fp32
    `logits.shape[:-1]`: log Σ_{v ∉ ids, v < vocab_size} softmax(logits)_v, computed directly from the shards
    (-inf when the k ids are the whole vocabulary). Communicates 2 all-gathers of [tokens, k] and 4 all-reduces
    of [tokens].
    """
    shard = _shard_of(logits, group, vocab_size)
    full_vocab = _vocab_size_of(shard, vocab_size)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= full_vocab:
        raise ValueError(f"k must be an int in [1, vocab_size={full_vocab}], got {k!r}")
    rows = _rows(logits, shard.local_vocab).float()
    local_k = min(k, shard.local_vocab)
    values, ids = rows.masked_fill(torch.arange(shard.local_vocab, device=rows.device) >= shard.valid,
                                   float("-inf")).topk(local_k, dim=-1)
    ids = ids + shard.vocab_start
    if shard.world_size > 1:
        gathered_values = [torch.empty_like(values) for _ in range(shard.world_size)]
        gathered_ids = [torch.empty_like(ids) for _ in range(shard.world_size)]
        dist.all_gather(gathered_values, values.contiguous(), group=shard.group)
        dist.all_gather(gathered_ids, ids.contiguous(), group=shard.group)
        values, order = torch.cat(gathered_values, -1).topk(k, dim=-1)
        ids = torch.cat(gathered_ids, -1).gather(-1, order)
    log_normalizer = vocab_parallel_logsumexp(logits, group, vocab_size).float().reshape(-1)
    log_probs = values - log_normalizer[:, None]
    shape = tuple(logits.shape[:-1]) + (k,)
    if k == full_vocab:
        tail = torch.full(shape[:-1], float("-inf"), device=logits.device)
    else:
        tail = _complement_log_mass(rows, ids, group, vocab_size, log_normalizer).reshape(shape[:-1])
    return ids.reshape(shape), log_probs.reshape(shape), tail


def topk_value_checks(ids: torch.Tensor, log_probs: torch.Tensor, tail_log_mass: torch.Tensor | None,
                      vocab_size: int) -> list[tuple[torch.Tensor, Callable[[], str]]]:
    """A teacher's top-k checked on its device without a read: (0-d bool flag, True where it is wrong; the
    ValueError message then) for ids outside [0, vocab_size), an id repeated within a token's top-k, log-probs
    that are NaN or > 0, top-k probabilities summing to more than 1, a tail log-mass that is NaN or > 0."""
    checks = []
    if ids.numel():
        checks.append(id_range_check(ids, vocab_size, "teacher_topk_ids"))
        ordered = ids.sort(dim=-1).values
        checks.append(((ordered[..., 1:] == ordered[..., :-1]).any(),
                       lambda: "teacher_topk_ids repeats an id within a token's top-k"))
    if log_probs.numel():
        values = log_probs.detach().float()
        largest, head = values.max(), torch.logsumexp(values, dim=-1).max().exp()
        checks.append((torch.isnan(values).any() | (largest > 1e-6), lambda: (
            f"teacher_topk_log_probs must be <= 0 and not NaN (max {float(largest)})")))
        checks.append((head > 1.0 + 1e-4, lambda: f"teacher top-k probabilities sum to {float(head):.6f} > 1 for "
                                                  "some token"))
    if tail_log_mass is not None and tail_log_mass.numel():
        checks.append((torch.isnan(tail_log_mass).any() | (tail_log_mass > 1e-6).any(), lambda: (
            f"teacher_tail_log_mass must be <= 0, not NaN (max {float(tail_log_mass.max())})")))
    return checks


def vocab_parallel_topk_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    kind: str = "reverse",
    group=None,
    vocab_size: int | None = None,
    *,
    teacher_tail_log_mass: torch.Tensor | None = None,
    renormalize: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Per-token KL against a teacher known only by its top-k (global ids, log-probs) per token.

    Tail (default): the vocabulary outside the teacher's k ids is one lumped outcome, and the KL is taken
    between the two distributions on k + 1 outcomes: reverse Σ_k p_k log(p_k / q_k) + p_tail log(p_tail /
    q_tail), forward likewise with p and q swapped, with 0 log 0 = 0. The student's tail log-mass is computed
    from its shards directly (`_complement_log_mass`), the teacher's is `teacher_tail_log_mass` (from
    `vocab_parallel_topk`; None: `tail_log_mass_from_topk` of its top-k log-probs). By the data-processing
    inequality this never exceeds the full-vocabulary KL; at k = V it is the full KL. A teacher tail of exactly
    0 (-inf log-mass) with a student tail > 0 gives +inf for reverse, as the full KL does.
    `renormalize=True` (the convention of NeMo-RL's DistillationLossFn and of the SCOPE authors' top-k option):
    both distributions renormalised over the k ids, p̃_k = p_k / Σ_j p_j, and KL(p̃ ‖ q̃) (or KL(q̃ ‖ p̃)) over
    the k ids only; no tail, and 0 whenever the two agree up to scale on the k ids.
    Shapes: ids and log-probs `[..., k]` and the tail `[...]` with `[...]` = `student_logits.shape[:-1]`;
    returns `[...]`. Communicates the all-reduces of `vocab_parallel_log_probs` at the k ids ([tokens] max,
    [tokens, 1 + k] sums) and, for the tail, 2 more of [tokens] over a masked copy of the student's shard (an
    fp32 copy of a 16-bit shard first, so the gradient is rounded once). The gradient flows into
    `student_logits` only. `validate`: read `topk_value_checks` from the device (once) and raise the first failing
    one; False where the caller has checked them (`schedule.forward_backward` does, once per step).
    """
    if kind not in ("reverse", "forward"):
        raise ValueError(f"kind={kind!r}; expected 'reverse' or 'forward'")
    shard = _shard_of(student_logits, group, vocab_size, "student_logits")
    full_vocab = _vocab_size_of(shard, vocab_size)
    if not isinstance(teacher_topk_log_probs, torch.Tensor) or not teacher_topk_log_probs.is_floating_point():
        raise ValueError("teacher_topk_log_probs must be a floating-point tensor")
    if teacher_topk_log_probs.dim() != student_logits.dim() or tuple(teacher_topk_log_probs.shape[:-1]) != tuple(
        student_logits.shape[:-1]
    ):
        raise ValueError(
            f"teacher_topk_log_probs shape {tuple(teacher_topk_log_probs.shape)} must be "
            f"student_logits.shape[:-1] + (k,) = {tuple(student_logits.shape[:-1])} + (k,)"
        )
    if not isinstance(teacher_topk_ids, torch.Tensor) or teacher_topk_ids.is_floating_point() or tuple(
        teacher_topk_ids.shape
    ) != tuple(teacher_topk_log_probs.shape):
        raise ValueError(f"teacher_topk_ids must be an integer tensor of shape {tuple(teacher_topk_log_probs.shape)}, "
                         f"got {getattr(teacher_topk_ids, 'dtype', type(teacher_topk_ids).__name__)} "
                         f"{tuple(getattr(teacher_topk_ids, 'shape', ()))}")
    if teacher_topk_ids.shape[-1] > full_vocab:
        raise ValueError(f"k={teacher_topk_ids.shape[-1]} exceeds vocab_size={full_vocab}")
    if teacher_tail_log_mass is not None and tuple(teacher_tail_log_mass.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"teacher_tail_log_mass must be <= 0, not NaN, of shape {tuple(student_logits.shape[:-1])}; "
                         f"got shape {tuple(teacher_tail_log_mass.shape)}")
    if validate:
        checks = topk_value_checks(teacher_topk_ids, teacher_topk_log_probs, teacher_tail_log_mass, full_vocab)
        failed = torch.stack([bad for bad, _ in checks]).nonzero().flatten().tolist() if checks else []  # one read
        if failed:
            raise ValueError(checks[failed[0]][1]())
    teacher_lp = teacher_topk_log_probs.detach().to(_accumulation_dtype(student_logits))

    if student_logits.dtype in (torch.bfloat16, torch.float16):
        # one upcast: the head and tail gradients then add in fp32 and are rounded to 16 bits once
        student_logits = student_logits.float()
    student_lp = _gather_log_probs(student_logits, teacher_topk_ids, group, vocab_size, "teacher_topk_ids")
    out_dtype = student_lp.dtype
    # [tokens, k] only: float64 keeps the head sums accurate when the top-k holds almost all the mass
    student_lp, teacher_lp = student_lp.double(), teacher_lp.double()
    if renormalize:
        student_lp = student_lp - torch.logsumexp(student_lp, dim=-1, keepdim=True)
        teacher_lp = teacher_lp - torch.logsumexp(teacher_lp, dim=-1, keepdim=True)
    elif teacher_topk_ids.shape[-1] < full_vocab:  # k = V: no tail outcome
        student_tail = _complement_log_mass(student_logits, teacher_topk_ids, group, vocab_size).double()
        teacher_tail = (tail_log_mass_from_topk(teacher_lp) if teacher_tail_log_mass is None
                        else teacher_tail_log_mass.detach().double())
        student_lp = torch.cat([student_lp, student_tail.unsqueeze(-1)], dim=-1)
        teacher_lp = torch.cat([teacher_lp, teacher_tail.unsqueeze(-1)], dim=-1)
    if kind == "reverse":
        return _plogp_ratio(student_lp, teacher_lp).sum(-1).to(out_dtype)
    return _plogp_ratio(teacher_lp, student_lp).sum(-1).to(out_dtype)
