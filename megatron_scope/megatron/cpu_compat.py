"""Run real megatron-core on CPU (gloo) when CUDA is unavailable. On a CUDA machine this does nothing.

megatron-core assumes a GPU in ~200 places. Three shims make its models, pipeline schedules,
optimizer and dist_checkpointing run unchanged on CPU (measured in ../shared/ENVIRONMENT.md):

1. Device: `torch.cuda.current_device()` returns `torch.device("cpu")`; `torch.cuda.set_device`,
   `synchronize`, `empty_cache`, streams, events and NVTX ranges become no-ops.
2. RNG: `torch.cuda.{get,set}_rng_state`, `manual_seed` and `default_generators` map to the CPU
   generator, and megatron's `_lazy_call` runs its callback at once (torch's queues it forever when
   CUDA never initialises), so `model_parallel_cuda_manual_seed` and the RNG tracker really fork state.
3. Explicit devices: a `TorchFunctionMode` rewrites `device="cuda"` / `device=0` / `Tensor.cuda()` /
   `Tensor.to("cuda")` in any torch call to the CPU (the schedules build `torch.zeros(..., device="cuda")`).
4. Causal masks: megatron's softmax builds them with device="cuda", also inside backward under activation
   recompute, where the mode is not active: `get_default_causal_mask` builds them on the CPU.
5. Type strings: the same mode answers `tensor.type()` of a CPU tensor with its CUDA name
   ("torch.FloatTensor" -> "torch.cuda.FloatTensor"), since the optimizer and gradient clipping assert on them.

Call `install()` once per process before building Megatron objects; it is idempotent and returns
whether the shims are active. Pair it with `TransformerConfig(use_cpu_initialization=True)`.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _AnyIndex(tuple):
    """`torch.cuda.default_generators[i]` for any i: the CPU generator."""

    def __getitem__(self, _index):
        return torch.default_generator


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _QuietForkWarning(logging.Filter):
    """The RNG tracker warns when the CPU generator moves inside a fork; on CPU it always does."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@functools.lru_cache(maxsize=8)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """megatron-core's `get_default_causal_mask` on the CPU: True above the diagonal (masked out)."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def is_active() -> bool:
    return _mode is not None


def install() -> bool:
    """Install the CPU shims if CUDA is unavailable; return True when they are active."""
    global _mode
    if _mode is not None:
        return True
    if torch.cuda.is_available():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats"):
        setattr(cuda, name, lambda *args, **kwargs: None)
    cuda.Stream = cuda.Event = _NoOpStream
    cuda.current_stream = cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.memory_allocated = cuda.max_memory_allocated = cuda.memory_reserved = lambda *args, **kwargs: 0
    cuda.nvtx.range_push = cuda.nvtx.range_pop = lambda *args, **kwargs: None

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    cuda.get_rng_state = cuda.random.get_rng_state = get_rng_state
    cuda.set_rng_state = cuda.random.set_rng_state = set_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    seed_cpu = lambda seed: torch.default_generator.manual_seed(int(seed))  # noqa: E731
    cuda.manual_seed = cuda.random.manual_seed = seed_cpu
    cuda.manual_seed_all = cuda.random.manual_seed_all = seed_cpu
    cuda.default_generators = _AnyIndex()

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer import utils as transformer_utils

    megatron_random._lazy_call = lambda callback: callback()
    # The softmax builds its causal mask with device="cuda"; under activation recompute that happens inside
    # backward, where this torch-function mode is not on the stack: build it on the CPU directly.
    transformer_utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = _cpu_causal_mask
    logging.getLogger(megatron_random.__name__).addFilter(_QuietForkWarning())
    logging.getLogger().addFilter(_QuietForkWarning())

    _mode = _CudaToCpuMode()
    _mode.__enter__()  # stays on this thread's torch-function mode stack for the process's life
    return True
