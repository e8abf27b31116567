"""Vocab-parallel ops (and the KL from hidden states, `ops.linear_kl`) at TP = 2 and 4 (gloo ranks) against the
one-process float64 references.

Each rank holds the contiguous vocabulary shard [rank V/TP, (rank + 1) V/TP) of the same global logits
(a non-contiguous slice of them), runs every op over a process group spanning the ranks, and returns
per-token values and its gradient shard; the test concatenates the shards and compares with
`megatron_scope.ops.reference` on the full vocabulary. One spawned job per TP size runs all the cases.
"""

import io
import math
import zlib

import pytest
import torch

from megatron_scope.ops import reference
from megatron_scope.ops.linear_kl import vocab_parallel_linear_distill_loss, vocab_parallel_linear_distill_stats
from megatron_scope.testing.multiprocess import run_on_ranks
from tests.unit.ops.test_linear_kl import _grads as linear_grads
from tests.unit.ops.test_linear_kl import coefficients, linear_inputs, reference_outputs

LEADING = (2, 5)
PADDED = 64  # global (padded) vocabulary: 32 per rank at TP 2, 16 at TP 4
# 53: Megatron-style padding inside the last shard; 45 at TP 4: the last rank holds only padding
VOCAB_SIZES = (None, 53, 45)
OPS = ("logsumexp", "log_probs", "entropy", "kl_reverse", "kl_forward", "kl_jsd", "topk_reverse", "topk_forward")
BETA = 0.3
TOPK = 6


def _global_inputs(dtype, vocab_size, variant):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{dtype}/{vocab_size}/{variant}".encode()))
    student = 3 * torch.randn(*LEADING, PADDED, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(*LEADING, PADDED, generator=generator, dtype=torch.float64)
    if variant == "huge":
        student, teacher = student * 300, teacher * 300
    if variant == "minus_inf":
        banned = torch.rand(*LEADING, PADDED, generator=generator) < 0.4
        banned[..., 0] = False
        student = student.masked_fill(banned, float("-inf"))
        teacher = teacher.masked_fill(banned, float("-inf"))
    real_vocab = vocab_size or PADDED
    target = torch.randint(0, real_vocab, LEADING, generator=generator)
    log_q = reference.log_softmax(teacher.to(dtype), vocab_size)
    topk_values, topk_ids = log_q.topk(TOPK, dim=-1)
    weights = torch.randn(*LEADING, generator=generator, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype), target, topk_ids, topk_values.to(dtype), weights


def _confident_inputs():
    """fp32 student and teacher logits over 53 real tokens whose teacher puts 1 - 1e-7 on its top token."""
    generator = torch.Generator().manual_seed(11)
    student = 3 * torch.randn(*LEADING, PADDED, generator=generator, dtype=torch.float64)
    teacher = torch.randn(*LEADING, PADDED, generator=generator, dtype=torch.float64)
    real = teacher[..., :53]
    top = real.argmax(-1, keepdim=True)
    rest = real.scatter(-1, top, float("-inf")).logsumexp(-1, keepdim=True)
    teacher[..., :53] = real.scatter(-1, top, rest + math.log((1 - 1e-7) / 1e-7))
    weights = torch.randn(*LEADING, generator=generator, dtype=torch.float64)
    return student.float(), teacher.float(), weights


MASKED_CASES = (("reverse", "positive"), ("reverse", "zero"), ("forward", "zero"))  # where the KL is finite
MASKED_K = 4


def _masked_inputs(teacher_tail: str):
    """test_topk's student masked to -inf outside the teacher's top-4 (ids 0-3: rank 0's shard); the teacher's
    tail is positive, or zero (the teacher -inf there too)."""
    from tests.unit.ops.test_topk import masked_outside_topk

    student, teacher = masked_outside_topk(seed=12, shape=(*LEADING, PADDED), k=MASKED_K)
    if teacher_tail == "zero":
        teacher[..., MASKED_K:] = float("-inf")
    return student, teacher


def _masked_weights():
    return torch.randn(*LEADING, generator=torch.Generator().manual_seed(13))


def _cases():
    for dtype in (torch.float32, torch.bfloat16):
        for vocab_size in VOCAB_SIZES:
            for op in OPS:
                yield dtype, vocab_size, "random", op
    for variant in ("huge", "minus_inf"):
        for op in ("entropy", "kl_reverse", "kl_forward", "kl_jsd", "log_probs"):
            yield torch.float32, 53, variant, op


def _apply(op, student, teacher, target, topk_ids, topk_values, vocab_size, group):
    from megatron_scope.ops import topk
    from megatron_scope.ops import vocab_parallel as vp

    if op == "logsumexp":
        return vp.vocab_parallel_logsumexp(student, group=group, vocab_size=vocab_size)
    if op == "log_probs":
        return vp.vocab_parallel_log_probs(student, target, group=group, vocab_size=vocab_size)
    if op == "entropy":
        return vp.vocab_parallel_entropy(student, group=group, vocab_size=vocab_size)
    if op.startswith("kl_"):
        return vp.vocab_parallel_kl(student, teacher, kind=op[3:], group=group, beta=BETA, vocab_size=vocab_size)
    return topk.vocab_parallel_topk_kl(student, topk_ids, topk_values, kind=op[5:], group=group, vocab_size=vocab_size)


def _reference(op, student, teacher, target, topk_ids, topk_values, vocab_size):
    if op == "logsumexp":
        return reference.logsumexp(student, vocab_size)
    if op == "log_probs":
        return reference.log_probs(student, target, vocab_size)
    if op == "entropy":
        return reference.entropy(student, vocab_size)
    if op.startswith("kl_"):
        return reference.kl(student, teacher, op[3:], BETA, vocab_size)
    return reference.topk_kl(student, topk_ids, topk_values, op[5:], vocab_size)


LINEAR_CASES = [(kind, vocab_size) for kind in ("reverse", "forward", "jsd") for vocab_size in VOCAB_SIZES]


def _rank_job(rank, world_size, chunk_elements):
    """Every case on this rank's shard; returns {case: (per-token values, gradient shard)} and error checks."""
    import torch.distributed as dist

    from megatron_scope.ops import topk
    from megatron_scope.ops import vocab_parallel as vp

    vp.CHUNK_ELEMENTS = chunk_elements  # several chunks and a ragged last one per shard
    group = dist.new_group(ranks=list(range(world_size)))
    width = PADDED // world_size
    shard = slice(rank * width, (rank + 1) * width)
    results = {}
    for dtype, vocab_size, variant, op in _cases():
        student, teacher, target, topk_ids, topk_values, weights = _global_inputs(dtype, vocab_size, variant)
        local = student[..., shard].requires_grad_()  # a strided view of the global logits
        out = _apply(op, local, teacher[..., shard], target, topk_ids, topk_values, vocab_size, group)
        (out * weights.to(out.dtype)).sum().backward()
        results[(str(dtype), vocab_size, variant, op)] = (out.detach(), local.grad)

    for vocab_size in VOCAB_SIZES:  # the teacher's top-k summary (forward only)
        _, teacher, *_ = _global_inputs(torch.float32, vocab_size, "random")
        results[("topk", vocab_size)] = topk.vocab_parallel_topk(teacher[..., shard], TOPK, group=group,
                                                                 vocab_size=vocab_size)

    for kind in ("reverse", "forward"):  # a confident teacher, its top-k and tail from its own shards, in fp32
        student, teacher, weights = _confident_inputs()
        ids, log_q, tail = topk.vocab_parallel_topk(teacher[..., shard], TOPK, group=group, vocab_size=53)
        local = student[..., shard].requires_grad_()
        out = topk.vocab_parallel_topk_kl(local, ids, log_q, kind=kind, group=group, vocab_size=53,
                                          teacher_tail_log_mass=tail)
        (out * weights.to(out.dtype)).sum().backward()
        results[("confident", kind)] = (out.detach(), local.grad, ids, tail)

    for kind, teacher_tail in MASKED_CASES:  # a student of -inf outside the top-k: ranks >= 1 hold only -inf
        student, teacher = _masked_inputs(teacher_tail)
        ids, log_q, tail = topk.vocab_parallel_topk(teacher[..., shard], MASKED_K, group=group)
        local = student[..., shard].requires_grad_()
        out = topk.vocab_parallel_topk_kl(local, ids, log_q, kind=kind, group=group, teacher_tail_log_mass=tail)
        (out * _masked_weights()).sum().backward()
        results[("masked", kind, teacher_tail)] = (out.detach(), local.grad, ids)

    for kind, vocab_size in LINEAR_CASES:  # the KL from hidden states: each rank holds its output-layer rows
        h_s, w_s, h_t, w_t, target = linear_inputs(7, padded=PADDED)
        h_s.requires_grad_()
        local_w = w_s[shard].clone().requires_grad_()
        stats = vocab_parallel_linear_distill_stats(h_s, local_w, h_t, w_t[shard], target, kind, group=group,
                                                    vocab_size=vocab_size, beta=BETA)
        results[("linear", kind, vocab_size)] = (*stats, *linear_grads(stats, h_s, local_w))
        a, b = coefficients(target.to(torch.float32))  # the same L, its gradient in the forward pass
        h_s, local_w = h_s.detach().requires_grad_(), local_w.detach().requires_grad_()
        loss, _ = vocab_parallel_linear_distill_loss(h_s, local_w, h_t, w_t[shard], a, target, b, kind, group=group,
                                                     vocab_size=vocab_size, beta=BETA)
        results[("linear_loss", kind, vocab_size)] = (loss.detach(), *torch.autograd.grad(loss, (h_s, local_w)))

    for kind in ("reverse", "jsd"):  # 33 real entries: at TP 4 rank 3 holds padding only, rank 2 one real entry
        h_s, w_s, h_t, w_t, target = linear_inputs(8, padded=PADDED)
        a, b = coefficients(target.to(torch.float32))
        h_s, local_w = h_s.requires_grad_(), w_s[shard].clone().requires_grad_()
        loss, _ = vocab_parallel_linear_distill_loss(h_s, local_w, h_t, w_t[shard], a, target % 33, b, kind,
                                                     group=group, vocab_size=33, beta=BETA)
        results[("linear_loss_33", kind)] = (loss.detach(), *torch.autograd.grad(loss, (h_s, local_w)))

    errors = {}
    student = torch.zeros(*LEADING, width)
    for name, call in {
        "vocab_too_big": lambda: vp.vocab_parallel_entropy(student, group=group, vocab_size=PADDED + 1),
        "target_in_padding": lambda: vp.vocab_parallel_log_probs(
            student, torch.full(LEADING, 60), group=group, vocab_size=53
        ),
        "shape_mismatch": lambda: vp.vocab_parallel_kl(student, student[..., :-1], group=group),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    buffer = io.BytesIO()  # by value: tensors put on a queue directly would be shared through files
    torch.save(results, buffer)  # that vanish when the rank exits
    return buffer.getvalue(), errors


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_ops_match_float64_reference(world_size):
    per_rank = run_on_ranks(_rank_job, world_size, args=(3 * PADDED // world_size + 5,), timeout=240)
    per_rank = [(torch.load(io.BytesIO(payload)), errors) for payload, errors in per_rank]
    checked = 0
    for dtype, vocab_size, variant, op in _cases():
        key = (str(dtype), vocab_size, variant, op)
        values = [results[key][0] for results, _ in per_rank]
        for other in values[1:]:  # per-token outputs are replicated over the TP group
            assert torch.equal(other, values[0]), key
        grad = torch.cat([results[key][1] for results, _ in per_rank], dim=-1)

        student, teacher, target, topk_ids, topk_values, weights = _global_inputs(dtype, vocab_size, variant)
        full = student.double().requires_grad_()
        ref = _reference(op, full, teacher, target, topk_ids, topk_values, vocab_size)
        (ref_grad,) = torch.autograd.grad((ref * weights).sum(), full)

        assert values[0].dtype == torch.float32 and grad.dtype == dtype, key
        # fp32 and bf16 alike: the math runs in fp32 on exactly upcast inputs -> 1e-5 relative on values.
        torch.testing.assert_close(values[0].double(), ref, rtol=1e-5, atol=1e-6 if variant != "huge" else 1e-4,
                                   msg=lambda m: f"{key}: {m}")
        # bf16 gradients are rounded once to bf16 on output: 2^-8 relative (bf16 has 8 mantissa bits).
        rtol = 1e-5 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=1e-6, msg=str(key))
        if vocab_size is not None:
            assert torch.all(grad[..., vocab_size:] == 0), key
        checked += 1
    assert checked == len(list(_cases()))

    for vocab_size in VOCAB_SIZES:
        _, teacher, *_ = _global_inputs(torch.float32, vocab_size, "random")
        expected_log_probs, expected_ids = reference.log_softmax(teacher, vocab_size).topk(TOPK, dim=-1)
        for results, _ in per_rank:
            ids, log_probs, tail = results[("topk", vocab_size)]
            assert torch.equal(ids, expected_ids), vocab_size
            torch.testing.assert_close(log_probs.double(), expected_log_probs, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tail.double(), reference.topk_tail(teacher, ids, vocab_size), rtol=1e-5,
                                       atol=1e-6)

    for kind in ("reverse", "forward"):  # confident teacher: finite, and equal to float64 with exact tails
        student, teacher, weights = _confident_inputs()
        out, _, ids, tail = per_rank[0][0][("confident", kind)]
        grad = torch.cat([results[("confident", kind)][1] for results, _ in per_rank], dim=-1)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), kind
        exact_tail = reference.topk_tail(teacher, ids, 53)
        torch.testing.assert_close(tail.double(), exact_tail, rtol=1e-5, atol=0)
        full = student.double().requires_grad_()
        ref = reference.topk_kl(full, ids, reference.log_softmax(teacher, 53).gather(-1, ids), kind, 53,
                                teacher_tail_log_mass=exact_tail)
        (ref_grad,) = torch.autograd.grad((ref * weights).sum(), full)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)

    for kind, teacher_tail in MASKED_CASES:  # finite, float64's values, zero gradient on the -inf entries
        student, teacher = _masked_inputs(teacher_tail)
        out, _, ids = per_rank[0][0][("masked", kind, teacher_tail)]
        grad = torch.cat([results[("masked", kind, teacher_tail)][1] for results, _ in per_rank], dim=-1)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), (kind, teacher_tail)
        assert torch.all(grad[..., MASKED_K:] == 0), (kind, teacher_tail)
        full = student.double().requires_grad_()
        ref = reference.topk_kl(full, ids, reference.log_softmax(teacher).gather(-1, ids), kind,
                                teacher_tail_log_mass=reference.topk_tail(teacher, ids))
        (ref_grad,) = torch.autograd.grad((ref * _masked_weights().double()).sum(), full)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)

    for kind, vocab_size in LINEAR_CASES:  # per-token outputs and the hidden-state gradient replicated, weights sharded
        key = ("linear", kind, vocab_size)
        *values, grad_hidden, _ = per_rank[0][0][key]
        for results, _ in per_rank[1:]:
            *other, other_grad_hidden, _ = results[key]
            assert all(torch.equal(a, b) for a, b in zip(values, other)) and torch.equal(grad_hidden, other_grad_hidden)
        grad_weight = torch.cat([results[key][-1] for results, _ in per_rank])
        h_s, w_s, h_t, w_t, target = linear_inputs(7, padded=PADDED)
        h_s.requires_grad_(), w_s.requires_grad_()
        ref = reference_outputs(h_s, w_s, h_t, w_t, target, kind, vocab_size, BETA)
        for mine, theirs in zip(values, ref):
            torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5, msg=str(key))
        for mine, theirs in zip((grad_hidden, grad_weight), linear_grads(ref, h_s, w_s)):
            torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-5, msg=str(key))

    for kind, vocab_size in LINEAR_CASES:  # the forward-pass gradient: the recomputing backward's, bit for bit
        for results, _ in per_rank:
            loss, grad_hidden, grad_weight = results[("linear_loss", kind, vocab_size)]
            *_, expected_hidden, expected_weight = results[("linear", kind, vocab_size)]
            assert torch.equal(grad_hidden, expected_hidden) and torch.equal(grad_weight, expected_weight), kind

    for kind in ("reverse", "jsd"):  # shards of padding only take part in every chunk's reductions
        h_s, w_s, h_t, w_t, target = linear_inputs(8, padded=PADDED)
        h_s.requires_grad_(), w_s.requires_grad_()
        a, b = (c.double() for c in coefficients(target.to(torch.float32)))
        ref = reference_outputs(h_s, w_s, h_t, w_t, target % 33, kind, 33, BETA)
        ref_loss = (a * ref[0]).sum() + (b * ref[1]).sum()
        ref_grads = torch.autograd.grad(ref_loss, (h_s, w_s))
        loss, grad_hidden, _ = per_rank[0][0][("linear_loss_33", kind)]
        grad_weight = torch.cat([results[("linear_loss_33", kind)][2] for results, _ in per_rank])
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip((grad_hidden, grad_weight), ref_grads):
            torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-4, atol=1e-5, msg=kind)
        assert torch.all(grad_weight[33:] == 0)

    for _, errors in per_rank:
        assert f"vocab_size={PADDED + 1} does not fit" in errors["vocab_too_big"]
        assert f"{world_size} ranks in group" in errors["vocab_too_big"]
        assert "vocabulary id 60, outside [0, 53)" in errors["target_in_padding"]
        assert "!= teacher_logits shape" in errors["shape_mismatch"]
