"""One-process checks of megatron_scope.ops.vocab_parallel against the float64 references.

The shared op cases (`OPS`, `_case`) also run `topk.vocab_parallel_topk_kl`, and the bad-input test covers
`topk` and `token_stats` too; their own tests are in test_topk.py and test_token_stats.py.
TP > 1 is checked in tests/distributed/test_vocab_parallel.py against the same references.
"""

import logging
import math

import pytest
import torch

from megatron_scope.ops import reference, vocab_parallel
from megatron_scope.ops.token_stats import sampled_kl, sequence_mean_log_prob, sequence_perplexity
from megatron_scope.ops.topk import vocab_parallel_topk_kl
from megatron_scope.ops.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_log_probs,
    vocab_parallel_logsumexp,
)

VOCAB = 53  # padded to 64 in the padding cases
PADDED = 64
TOPK = 5


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def _topk(teacher_logits, vocab_size, k=TOPK):
    """A teacher's top-k (ids, log-probs) from full teacher logits, as a remote teacher would send."""
    log_q = reference.log_softmax(teacher_logits, vocab_size)
    values, ids = log_q.topk(k, dim=-1)
    return ids, values.to(teacher_logits.dtype)


def _case(op, logits, teacher, target, vocab_size, beta=0.3):
    """(ours, reference) callables of the student logits for op name `op`."""
    if op == "logsumexp":
        return (lambda x: vocab_parallel_logsumexp(x, vocab_size=vocab_size),
                lambda x: reference.logsumexp(x, vocab_size))
    if op == "log_probs":
        return (lambda x: vocab_parallel_log_probs(x, target, vocab_size=vocab_size),
                lambda x: reference.log_probs(x, target, vocab_size))
    if op == "entropy":
        return (lambda x: vocab_parallel_entropy(x, vocab_size=vocab_size),
                lambda x: reference.entropy(x, vocab_size))
    if op.startswith("kl_"):
        kind = op[3:]
        return (lambda x: vocab_parallel_kl(x, teacher, kind=kind, beta=beta, vocab_size=vocab_size),
                lambda x: reference.kl(x, teacher, kind, beta, vocab_size))
    if op.startswith("topk_"):
        kind = op[5:]
        ids, log_q = _topk(teacher, vocab_size)
        return (lambda x: vocab_parallel_topk_kl(x, ids, log_q, kind=kind, vocab_size=vocab_size),
                lambda x: reference.topk_kl(x, ids, log_q, kind, vocab_size))
    raise AssertionError(op)


OPS = ["logsumexp", "log_probs", "entropy", "kl_reverse", "kl_forward", "kl_jsd", "topk_reverse", "topk_forward"]


def _value_and_grad(fn, logits, grad_seed=5):
    x = logits.detach().clone().requires_grad_()
    out = fn(x)
    weights = _logits(out.shape, grad_seed, scale=1.0, dtype=out.dtype).to(out.device)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("chunk_elements", [1 << 16, 3 * PADDED + 7], ids=["one_chunk", "ragged_chunks"])
@pytest.mark.parametrize("vocab_size", [None, VOCAB], ids=["unpadded", "padded"])
@pytest.mark.parametrize("op", OPS)
def test_matches_float64_reference(op, vocab_size, chunk_elements, monkeypatch):
    monkeypatch.setattr(vocab_parallel, "CHUNK_ELEMENTS", chunk_elements)
    real_vocab = vocab_size or PADDED
    logits = _logits((3, 7, PADDED), seed=1)
    teacher = _logits((3, 7, PADDED), seed=2)
    target = torch.randint(0, real_vocab, (3, 7), generator=torch.Generator().manual_seed(3))
    ours_fn, ref_fn = _case(op, logits, teacher, target, vocab_size)
    ours, ours_grad = _value_and_grad(ours_fn, logits)
    ref, ref_grad = _value_and_grad(ref_fn, logits.double())
    assert ours.dtype == torch.float32 and ours.shape == (3, 7)
    assert ours_grad.dtype == torch.float32 and ours_grad.shape == logits.shape
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    if vocab_size is not None:
        assert torch.all(ours_grad[..., vocab_size:] == 0)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op):
    logits = _logits((2, 3, 11), seed=4, dtype=torch.float64)
    teacher = _logits((2, 3, 11), seed=6, dtype=torch.float64)
    target = torch.randint(0, 9, (2, 3), generator=torch.Generator().manual_seed(7))
    ours_fn, _ = _case(op, logits, teacher, target, vocab_size=9)
    assert torch.autograd.gradcheck(ours_fn, (logits.clone().requires_grad_(),))


def test_jsd_beta_enters_the_mixture():
    logits, teacher = _logits((4, 20), seed=1, dtype=torch.float64), _logits((4, 20), seed=2, dtype=torch.float64)
    for beta in (0.1, 0.9):
        torch.testing.assert_close(
            vocab_parallel_kl(logits, teacher, "jsd", beta=beta), reference.kl(logits, teacher, "jsd", beta)
        )
    assert not torch.allclose(vocab_parallel_kl(logits, teacher, "jsd", beta=0.1),
                              vocab_parallel_kl(logits, teacher, "jsd", beta=0.9))


def test_non_contiguous_views_and_leading_shapes():
    base_s = _logits((6, 4, PADDED + 9), seed=1)
    base_t = _logits((6, 4, PADDED + 9), seed=2)
    student = base_s[::2, :, 3 : 3 + PADDED].transpose(0, 1)  # [4, 3, 64], strided in every dim
    teacher = base_t[::2, :, 3 : 3 + PADDED].transpose(0, 1)
    assert not student.is_contiguous()
    ours, ours_grad = _value_and_grad(lambda x: vocab_parallel_kl(x, teacher, "reverse", vocab_size=VOCAB), student)
    ref, ref_grad = _value_and_grad(lambda x: reference.kl(x, teacher, "reverse", vocab_size=VOCAB), student.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    # no leading dims at all: one token
    one = _logits((PADDED,), seed=3)
    torch.testing.assert_close(vocab_parallel_entropy(one).double(), reference.entropy(one), rtol=1e-5, atol=1e-6)
    # zero tokens
    empty = torch.zeros(0, 5, PADDED, requires_grad=True)
    out = vocab_parallel_kl(empty, torch.zeros(0, 5, PADDED))
    out.sum().backward()
    assert out.shape == (0, 5) and empty.grad.shape == empty.shape


def test_huge_logits_stay_finite():
    """Logits of magnitude 1e4 (exp overflows fp32 without the max shift) still match the reference."""
    student = _logits((4, PADDED), seed=1, scale=1e4)
    teacher = _logits((4, PADDED), seed=2, scale=1e4)
    for kind in ("forward", "jsd"):
        ours = vocab_parallel_kl(student, teacher, kind)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), reference.kl(student, teacher, kind), rtol=1e-5, atol=1e-3)
    # reverse KL of near-one-hot distributions: sum p (s - t) cancels against lse_s - lse_t, so compare
    # against a reference with the same fp32 rounding of the inputs but milder scale (relative 1e-5 of ~1e4).
    mild_s, mild_t = student / 1e2, teacher / 1e2
    torch.testing.assert_close(
        vocab_parallel_kl(mild_s, mild_t).double(), reference.kl(mild_s, mild_t), rtol=1e-5, atol=1e-4
    )
    ours_entropy = vocab_parallel_entropy(student)
    assert torch.isfinite(ours_entropy).all()
    torch.testing.assert_close(ours_entropy.double(), reference.entropy(student), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vocab_parallel_logsumexp(student).double(), reference.logsumexp(student), rtol=1e-6, atol=0)


def test_minus_inf_logits_take_no_probability_and_give_no_nan():
    student = _logits((5, PADDED), seed=1)
    teacher = _logits((5, PADDED), seed=2)
    banned = torch.rand(5, PADDED, generator=torch.Generator().manual_seed(3)) < 0.4
    banned[:, 0] = False  # every row keeps a finite logit
    student = student.masked_fill(banned, float("-inf"))
    teacher = teacher.masked_fill(banned, float("-inf"))
    one_hot = torch.full((1, PADDED), float("-inf"))
    one_hot[0, 7] = 2.0
    for op in OPS:
        ours_fn, ref_fn = _case(op, student, teacher, torch.zeros(5, dtype=torch.long), None)
        ours, ours_grad = _value_and_grad(ours_fn, student)
        ref, ref_grad = _value_and_grad(ref_fn, student.double())
        assert not torch.isnan(ours).any() and not torch.isnan(ours_grad).any(), op
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6, msg=op)
        torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-5, atol=1e-7, msg=op)
        assert torch.all(ours_grad[banned] == 0), op
    # a single finite logit: entropy 0, KL to itself 0, gradients 0 (not NaN)
    x = one_hot.clone().requires_grad_()
    (vocab_parallel_entropy(x) + vocab_parallel_kl(x, one_hot)).sum().backward()
    assert vocab_parallel_entropy(one_hot).item() == 0.0 and torch.all(x.grad == 0)
    # teacher gives 0 probability where the student gives some: reverse KL is +inf, as defined
    assert math.isinf(vocab_parallel_kl(_logits((1, PADDED), seed=4), one_hot).item())


def test_padded_vocabulary_takes_no_probability():
    """Garbage (even huge) logits in Megatron's padding columns change nothing."""
    logits = _logits((4, PADDED), seed=1)
    teacher = _logits((4, PADDED), seed=2)
    padded_garbage = logits.clone()
    padded_garbage[:, VOCAB:] = 1e4
    for op in ("logsumexp", "entropy", "kl_reverse", "kl_jsd"):
        ours_fn, _ = _case(op, padded_garbage, teacher, None, VOCAB)
        clean_fn, _ = _case(op, logits[:, :VOCAB], teacher[:, :VOCAB], None, None)
        torch.testing.assert_close(ours_fn(padded_garbage), clean_fn(logits[:, :VOCAB].contiguous()), rtol=1e-6, atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 logits: values at fp32 accuracy (math runs in fp32 on the exactly upcast inputs); the
    gradient is rounded once to bf16 on output, so it matches to bf16's 2^-8 relative precision."""
    logits = _logits((3, 5, PADDED), seed=1, dtype=torch.bfloat16)
    teacher = _logits((3, 5, PADDED), seed=2, dtype=torch.bfloat16)
    target = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    for op in OPS:
        ours_fn, ref_fn = _case(op, logits, teacher, target, VOCAB)
        ours, ours_grad = _value_and_grad(ours_fn, logits)
        ref, ref_grad = _value_and_grad(ref_fn, logits.double())
        assert ours.dtype == torch.float32 and ours_grad.dtype == torch.bfloat16, op
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6, msg=op)
        torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=2**-8, atol=1e-5, msg=op)


def test_kl_gradient_flows_into_student_only():
    student = _logits((3, PADDED), seed=1).requires_grad_()
    teacher = _logits((3, PADDED), seed=2).requires_grad_()
    vocab_parallel_kl(student, teacher, "forward").sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(use_compiled, dynamic=False):
        if use_compiled:
            return {name: _raise for name in vocab_parallel._chunk_kernels.kernels(False)}
        return real(False)

    def _raise(*args):
        raise RuntimeError("simulated compiler failure")

    real = vocab_parallel._chunk_kernels.kernels
    monkeypatch.setattr(vocab_parallel._chunk_kernels, "kernels", broken)
    monkeypatch.setattr(vocab_parallel, "_compile_failed", False)
    monkeypatch.setenv(vocab_parallel.BACKEND_ENV, "auto")
    monkeypatch.setattr(vocab_parallel, "COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(vocab_parallel, "CHUNK_ELEMENTS", 4 * PADDED)  # two full chunks: compiled kernels
    logits, teacher = _logits((8, PADDED), seed=1), _logits((8, PADDED), seed=2)
    with caplog.at_level(logging.WARNING, logger=vocab_parallel.__name__):
        out = vocab_parallel_kl(logits, teacher)
    assert "simulated compiler failure" in caplog.text and vocab_parallel._compile_failed
    torch.testing.assert_close(out.double(), reference.kl(logits, teacher), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(vocab_parallel.BACKEND_ENV, "compile")  # explicit request: the error surfaces
    monkeypatch.setattr(vocab_parallel, "_compile_failed", False)
    with pytest.raises(RuntimeError, match="simulated compiler failure"):
        vocab_parallel_kl(logits, teacher)


@pytest.mark.slow
def test_compiled_kernels_match_eager(monkeypatch):
    """The Inductor-compiled chunk kernels (full chunks) + eager ragged chunk equal the reference."""
    monkeypatch.setenv(vocab_parallel.BACKEND_ENV, "compile")
    monkeypatch.setattr(vocab_parallel, "CHUNK_ELEMENTS", 4 * 1000)
    student = _logits((2, 9, 1000), seed=1, dtype=torch.bfloat16)  # 4 full chunks of 4 rows + 2 rows
    teacher = _logits((2, 9, 1000), seed=2, dtype=torch.bfloat16)
    ours, ours_grad = _value_and_grad(lambda x: vocab_parallel_kl(x, teacher, vocab_size=990), student)
    ref, ref_grad = _value_and_grad(lambda x: reference.kl(x, teacher, vocab_size=990), student.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=2**-8, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the offending shape or value


def test_bad_input_raises_value_error_naming_it():
    s, t = _logits((2, 3, 8), seed=1), _logits((2, 3, 8), seed=2)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\) != teacher_logits shape \(2, 3, 7\)"):
        vocab_parallel_kl(s, t[..., :7])
    with pytest.raises(ValueError, match="torch.float32 != teacher_logits dtype torch.bfloat16"):
        vocab_parallel_kl(s, t.bfloat16())
    with pytest.raises(ValueError, match="kind='sideways'"):
        vocab_parallel_kl(s, t, kind="sideways")
    with pytest.raises(ValueError, match="beta=1.0"):
        vocab_parallel_kl(s, t, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="vocabulary id 7, outside \\[0, 7\\)"):
        vocab_parallel_log_probs(s, torch.full((2, 3), 7), vocab_size=7)  # a padding id
    with pytest.raises(ValueError, match="vocabulary id -100"):
        vocab_parallel_log_probs(s, torch.full((2, 3), -100))
    with pytest.raises(ValueError, match=r"target shape \(2, 4\)"):
        vocab_parallel_log_probs(s, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        vocab_parallel_log_probs(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="vocab_size=9 does not fit"):
        vocab_parallel_entropy(s, vocab_size=9)
    with pytest.raises(ValueError, match="vocab_size=0"):
        vocab_parallel_logsumexp(s, vocab_size=0)
    with pytest.raises(ValueError, match="floating point, got dtype torch.int64"):
        vocab_parallel_entropy(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sampled_kl|kind='k4'"):
        sampled_kl(s[..., 0], t[..., 0], kind="k4")
    with pytest.raises(ValueError, match=r"student_log_probs shape \(2, 3\)"):
        sampled_kl(s[..., 0], t[..., :2, 0])
    ids = torch.tensor([[0, 1], [2, 2]])
    with pytest.raises(ValueError, match="repeats an id"):
        vocab_parallel_topk_kl(s[0, :2], ids, torch.full((2, 2), -3.0))
    with pytest.raises(ValueError, match="must be <= 0"):
        vocab_parallel_topk_kl(s[0, :2], torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="sum to 1.2"):
        vocab_parallel_topk_kl(s[0, :2], torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), math.log(0.6)))
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be an integer tensor of shape \(2, 2\), got "
                                         r"torch.int64 \(2, 3\)"):
        vocab_parallel_topk_kl(s[0, :2], torch.zeros(2, 3, dtype=torch.long), torch.full((2, 2), -3.0))
    with pytest.raises(ValueError, match="mask must hold only 0/1"):
        sequence_mean_log_prob(torch.zeros(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\)"):
        sequence_perplexity(torch.zeros(2, 3), torch.ones(2, 4))
