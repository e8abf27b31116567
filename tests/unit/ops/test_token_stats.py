"""One-process checks of megatron_scope.ops.token_stats against the float64 references."""

import math

import pytest
import torch

from megatron_scope.ops import reference
from megatron_scope.ops.token_stats import LOG_RATIO_FLOOR, sampled_kl, sequence_mean_log_prob, sequence_perplexity

from .test_vocab_parallel import _logits


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_sampled_kl_matches_definition_and_estimates_kl(kind):
    student_lp = torch.log_softmax(_logits((4, 9), seed=1, dtype=torch.float64), -1)
    teacher_lp = torch.log_softmax(_logits((4, 9), seed=2, dtype=torch.float64), -1)
    torch.testing.assert_close(sampled_kl(student_lp, teacher_lp, kind), reference.sampled_kl(student_lp, teacher_lp, kind))
    # Monte Carlo over tokens sampled from the student: k1 and k3 are unbiased for KL(student || teacher)
    samples = torch.multinomial(student_lp.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = sampled_kl(student_lp.gather(-1, samples), teacher_lp.gather(-1, samples), kind)
    exact = reference.kl(student_lp, teacher_lp, "reverse")
    if kind == "k2":
        assert torch.all(estimates >= 0)
    else:
        stderr = estimates.std(-1) / math.sqrt(samples.shape[-1])
        assert torch.all((estimates.mean(-1) - exact).abs() < 5 * stderr), (estimates.mean(-1), exact)
    if kind == "k3":
        assert torch.all(estimates >= 0)
    student = student_lp.clone().requires_grad_()
    teacher = teacher_lp.clone().requires_grad_()
    sampled_kl(student, teacher, kind).sum().backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_sampled_kl_floors_the_log_ratio_so_a_minus_inf_teacher_stays_finite(kind):
    """A teacher log-prob of -inf (a token it cannot emit) and one far below the student's: log r is floored at
    LOG_RATIO_FLOOR, so value and gradient are the estimator's at log r = -100 (float64 by hand), never NaN; log r
    above the floor is untouched."""
    student = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([float("-inf"), -150.0, -4.0], dtype=torch.float64)
    value = sampled_kl(student, teacher, kind)
    value.sum().backward()
    log_r = torch.tensor([LOG_RATIO_FLOOR, LOG_RATIO_FLOOR, -1.0], dtype=torch.float64)
    expected = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.expm1(log_r) - log_r}[kind]
    torch.testing.assert_close(value.detach(), expected)
    torch.testing.assert_close(student.grad, -log_r)  # the reverse-KL gradient -log r ∇ log π_S for every estimator


def test_sequence_reductions_mask_and_all_masked():
    token_lp = torch.log(torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0] * 6, [1] * 6], dtype=torch.float32)
    poisoned = token_lp.clone()
    poisoned[mask == 0] = float("nan")
    poisoned[0, 5] = float("-inf")
    poisoned.requires_grad_()
    mean = sequence_mean_log_prob(poisoned, mask)
    torch.testing.assert_close(mean, reference.sequence_mean_log_prob(token_lp, mask))
    assert mean[1].item() == 0.0
    ppl = sequence_perplexity(poisoned, mask.bool())
    torch.testing.assert_close(ppl, torch.exp(-reference.sequence_mean_log_prob(token_lp, mask)))
    assert ppl[1].item() == 1.0
    (mean.sum() + ppl.sum()).backward()
    assert not torch.isnan(poisoned.grad).any() and torch.all(poisoned.grad[mask == 0] == 0)
    # leading dims: [2, 3, 6] -> [2, 3]
    stacked = sequence_mean_log_prob(token_lp.expand(2, 3, 6), mask.expand(2, 3, 6))
    assert stacked.shape == (2, 3)
