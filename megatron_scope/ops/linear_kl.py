"""Full-vocabulary KL straight from two models' last hidden states: no [tokens, vocab] logits are kept.

Each rank of the tensor-parallel `group` holds its vocabulary shard of both models' output layers
(Megatron's `ColumnParallelLinear` output layer or the tied word embeddings: `[V/TP, hidden]`, rows
[rank * V/TP, (rank + 1) * V/TP)). The logits s = h_S W_S^T and t = h_T W_T^T exist one token chunk at a
time (`[rows, V/TP]`): the forward computes each chunk's statistics with `vocab_parallel`'s chunk kernels
and combines them across ranks as `vocab_parallel_kl` does, chunk by chunk (every rank cuts the same chunks);
the chunk's logit gradient is then multiplied into the hidden-state and weight gradients. The result equals
`vocab_parallel_kl(h_S W_S^T, h_T W_T^T)` on materialised logits (same logit dtype, same fp32 statistics), with
memory of one chunk instead of two [tokens, V/TP] shards and their gradient.

Two entry points, by when the gradient is taken:
- `vocab_parallel_linear_distill_stats` (and `vocab_parallel_linear_kl`): per-token outputs with gradient,
  whatever the caller makes of them. The per-token upstream gradient is known only in backward, which
  recomputes both logit chunks: 6 matmuls against 4 for materialised logits.
- `vocab_parallel_linear_distill_loss`: L = sum_i a_i KL_i + b_i log p_S(target_i) with coefficients a, b given
  up front (a loss linear in both, as SCOPE's and OPD's are). The gradient is taken in the forward pass while
  each chunk exists, as Liger-Kernel's fused losses do: 4 matmuls; backward scales it by L's upstream gradient.
  Its gradients equal the first entry point's bit for bit (same chunks, same kernels, same accumulation).

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

__all__ = [
    "LinearDistillStats",
    "vocab_parallel_linear_distill_loss",
    "vocab_parallel_linear_distill_stats",
    "vocab_parallel_linear_kl",
]

logger = logging.getLogger(__name__)

#: Most elements of one [rows, V/TP] logits chunk: 2^24 (64 MiB of fp32) on CPU, 2^26 on CUDA.
CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 26
#: At least this many chunks (when there are enough tokens), so a chunk's logits s, t (its gradient is written
#: over s) stay a fraction (~2/16) of one [tokens, V/TP] fp32 shard whatever the token count, while 128-row
#: chunks of 2048 tokens keep the matmuls near full speed (64 rows lost ~30% on CPU: BENCHMARKS.md).
MIN_CHUNKS = 16


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


class _ChunkStats(NamedTuple):
    """Global per-token statistics of one token chunk (every TP rank holds the same)."""

    s_shift: torch.Tensor
    s_log_norm: torch.Tensor
    t_shift: torch.Tensor
    t_log_norm: torch.Tensor
    aux: torch.Tensor
    kl: torch.Tensor
    student_log_probs: torch.Tensor  # [rows, k]
    teacher_log_probs: torch.Tensor  # [rows, k]
    entropy: torch.Tensor


def _chunk_statistics(s, t, local_ids, owned, kind: str, beta: float, shard: _Shard, use_compiled: bool,
                      full: bool, stats_dtype: torch.dtype) -> _ChunkStats:
    """A chunk's statistics from this rank's logits chunks s, t ([rows, valid]; None for a shard of padding only,
    which takes no mass), combined over the TP group: 2 all-reduces (jsd: 3) of [<= 8, rows]."""
    rows, k = local_ids.shape
    if s is None:
        local = torch.zeros((rows, 6), dtype=stats_dtype, device=local_ids.device)
        local[:, :2] = float("-inf")  # no mass, neutral statistics
        picked = torch.zeros((rows, 2 * k), dtype=stats_dtype, device=local_ids.device)
    else:
        local = torch.stack(_kernel("kl_entropy_stats", use_compiled, full, s, t, kind), -1).to(stats_dtype)
        picked = torch.cat([s.gather(-1, local_ids), t.gather(-1, local_ids)], -1).to(stats_dtype)
        picked = torch.where(owned.repeat(1, 2), picked, 0.0)
    s_max, t_max, s_sum, t_sum, cross, entropy_sum = local.unbind(-1)
    s_shift, s_log_norm, t_shift, t_log_norm, aux, kl, (mean_shifted, picked) = reduce_pair_stats(
        shard, kind, s_max, t_max, s_sum, t_sum, cross, (entropy_sum, picked)
    )
    if kind == "jsd":  # its sums need the global log-normalisers: a second look at the same chunk
        if s is None:
            mix = local.new_zeros((2, rows))
        else:
            mix = torch.stack(_kernel("jsd_sums", use_compiled, full, s, t, s_shift, s_log_norm, t_shift,
                                      t_log_norm, beta)).to(stats_dtype)
        mix = shard.reduce(mix, dist.ReduceOp.SUM)
        aux = mix[1]  # KL(p || m)
        kl = beta * mix[0] + (1.0 - beta) * mix[1]
    return _ChunkStats(s_shift, s_log_norm, t_shift, t_log_norm, aux, kl,
                       picked[:, :k] - (s_shift + s_log_norm).unsqueeze(-1),
                       picked[:, k:] - (t_shift + t_log_norm).unsqueeze(-1), s_log_norm - mean_shifted)


def _chunk_passes(student_hidden, student_weight, teacher_hidden, teacher_weight, local_ids, owned, kind: str,
                  beta: float, shard: _Shard, use_compiled: bool):
    """(rows, full, s, t, statistics) per token chunk, in the same chunks on every TP rank (sized by the shard's
    width, not its valid columns, since each chunk communicates)."""
    valid = shard.valid
    w_s, w_t = student_weight[:valid], teacher_weight[:valid]
    stats_dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32  # as the kernels
    for rows, full in _token_chunks(student_hidden.shape[0], shard.local_vocab, student_hidden.device):
        s = t = None
        if valid:
            s, t = _logits(student_hidden[rows], w_s), _logits(teacher_hidden[rows], w_t)
        yield rows, full, s, t, _chunk_statistics(s, t, local_ids[rows], owned[rows], kind, beta, shard,
                                                  use_compiled, full, stats_dtype)


def _collect(outputs: dict, rows: slice, stats: _ChunkStats, num_rows: int) -> None:
    """Write one chunk's statistics into the per-token tensors of `outputs` (allocated at the first chunk)."""
    for name, value in stats._asdict().items():
        if name not in outputs:
            outputs[name] = value.new_empty((num_rows, *value.shape[1:]))
        outputs[name][rows] = value


def _chunk_input_grads(s, t, stats: _ChunkStats, kl_coef, target_coef, local_ids, owned, hidden, weight,
                       accumulator, kind, beta, use_compiled, full) -> torch.Tensor:
    """One chunk's share of the student's input gradients of L = sum_i a_i KL_i + sum_ik b_ik log p_S(id_ik)
    (a = kl_coef [rows], b = target_coef [rows, k] or None): returns dL/d hidden [rows, H] and adds dL/dW to
    `accumulator` (fp32 for bf16/fp16 weights).

    The logit gradient g = a dKL/ds + sum_k b_k (e_{id_k} - p) is taken without its one-hot terms
    (`kl_target_grad_`, written over s: a chunk's peak is s, t and nothing more), and the one-hot terms, one
    column per target, are applied to the products directly: g W gains b W[id], and g^T h gains b h in row id
    (owned ids only). 2 matmuls.
    """
    target_coef_sum = kl_coef.new_zeros(kl_coef.shape) if target_coef is None else target_coef.sum(-1)
    _kernel("kl_target_grad_", use_compiled, full, s, t, kl_coef.contiguous(), target_coef_sum.contiguous(),
            stats.s_shift, stats.s_log_norm, stats.t_shift, stats.t_log_norm, stats.aux, kind, beta)
    _accumulate_weight_grad(accumulator, s, hidden)
    if target_coef is None:
        return s @ weight
    coef = torch.where(owned, target_coef, 0.0).to(accumulator.dtype)  # [rows, k]
    accumulator.index_add_(0, local_ids.reshape(-1),
                           (coef.unsqueeze(-1) * hidden.unsqueeze(1).to(accumulator.dtype)).flatten(0, 1))
    one_hot_term = (coef.unsqueeze(-1) * weight[local_ids].to(accumulator.dtype)).sum(1)
    return torch.addmm(one_hot_term.to(weight.dtype), s, weight)


def _weight_grad_accumulator(student_weight: torch.Tensor, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the returned weight gradient, zero; the fp32 accumulator over its valid rows: a view of it for fp32/fp64
    weights, a buffer of its own for bf16/fp16)."""
    grad_weight = torch.zeros_like(student_weight)  # padded rows keep 0
    if student_weight.dtype in (torch.float32, torch.float64):
        return grad_weight, grad_weight[:valid]
    return grad_weight, grad_weight.new_zeros((valid, grad_weight.shape[1]), dtype=torch.float32)


class _LinearKL(torch.autograd.Function):
    """Statistics of s = h_S W_S^T and t = h_T W_T^T per token chunk; backward recomputes each chunk.

    Forward inputs are 2-D ([tokens, hidden], [V/TP, hidden]) plus local target ids [tokens, k] (k = 0 or 1)
    and their ownership mask. Communicates per chunk the all-reduces of `reduce_pair_stats` (jsd: one more), and in
    backward one all-reduce of the student's hidden-state gradient [tokens, hidden_S].
    Saves the four inputs and 5 [tokens] statistics; backward accumulates the weight gradient in fp32 (one
    [V/TP, hidden_S] buffer for bf16/fp16 weights) and casts it to the weight's dtype once.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, local_ids, owned,
                kind, beta, shard: _Shard, use_compiled):
        out: dict = {}
        for rows, _, s, t, stats in _chunk_passes(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                  local_ids, owned, kind, beta, shard, use_compiled):
            _collect(out, rows, stats, student_hidden.shape[0])
            del s, t  # before the next chunk's logits exist
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, out["s_shift"],
                              out["s_log_norm"], out["t_shift"], out["t_log_norm"], out["aux"], local_ids, owned)
        ctx.kind, ctx.beta, ctx.shard, ctx.use_compiled = kind, beta, shard, use_compiled
        ctx.mark_non_differentiable(out["teacher_log_probs"], out["entropy"])
        return out["kl"], out["student_log_probs"], out["teacher_log_probs"], out["entropy"]

    @staticmethod
    def backward(ctx, grad_kl, grad_log_probs, _grad_teacher_log_probs, _grad_entropy):
        """Per chunk: d/ds of (g_kl KL + g_lp log p_S(target)), then h_S and W_S gradients (the latter summed
        over chunks in fp32) from it."""
        (student_hidden, student_weight, teacher_hidden, teacher_weight,
         s_shift, s_log_norm, t_shift, t_log_norm, aux, local_ids, owned) = ctx.saved_tensors
        shard, valid = ctx.shard, ctx.shard.valid
        w_s, w_t = student_weight[:valid], teacher_weight[:valid]
        grad_hidden = torch.zeros_like(student_hidden)
        grad_weight, accumulator = _weight_grad_accumulator(student_weight, valid)
        if grad_kl is None:
            grad_kl = s_shift.new_zeros(s_shift.shape)
        if grad_log_probs is None or local_ids.shape[1] == 0:
            grad_log_probs = None
        for rows, full in _token_chunks(student_hidden.shape[0], shard.local_vocab, student_hidden.device):
            if not valid:
                break
            s, t = _logits(student_hidden[rows], w_s), _logits(teacher_hidden[rows], w_t)
            stats = _ChunkStats(s_shift[rows], s_log_norm[rows], t_shift[rows], t_log_norm[rows], aux[rows],
                                None, None, None, None)
            grad_hidden[rows] = _chunk_input_grads(
                s, t, stats, grad_kl[rows], None if grad_log_probs is None else grad_log_probs[rows],
                local_ids[rows], owned[rows], student_hidden[rows], w_s, accumulator, ctx.kind, ctx.beta,
                ctx.use_compiled, full)
            del s, t  # before the next chunk's logits exist
        if accumulator.data_ptr() != grad_weight.data_ptr():
            grad_weight[:valid].copy_(accumulator)  # the one rounding to the weight's dtype
        shard.reduce(grad_hidden, dist.ReduceOp.SUM)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


class _LinearKLLoss(torch.autograd.Function):
    """L = sum_i (a_i KL_i + b_i log p_S(target_i)) for coefficients a, b fixed before the call, with its gradient
    computed in the forward pass while each chunk's logits exist: 4 matmuls per chunk (the two logit chunks, then
    the h_S and W_S gradients), where `_LinearKL` needs 6 (its backward recomputes both logit chunks because the
    per-token upstream gradient is unknown until then). Backward only scales the stored gradients by dL's upstream
    scalar. The weight gradient stays an fp32 accumulator (bf16/fp16 weights) until then and is cast once.

    Communicates what `_LinearKL`'s forward does plus one all-reduce of the hidden-state gradient [tokens, hidden_S]
    in the forward. Returns (L, KL, log p_S(target), log p_T(target), entropy), all but L without gradient.
    Memory: from forward to backward it holds the hidden-state gradient and the weight gradient (fp32/fp64 weights)
    or its fp32 accumulator (bf16/fp16); backward scales them in place and returns them, so it runs once.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, local_ids, owned, kl_coef,
                log_prob_coef, kind, beta, shard: _Shard, use_compiled, with_grad: bool):
        num_rows, valid = student_hidden.shape[0], shard.valid
        out: dict = {}
        grad_hidden = weight_grad = accumulator = None
        if with_grad:
            grad_hidden = torch.zeros_like(student_hidden)
            if student_weight.dtype in (torch.float32, torch.float64):  # the returned gradient; padded rows keep 0
                weight_grad = torch.zeros_like(student_weight)
                accumulator = weight_grad[:valid]
            else:  # the returned gradient is made in backward, rounded once
                weight_grad = accumulator = student_weight.new_zeros((valid, student_weight.shape[1]),
                                                                     dtype=torch.float32)
        with_target = local_ids.shape[1] > 0
        for rows, full, s, t, stats in _chunk_passes(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                     local_ids, owned, kind, beta, shard, use_compiled):
            _collect(out, rows, stats, num_rows)
            if with_grad and s is not None:
                grad_hidden[rows] = _chunk_input_grads(
                    s, t, stats, kl_coef[rows], log_prob_coef[rows] if with_target else None, local_ids[rows],
                    owned[rows], student_hidden[rows], student_weight[:valid], accumulator, kind, beta,
                    use_compiled, full)
            del s, t  # before the next chunk's logits exist
        kl, student_log_probs = out["kl"], out["student_log_probs"]
        loss = (kl_coef.to(kl.dtype) * kl).sum()
        if with_target:
            loss = loss + (log_prob_coef.to(kl.dtype) * student_log_probs).sum()
        if with_grad:
            shard.reduce(grad_hidden, dist.ReduceOp.SUM)
            ctx.save_for_backward(grad_hidden, weight_grad)
        ctx.valid, ctx.weight_like, ctx.consumed = valid, (student_weight.shape, student_weight.dtype), False
        ctx.mark_non_differentiable(kl, student_log_probs, out["teacher_log_probs"], out["entropy"])
        return loss, kl, student_log_probs, out["teacher_log_probs"], out["entropy"]

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.consumed:
            raise RuntimeError("vocab_parallel_linear_distill_loss: its gradient was computed in the forward pass and "
                               "is scaled in place; a second backward (retain_graph) is not supported")
        ctx.consumed = True
        grad_hidden, weight_grad = ctx.saved_tensors
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        weight_grad.mul_(grad_loss.to(weight_grad.dtype))
        shape, dtype = ctx.weight_like
        if weight_grad.dtype != dtype:  # an fp32 accumulator of a bf16/fp16 weight's valid rows
            accumulated, weight_grad = weight_grad, torch.zeros(shape, dtype=dtype, device=weight_grad.device)
            weight_grad[:ctx.valid] = accumulated  # the one rounding
        return grad_hidden, weight_grad, *([None] * 11)


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


def _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, target, kind, group, vocab_size,
             beta):
    """Validate the inputs; return (shard, leading shape, local target ids [tokens, k], owned, use_compiled)."""
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
    return shard, leading, local_ids, owned, use_compiled


def _stats_of(leading, kl, student_log_probs, teacher_log_probs, entropy, with_target: bool) -> LinearDistillStats:
    if not with_target:
        return LinearDistillStats(kl.view(leading), None, None, entropy.view(leading))
    return LinearDistillStats(kl.view(leading), student_log_probs.view(leading), teacher_log_probs.view(leading),
                              entropy.view(leading))


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
    Gradients flow into `student_hidden` and `student_weight` only, from `kl` and `student_log_probs`, whatever
    the caller makes of them (the backward recomputes the logits: 6 matmuls; `vocab_parallel_linear_distill_loss`
    needs 4 where the loss is linear in them with known coefficients).
    """
    shard, leading, local_ids, owned, use_compiled = _prepare(student_hidden, student_weight, teacher_hidden,
                                                              teacher_weight, target, kind, group, vocab_size, beta)
    num_rows = local_ids.shape[0]
    outputs = _LinearKL.apply(
        student_hidden.reshape(num_rows, -1), student_weight, teacher_hidden.reshape(num_rows, -1), teacher_weight,
        local_ids, owned, kind, float(beta), shard, use_compiled,
    )
    return _stats_of(leading, *outputs, with_target=target is not None)


def vocab_parallel_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kl_coef: torch.Tensor,
    target: torch.Tensor | None = None,
    log_prob_coef: torch.Tensor | None = None,
    kind: str = "reverse",
    group=None,
    vocab_size: int | None = None,
    beta: float = 0.5,
) -> tuple[torch.Tensor, LinearDistillStats]:
    """(L, the per-token statistics without gradient): L = sum_i a_i KL_i + b_i log p_S(target_i) for per-token
    coefficients a = `kl_coef` and b = `log_prob_coef` (shape: the hidden states' leading dims; constants, no
    gradient) that the caller knows before the call: a loss linear in KL and log p_S (SCOPE's and OPD's, whose
    coefficients are sequence weights, masks and normalisers). Its gradient into `student_hidden` and
    `student_weight` is computed in the forward pass while each logits chunk exists (4 matmuls per chunk, as
    materialised logits need); backward only scales it. Inputs otherwise as `vocab_parallel_linear_distill_stats`,
    whose statistics it returns."""
    shard, leading, local_ids, owned, use_compiled = _prepare(student_hidden, student_weight, teacher_hidden,
                                                              teacher_weight, target, kind, group, vocab_size, beta)
    num_rows = local_ids.shape[0]
    coefficients = {"kl_coef": kl_coef} if target is None else {"kl_coef": kl_coef, "log_prob_coef": log_prob_coef}
    for name, value in coefficients.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(leading):
            raise ValueError(f"{name} must be a tensor of the hidden states' leading shape {tuple(leading)}, got "
                             f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if target is None and log_prob_coef is not None:
        raise ValueError("log_prob_coef weights log p_S(target): give target too")
    with_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    log_prob_coef = kl_coef.new_zeros(leading) if log_prob_coef is None else log_prob_coef
    loss, *outputs = _LinearKLLoss.apply(
        student_hidden.reshape(num_rows, -1), student_weight, teacher_hidden.reshape(num_rows, -1), teacher_weight,
        local_ids, owned, kl_coef.detach().reshape(num_rows), log_prob_coef.detach().reshape(num_rows, 1), kind,
        float(beta), shard, use_compiled, with_grad,
    )
    return loss, _stats_of(leading, *outputs, with_target=target is not None)


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
