"""Per-chunk math of the vocab-parallel ops: one rank's shard of a few token rows, fp32 inside.

Every function here sees a chunk `[rows, local_vocab]` of one rank's logits shard (any floating dtype;
it is upcast to fp32 inside, so bf16 accumulates in fp32) and returns per-row statistics or the
gradient chunk. Nothing here communicates: `vocab_parallel.py` combines the per-rank statistics.

Local statistics are taken relative to the shard's own row maximum `m` (or 0 where the whole shard row
is -inf, e.g. a rank that holds only Megatron's vocabulary padding), so a rank can combine them with the
global maximum `M` afterwards by the factor exp(m - M) (the log-sum-exp trick): the data are read once.

Zero-probability entries (logit -inf) contribute exactly 0 to every sum (`torch.where` guards the
0 * inf products), so masked vocabulary entries never produce NaN.

Backends: the same functions run eagerly or through `torch.compile` (Inductor's C++ backend on CPU fuses
each into one loop over the chunk). `kernels(use_compiled)` picks the table; the choice is made by
`vocab_parallel._kernel` (on CUDA torch.compile emits Triton kernels).
"""

from __future__ import annotations

import math

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: fp32 for fp32/bf16/fp16 chunks, fp64 kept (gradcheck runs in fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _shift(row_max: torch.Tensor) -> torch.Tensor:
    """The row maximum, or 0 where the row has no finite logit (so exp(x - shift) is 0, not NaN)."""
    return torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)


def _guarded(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value, with 0 where weight is 0 (a -inf logit), even if value is +-inf or NaN there."""
    return torch.where(weight > 0, weight * value, torch.zeros_like(value))


def logsumexp_stats(logits: torch.Tensor):
    """(row max, sum exp(x - shift)) of one shard chunk."""
    x = _acc(logits)
    row_max = x.amax(-1)
    exps = torch.exp(x - _shift(row_max).unsqueeze(-1))
    return row_max, exps.sum(-1)


def entropy_stats(logits: torch.Tensor):
    """(row max, sum exp(x - shift), sum exp(x - shift) (x - shift)): H = log Z - sum p (x - shift)."""
    x = _acc(logits)
    row_max = x.amax(-1)
    shifted = x - _shift(row_max).unsqueeze(-1)
    exps = torch.exp(shifted)
    return row_max, exps.sum(-1), _guarded(exps, shifted).sum(-1)


def gather_stats(logits: torch.Tensor, local_ids: torch.Tensor, owned: torch.Tensor):
    """(row max, sum exp(x - shift), logits at local_ids where owned else 0); local_ids: [rows, k]."""
    x = _acc(logits)
    row_max = x.amax(-1)
    exps = torch.exp(x - _shift(row_max).unsqueeze(-1))
    picked = torch.gather(x, -1, local_ids)
    return row_max, exps.sum(-1), torch.where(owned, picked, torch.zeros_like(picked))


def kl_stats(student: torch.Tensor, teacher: torch.Tensor, kind: str):
    """(student max, teacher max, student sum-exp, teacher sum-exp, cross term) of one chunk.

    With shifted logits s' = s - shift_s, t' = t - shift_t, the cross term is: reverse
    sum e^{s'} (s' - t'); forward sum e^{t'} (t' - s'); jsd zeros (it needs the global log-sum-exps,
    see `jsd_sums`). Shifted differences keep fp32 precision when logits are huge (no lse - lse).
    """
    return _pair_stats(student, teacher, kind, with_entropy=False)


def kl_entropy_stats(student: torch.Tensor, teacher: torch.Tensor, kind: str):
    """`kl_stats` plus the student's sum e^{s'} s' (its entropy's numerator), in the same pass."""
    return _pair_stats(student, teacher, kind, with_entropy=True)


def _pair_stats(student: torch.Tensor, teacher: torch.Tensor, kind: str, with_entropy: bool):
    s = _acc(student)
    t = _acc(teacher)
    s_max = s.amax(-1)
    t_max = t.amax(-1)
    s_shifted = s - _shift(s_max).unsqueeze(-1)
    t_shifted = t - _shift(t_max).unsqueeze(-1)
    s_exps = torch.exp(s_shifted)
    t_exps = torch.exp(t_shifted)
    if kind == "reverse":
        cross = _guarded(s_exps, s_shifted - t_shifted).sum(-1)
    elif kind == "forward":
        cross = _guarded(t_exps, t_shifted - s_shifted).sum(-1)
    else:
        cross = torch.zeros_like(s_max)
    stats = (s_max, t_max, s_exps.sum(-1), t_exps.sum(-1), cross)
    if with_entropy:
        stats += (_guarded(s_exps, s_shifted).sum(-1),)
    return stats


def _log_softmax(x, shift, log_norm):
    """log p = (x - shift) - log sum exp(x - shift), from per-row statistics [rows]."""
    return (x - shift.unsqueeze(-1)) - log_norm.unsqueeze(-1)


def _jsd_log_mixture(s_logp, t_logp, beta: float):
    """log(beta * q + (1 - beta) * p) from log p (student) and log q (teacher)."""
    return torch.logaddexp(t_logp + math.log(beta), s_logp + math.log1p(-beta))


def jsd_sums(student, teacher, s_shift, s_log_norm, t_shift, t_log_norm, beta: float):
    """(sum q (log q - log m), sum p (log p - log m)) of one chunk, m = beta q + (1 - beta) p."""
    s_logp = _log_softmax(_acc(student), s_shift, s_log_norm)
    t_logp = _log_softmax(_acc(teacher), t_shift, t_log_norm)
    log_mix = _jsd_log_mixture(s_logp, t_logp, beta)
    kl_teacher_mix = _guarded(torch.exp(t_logp), t_logp - log_mix).sum(-1)
    kl_student_mix = _guarded(torch.exp(s_logp), s_logp - log_mix).sum(-1)
    return kl_teacher_mix, kl_student_mix


def _kl_grad_and_probs(student, teacher, grad_out, s_shift, s_log_norm, t_shift, t_log_norm, aux, kind: str,
                       beta: float):
    """(grad_out * d KL / d student chunk, the student's probabilities p), both fp32.

    reverse: p (s' - t' - aux), aux = sum p (s' - t') (shifted logits);  forward: p - q;
    jsd: (1 - beta) p (log p - log m - aux), aux = KL(p || m).
    """
    s = _acc(student)
    t = _acc(teacher)
    s_logp = _log_softmax(s, s_shift, s_log_norm)
    probs = torch.exp(s_logp)
    g = grad_out.unsqueeze(-1)
    if kind == "reverse":
        diff = (s - s_shift.unsqueeze(-1)) - (t - t_shift.unsqueeze(-1))
        return g * _guarded(probs, diff - aux.unsqueeze(-1)), probs
    t_logp = _log_softmax(t, t_shift, t_log_norm)
    if kind == "forward":
        return g * (probs - torch.exp(t_logp)), probs
    log_mix = _jsd_log_mixture(s_logp, t_logp, beta)
    return (g * (1.0 - beta)) * _guarded(probs, s_logp - log_mix - aux.unsqueeze(-1)), probs


def kl_grad(student, teacher, grad_out, s_shift, s_log_norm, t_shift, t_log_norm, aux, kind: str, beta: float):
    """d KL / d student chunk (fp32), times grad_out [rows] (`_kl_grad_and_probs`)."""
    return _kl_grad_and_probs(student, teacher, grad_out, s_shift, s_log_norm, t_shift, t_log_norm, aux, kind,
                              beta)[0]


def kl_target_grad_(student, teacher, kl_coef, target_coef_sum, s_shift, s_log_norm, t_shift, t_log_norm, aux,
                    kind: str, beta: float) -> None:
    """Overwrite the student chunk with a dKL/ds - (sum_k b_k) p (fp32 inside, rounded once to its dtype).

    That is d/ds of a KL + sum_k b_k log p[id_k] (a = kl_coef, target_coef_sum = sum_k b_k, per row) less the
    one-hot terms b_k e_{id_k}, which touch one column per target and which the caller applies sparsely. Writing
    over the logits it reads saves one chunk-sized buffer (they are not needed after)."""
    grad, probs = _kl_grad_and_probs(student, teacher, kl_coef, s_shift, s_log_norm, t_shift, t_log_norm, aux,
                                     kind, beta)
    student.copy_(grad - target_coef_sum.unsqueeze(-1) * probs)


def entropy_grad(logits, grad_out, shift, log_norm, mean_shifted):
    """d H / d logits = -p (x' - sum p x') with x' = x - shift, times grad_out."""
    x = _acc(logits)
    shifted = x - shift.unsqueeze(-1)
    probs = torch.exp(shifted - log_norm.unsqueeze(-1))
    return -grad_out.unsqueeze(-1) * _guarded(probs, shifted - mean_shifted.unsqueeze(-1))


def softmax_grad(logits, grad_out, shift, log_norm):
    """d lse / d logits = p, times grad_out; 0 on a row with no finite logit (lse = -inf, an empty sum: a student
    masked to -inf outside a teacher's top-k has such a tail, and no finite change of a -inf logit moves it)."""
    probs = torch.exp(_log_softmax(_acc(logits), shift, log_norm))
    empty = torch.isneginf(log_norm).unsqueeze(-1)
    return grad_out.unsqueeze(-1) * torch.where(empty, torch.zeros_like(probs), probs)


def gather_grad(logits, grad_out, shift, log_norm, local_ids, owned):
    """d (sum_k g_k log p[id_k]) / d logits = onehot-scatter of g - (sum_k g_k) p."""
    probs = torch.exp(_log_softmax(_acc(logits), shift, log_norm))
    grad = -grad_out.sum(-1, keepdim=True) * probs
    return grad.scatter_add(-1, local_ids, torch.where(owned, grad_out, torch.zeros_like(grad_out)))


_EAGER = {
    "logsumexp_stats": logsumexp_stats,
    "entropy_stats": entropy_stats,
    "gather_stats": gather_stats,
    "kl_stats": kl_stats,
    "kl_entropy_stats": kl_entropy_stats,
    "jsd_sums": jsd_sums,
    "kl_grad": kl_grad,
    "kl_target_grad_": kl_target_grad_,
    "entropy_grad": entropy_grad,
    "softmax_grad": softmax_grad,
    "gather_grad": gather_grad,
}
_COMPILED: dict[bool, dict] = {}


def kernels(use_compiled: bool, dynamic: bool = False) -> dict:
    """The kernel table: eager torch, or each function through torch.compile (compiled lazily).

    dynamic=False: one specialisation per (rows, local vocab, dtype); the caller sends only full chunks of
    a fixed row count here and runs the ragged last chunk eagerly. dynamic=True: one kernel for any shape,
    so the ragged chunk runs compiled too (what CUDA uses: a ragged chunk run eagerly costs more there).
    """
    if not use_compiled:
        return _EAGER
    if dynamic not in _COMPILED:
        _COMPILED[dynamic] = {name: torch.compile(fn, dynamic=dynamic) for name, fn in _EAGER.items()}
    return _COMPILED[dynamic]
