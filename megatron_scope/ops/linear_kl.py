"""Full-vocabulary KL straight from two models' last hidden states: no [tokens, vocab] logits are kept.

Each rank of the tensor-parallel `group` holds its vocabulary shard of both models' output layers
(Megatron's `ColumnParallelLinear` output layer or the tied word embeddings: `[V/TP, hidden]`, rows
[rank * V/TP, (rank + 1) * V/TP)). The logits s = h_S W_S^T and t = h_T W_T^T exist one token chunk at a
time (`[rows, V/TP]`): the forward computes each chunk's statistics with `vocab_parallel`'s chunk kernels
and combines them across ranks exactly as `vocab_parallel_kl` does; the backward recomputes each chunk,
turns it into the chunk's logit gradient and multiplies that into the hidden-state and weight gradients.
The result equals `vocab_parallel_kl(h_S W_S^T, h_T W_T^T)` on materialised logits (same logit dtype,
same fp32 statistics), with memory of one chunk instead of two [tokens, V/TP] shards and their gradient.

Cost: the forward does the two logit matmuls, the backward recomputes them and adds the two gradient
matmuls (h_S and W_S): 6 matmuls against 4 for materialised logits, because the per-token output's
upstream gradient is unknown until backward (Liger-Kernel's fused losses reach 4 by returning a scalar).

Under TP the hidden states are replicated on every rank (as in front of Megatron's output layer without
sequence parallelism); the hidden-state gradient is summed over the group here, as the output layer's
`copy_to_tensor_model_parallel_region` would, so every rank returns the full gradient.
Precision: the logits have the inputs' dtype (as Megatron's output layer produces them); statistics and
the logit gradient are fp32, rounded once to the logits' dtype before the two gradient matmuls (as autograd
rounds the gradient of materialised logits). The weight gradient accumulates over all token chunks in fp32
(fp64 for fp64 weights) and is cast to the weight's dtype once, as one matmul over all tokens would round it.

Memory: for bf16/fp16 weights the backward holds one fp32 [V/TP, hidden_S] accumulator, 4 bytes per element
of the local weight shard (0.87 GiB for a 151936 x 1536 output layer at TP 1), beside the returned gradient
in the weight's dtype; fp32 and fp64 weights accumulate straight into the returned gradient.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_scope.ops.vocab_parallel import (
    _check_ids,
    _kernel,
    _Shard,
    _vocab_size_of,
    check_kl_kind,
    reduce_pair_stats,
    shard_geometry,
    use_compiled_kernels,
)

__all__ = ["LinearDistillStats", "vocab_parallel_linear_distill_stats", "vocab_parallel_linear_kl"]

logger = logging.getLogger(__name__)

#: Most elements of one [rows, V/TP] logits chunk: 2^24 (64 MiB of fp32) on CPU, 2^26 on CUDA.
CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 26
#: At least this many chunks (when there are enough tokens), so a chunk's ~6 logit-sized temporaries stay
#: a fraction (~6/32) of one [tokens, V/TP] fp32 shard whatever the token count.
MIN_CHUNKS = 32


class LinearDistillStats(NamedTuple):
    """Per-token outputs of `vocab_parallel_linear_distill_stats` (shape: the hidden states' leading dims)."""

    kl: torch.Tensor
    """The divergence `kind` between student and teacher; gradient into the student's hidden state and weight."""
    student_log_probs: torch.Tensor | None
    """log p_S(target); gradient into the student (None without `target`)."""
    teacher_log_probs: torch.Tensor | None
    """log p_T(target), no gradient (None without `target`)."""
    student_entropy: torch.Tensor
    """H(p_S) in nats, no gradient."""


def chunk_rows(num_rows: int, local_vocab: int, device_type: str) -> int:
    """Token rows per chunk: at most CHUNK_ELEMENTS (CUDA_CHUNK_ELEMENTS) logits, and at least MIN_CHUNKS
    chunks when num_rows allows."""
    elements = CUDA_CHUNK_ELEMENTS if device_type == "cuda" else CHUNK_ELEMENTS
    return max(1, min(elements // max(local_vocab, 1), math.ceil(num_rows / MIN_CHUNKS)))


def _token_chunks(num_rows: int, local_vocab: int, device: torch.device):
    """(row slice, is_full_chunk) covering [0, num_rows) in chunks of `chunk_rows` rows."""
    rows = chunk_rows(num_rows, local_vocab, device.type)
    for start in range(0, num_rows, rows):
        stop = min(start + rows, num_rows)
        yield slice(start, stop), stop - start == rows


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One chunk of a model's logits shard, [rows, valid], in the inputs' dtype."""
    return hidden @ weight.t()


#: Whether this torch's CUDA addmm takes a bf16/fp16 product into an fp32 `out` (torch.addmm's `out_dtype`);
#: None until first tried.
_cuda_mixed_addmm: bool | None = None


def _accumulate_weight_grad(accumulator: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """accumulator += grad_logits^T hidden, the sum and every product in the accumulator's dtype.

    bf16/fp16 operands into an fp32 accumulator: on CUDA one cuBLAS matmul with fp32 output (addmm's
    `out_dtype`), else (CPU, or a torch without it) on operands upcast to fp32. The two agree up to summation
    order: a product of two bf16 (fp16) values is exact in fp32.
    """
    global _cuda_mixed_addmm
    if grad_logits.dtype == accumulator.dtype:
        accumulator.addmm_(grad_logits.t(), hidden)
        return
    if accumulator.is_cuda and _cuda_mixed_addmm is not False:
        try:
            torch.addmm(accumulator, grad_logits.t(), hidden, out_dtype=accumulator.dtype, out=accumulator)
            _cuda_mixed_addmm = True
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError) as error:
            if _cuda_mixed_addmm:  # it worked before: a real failure, not a missing feature
                raise
            _cuda_mixed_addmm = False
            logger.warning("torch.addmm(out_dtype=%s) is not available (%s); the fused KL's weight gradient "
                           "multiplies fp32 upcasts of its %s operands instead (same result, slower)",
                           accumulator.dtype, error, grad_logits.dtype)
    accumulator.addmm_(grad_logits.t().to(accumulator.dtype), hidden.to(accumulator.dtype))


class _LinearKL(torch.autograd.Function):
    """Statistics of s = h_S W_S^T and t = h_T W_T^T per token chunk; backward recomputes each chunk.

    Forward inputs are 2-D ([tokens, hidden], [V/TP, hidden]) plus local target ids [tokens, k] (k = 0 or 1)
    and their ownership mask. Communicates the all-reduces of `reduce_pair_stats` (jsd: one more), and in
    backward one all-reduce of the student's hidden-state gradient [tokens, hidden_S].
    Saves the four inputs and 5 [tokens] statistics; backward accumulates the weight gradient in fp32 (one
    [V/TP, hidden_S] buffer for bf16/fp16 weights) and casts it to the weight's dtype once.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, local_ids, owned,
                kind, beta, shard: _Shard, use_compiled):
        num_rows, valid = student_hidden.shape[0], shard.valid
        w_s, w_t = student_weight[:valid], teacher_weight[:valid]
        stats_dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32  # as the kernels
        local = torch.zeros((num_rows, 6 + 2 * local_ids.shape[1]), dtype=stats_dtype, device=student_hidden.device)
        local[:, :2] = float("-inf")  # a shard of padding only: no mass, neutral statistics
        for rows, full in _token_chunks(num_rows, valid, student_hidden.device) if valid else ():
            s, t = _logits(student_hidden[rows], w_s), _logits(teacher_hidden[rows], w_t)
            local[rows, :6] = torch.stack(_kernel("kl_entropy_stats", use_compiled, full, s, t, kind), -1)
            picked = torch.cat([s.gather(-1, local_ids[rows]), t.gather(-1, local_ids[rows])], -1)
            local[rows, 6:] = torch.where(owned[rows].repeat(1, 2), picked.to(local.dtype), 0.0)
        s_max, t_max, s_sum, t_sum, cross, entropy_sum = local[:, :6].unbind(-1)
        s_shift, s_log_norm, t_shift, t_log_norm, aux, kl, (mean_shifted, picked) = reduce_pair_stats(
            shard, kind, s_max, t_max, s_sum, t_sum, cross, (entropy_sum, local[:, 6:])
        )
        if kind == "jsd":  # its sums need the global log-normalisers: a second pass over recomputed logits
            mix = local.new_zeros((2, num_rows))
            for rows, full in _token_chunks(num_rows, valid, student_hidden.device) if valid else ():
                s, t = _logits(student_hidden[rows], w_s), _logits(teacher_hidden[rows], w_t)
                mix[:, rows] = torch.stack(_kernel("jsd_sums", use_compiled, full, s, t, s_shift[rows],
                                                   s_log_norm[rows], t_shift[rows], t_log_norm[rows], beta))
            mix = shard.reduce(mix, dist.ReduceOp.SUM)
            aux = mix[1]  # KL(p || m)
            kl = beta * mix[0] + (1.0 - beta) * mix[1]
        k = local_ids.shape[1]
        student_log_probs = picked[:, :k] - (s_shift + s_log_norm).unsqueeze(-1)
        teacher_log_probs = picked[:, k:] - (t_shift + t_log_norm).unsqueeze(-1)
        entropy = s_log_norm - mean_shifted
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              s_shift, s_log_norm, t_shift, t_log_norm, aux, local_ids, owned)
        ctx.kind, ctx.beta, ctx.shard, ctx.use_compiled = kind, beta, shard, use_compiled
        ctx.mark_non_differentiable(teacher_log_probs, entropy)
        return kl, student_log_probs, teacher_log_probs, entropy

    @staticmethod
    def backward(ctx, grad_kl, grad_log_probs, _grad_teacher_log_probs, _grad_entropy):
        """Per chunk: d/ds of (g_kl KL + g_lp log p_S(target)), then h_S and W_S gradients (the latter summed
        over chunks in fp32) from it."""
        (student_hidden, student_weight, teacher_hidden, teacher_weight,
         s_shift, s_log_norm, t_shift, t_log_norm, aux, local_ids, owned) = ctx.saved_tensors
        shard, valid = ctx.shard, ctx.shard.valid
        w_s, w_t = student_weight[:valid], teacher_weight[:valid]
        grad_hidden = torch.zeros_like(student_hidden)
        grad_weight = torch.zeros_like(student_weight)  # padded rows keep 0
        accumulate_in_place = student_weight.dtype in (torch.float32, torch.float64)
        grad_weight_acc = grad_weight[:valid] if accumulate_in_place else grad_weight.new_zeros(
            (valid, grad_weight.shape[1]), dtype=torch.float32)
        if grad_kl is None:
            grad_kl = s_shift.new_zeros(s_shift.shape)
        with_target = grad_log_probs is not None and local_ids.shape[1] > 0
        for rows, full in _token_chunks(student_hidden.shape[0], valid, student_hidden.device) if valid else ():
            s, t = _logits(student_hidden[rows], w_s), _logits(teacher_hidden[rows], w_t)
            grad = _kernel("kl_grad", ctx.use_compiled, full, s, t, grad_kl[rows].contiguous(), s_shift[rows],
                           s_log_norm[rows], t_shift[rows], t_log_norm[rows], aux[rows], ctx.kind, ctx.beta)
            if with_target:
                grad = grad + _kernel("gather_grad", ctx.use_compiled, full, s, grad_log_probs[rows].contiguous(),
                                      s_shift[rows], s_log_norm[rows], local_ids[rows], owned[rows])
            grad = grad.to(student_weight.dtype)
            grad_hidden[rows] = grad @ w_s
            _accumulate_weight_grad(grad_weight_acc, grad, student_hidden[rows])
        if not accumulate_in_place:
            grad_weight[:valid].copy_(grad_weight_acc)  # the one rounding to the weight's dtype
            del grad_weight_acc
        shard.reduce(grad_hidden, dist.ReduceOp.SUM)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _check_model(hidden, weight, name: str) -> None:
    for tensor, what in ((hidden, f"{name}_hidden"), (weight, f"{name}_weight")):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{what} must be a floating-point torch.Tensor, got "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}_weight must be the output layer's shard [V/TP, hidden], got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}_hidden shape {tuple(hidden.shape)} does not end in {name}_weight's hidden size "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"{name}_hidden ({hidden.dtype}, {hidden.device}) and {name}_weight "
                         f"({weight.dtype}, {weight.device}) must share dtype and device")


def vocab_parallel_linear_distill_stats(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    kind: str = "reverse",
    group=None,
    vocab_size: int | None = None,
    beta: float = 0.5,
) -> LinearDistillStats:
    """Per-token KL, log p(target) of both models and the student's entropy, from hidden states.

    student_hidden [..., H_S] and teacher_hidden [..., H_T] (same leading shape, hidden sizes may differ),
    student_weight [V/TP, H_S] and teacher_weight [V/TP, H_T] (this rank's output-layer shards), target
    [...] global vocabulary ids or None; `kind`, `group`, `vocab_size`, `beta` as in `vocab_parallel_kl`.
    Gradients flow into `student_hidden` and `student_weight` only, from `kl` and `student_log_probs`.
    """
    check_kl_kind(kind, beta)
    _check_model(student_hidden, student_weight, "student")
    _check_model(teacher_hidden, teacher_weight, "teacher")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden shape {tuple(student_hidden.shape)} and teacher_hidden shape "
                         f"{tuple(teacher_hidden.shape)} differ in their token dimensions")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student_weight has {student_weight.shape[0]} vocabulary rows per rank, teacher_weight "
                         f"{teacher_weight.shape[0]}: the two output layers must be sharded alike")
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device}, teacher_hidden on {teacher_hidden.device}")
    shard = shard_geometry(student_weight.shape[0], group, vocab_size, "student_weight")
    leading = student_hidden.shape[:-1]
    num_rows = math.prod(leading)
    if target is None:
        local_ids = torch.zeros((num_rows, 0), dtype=torch.long, device=student_hidden.device)
    else:
        _check_ids(target, leading, _vocab_size_of(shard, vocab_size), "target")
        local_ids = target.reshape(num_rows, 1).long() - shard.vocab_start
    owned = (local_ids >= 0) & (local_ids < shard.valid)
    local_ids = local_ids.clamp(0, max(shard.valid - 1, 0))
    use_compiled = use_compiled_kernels(student_hidden.dtype, student_hidden.device, num_rows * shard.local_vocab)
    kl, student_log_probs, teacher_log_probs, entropy = _LinearKL.apply(
        student_hidden.reshape(num_rows, -1), student_weight, teacher_hidden.reshape(num_rows, -1), teacher_weight,
        local_ids, owned, kind, float(beta), shard, use_compiled,
    )
    if target is None:
        student_log_probs = teacher_log_probs = None
    else:
        student_log_probs, teacher_log_probs = student_log_probs.view(leading), teacher_log_probs.view(leading)
    return LinearDistillStats(kl.view(leading), student_log_probs, teacher_log_probs, entropy.view(leading))


def vocab_parallel_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str = "reverse",
    group=None,
    vocab_size: int | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """`vocab_parallel_kl(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, kind, ...)`
    without either model's logits: per-token divergence, shape `student_hidden.shape[:-1]`.

    kind: "reverse" KL(student || teacher), "forward" KL(teacher || student), "jsd" (GKD, arXiv 2306.13649,
    Eq. 3, with `beta`). Each weight is that model's output-layer shard [V/TP, hidden] (the word embeddings
    when tied); hidden sizes may differ. Gradients into `student_hidden` (summed over the TP group) and
    `student_weight` only. Memory: one token chunk of logits (`CHUNK_ELEMENTS`); communicates per-token
    statistics only.
    """
    return vocab_parallel_linear_distill_stats(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                               None, kind, group, vocab_size, beta).kl
