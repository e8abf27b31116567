"""Per-token statistics of log-probs already taken at the sampled tokens: no logits, no communication.

`sampled_kl` estimates KL(student || teacher) from both log-probs of tokens sampled from the student;
`sequence_mean_log_prob` and `sequence_perplexity` reduce per-token log-probs over each sequence's
response tokens. Inputs are per-token values (e.g. from `vocab_parallel_log_probs`), the same on every
TP rank, and sequences are not split over TP ranks, so nothing here communicates. The losses
(losses/, megatron/loss_func.py) and the trainer use them.

References: SCOPE, arXiv 2604.10688 (its perplexity weights from per-sequence mean log-probs);
k1/k2/k3 estimators: J. Schulman, "Approximating KL divergence" (2020).
"""

from __future__ import annotations

import torch

__all__ = ["sampled_kl", "sequence_mean_log_prob", "sequence_perplexity", "SAMPLED_KL", "LOG_RATIO_FLOOR"]

SAMPLED_KL = ("k1", "k2", "k3")

#: `sampled_kl` floors log r = log π_T(y) - log π_S(y) here. A teacher log-prob of -inf (a token the teacher cannot
#: emit: the true KL is +inf) then counts as a ratio of e^-100 (below fp32's smallest subnormal, 2^-149 = e^-103.3),
#: so every estimate stays finite (k1 <= 100, k2 <= 5000, k3 < 100) and the gradient is at most 100 ∇ log π_S(y),
#: pushing the student off that token hard but never with NaN (verl's `kl_penalty` clamps its estimates likewise).
LOG_RATIO_FLOOR = -100.0


def sampled_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Single-sample estimators of KL(student || teacher) on tokens y sampled from the student, whose gradient
    is, in expectation over y ~ π_S, the gradient of KL(π_S ‖ π_T).

    Values, with log r = log π_T(y) - log π_S(y) (J. Schulman, "Approximating KL divergence", 2020):
    k1 = -log r (unbiased), k2 = (log r)^2 / 2 (biased, low variance), k3 = (r - 1) - log r (unbiased, >= 0).

    Gradients: ∇ KL(π_S‖π_T) = E_{y~π_S}[(log π_S(y) - log π_T(y)) ∇ log π_S(y)] (the score-function identity;
    Σ_y π_S ∇ log π_S = 0 removes the "+1"), and each estimator's gradient is exactly this per sample:
      k1: differentiated directly its gradient is ∇ log π_S(y), zero in expectation whatever the teacher says;
          here it is the policy gradient with advantage sg(log π_T - log π_S) (the form of on-policy
          distillation with a per-token reward, Thinking Machines 2025; the SCOPE authors' released code);
      k2: the direct gradient, (log π_S - log π_T) ∇ log π_S;
      k3: the direct gradient (1 - r) ∇ log π_S is, in expectation, ∇ KL(π_T‖π_S) (the FORWARD KL); adding its
          score-function term sg(k3) ∇ log π_S gives (1 - r + k3) ∇ log π_S = -log r ∇ log π_S, k2's
          gradient (verl's "k3+").
    The returned tensor has the estimator's value and this gradient (value + g - sg(g), g the surrogate), so
    losses and reports read the estimate while backward gets the unbiased reverse-KL gradient. The gradient
    flows into `student_log_probs` only (the teacher is detached). log r is floored at LOG_RATIO_FLOOR (-100), so a
    teacher log-prob of -inf gives a finite value and gradient, never NaN. Elementwise; no communication.
    """
    if kind not in SAMPLED_KL:
        raise ValueError(f"kind={kind!r}; expected one of {SAMPLED_KL}")
    for name, value in (("student_log_probs", student_log_probs), ("teacher_log_probs", teacher_log_probs)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(
            f"student_log_probs shape {tuple(student_log_probs.shape)} != "
            f"teacher_log_probs shape {tuple(teacher_log_probs.shape)}"
        )
    student = student_log_probs.detach()
    log_ratio = (teacher_log_probs.detach().to(student.dtype) - student).clamp(min=LOG_RATIO_FLOOR)
    if kind == "k1":
        value = -log_ratio
    elif kind == "k2":
        value = 0.5 * log_ratio.square()
    else:
        value = torch.expm1(log_ratio) - log_ratio
    # Surrogate whose gradient is -log r · ∇ log π_S (zero-valued: it only routes the gradient).
    score = student_log_probs - student
    return value + (-log_ratio) * score


def _check_mask(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool; ValueError for a shape mismatch or values other than 0/1."""
    if not isinstance(token_log_probs, torch.Tensor) or not token_log_probs.is_floating_point():
        raise ValueError("token_log_probs must be a floating-point tensor")
    if token_log_probs.dim() < 1:
        raise ValueError(f"token_log_probs must be [..., seq], got shape {tuple(token_log_probs.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(token_log_probs.shape):
        raise ValueError(
            f"mask shape {tuple(getattr(mask, 'shape', ()))} != token_log_probs shape {tuple(token_log_probs.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must hold only 0/1 (or be bool); found {mask[(mask != 0) & (mask != 1)][0].item()}")
        mask = mask != 0
    return mask


def sequence_mean_log_prob(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log-prob over each sequence's response tokens (`mask` true); `[..., seq] -> [...]`.

    SCOPE's perplexity weights (arXiv 2604.10688) start from this per-sequence mean. Masked positions
    never leak into the result (not even a NaN or -inf there); an all-masked sequence gives 0 (perplexity
    1), never NaN. No communication (sequences are not split over TP ranks).
    """
    mask = _check_mask(token_log_probs, mask)
    total = torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs)).sum(-1)
    count = mask.sum(-1).clamp(min=1).to(total.dtype)
    return total / count


def sequence_perplexity(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(-mean log-prob) per sequence over its response tokens; an all-masked sequence gives 1."""
    return torch.exp(-sequence_mean_log_prob(token_log_probs, mask))
