"""Float64 one-process references for the ops (`vocab_parallel`, `topk`, `token_stats`): full vocabulary,
plain torch, no chunking.

Written straight from the definitions (log_softmax, sum p log(p/q), ...), independent of the
vocab-parallel formulas, so the tests can compare every op and its gradient against them. Padded
vocabulary entries (global id >= vocab_size) are set to -inf before anything else. Inputs of any
dtype are upcast to float64; results are float64.
"""

from __future__ import annotations

import math

import torch

from megatron_scope.ops.topk import FP32_TAIL_FLOOR


def _masked_float64(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    x = logits.double()
    if vocab_size is not None and vocab_size < x.shape[-1]:
        keep = torch.arange(x.shape[-1], device=x.device) < vocab_size
        x = x.masked_fill(~keep, float("-inf"))
    return x


def _p_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) over the last dim, 0 where p = 0 (inputs sanitised first, so no NaN gradient)."""
    positive = log_p > float("-inf")
    zero = torch.zeros_like(log_p)
    safe_log_p = torch.where(positive, log_p, zero)
    safe_log_q = torch.where(positive, log_q, zero)
    return torch.where(positive, safe_log_p.exp() * (safe_log_p - safe_log_q), zero).sum(-1)


def _log(x: torch.Tensor) -> torch.Tensor:
    """log x with -inf at 0 and a finite gradient everywhere it is used."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), float("-inf"))


def log_softmax(logits, vocab_size=None):
    return torch.log_softmax(_masked_float64(logits, vocab_size), dim=-1)


def logsumexp(logits, vocab_size=None):
    return torch.logsumexp(_masked_float64(logits, vocab_size), dim=-1)


def log_probs(logits, target, vocab_size=None):
    return log_softmax(logits, vocab_size).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)


def entropy(logits, vocab_size=None):
    log_p = log_softmax(logits, vocab_size)
    return -_p_log_ratio(log_p, torch.zeros_like(log_p))


def kl(student_logits, teacher_logits, kind="reverse", beta=0.5, vocab_size=None):
    log_p = log_softmax(student_logits, vocab_size)
    log_q = log_softmax(teacher_logits.detach(), vocab_size)
    if kind == "reverse":
        return _p_log_ratio(log_p, log_q)
    if kind == "forward":
        return _p_log_ratio(log_q, log_p)
    if kind == "jsd":
        either = (log_p > float("-inf")) | (log_q > float("-inf"))
        zero = torch.zeros_like(log_p)
        log_m = torch.where(
            either,
            torch.logaddexp(torch.where(either, log_q, zero) + math.log(beta),
                            torch.where(either, log_p, zero) + math.log(1 - beta)),
            float("-inf"),
        )
        return beta * _p_log_ratio(log_q, log_m) + (1 - beta) * _p_log_ratio(log_p, log_m)
    raise ValueError(kind)


def topk_tail(logits, topk_ids, vocab_size=None):
    """log Σ_{v ∉ topk_ids} softmax(logits)_v, from the logits outside the ids (-inf, with zero gradient, when none
    is left or all of them are -inf)."""
    rest = log_softmax(logits, vocab_size).scatter(-1, topk_ids.long(), float("-inf"))
    empty = torch.isneginf(rest).all(-1)
    safe = torch.where(empty.unsqueeze(-1), torch.zeros_like(rest), rest)
    return torch.where(empty, float("-inf"), safe.logsumexp(-1))


def topk_kl(student_logits, topk_ids, teacher_topk_log_probs, kind="reverse", vocab_size=None,
            teacher_tail_log_mass=None, renormalize=False):
    """KL over the k listed ids plus one lumped 'everything else' outcome (the student's tail from its logits,
    the teacher's given, or 1 - Σ_k q_k); `renormalize`: both renormalised over the k ids, no tail."""
    log_p = log_softmax(student_logits, vocab_size).gather(-1, topk_ids.long())
    log_q = teacher_topk_log_probs.double()
    if renormalize:
        log_p, log_q = log_p - log_p.logsumexp(-1, keepdim=True), log_q - log_q.logsumexp(-1, keepdim=True)
    elif topk_ids.shape[-1] < (vocab_size or student_logits.shape[-1]):
        if teacher_tail_log_mass is None:
            teacher_tail_log_mass = _log((1 - log_q.exp().sum(-1)).clamp(min=FP32_TAIL_FLOOR))
        log_p = torch.cat([log_p, topk_tail(student_logits, topk_ids, vocab_size).unsqueeze(-1)], dim=-1)
        log_q = torch.cat([log_q, teacher_tail_log_mass.double().unsqueeze(-1)], dim=-1)
    if kind == "reverse":
        return _p_log_ratio(log_p, log_q)
    return _p_log_ratio(log_q, log_p)


def sampled_kl(student_log_probs, teacher_log_probs, kind="k1"):
    ratio = (teacher_log_probs.double() - student_log_probs.double()).exp()
    if kind == "k1":
        return -ratio.log()
    if kind == "k2":
        return 0.5 * ratio.log() ** 2
    return ratio - 1 - ratio.log()


def sequence_mean_log_prob(token_log_probs, mask):
    out = []
    for row, row_mask in zip(token_log_probs.double().reshape(-1, token_log_probs.shape[-1]), mask.reshape(-1, mask.shape[-1])):
        picked = [float(v) for v, m in zip(row, row_mask) if bool(m)]
        out.append(math.fsum(picked) / len(picked) if picked else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(token_log_probs.shape[:-1])
