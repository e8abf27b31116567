"""One-process checks of megatron_scope.ops.topk against the float64 references.

The top-k KL also runs through the shared op cases of test_vocab_parallel.py (values, gradients, padding,
-inf, bf16); TP > 1 is checked in tests/distributed/test_vocab_parallel.py.
"""

import math

import pytest
import torch

from megatron_scope.ops import reference, topk
from megatron_scope.ops.topk import vocab_parallel_topk_kl

from .test_vocab_parallel import _logits, _topk


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_topk_kl_with_full_support_is_the_full_kl_and_a_lower_bound_otherwise(kind):
    student = _logits((3, 4, 16), seed=1, dtype=torch.float64)
    teacher = _logits((3, 4, 16), seed=2, dtype=torch.float64)
    full_ids, full_lp = _topk(teacher, None, k=16)
    torch.testing.assert_close(vocab_parallel_topk_kl(student, full_ids, full_lp, kind),
                               reference.kl(student, teacher, kind))
    for k in (1, 4, 15):
        ids, lp = _topk(teacher, None, k=k)
        partial = vocab_parallel_topk_kl(student, ids, lp, kind)
        full = reference.kl(student, teacher, kind)  # equal at k = V - 1 (one tail entry), up to float64 rounding
        assert torch.all(partial <= full + 1e-12 * (1 + full.abs())), (partial - full).max()
        assert torch.all(partial >= 0)


def test_topk_summary_matches_reference_and_skips_padding():
    """vocab_parallel_topk: the k largest log-probs (float64 reference), never a padded id; bad k is named."""
    logits = 3 * torch.randn(4, 7, 40, generator=torch.Generator().manual_seed(0))
    logits[..., 30:] = 50.0  # padded entries with the largest logits: must never be chosen
    ids, log_probs, tail = topk.vocab_parallel_topk(logits, 5, vocab_size=30)
    expected_log_probs, expected_ids = reference.log_softmax(logits, 30).topk(5, dim=-1)
    assert torch.equal(ids, expected_ids) and ids.max() < 30
    torch.testing.assert_close(log_probs.double(), expected_log_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tail.double(), reference.topk_tail(logits, ids, 30), rtol=1e-6, atol=1e-6)
    assert torch.all(topk.vocab_parallel_topk(logits, 30, vocab_size=30)[2] == float("-inf"))  # k = V: no tail
    for bad in (0, 31, 2.0):
        with pytest.raises(ValueError, match="k must be an int in"):
            topk.vocab_parallel_topk(logits, bad, vocab_size=30)


def _confident_teacher(k_logit_gap: float = 0.0) -> torch.Tensor:
    """fp32 teacher logits [4, 6, 32] whose top-1 probability is 1 - 1e-7 at every token (the rest 1e-7)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 32, generator=g, dtype=torch.float64)
    top = logits.argmax(-1, keepdim=True)
    rest = logits.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)
    logits = logits.scatter(-1, top, rest + math.log((1 - 1e-7) / 1e-7))
    return logits.float()


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_topk_kl_with_a_confident_teacher_is_finite_and_exact_in_fp32(k, kind):
    """Top-1 probability 1 - 1e-7: 1 - Σ_k q_k cancels in fp32, the directly computed tails do not. Loss and
    gradient equal the float64 reference (tails from the full logits) and are finite."""
    teacher = _confident_teacher()
    student = (2 * torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    ids, log_q, tail = topk.vocab_parallel_topk(teacher, k)
    assert torch.all(torch.logsumexp(log_q.double(), -1).exp() >= 1 - 1.5e-7)  # the head holds nearly all
    torch.testing.assert_close(tail.double(), reference.topk_tail(teacher, ids), rtol=1e-5, atol=0)
    kl = vocab_parallel_topk_kl(student, ids, log_q, kind, teacher_tail_log_mass=tail)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
    student64 = student.detach().double().requires_grad_(True)
    expected = reference.topk_kl(student64, ids, reference.log_softmax(teacher).gather(-1, ids), kind,
                                 teacher_tail_log_mass=reference.topk_tail(teacher, ids))
    expected.sum().backward()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)


def test_the_tail_from_the_top_k_alone_is_floored_at_fp32_rounding():
    """Without the teacher's tail (a vLLM teacher gives only its top-k), 1 - Σ_k q_k below fp32's resolution
    counts as 2^-24, never 0: the reverse KL stays finite."""
    log_q = torch.tensor([[math.log(1 - 1e-9), -30.0]])
    assert float(topk.tail_log_mass_from_topk(log_q)) == pytest.approx(math.log(topk.FP32_TAIL_FLOOR))
    half = torch.tensor([[math.log(0.25), math.log(0.25)]])
    assert float(topk.tail_log_mass_from_topk(half)) == pytest.approx(math.log(0.5))
    student = torch.zeros(1, 8, requires_grad=True)
    kl = vocab_parallel_topk_kl(student, torch.tensor([[0, 1]]), log_q.float())
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()


def masked_outside_topk(seed: int, shape=(3, 4, 32), k: int = 4):
    """(student, teacher) fp32 logits over `shape`; the teacher's top-k ids are 0..k-1 (its logits there raised by
    20), and the student is -inf everywhere else, so its tail outside the teacher's top-k has probability 0."""
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    teacher[..., :k] += 20.0
    student[..., k:] = float("-inf")
    return student.float(), teacher.float()


@pytest.mark.parametrize("teacher_tail", ["positive", "zero"])
@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_topk_kl_with_a_student_masked_outside_the_top_k(kind, teacher_tail):
    """Student logits of -inf outside the teacher's top-k: wherever the KL is finite (reverse; forward when the
    teacher's tail is 0 too) value and gradient equal float64 and the -inf entries get exactly zero gradient;
    forward against a teacher with tail mass is +inf, as the full KL, never NaN."""
    student, teacher = masked_outside_topk(seed=1)
    if teacher_tail == "zero":
        teacher[..., 4:] = float("-inf")
    ids, log_q, tail = topk.vocab_parallel_topk(teacher, 4)
    x = student.clone().requires_grad_()
    kl = vocab_parallel_topk_kl(x, ids, log_q, kind, teacher_tail_log_mass=tail)
    if kind == "forward" and teacher_tail == "positive":
        assert torch.all(kl == float("inf"))
        return
    weights = _logits(kl.shape, seed=5, scale=1.0)
    (kl * weights).sum().backward()
    x64 = student.double().requires_grad_()
    expected = reference.topk_kl(x64, ids, reference.log_softmax(teacher).gather(-1, ids), kind,
                                 teacher_tail_log_mass=reference.topk_tail(teacher, ids))
    (expected * weights.double()).sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[..., 4:] == 0)


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_renormalized_topk_kl_compares_the_distributions_within_the_top_k(kind):
    student = _logits((3, 4, 16), seed=1, dtype=torch.float64).requires_grad_(True)
    teacher = _logits((3, 4, 16), seed=2, dtype=torch.float64)
    ids, lp = _topk(teacher, None, k=5)
    got = vocab_parallel_topk_kl(student, ids, lp, kind, renormalize=True)
    torch.testing.assert_close(got, reference.topk_kl(student, ids, lp, kind, renormalize=True))
    # 0 when the student's top-k logits are the teacher's up to a constant, whatever happens outside them
    same = teacher.clone().scatter(-1, ids, teacher.gather(-1, ids) + 2.0)
    zero = vocab_parallel_topk_kl(same, ids, lp, kind, renormalize=True)
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_int32_ids_as_a_vllm_teacher_sends_them_give_the_int64_results(kind):
    """A vLLM teacher's top-k ids travel as int32 (`SequenceScores`): values and gradients are those of int64 ids."""
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(3, 5, 64, generator=generator, requires_grad=True)
    ids, log_q, tail = topk.vocab_parallel_topk(torch.randn(3, 5, 64, generator=generator), 8, vocab_size=60)
    results = []
    for dtype in (torch.int64, torch.int32):
        out = vocab_parallel_topk_kl(student, ids.to(dtype), log_q, kind=kind, vocab_size=60,
                                     teacher_tail_log_mass=tail)
        results.append((out, *torch.autograd.grad(out.sum(), student)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
