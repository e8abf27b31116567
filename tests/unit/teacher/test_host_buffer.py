"""`teacher.colocated.HostBuffer`: one buffer for a step's teacher hidden states, shared by the step's passes (several
teachers' one after the other), reused every step, grown only when a step needs more, each tensor at an aligned
offset; on CUDA page-locked with cudaHostRegister (exact size), so non-blocking copies to and from it are
asynchronous and complete."""

import pytest
import torch

from megatron_scope.teacher.colocated import HostBuffer


def test_views_are_disjoint_aligned_and_reused_across_steps():
    buffer = HostBuffer(pinned=False)
    shapes = [(2, 12, 24), (3, 8, 24)]
    first = buffer.tensors(shapes, torch.bfloat16)
    assert [tuple(t.shape) for t in first] == shapes and all(t.dtype == torch.bfloat16 for t in first)
    assert all(t.data_ptr() % HostBuffer.ALIGNMENT == first[0].data_ptr() % HostBuffer.ALIGNMENT for t in first)
    first[0].fill_(1.0)
    first[1].fill_(2.0)
    assert (first[0] == 1).all() and (first[1] == 2).all()  # no overlap
    size = buffer.nbytes
    assert size == 1536 + 1536  # 2*12*24*2 = 1152 and 3*8*24*2 = 1152 bytes, each rounded up to 512
    buffer.new_step()
    again = buffer.tensors([(1, 8, 24)], torch.bfloat16)  # a smaller step: the same memory, no new allocation
    assert buffer.nbytes == size and again[0].data_ptr() == first[0].data_ptr()
    buffer.new_step()
    grown = buffer.tensors([(4, 16, 24)], torch.float32)  # a larger step: grown to exactly what it needs
    assert buffer.nbytes == 4 * 16 * 24 * 4
    buffer.release()
    assert buffer.nbytes == 0 and grown[0].numel() == 4 * 16 * 24


def test_a_steps_teachers_share_the_buffer_one_pass_after_the_other():
    """Two teachers' passes in one step: the second's tensors follow the first's, both stay intact; a step that
    outgrows the buffer takes an extra one for the rest (the first pass's tensors keep their memory), and the next
    step has one buffer of that step's total."""
    buffer = HostBuffer(pinned=False)
    (a,) = buffer.tensors([(4, 128)], torch.float32)  # teacher a: 2048 B
    (b,) = buffer.tensors([(2, 128)], torch.float32)  # teacher b: 1024 B, a second buffer (a's stays)
    a.fill_(1.0)
    b.fill_(2.0)
    assert (a == 1).all() and (b == 2).all() and buffer.nbytes == 2048 + 1024
    buffer.new_step()
    assert buffer.nbytes == 3072  # one buffer of the last step's total
    (a2,) = buffer.tensors([(4, 128)], torch.float32)
    (b2,) = buffer.tensors([(2, 128)], torch.float32)
    assert buffer.nbytes == 3072 and b2.data_ptr() == a2.data_ptr() + 2048  # one after the other, no allocation
    a2.fill_(3.0)
    b2.fill_(4.0)
    assert (a2 == 3).all() and (b2 == 4).all()
    buffer.new_step()
    (c,) = buffer.tensors([(6, 128)], torch.float32)  # a step of one teacher's 3072 B: the same memory
    assert c.data_ptr() == a2.data_ptr() and buffer.nbytes == 3072
    buffer.release()


@pytest.mark.gpu
def test_a_pinned_buffer_is_page_locked_and_round_trips_non_blocking_copies():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    buffer = HostBuffer(pinned=True)
    (host,) = buffer.tensors([(4, 1000, 64)], torch.bfloat16)
    assert host.is_pinned() and buffer.nbytes == 4 * 1000 * 64 * 2
    source = torch.randn(4, 1000, 64, device="cuda", dtype=torch.bfloat16)
    host.copy_(source, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    back = host.to("cuda", non_blocking=True)
    assert torch.equal(back, source)
    buffer.release()
