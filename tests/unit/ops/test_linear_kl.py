"""One-process checks of `ops.linear_kl` (the KL from hidden states) against float64 references on the
materialised logits. TP = 2 and 4 are in tests/distributed/test_vocab_parallel.py."""

import pytest
import torch

from megatron_scope.ops import linear_kl, reference, vocab_parallel
from megatron_scope.ops.linear_kl import (
    vocab_parallel_linear_distill_loss,
    vocab_parallel_linear_distill_stats,
    vocab_parallel_linear_kl,
)
from megatron_scope.ops.vocab_parallel import vocab_parallel_kl, vocab_parallel_log_probs

TOKENS, H_STUDENT, H_TEACHER = (3, 7), 8, 12
PADDED, VOCAB = 64, 53


def linear_inputs(seed, dtype=torch.float32, padded=PADDED, leading=TOKENS):
    """(student hidden, student weight, teacher hidden, teacher weight, target) with logits of scale ~3."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    h_s, h_t = draw(*leading, H_STUDENT), draw(*leading, H_TEACHER)
    w_s, w_t = draw(padded, H_STUDENT) * 3 / H_STUDENT**0.5, draw(padded, H_TEACHER) * 3 / H_TEACHER**0.5
    target = torch.randint(0, 45, leading, generator=generator)  # real at every vocab_size the tests use
    return h_s.to(dtype), w_s.to(dtype), h_t.to(dtype), w_t.to(dtype), target


def reference_outputs(h_s, w_s, h_t, w_t, target, kind, vocab_size, beta=0.3):
    """float64 (kl, log p_S(target), log p_T(target), H(p_S)) on materialised logits, differentiable in h_s, w_s."""
    s = h_s.double() @ w_s.double().t()
    t = h_t.double() @ w_t.double().t()
    return (reference.kl(s, t, kind, beta, vocab_size), reference.log_probs(s, target, vocab_size),
            reference.log_probs(t, target, vocab_size), reference.entropy(s, vocab_size))


def coefficients(like: torch.Tensor, seed=3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-token (a, b) of `like`'s shape, dtype and device."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)
    b = torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)
    return a, b


def _grads(outputs, *inputs, seed=3):
    """Gradients of sum(a * kl + b * log p_S(target)) into `inputs` (h_s, w_s, ...), `coefficients(kl)`."""
    kl, log_probs = outputs[0], outputs[1]
    a, b = coefficients(kl, seed)
    return torch.autograd.grad((a * kl).sum() + (b * log_probs).sum(), inputs)


def set_chunking(monkeypatch, chunking: str) -> None:
    """"one_chunk": all 21 tokens at once; "ragged_chunks": chunks of 4 rows, the last one of 1."""
    monkeypatch.setattr(linear_kl, "MIN_CHUNKS", 1)
    if chunking == "ragged_chunks":
        monkeypatch.setattr(linear_kl, "CHUNK_ELEMENTS", 4 * PADDED + 3)
    assert linear_kl.chunk_rows(21, PADDED, "cpu") == (4 if chunking == "ragged_chunks" else 21)


@pytest.mark.parametrize("chunking", ["one_chunk", "ragged_chunks"])
@pytest.mark.parametrize("vocab_size", [None, VOCAB], ids=["unpadded", "padded"])
@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_matches_float64_reference(kind, vocab_size, chunking, monkeypatch):
    set_chunking(monkeypatch, chunking)
    h_s, w_s, h_t, w_t, target = linear_inputs(0)
    h_s.requires_grad_(), w_s.requires_grad_()
    ours = vocab_parallel_linear_distill_stats(h_s, w_s, h_t, w_t, target, kind, vocab_size=vocab_size, beta=0.3)
    ref = reference_outputs(h_s, w_s, h_t, w_t, target, kind, vocab_size)
    for name, mine, theirs in zip(ours._fields, ours, ref):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5, msg=name)
    for mine, theirs in zip(_grads(ours, h_s, w_s), _grads(ref, h_s, w_s)):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-5)
    assert ours.kl.shape == TOKENS


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_gradcheck_float64(kind, monkeypatch):
    monkeypatch.setattr(linear_kl, "CHUNK_ELEMENTS", 2 * PADDED)  # several chunks
    h_s, w_s, h_t, w_t, target = linear_inputs(1, torch.float64, leading=(5,))
    def outputs(hidden, weight):
        stats = vocab_parallel_linear_distill_stats(hidden, weight, h_t, w_t, target, kind, vocab_size=VOCAB, beta=0.3)
        return stats.kl, stats.student_log_probs
    assert torch.autograd.gradcheck(outputs, (h_s.requires_grad_(), w_s.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_kl_on_materialised_logits(dtype):
    """Same logits dtype, same fp32 statistics: the fused op is the unfused path without the stored logits."""
    h_s, w_s, h_t, w_t, _ = linear_inputs(2, dtype)
    h_s.requires_grad_(), w_s.requires_grad_()
    fused = vocab_parallel_linear_kl(h_s, w_s, h_t, w_t, vocab_size=VOCAB)
    unfused = vocab_parallel_kl(h_s @ w_s.t(), (h_t @ w_t.t()).detach(), vocab_size=VOCAB)
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    weights = torch.randn(TOKENS, dtype=fused.dtype)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    for mine, theirs in zip(torch.autograd.grad((weights * fused).sum(), (h_s, w_s)),
                            torch.autograd.grad((weights * unfused).sum(), (h_s, w_s))):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine, theirs, **tolerance)


def test_padded_rows_get_no_gradient_and_teacher_none():
    h_s, w_s, h_t, w_t, _ = linear_inputs(4)
    for tensor in (h_s, w_s, h_t, w_t):
        tensor.requires_grad_()
    vocab_parallel_linear_kl(h_s, w_s, h_t, w_t, vocab_size=VOCAB).sum().backward()
    assert h_t.grad is None and w_t.grad is None
    assert (w_s.grad[VOCAB:] == 0).all() and (w_s.grad[:VOCAB] != 0).any()


def test_a_confident_teacher_gives_finite_values_and_gradients():
    """Teacher logits ~ 40 apart (top-1 probability 1 - 1e-17): KL and gradients finite, equal to float64."""
    h_s, w_s, h_t, w_t, target = linear_inputs(5)
    w_t = w_t * 15
    h_s.requires_grad_(), w_s.requires_grad_()
    ours = vocab_parallel_linear_distill_stats(h_s, w_s, h_t, w_t, target, vocab_size=VOCAB)
    ref = reference_outputs(h_s, w_s, h_t, w_t, target, "reverse", VOCAB)
    torch.testing.assert_close(ours.kl.double(), ref[0], rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(_grads(ours, h_s, w_s), _grads(ref, h_s, w_s)):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-4)


def test_bad_input_raises_value_error_naming_it():
    h_s, w_s, h_t, w_t, target = linear_inputs(6)
    cases = {
        "kind": dict(kind="topk"),
        "beta": dict(kind="jsd", beta=1.0),
        "student_weight must be the output layer's shard": dict(student_weight=w_s[0]),
        "teacher_hidden shape": dict(teacher_hidden=h_t[..., :5]),
        "token dimensions": dict(teacher_hidden=h_t[:2]),
        "sharded alike": dict(teacher_weight=w_t[:32]),
        "must share dtype": dict(student_weight=w_s.double()),
        "vocab_size": dict(vocab_size=PADDED + 1),
        "target holds vocabulary id": dict(target=target + VOCAB, vocab_size=VOCAB),
        "floating-point": dict(student_hidden=target),
    }
    for message, override in cases.items():
        args = dict(student_hidden=h_s, student_weight=w_s, teacher_hidden=h_t, teacher_weight=w_t, target=target)
        args.update(override)
        with pytest.raises(ValueError, match=message):
            vocab_parallel_linear_distill_stats(**args)


def _relative_error(value: torch.Tensor, reference_value: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (Frobenius), in float64."""
    return ((value.cpu().double() - reference_value).norm() / reference_value.norm()).item()


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_weight_gradient_accumulates_in_fp32_over_chunks(kind, device, monkeypatch):
    """bf16 inputs, 1024 tokens in 256 chunks of 4 rows: the fused op's bf16 weight gradient is no less accurate
    against float64 than the unfused bf16 path's (bf16 logits, the `vocab_parallel` ops, autograd's one matmul over
    all tokens), and much more accurate than the 256 chunk products summed in bf16 (the op before its fp32
    accumulator, here from the unfused path's logit gradient).

    Relative error norms on CPU: fused 4.2-5.6e-3, unfused 4.5-6.0e-3, bf16-summed 1.6-1.9e-2. The factor 1.05:
    fused and unfused multiply the same bf16 logit gradients (up to the unfused path adding its two terms in bf16)
    and differ in fp32 summation order, so a few entries may round to the neighbouring bf16 value either way.
    """
    rows = 4
    monkeypatch.setattr(linear_kl, "CHUNK_ELEMENTS", rows * PADDED)
    monkeypatch.setattr(linear_kl, "CUDA_CHUNK_ELEMENTS", rows * PADDED)
    h_s, w_s, h_t, w_t, target = (x.to(device) for x in linear_inputs(8, torch.bfloat16, leading=(1024,)))
    h_s.requires_grad_(), w_s.requires_grad_()
    h_ref, w_ref = h_s.detach().cpu().double().requires_grad_(), w_s.detach().cpu().double().requires_grad_()
    ref = reference_outputs(h_ref, w_ref, h_t.cpu(), w_t.cpu(), target.cpu(), kind, VOCAB)
    _, ref_grad_weight = _grads(ref, h_ref, w_ref)

    fused = vocab_parallel_linear_distill_stats(h_s, w_s, h_t, w_t, target, kind, vocab_size=VOCAB, beta=0.3)
    _, fused_grad_weight = _grads(fused, h_s, w_s)

    student_logits = h_s @ w_s.t()
    unfused = (vocab_parallel_kl(student_logits, h_t @ w_t.t(), kind, vocab_size=VOCAB, beta=0.3),
               vocab_parallel_log_probs(student_logits, target, vocab_size=VOCAB))
    _, unfused_grad_weight, grad_logits = _grads(unfused, h_s, w_s, student_logits)
    bf16_summed = torch.zeros_like(w_s)
    for start in range(0, h_s.shape[0], rows):
        bf16_summed.addmm_(grad_logits[start:start + rows].t(), h_s.detach()[start:start + rows])

    assert fused_grad_weight.dtype == torch.bfloat16 and torch.all(fused_grad_weight[VOCAB:] == 0)
    fused_error = _relative_error(fused_grad_weight, ref_grad_weight)
    unfused_error = _relative_error(unfused_grad_weight, ref_grad_weight)
    bf16_summed_error = _relative_error(bf16_summed, ref_grad_weight)
    assert fused_error <= 1.05 * unfused_error, (fused_error, unfused_error)
    assert bf16_summed_error >= 2 * fused_error, (bf16_summed_error, fused_error)


# ------------------------------------------------------------------ the loss with its gradient in the forward pass
@pytest.mark.parametrize("chunking", ["one_chunk", "ragged_chunks"])
@pytest.mark.parametrize("vocab_size", [None, VOCAB], ids=["unpadded", "padded"])
@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_the_loss_op_matches_float64_reference(kind, vocab_size, chunking, monkeypatch):
    """L = sum a KL + b log p_S(target), its statistics and its gradients against float64 on materialised logits."""
    set_chunking(monkeypatch, chunking)
    h_s, w_s, h_t, w_t, target = linear_inputs(0)
    h_s.requires_grad_(), w_s.requires_grad_()
    a, b = coefficients(target.to(torch.float32))
    loss, stats = vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a, target, b, kind, vocab_size=vocab_size,
                                                     beta=0.3)
    ref = reference_outputs(h_s, w_s, h_t, w_t, target, kind, vocab_size)
    for name, mine, theirs in zip(stats._fields, stats, ref):
        assert not mine.requires_grad, name
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5, msg=name)
    ref_loss = (a.double() * ref[0]).sum() + (b.double() * ref[1]).sum()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    mine = torch.autograd.grad(loss, (h_s, w_s))
    for ours, theirs in zip(mine, torch.autograd.grad(ref_loss, (h_s, w_s))):
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_the_loss_ops_gradient_is_the_per_token_ops_bit_for_bit(kind, dtype, monkeypatch):
    """Same logit chunks, same logit gradients, same fp32 accumulation: the forward-pass gradient (4 matmuls) is the
    recomputing backward's (6) exactly, also in bf16; an upstream gradient other than 1 scales it."""
    set_chunking(monkeypatch, "ragged_chunks")
    h_s, w_s, h_t, w_t, target = linear_inputs(1, dtype)
    a, b = coefficients(target.to(torch.float32))
    expected = _grads(vocab_parallel_linear_distill_stats(h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t,
                                                          target, kind), h_s, w_s)
    loss, _ = vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a, target, b, kind)
    for ours, theirs in zip(torch.autograd.grad(loss, (h_s, w_s)), expected):
        assert ours.dtype == dtype and torch.equal(ours, theirs)
    loss, _ = vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a, target, b, kind)
    grads = torch.autograd.grad(3 * loss, (h_s, w_s), retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward \\(retain_graph\\) is not supported"):
        torch.autograd.grad(loss, (h_s, w_s))  # its stored gradient was scaled in place
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours.float(), 3 * theirs.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                                   atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_the_compiled_kernels_write_the_logit_gradient_over_the_logits(kind, dtype, monkeypatch):
    """Inductor-compiled full chunks (the logit gradient written over the logits chunk it reads) and an eager ragged
    chunk: both entry points equal each other bit for bit, the eager kernels' gradients (bf16: up to its rounding)
    and, in fp32, the float64 reference; padded vocabulary rows get none."""
    set_chunking(monkeypatch, "ragged_chunks")
    h_s, w_s, h_t, w_t, target = linear_inputs(4, dtype)
    h_s.requires_grad_(), w_s.requires_grad_()
    a, b = coefficients(target.to(torch.float32))

    def loss_grads():
        loss, _ = vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a, target, b, kind, vocab_size=VOCAB,
                                                     beta=0.3)
        return torch.autograd.grad(loss, (h_s, w_s))

    eager = loss_grads()
    monkeypatch.setenv(vocab_parallel.BACKEND_ENV, "compile")
    compiled = loss_grads()
    stats = vocab_parallel_linear_distill_stats(h_s, w_s, h_t, w_t, target, kind, vocab_size=VOCAB, beta=0.3)
    reference_grads = _grads(reference_outputs(h_s, w_s, h_t, w_t, target, kind, VOCAB), h_s, w_s)
    for ours, theirs, eager_grad, reference_grad in zip(compiled, _grads(stats, h_s, w_s), eager, reference_grads):
        assert ours.dtype == dtype and torch.equal(ours, theirs)
        if dtype == torch.bfloat16:
            torch.testing.assert_close(ours.float(), eager_grad.float(), rtol=2**-7, atol=1e-2)
        else:
            torch.testing.assert_close(ours, eager_grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.double(), reference_grad.double(), rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(compiled[1][VOCAB:]) == 0


def test_the_loss_op_without_target_or_gradient_and_its_bad_coefficients():
    h_s, w_s, h_t, w_t, target = linear_inputs(2)
    a, b = coefficients(target.to(torch.float32))
    with torch.no_grad():
        loss, stats = vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a)
    assert stats.student_log_probs is None and stats.teacher_log_probs is None
    torch.testing.assert_close(loss, (a * vocab_parallel_linear_kl(h_s, w_s, h_t, w_t)).sum())
    with pytest.raises(ValueError, match=r"kl_coef must be a tensor of the hidden states' leading shape \(3, 7\), "
                                         r"got \(21,\)"):
        vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a.flatten(), target, b)
    with pytest.raises(ValueError, match="log_prob_coef weights log p_S\\(target\\): give target too"):
        vocab_parallel_linear_distill_loss(h_s, w_s, h_t, w_t, a, None, b)
