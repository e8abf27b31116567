"""Vocab-parallel ops on logits shards: log-sum-exp, log-probs, entropy, full-vocabulary KL.

Under tensor parallelism (TP) each rank of `group` holds `logits[..., V/TP]`, the contiguous vocabulary
shard [rank * V/TP, (rank + 1) * V/TP), as Megatron's `VocabParallelEmbedding` and
`vocab_parallel_cross_entropy` lay it out. The vocabulary dimension is never gathered: each op reads its
shard once per pass, all-reduces only per-token statistics (each docstring says which), and keeps for
backward only its input shards and per-token statistics (softmaxes are recomputed in backward).
`group=None` is one process holding the whole vocabulary and gives the same numbers as any TP size.
The top-k ops in `topk` are built on this module's shard plumbing and follow the same conventions.

Conventions shared by every function that takes logits:
- `logits`: `[..., V/TP]`, any leading shape, fp32 / bf16 / fp16 / fp64, non-contiguous views allowed
  (a view whose leading dims cannot be flattened without a copy is copied once). Math runs in fp32
  (fp64 for fp64 inputs); per-token outputs are fp32 (fp64), gradients have the logits' dtype.
- `vocab_size`: the true vocabulary size. Megatron pads the vocabulary to a multiple of
  `make_vocab_size_divisible_by x TP`; global ids >= vocab_size take no probability (as if -inf) and
  get zero gradient. None: every column is a real token.
- Logits must be finite or -inf (a -inf entry has probability 0 and contributes exactly 0); a row
  with no finite logit is not a distribution and gives NaN, except in `vocab_parallel_logsumexp`: -inf with a
  zero gradient (the empty tail of a student masked outside a teacher's top-k).
- Work is chunked over tokens (`CHUNK_ELEMENTS` per chunk on CPU, `CUDA_CHUNK_ELEMENTS` on CUDA) so
  temporaries stay chunk-sized; gradients are written chunk by chunk into one preallocated tensor. Large
  inputs run fused chunk kernels compiled by torch.compile (Inductor C++ on CPU, Triton on CUDA), falling
  back to eager torch if compilation fails; see `_use_compiled`.

References: SCOPE, arXiv 2604.10688 (its teacher-path KL over the vocabulary; equation numbers to be
filled in by the losses/ module that cites them); generalized JSD: Agarwal et al., "On-Policy
Distillation of Language Models" (GKD, arXiv 2306.13649), Eq. 3.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_scope.ops import _chunk_kernels

__all__ = [
    "vocab_parallel_logsumexp",
    "vocab_parallel_log_probs",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "FULL_VOCAB_KL",
    "BACKEND_ENV",
]

logger = logging.getLogger(__name__)

FULL_VOCAB_KL = ("reverse", "forward", "jsd")

#: Elements of one rank's shard processed per chunk on CPU (rows = CHUNK_ELEMENTS // local vocab, at least 1).
#: 2^20 (4 MiB of fp32 per temporary): small next to a shard (0.8% of 4096 x 32768), large enough that
#: the per-call cost of a compiled kernel (~0.1 ms) stays a few % of a chunk's work.
CHUNK_ELEMENTS = 1 << 20
#: The same on CUDA: 2^26 (256 MiB of fp32 per temporary) amortises the ~0.1-0.5 ms of Python, guard and
#: launch overhead per chunk; 2^24 was 2-3x slower (BENCHMARKS.md, "Vocab-parallel KL on a GPU").
CUDA_CHUNK_ELEMENTS = 1 << 26
#: CUDA compiles shape-dynamic kernels, so the ragged last chunk runs compiled too (CPU runs it eagerly).
CUDA_COMPILE_DYNAMIC = True
#: "auto" backend: shards with at least this many elements use the compiled kernels.
COMPILE_MIN_ELEMENTS = 1 << 22
#: Environment variable choosing the kernels: "auto" (default), "eager" or "compile" (errors surface).
BACKEND_ENV = "MEGATRON_SCOPE_VOCAB_OPS_BACKEND"
_BACKENDS = ("auto", "eager", "compile")
_compile_failed = False


# ----------------------------------------------------------------------------------------------------
# Validation and shard geometry


@dataclass(frozen=True)
class _Shard:
    """Where this rank's logits sit in the global vocabulary."""

    group: object
    world_size: int
    rank: int
    local_vocab: int
    vocab_start: int
    valid: int  # real (unpadded) vocabulary entries in this shard: columns [0, valid)

    def reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        """In-place all-reduce over the TP group (nothing when TP = 1)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


def _check_logits(logits, name: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")


def _shard_of(logits: torch.Tensor, group, vocab_size: int | None, name: str = "logits") -> _Shard:
    """Validate `logits`, `group` and `vocab_size`; return this rank's shard geometry."""
    _check_logits(logits, name)
    return shard_geometry(logits.shape[-1], group, vocab_size, name)


def shard_geometry(local_vocab: int, group, vocab_size: int | None, name: str = "logits") -> _Shard:
    """Validate `group` and `vocab_size` for `local_vocab` entries per rank; return this rank's shard geometry."""
    if group is None:
        world_size, rank = 1, 0
    else:
        if not dist.is_initialized():
            raise ValueError(f"group={group!r} given but torch.distributed is not initialised")
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group {group!r}")
    padded_vocab = local_vocab * world_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int or None, got {vocab_size!r}")
    if not 1 <= vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} does not fit the sharded vocabulary: {name} has {local_vocab} entries "
            f"per rank x {world_size} ranks in group = {padded_vocab} (is `group` the tensor-parallel group?)"
        )
    vocab_start = rank * local_vocab
    valid = min(max(vocab_size - vocab_start, 0), local_vocab)
    return _Shard(group, world_size, rank, local_vocab, vocab_start, valid)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_logits(teacher, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits shape {tuple(student.shape)} != teacher_logits shape {tuple(teacher.shape)}"
        )
    if student.dtype != teacher.dtype:
        raise ValueError(f"student_logits dtype {student.dtype} != teacher_logits dtype {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student_logits device {student.device} != teacher_logits device {teacher.device}")


def _check_ids(ids: torch.Tensor, expected_shape: tuple, vocab_size: int, name: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != tuple(expected_shape):
        raise ValueError(f"{name} shape {tuple(ids.shape)} != expected {tuple(expected_shape)}")
    if ids.numel():
        outside, message = id_range_check(ids, vocab_size, name)
        if bool(outside):  # one device read
            raise ValueError(message())


def id_range_check(ids: torch.Tensor, vocab_size: int, name: str) -> tuple[torch.Tensor, Callable[[], str]]:
    """(0-d bool on the ids' device, True where some id of the non-empty `ids` lies outside [0, vocab_size); the
    ValueError message then, naming the first bad extreme): nothing is read from the device until one of them is."""
    low, high = ids.min(), ids.max()

    def message() -> str:
        bad = int(low) if int(low) < 0 else int(high)
        return f"{name} holds vocabulary id {bad}, outside [0, {vocab_size}) (vocab_size={vocab_size})"

    return (low < 0) | (high >= vocab_size), message


def _vocab_size_of(shard: _Shard, vocab_size: int | None) -> int:
    return shard.local_vocab * shard.world_size if vocab_size is None else vocab_size


# ----------------------------------------------------------------------------------------------------
# Kernel dispatch and the chunk loop


def _backend() -> str:
    mode = os.environ.get(BACKEND_ENV, "auto")
    if mode not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={mode!r}; expected one of {_BACKENDS}")
    return mode


def _use_compiled(logits: torch.Tensor) -> bool:
    """Dispatch point. CPU and CUDA: Inductor-compiled chunk kernels (C++ / Triton) for large shards,
    eager torch otherwise; other devices always run eager.
    """
    return use_compiled_kernels(logits.dtype, logits.device, logits.numel())


def use_compiled_kernels(dtype: torch.dtype, device: torch.device, numel: int) -> bool:
    """`_use_compiled` for a shard of `numel` elements of `dtype` on `device` that need not exist yet."""
    mode = _backend()
    if mode == "eager" or dtype == torch.float64 or device.type not in ("cpu", "cuda"):
        return False
    if mode == "compile":
        return True
    return not _compile_failed and numel >= COMPILE_MIN_ELEMENTS


def _kernel(name: str, use_compiled: bool, full_chunk: bool, *args):
    """Run chunk kernel `name`; a compiled kernel that fails to build falls back to eager (auto mode).

    A ragged (not full) chunk runs compiled only where the kernels are shape-dynamic (CUDA).
    """
    global _compile_failed
    dynamic = CUDA_COMPILE_DYNAMIC and args[0].device.type == "cuda"
    if use_compiled and (full_chunk or dynamic) and not _compile_failed:
        try:
            return _chunk_kernels.kernels(True, dynamic)[name](*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure must fall back, not kill training
            if _backend() == "compile":
                raise
            _compile_failed = True
            logger.warning("torch.compile of vocab-parallel kernel %s failed (%s); using eager torch", name, error)
    return _chunk_kernels.kernels(False)[name](*args)


def _chunk_slices(num_rows: int, local_vocab: int, device: torch.device):
    """(row slice, is_full_chunk) covering [0, num_rows), CHUNK_ELEMENTS (CUDA_CHUNK_ELEMENTS) per chunk."""
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    rows = max(1, elements // max(local_vocab, 1))
    if num_rows == 0:
        yield slice(0, 0), False
    for start in range(0, num_rows, rows):
        stop = min(start + rows, num_rows)
        yield slice(start, stop), stop - start == rows


def _rows(x: torch.Tensor, local_vocab: int) -> torch.Tensor:
    """[..., local_vocab] -> [tokens, local_vocab]: a view when the leading dims allow it."""
    return x.reshape(-1, local_vocab)


def _chunked_stats(name: str, shard: _Shard, use_compiled: bool, row_tensors, row_extras=(), kernel_args=()):
    """Run stats kernel `name` over token chunks of the valid columns; concatenate its per-row outputs.

    row_tensors: [tokens, local_vocab] shards; row_extras: [tokens, ...] tensors sliced alongside.
    A shard with no valid column (all padding) is replaced by one -inf column: neutral statistics.
    """
    num_rows = row_tensors[0].shape[0]
    if shard.valid == 0:
        row_tensors = [torch.full((num_rows, 1), float("-inf"), dtype=x.dtype, device=x.device) for x in row_tensors]
    else:
        row_tensors = [x[:, : shard.valid] for x in row_tensors]
    width = row_tensors[0].shape[1]
    outputs = None
    for rows, full in _chunk_slices(num_rows, width, row_tensors[0].device):
        result = _kernel(
            name, use_compiled, full, *[x[rows] for x in row_tensors], *[e[rows] for e in row_extras], *kernel_args
        )
        if outputs is None:
            outputs = [torch.empty((num_rows, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in result]
        for out, r in zip(outputs, result):
            out[rows] = r
    return outputs


def _chunked_grad(name: str, shard: _Shard, use_compiled: bool, logits2d, row_tensors, row_extras=(), kernel_args=()):
    """Gradient w.r.t. `logits2d`, written chunk by chunk into one tensor of its shape and dtype."""
    num_rows = logits2d.shape[0]
    grad = torch.empty((num_rows, shard.local_vocab), dtype=logits2d.dtype, device=logits2d.device)
    if shard.valid < shard.local_vocab:
        grad[:, shard.valid :].zero_()  # padded vocabulary: no probability, no gradient
    if shard.valid == 0:
        return grad
    row_tensors = [x[:, : shard.valid] for x in row_tensors]
    for rows, full in _chunk_slices(num_rows, shard.valid, logits2d.device):
        chunk = _kernel(
            name, use_compiled, full, *[x[rows] for x in row_tensors], *[e[rows] for e in row_extras], *kernel_args
        )
        grad[rows, : shard.valid] = chunk
    return grad


def _rescale(local_max: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    """exp(local shift - global shift): brings a rank's sums of exp(x - local shift) to the global shift."""
    factor = torch.exp(_shift(local_max) - _shift(global_max))
    return torch.where(torch.isneginf(local_max), torch.zeros_like(factor), factor)


_shift = _chunk_kernels._shift


def _global_max(shard: _Shard, local_max: torch.Tensor) -> torch.Tensor:
    return shard.reduce(local_max.clone(), dist.ReduceOp.MAX)


def reduce_pair_stats(shard: _Shard, kind: str, s_max, t_max, s_sum, t_sum, cross, student_extras=None):
    """Combine per-rank statistics of a (student s, teacher t) pair of shards into global per-token ones.

    Inputs ([tokens] each, relative to each rank's own row maxima, as `_chunk_kernels.kl_stats` returns):
    s_max, t_max, s_sum = sum e^{s - shift}, t_sum, cross (reverse: sum e^{s'} (s' - t'); forward:
    sum e^{t'} (t' - s'); jsd: unused). student_extras: None, or (sum e^{s'} s', picked) with picked [tokens, k]
    raw logits the rank owns (0 elsewhere), for the student's entropy and the log-probs of given ids.
    Communicates 2 all-reduces: max [2, tokens], sums [3 (+ 1 + k), tokens].
    Returns (s_shift, s_log_norm, t_shift, t_log_norm, aux, kl, extras): aux = sum p (s' - t') (reverse),
    sum q (t' - s') (forward), None (jsd, whose KL needs a second pass: kl None too); extras None or
    (sum p s', picked summed over ranks) with s' relative to the global shift.
    """
    global_max = _global_max(shard, torch.stack([s_max, t_max]))
    scale_s, scale_t = _rescale(s_max, global_max[0]), _rescale(t_max, global_max[1])
    s_shift, t_shift = _shift(global_max[0]), _shift(global_max[1])
    # the local sums use local shifts; move them to the global ones (s' changes by s_delta, s' - t' by delta)
    s_delta = _shift(s_max) - s_shift
    delta = s_delta - (_shift(t_max) - t_shift)
    if kind == "reverse":
        cross = (cross + delta * s_sum) * scale_s
    elif kind == "forward":
        cross = (cross - delta * t_sum) * scale_t
    rows = [s_sum * scale_s, t_sum * scale_t, cross]
    if student_extras is not None:
        entropy_sum, picked = student_extras
        rows.append((entropy_sum + s_delta * s_sum) * scale_s)
    sums = torch.stack(rows)
    if student_extras is not None:  # one all-reduce for the sums and the owned logits
        sums = torch.cat([sums, picked.t()])
    sums = shard.reduce(sums, dist.ReduceOp.SUM)
    s_log_norm, t_log_norm = torch.log(sums[0]), torch.log(sums[1])
    aux = kl = extras = None
    if kind == "reverse":
        aux = sums[2] / sums[0]
        kl = aux - s_log_norm + t_log_norm
    elif kind == "forward":
        aux = sums[2] / sums[1]
        kl = aux - t_log_norm + s_log_norm
    if student_extras is not None:
        extras = (sums[3] / sums[0], sums[4:].t())
    return s_shift, s_log_norm, t_shift, t_log_norm, aux, kl, extras


# ----------------------------------------------------------------------------------------------------
# autograd Functions (inputs are [tokens, local_vocab]; outputs per token). Per-token statistics are kept
# as (shift, log_norm): shift = global row max (0 for a row of -inf), log_norm = log sum exp(x - shift),
# so lse = shift + log_norm and log p = (x - shift) - log_norm without rounding lse at the logits' scale.


class _VocabParallelLogSumExp(torch.autograd.Function):
    """log sum_v exp(x_v) over the whole vocabulary.

    Communicates 2 all-reduces of [tokens] floats (max, sum-exp). Saves logits and 2 [tokens] stats.
    """

    @staticmethod
    def forward(ctx, logits, shard, use_compiled):
        """Local max and sum-exp per chunk; combine across ranks."""
        local_max, sum_exp = _chunked_stats("logsumexp_stats", shard, use_compiled, [logits])
        global_max = _global_max(shard, local_max)
        sum_exp = shard.reduce(sum_exp * _rescale(local_max, global_max), dist.ReduceOp.SUM)
        shift, log_norm = _shift(global_max), torch.log(sum_exp)
        ctx.save_for_backward(logits, shift, log_norm)
        ctx.shard, ctx.use_compiled = shard, use_compiled
        return shift + log_norm

    @staticmethod
    def backward(ctx, grad_lse):
        """grad * softmax, recomputed per chunk."""
        logits, shift, log_norm = ctx.saved_tensors
        grad = _chunked_grad(
            "softmax_grad", ctx.shard, ctx.use_compiled, logits, [logits], [grad_lse.contiguous(), shift, log_norm]
        )
        return grad, None, None


class _VocabParallelGatherLogProbs(torch.autograd.Function):
    """log p(id_k) for k target ids per token (global ids; each rank contributes the ids it owns).

    Communicates 2 all-reduces: max [tokens], then sum-exp and owned target logits [tokens, 1 + k].
    Saves logits, 2 [tokens] statistics and the local ids.
    """

    @staticmethod
    def forward(ctx, logits, ids, shard, use_compiled):
        """Local max, sum-exp and owned target logits per chunk; combine across ranks."""
        local_ids = ids - shard.vocab_start
        owned = (local_ids >= 0) & (local_ids < shard.valid)
        local_ids = local_ids.clamp(0, max(shard.valid - 1, 0))
        local_max, sum_exp, picked = _chunked_stats(
            "gather_stats", shard, use_compiled, [logits], [local_ids, owned]
        )
        global_max = _global_max(shard, local_max)
        packed = torch.cat([(sum_exp * _rescale(local_max, global_max)).unsqueeze(-1), picked], dim=-1)
        packed = shard.reduce(packed, dist.ReduceOp.SUM)
        shift, log_norm = _shift(global_max), torch.log(packed[:, 0])
        ctx.save_for_backward(logits, shift, log_norm, local_ids, owned)
        ctx.shard, ctx.use_compiled = shard, use_compiled
        return (packed[:, 1:] - shift.unsqueeze(-1)) - log_norm.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad_log_probs):
        """scatter(grad) - sum(grad) * softmax, recomputed per chunk."""
        logits, shift, log_norm, local_ids, owned = ctx.saved_tensors
        grad = _chunked_grad(
            "gather_grad", ctx.shard, ctx.use_compiled, logits, [logits],
            [grad_log_probs.contiguous(), shift, log_norm, local_ids, owned],
        )
        return grad, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """H(p) = log Z - sum_v p_v (x_v - shift) over the whole vocabulary.

    Communicates 2 all-reduces: max [tokens], then sums [2, tokens]. Saves logits and 3 [tokens] stats.
    """

    @staticmethod
    def forward(ctx, logits, shard, use_compiled):
        """Local max, sum-exp and sum exp * shifted logit per chunk; combine across ranks."""
        local_max, sum_exp, sum_exp_shifted = _chunked_stats("entropy_stats", shard, use_compiled, [logits])
        global_max = _global_max(shard, local_max)
        scale = _rescale(local_max, global_max)
        shift = _shift(global_max)
        to_global_shift = _shift(local_max) - shift  # sum e (x - shift) = sum e (x - local) + (local - shift) sum e
        sums = torch.stack([sum_exp, sum_exp_shifted + to_global_shift * sum_exp]) * scale
        sums = shard.reduce(sums, dist.ReduceOp.SUM)
        log_norm = torch.log(sums[0])
        mean_shifted = sums[1] / sums[0]
        ctx.save_for_backward(logits, shift, log_norm, mean_shifted)
        ctx.shard, ctx.use_compiled = shard, use_compiled
        return log_norm - mean_shifted

    @staticmethod
    def backward(ctx, grad_entropy):
        """-grad * p (x - sum p x), recomputed per chunk."""
        logits, shift, log_norm, mean_shifted = ctx.saved_tensors
        grad = _chunked_grad(
            "entropy_grad", ctx.shard, ctx.use_compiled, logits, [logits],
            [grad_entropy.contiguous(), shift, log_norm, mean_shifted],
        )
        return grad, None, None


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL between student p = softmax(s) and teacher q = softmax(t); gradient into s only.

    With shifted logits s' = s - shift_s, t' = t - shift_t and Z_s, Z_t their sum-exps:
    reverse KL(p||q) = sum p (s' - t') - log Z_s + log Z_t; forward KL(q||p) = sum q (t' - s') - log Z_t
    + log Z_s; jsd = beta KL(q||m) + (1 - beta) KL(p||m), m = beta q + (1 - beta) p.
    Communicates: reverse/forward: 2 all-reduces, max [2, tokens] then sums [3, tokens];
    jsd: 3, the same two then [2, tokens] (it needs the global log-sum-exps before its sums).
    Saves both shards and 5 [tokens] statistics; nothing vocabulary-sized.
    """

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, shard, use_compiled):
        """Local maxima and sums per chunk (one read of both shards; jsd: two); combine across ranks."""
        s_max, t_max, s_sum, t_sum, cross = _chunked_stats("kl_stats", shard, use_compiled, [student, teacher], (), (kind,))
        s_shift, s_log_norm, t_shift, t_log_norm, aux, kl, _ = reduce_pair_stats(
            shard, kind, s_max, t_max, s_sum, t_sum, cross
        )
        if kind == "jsd":
            kl_teacher_mix, kl_student_mix = _chunked_stats(
                "jsd_sums", shard, use_compiled, [student, teacher], [s_shift, s_log_norm, t_shift, t_log_norm], (beta,)
            )
            mix = shard.reduce(torch.stack([kl_teacher_mix, kl_student_mix]), dist.ReduceOp.SUM)
            aux = mix[1]  # KL(p || m)
            kl = beta * mix[0] + (1.0 - beta) * mix[1]
        ctx.save_for_backward(student, teacher, s_shift, s_log_norm, t_shift, t_log_norm, aux)
        ctx.kind, ctx.beta, ctx.shard, ctx.use_compiled = kind, beta, shard, use_compiled
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        """d KL / d s per chunk from the saved statistics; the teacher gets no gradient."""
        student, teacher, *stats = ctx.saved_tensors
        grad = _chunked_grad(
            "kl_grad", ctx.shard, ctx.use_compiled, student, [student, teacher],
            [grad_kl.contiguous(), *stats], (ctx.kind, ctx.beta),
        )
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public API


def vocab_parallel_logsumexp(logits: torch.Tensor, group=None, vocab_size: int | None = None) -> torch.Tensor:
    """log sum_v exp(logits_v) over the whole (sharded) vocabulary; shape `logits.shape[:-1]`.

    Communicates 2 all-reduces of [tokens] floats. Gradient: softmax.
    """
    shard = _shard_of(logits, group, vocab_size)
    out = _VocabParallelLogSumExp.apply(_rows(logits, shard.local_vocab), shard, _use_compiled(logits))
    return out.view(logits.shape[:-1])


def _gather_log_probs(logits, ids, group, vocab_size, ids_name):
    """log p(ids) with ids [..., k] of global vocabulary ids; shape `ids.shape`."""
    shard = _shard_of(logits, group, vocab_size)
    if tuple(ids.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"{ids_name} shape {tuple(ids.shape)} does not match logits shape {tuple(logits.shape)}")
    _check_ids(ids, ids.shape, _vocab_size_of(shard, vocab_size), ids_name)
    ids2d = ids.reshape(-1, ids.shape[-1]).long()
    out = _VocabParallelGatherLogProbs.apply(_rows(logits, shard.local_vocab), ids2d, shard, _use_compiled(logits))
    return out.view(ids.shape)


def vocab_parallel_log_probs(
    logits: torch.Tensor, target: torch.Tensor, group=None, vocab_size: int | None = None
) -> torch.Tensor:
    """log softmax(logits)[target] per token; `target` holds global vocab ids, shape `logits.shape[:-1]`.

    The rank owning a token's id contributes its logit (Megatron's vocab_parallel_cross_entropy, negated,
    without label smoothing). Communicates 2 all-reduces: [tokens] (max) and [tokens, 2] (sum-exp and
    target logit). Gradient into logits: onehot(target) - softmax.
    Raises ValueError for a target outside [0, vocab_size) or a shape mismatch.
    """
    _check_logits(logits, "logits")
    if isinstance(target, torch.Tensor) and tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be an integer tensor, got {type(target).__name__}")
    return _gather_log_probs(logits, target.unsqueeze(-1), group, vocab_size, "target").squeeze(-1)


def vocab_parallel_entropy(logits: torch.Tensor, group=None, vocab_size: int | None = None) -> torch.Tensor:
    """Entropy -sum_v p_v log p_v of softmax(logits) per token (in nats); shape `logits.shape[:-1]`.

    Computed as lse - sum_v p_v x_v. Communicates 2 all-reduces: [tokens] (max), [2, tokens] (sums).
    Gradient into logits: -p (x - sum p x).
    """
    shard = _shard_of(logits, group, vocab_size)
    out = _VocabParallelEntropy.apply(_rows(logits, shard.local_vocab), shard, _use_compiled(logits))
    return out.view(logits.shape[:-1])


def check_kl_kind(kind: str, beta: float) -> None:
    """ValueError unless `kind` is one of FULL_VOCAB_KL (and, for jsd, 0 < beta < 1)."""
    if kind not in FULL_VOCAB_KL:
        raise ValueError(f"kind={kind!r}; expected one of {FULL_VOCAB_KL}")
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0.0 < float(beta) < 1.0):
        raise ValueError(f"beta={beta!r} must lie strictly inside (0, 1) for kind='jsd'")


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "reverse",
    group=None,
    beta: float = 0.5,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token divergence between student and teacher over the whole vocabulary; shape `[...]`.

    kind: "reverse" = KL(student || teacher) (SCOPE's teacher-path KL and on-policy distillation's
    objective, arXiv 2604.10688); "forward" = KL(teacher || student); "jsd" = generalized JSD of GKD
    (arXiv 2306.13649, Eq. 3): beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p,
    p = student, q = teacher, beta strictly inside (0, 1) (its limits are the forward/reverse KL up to
    scale: use those kinds). The gradient flows into `student_logits` only; the teacher is a constant.
    Communicates 2 all-reduces (max [2, tokens], sums [3, tokens]); jsd one more ([2, tokens]).
    Memory: saves the two input shards and three [tokens] statistics; the softmaxes are recomputed
    chunk by chunk in backward, which writes the gradient into one preallocated shard-sized tensor.
    """
    check_kl_kind(kind, beta)
    shard = _shard_of(student_logits, group, vocab_size, "student_logits")
    _check_pair(student_logits, teacher_logits)
    out = _VocabParallelKL.apply(
        _rows(student_logits, shard.local_vocab),
        _rows(teacher_logits, shard.local_vocab),
        kind,
        float(beta),
        shard,
        _use_compiled(student_logits),
    )
    return out.view(student_logits.shape[:-1])
