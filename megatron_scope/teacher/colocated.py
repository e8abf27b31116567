"""A co-located teacher's view of the rollouts: forward-only passes of Megatron models with the student's TP/PP.

`log_prob_pass` runs any model (the student before its step, the teacher, ExOPD's reference) through the
pipeline schedule and keeps, on the last stage, the temperature-1 log-probs of the labels and whatever of the
teacher's distribution the loss reads (`teacher_pass`): its last hidden states for a full-vocabulary KL or SRPO's
entropy (the loss applies the teacher's output layer per microbatch or chunk: `teacher_hidden` is hidden-size
wide where logits would be V/TP wide; on CUDA they wait in pinned host memory until the student's step), its
vocab-parallel top-k for --scope-kl topk, nothing more for sampled-token estimators. The vocabulary is never
gathered: log-probs and the top-k communicate per-token statistics over the TP group.

Under sequence parallelism each TP rank keeps its own slice of the sequence, [b, s/TP, hidden] (the slice the
model's last norm computed there), so a rank holds 1/TP of the hidden states; the loss all-gathers them per
microbatch (`schedule.forward_backward`).

Hidden states are checked where they are made: `teacher_hidden_nonfinite` [b] bool flags, on the device, each
sequence with NaN/Inf at a response position, so `check_batch` never scans the host copy. The copies to host
memory are non-blocking; `log_prob_pass` returns only once they are complete (it waits on the CUDA event recorded
after each), so the CPU may read them and the step may copy them back without racing the copy.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state

from megatron_scope.config import LossConfig
from megatron_scope.megatron.loss_func import nonfinite_sequences
from megatron_scope.megatron.model import (
    capturing_hidden_states,
    gather_sequence_slices,
    sequence_parallel,
    sequence_slice,
)
from megatron_scope.megatron.schedule import forward_collect
from megatron_scope.ops.topk import vocab_parallel_topk
from megatron_scope.ops.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs


def log_prob_pass(model, microbatches: list[dict], vocab_size: int, keep: str | None = None, topk: int = 0,
                  temperature: float = 1.0, entropy: bool = False, full_sequence: bool = False) -> list:
    """Forward only: per microbatch (extra inputs, log-probs of the labels under softmax(logits / temperature))
    under `model`, on the last stage ([] elsewhere). Extras, by `keep`: None nothing; "hidden" the last hidden
    states {teacher_hidden} [b, s, hidden] (the output layer's input; under sequence parallelism this TP rank's
    slice [b, s/TP, hidden] unless `full_sequence`; pinned host memory on CUDA, the copy complete when this
    returns) and, where the microbatch has a loss_mask, {teacher_hidden_nonfinite} [b] bool on the device: NaN/Inf
    at a response position of the whole sequence; "topk" {teacher_topk_ids, teacher_topk_log_probs,
    teacher_topk_tail_log_mass}, `topk` + 1 values per token instead of V/TP; with `entropy`, also
    {teacher_entropy} [b, s], the entropy of softmax(logits) in nats (SRPO's weights)."""
    group = parallel_state.get_tensor_model_parallel_group()
    split = sequence_parallel(model)
    hidden = []  # this microbatch's last hidden states, [s, b, hidden] ([s/TP, b, hidden] when split)
    copies = []  # CUDA events recorded after each non-blocking copy of hidden states to host memory

    def collect(batch, logits):
        scaled = logits / temperature if temperature != 1.0 else logits
        log_probs = vocab_parallel_log_probs(scaled, batch["labels"], group=group, vocab_size=vocab_size)
        extras = {}
        if keep == "hidden":
            states = hidden.pop().transpose(0, 1)  # [b, s, hidden] ([b, s/TP, hidden] when split), on the device
            if split and full_sequence:
                states, split_here = gather_sequence_slices(states), False
            else:
                split_here = split
            if "loss_mask" in batch:  # checked here, before the copy: no host scan later
                mask = sequence_slice(batch["loss_mask"]) if split_here else batch["loss_mask"]
                flags = nonfinite_sequences(states, mask)
                if split_here:  # NaN/Inf anywhere in the sequence: 1 all-reduce of [b] over TP, no host read
                    flags = flags.to(torch.int32)
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
                    flags = flags.bool()
                extras["teacher_hidden_nonfinite"] = flags
            extras["teacher_hidden"] = _to_host(states, copies)
        elif keep == "topk":
            ids, top, tail = vocab_parallel_topk(logits, topk, group=group, vocab_size=vocab_size)
            extras.update(teacher_topk_ids=ids, teacher_topk_log_probs=top, teacher_topk_tail_log_mass=tail)
        if entropy:
            extras["teacher_entropy"] = vocab_parallel_entropy(logits, group=group, vocab_size=vocab_size)
        return extras, log_probs

    with capturing_hidden_states(model, hidden) if keep == "hidden" else contextlib.nullcontext():
        views = forward_collect(model, microbatches, collect)
    for copied in copies:  # nobody reads the host copies (on the CPU, or back to the device) before they land
        copied.synchronize()
    return views


def host_zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros where `_to_host` keeps a tensor of `device`: pinned host memory for CUDA, else `device`."""
    if device.type != "cuda":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


def _to_host(tensor: torch.Tensor, copies: list) -> torch.Tensor:
    """A contiguous copy in pinned host memory for a CUDA tensor (`schedule.forward_backward` brings each microbatch's
    back), else a contiguous tensor: the local batch's teacher hidden states wait off the GPU until the step.
    The copy is non-blocking: a CUDA event recorded after it is appended to `copies`; wait on it before any read."""
    if not tensor.is_cuda:
        return tensor.contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)  # issued on the source device's current stream
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copies.append(copied)
    return host


def teacher_pass(teacher, microbatches: list[dict], config: LossConfig, vocab_size: int) -> list[dict]:
    """The teacher's loss inputs per microbatch on the last stage ([] elsewhere): teacher_log_probs and, as
    `config` needs, teacher_hidden with teacher_hidden_nonfinite, or the top-k (see `log_prob_pass`)."""
    keep = "hidden" if config.needs_teacher_logits else "topk" if config.teacher_topk else None
    return [{**extras, "teacher_log_probs": log_probs}
            for extras, log_probs in log_prob_pass(teacher, microbatches, vocab_size, keep, config.teacher_topk,
                                                   entropy=config.algorithm == "srpo")]
