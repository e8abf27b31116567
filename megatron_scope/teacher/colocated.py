"""A co-located teacher's view of the rollouts: forward-only passes of Megatron models with the student's TP/PP.

`log_prob_pass` runs any model (the student before its step, the teacher, ExOPD's reference) through the
pipeline schedule and keeps, on the last stage, the temperature-1 log-probs of the labels and whatever of the
teacher's distribution the loss reads (`teacher_pass`): its last hidden states for a full-vocabulary KL or SRPO's
entropy (the loss applies the teacher's output layer per microbatch or chunk: `teacher_hidden` is hidden-size
wide where logits would be V/TP wide; on CUDA they wait in pinned host memory until the student's step), its
vocab-parallel top-k for --scope-kl topk, nothing more for sampled-token estimators. The vocabulary is never
gathered: log-probs and the top-k communicate per-token statistics over the TP group.

Hidden states are kept at the response positions only (loss_mask > 0: no prompt, no padding), and each TP rank
keeps its own share of those rows, 1/TP of them; the step all-gathers each microbatch's on the device
(`schedule.forward_backward`). The trainer keeps them in one `HostBuffer`, reused every step.

Hidden states are checked where they are made: `teacher_hidden_nonfinite` [b] bool flags, on the device, each
sequence with NaN/Inf at a response position, so `check_batch` never scans the host copy. The copies to host
memory are non-blocking; `log_prob_pass` returns only once they are complete (it waits on the CUDA event recorded
after each), so the CPU may read them and the step may copy them back without racing the copy.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from megatron_scope.config import LossConfig
from megatron_scope.megatron.loss_func import nonfinite_response_rows, response_positions, row_share, spread_rows
from megatron_scope.megatron.model import output_layer_weight
from megatron_scope.megatron.schedule import forward_collect
from megatron_scope.ops.topk import uniform_topk, vocab_parallel_topk
from megatron_scope.ops.vocab_parallel import vocab_parallel_entropy, vocab_parallel_log_probs


def log_prob_pass(model, microbatches: list[dict], vocab_size: int, keep: str | None = None, topk: int = 0,
                  temperature: float = 1.0, entropy: bool = False, all_rows: bool = False,
                  host_buffer: HostBuffer | None = None) -> list:
    """Forward only: per microbatch (extra inputs, log-probs of the labels under softmax(logits / temperature))
    under `model`, on the last stage ([] elsewhere). Where every microbatch has a loss_mask, the output layer runs on
    its m response rows only (`loss_func.response_positions`) and the outputs are 0 off the response (the top-k
    `ops.topk.uniform_topk`). Extras, by `keep`: None nothing; "hidden" (needs the loss_mask) the last hidden states
    (the output layer's input) at the response rows {teacher_hidden}: this TP rank's share [row_share(m, TP),
    hidden] of them (all [m, hidden] at TP 1 or with `all_rows`), in `host_buffer` (or fresh host tensors; pinned on
    CUDA, the copy complete when this returns), and {teacher_hidden_nonfinite} [b] bool on the device: NaN/Inf at a
    response position of the sequence; "topk" {teacher_topk_ids, teacher_topk_log_probs,
    teacher_topk_tail_log_mass}, `topk` + 1 values per token instead of V/TP; with `entropy`, also
    {teacher_entropy} [b, s], the entropy of softmax(logits) in nats (SRPO's weights)."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    last = parallel_state.is_pipeline_last_stage()
    responses_only = last and bool(microbatches) and all("loss_mask" in batch for batch in microbatches)
    if keep == "hidden" and last and microbatches and not responses_only:
        raise ValueError("log_prob_pass(keep='hidden') keeps the response rows' hidden states: every microbatch needs "
                         "a loss_mask")
    positions = response_positions(microbatches) if responses_only else []
    shares = tp if keep == "hidden" and not all_rows else 1  # each TP rank keeps 1/shares of the response rows
    weight = output_layer_weight(model) if responses_only else None  # [V/TP, hidden]
    destinations = []  # the host tensors the microbatches' hidden states land in, in order
    if keep == "hidden" and host_buffer is not None and positions:  # the whole pass's tensors, carved out at once
        destinations = host_buffer.tensors([(row_share(len(rows), shares), weight.shape[1]) for rows in positions],
                                           weight.dtype)
    copies = []  # CUDA events recorded after each non-blocking copy of hidden states to host memory
    positions = iter(positions)

    def collect(batch, output):
        labels, shape = batch["labels"], batch["labels"].shape
        if responses_only:  # `output` is the last hidden states: the output layer on the response rows only
            rows = next(positions)
            states = output.flatten(0, 1).index_select(0, rows)  # [m, hidden]
            logits = states @ weight.t()  # [m, V/TP], in the model's dtype
            labels = labels.flatten().index_select(0, rows)
        else:
            logits = output
        spread = (lambda values: spread_rows(values, rows, shape)) if responses_only else (lambda values: values)
        scaled = logits / temperature if temperature != 1.0 else logits
        log_probs = spread(vocab_parallel_log_probs(scaled, labels, group=group, vocab_size=vocab_size))
        extras = {}
        if keep == "hidden":  # checked here, before the copy: no host scan later
            extras["teacher_hidden_nonfinite"] = nonfinite_response_rows(states, rows, batch["loss_mask"])
            if shares > 1:  # this rank's share, the last ones padded with zero rows
                share = row_share(len(rows), shares)
                states = states[tp_rank * share:(tp_rank + 1) * share]
                states = torch.cat([states, states.new_zeros(share - len(states), states.shape[1])])
            extras["teacher_hidden"] = _to_host(states, copies, destinations.pop(0) if destinations else None)
        elif keep == "topk":
            ids, top, tail = vocab_parallel_topk(logits, topk, group=group, vocab_size=vocab_size)
            if responses_only:
                neutral = uniform_topk(tuple(shape), topk, ids.dtype, ids.device)
                ids, top, tail = (value.flatten(0, 1).index_copy_(0, rows, mine).view_as(value)
                                  for value, mine in zip(neutral, (ids, top, tail)))
            extras.update(teacher_topk_ids=ids, teacher_topk_log_probs=top, teacher_topk_tail_log_mass=tail)
        if entropy:
            extras["teacher_entropy"] = spread(vocab_parallel_entropy(logits, group=group, vocab_size=vocab_size))
        return extras, log_probs

    views = forward_collect(model, microbatches, collect, hidden_states=responses_only)
    for copied in copies:  # nobody reads the host copies (on the CPU, or back to the device) before they land
        copied.synchronize()
    return views


def host_zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros where `_to_host` keeps a tensor of `device`: pinned host memory for CUDA, else `device`."""
    if device.type != "cuda":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


def _to_host(tensor: torch.Tensor, copies: list, destination: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy in pinned host memory for a CUDA tensor (`destination`, or a new pinned tensor;
    `schedule.forward_backward` brings each microbatch's back), else a contiguous tensor (copied into `destination`
    when given): the local batch's teacher hidden states wait off the GPU until the step. The CUDA copy is
    non-blocking: a CUDA event recorded after it is appended to `copies`; wait on it before any read."""
    if not tensor.is_cuda:
        return tensor.contiguous() if destination is None else destination.copy_(tensor)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) if destination is None else destination
    host.copy_(tensor, non_blocking=True)  # issued on the source device's current stream
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copies.append(copied)
    return host


class HostBuffer:
    """One host buffer for a step's teacher hidden states, shared by the step's scoring passes (several co-located
    teachers' one after the other, each pass's tensors after the last one's) and reused every step: `new_step` hands
    its memory out again from the start, so the tensors of a step stay valid until the next `new_step` (the step
    that reads them ends before the next scoring pass: each copy back is ordered on the device before the next
    pass's copies out). Page-locked (pinned) with `cudaHostRegister` when `pinned`, so it takes exactly its bytes
    (torch's caching host allocator rounds each pinned block up to a power of two and keeps it). A step that needs
    more than the buffer holds gets a larger one if it has taken nothing yet, else an extra one for the rest (its
    tensors so far stay where they are); the next `new_step` makes that step's total one buffer again."""

    ALIGNMENT = 512
    """Bytes each tensor's offset is a multiple of."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._chunks: list[torch.Tensor] = []  # flat uint8; more than one only in a step that outgrew the first
        self._offset = 0  # bytes of the last chunk handed out this step
        self._step_bytes = 0  # bytes handed out this step, in all chunks

    @property
    def nbytes(self) -> int:
        return sum(chunk.numel() for chunk in self._chunks)

    def new_step(self) -> None:
        """Hand the memory out again from its start; after a step that took several buffers, one of their total."""
        if len(self._chunks) > 1:
            total = self._step_bytes
            self.release()
            self._chunks.append(self._allocate(total))
        self._offset = self._step_bytes = 0

    def tensors(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Views of the buffer after this step's earlier ones, one per shape, of `dtype`."""
        sizes = [math.prod(shape) * dtype.itemsize for shape in shapes]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // self.ALIGNMENT) * self.ALIGNMENT)
        if not self._chunks or self._offset + offsets[-1] > self._chunks[-1].numel():
            if self._step_bytes == 0:  # nothing of this step handed out: the old buffer goes first
                self.release()
            self._chunks.append(self._allocate(offsets[-1]))
            self._offset = 0
        chunk, base = self._chunks[-1], self._offset
        self._offset += offsets[-1]
        self._step_bytes += offsets[-1]
        return [chunk[base + start:base + start + size].view(dtype).view(shape)
                for start, size, shape in zip(offsets, sizes, shapes)]

    def _allocate(self, nbytes: int) -> torch.Tensor:
        memory = torch.empty(nbytes, dtype=torch.uint8)
        if self.pinned:
            status = torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), nbytes, 0)
            if int(status) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes for the teacher's hidden states failed "
                                   f"(cudaError {int(status)}): not enough page-lockable host memory")
        return memory

    def release(self) -> None:
        """Unpin and free the buffer (tensors handed out before must not be used after)."""
        for chunk in self._chunks:
            if self.pinned:
                torch.cuda.cudart().cudaHostUnregister(chunk.data_ptr())
        self._chunks = []
        self._offset = self._step_bytes = 0


def teacher_pass(teacher, microbatches: list[dict], config: LossConfig, vocab_size: int,
                 host_buffer: HostBuffer | None = None) -> list[dict]:
    """The teacher's loss inputs per microbatch on the last stage ([] elsewhere): teacher_log_probs and, as
    `config` needs, teacher_hidden (in `host_buffer` when given) with teacher_hidden_nonfinite, or the top-k (see
    `log_prob_pass`)."""
    keep = "hidden" if config.needs_teacher_logits else "topk" if config.teacher_topk else None
    return [{**extras, "teacher_log_probs": log_probs}
            for extras, log_probs in log_prob_pass(teacher, microbatches, vocab_size, keep, config.teacher_topk,
                                                   entropy=config.algorithm == "srpo", host_buffer=host_buffer)]
