"""The vocab-parallel ops on a CUDA device, eager and Inductor-compiled (Triton), against float64 on CPU."""

import pytest
import torch

from megatron_scope.ops import reference, vocab_parallel
from megatron_scope.ops.topk import vocab_parallel_topk_kl

from .test_vocab_parallel import OPS, PADDED, VOCAB, _case, _logits, _topk, _value_and_grad

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_float64_reference(op, backend, dtype, monkeypatch):
    """4 full chunks of 4 rows and a ragged one of 2 (the compiled kernels run on the full chunks)."""
    monkeypatch.setenv(vocab_parallel.BACKEND_ENV, backend)
    monkeypatch.setattr(vocab_parallel, "CUDA_CHUNK_ELEMENTS", 4 * PADDED)
    logits, teacher = _logits((2, 9, PADDED), seed=1, dtype=dtype), _logits((2, 9, PADDED), seed=2, dtype=dtype)
    target = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    if op.startswith("topk_"):  # one set of teacher top-k log-probs (rounded to `dtype`) for both sides
        ids, log_q = _topk(teacher, VOCAB)
        kind = op[5:]
        ours_fn = lambda x: vocab_parallel_topk_kl(x, ids.cuda(), log_q.cuda(), kind=kind, vocab_size=VOCAB)  # noqa: E731
        ref_fn = lambda x: reference.topk_kl(x, ids, log_q.double(), kind, VOCAB)  # noqa: E731
    else:
        ours_fn, _ = _case(op, logits.cuda(), teacher.cuda(), target.cuda(), VOCAB)
        _, ref_fn = _case(op, logits.double(), teacher.double(), target, VOCAB)
    ours, ours_grad = _value_and_grad(ours_fn, logits.cuda())
    ref, ref_grad = _value_and_grad(ref_fn, logits.double())
    assert ours.is_cuda and ours_grad.dtype == dtype
    torch.testing.assert_close(ours.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    grad_tol = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(ours_grad.cpu().double(), ref_grad, rtol=grad_tol, atol=1e-6)
    assert torch.all(ours_grad[..., VOCAB:] == 0)


def test_cuda_chunking_is_device_specific(monkeypatch):
    """CUDA_CHUNK_ELEMENTS sets the CUDA chunk rows; CHUNK_ELEMENTS (CPU) does not touch them."""
    monkeypatch.setattr(vocab_parallel, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(vocab_parallel, "CUDA_CHUNK_ELEMENTS", 8 * PADDED)
    slices = list(vocab_parallel._chunk_slices(20, PADDED, torch.device("cuda")))
    assert [(s.start, s.stop, full) for s, full in slices] == [(0, 8, True), (8, 16, True), (16, 20, False)]
