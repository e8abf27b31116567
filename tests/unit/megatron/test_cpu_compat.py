"""The CPU shims: CUDA devices map to the CPU, and Megatron's RNG tracker really forks generator state."""

import pytest
import torch

from megatron_scope.megatron import cpu_compat
from megatron_scope.testing.multiprocess import run_on_ranks


def _shims_in_fresh_process(rank, world_size):
    from megatron.core import tensor_parallel

    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=11)
    explicit = torch.zeros(3, device="cuda").device.type
    indexed = torch.ones(2, device=torch.cuda.current_device()).device.type
    moved = torch.ones(2).cuda().device.type
    type_name = torch.ones(2).type()

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outside_before = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        inside_first = torch.rand(4)
    outside_after = torch.rand(4)  # the default stream resumes as if the fork never happened
    with tracker.fork():
        inside_second = torch.rand(4)  # the tracker's stream advanced, it did not restart
    return {
        "devices": (explicit, indexed, moved),
        "type_name": type_name,
        "outside_unchanged": torch.equal(outside_before, outside_after),
        "fork_differs_from_default": not torch.equal(inside_first, outside_before),
        "fork_advances": not torch.equal(inside_first, inside_second),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")
def test_cpu_shims_cover_devices_and_rng():
    (result,) = run_on_ranks(_shims_in_fresh_process, 1)
    assert result["devices"] == ("cpu", "cpu", "cpu")
    assert result["type_name"] == "torch.cuda.FloatTensor"
    assert result["outside_unchanged"]
    assert result["fork_differs_from_default"]
    assert result["fork_advances"]


@pytest.mark.gpu
def test_shims_stay_off_with_cuda():
    assert cpu_compat.install() is False
    assert not cpu_compat.is_active()
    assert torch.zeros(1, device="cuda").is_cuda
