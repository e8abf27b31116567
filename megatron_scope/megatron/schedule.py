"""Run microbatches through Megatron's pipeline schedule (1F1B with PP > 1, no-pipelining otherwise).

Only the last pipeline stage sees logits, so only it holds the loss inputs (teacher logits, old
log-probs, weights); the other stages' microbatches need just `tokens` and `position_ids`.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_scope.config import LossConfig
from megatron_scope.megatron.loss_func import batch_value_checks, response_positions, scope_loss_func
from megatron_scope.megatron.model import output_layer_weight, returning_hidden_states
from megatron_scope.megatron.parallel import collective_device


def _batch_shape(microbatches: list[dict], variable: bool = False) -> tuple[int, int]:
    """The microbatches' one [micro_batch, seq] shape (the first one's when `variable`: the model's config has
    `variable_seq_lengths`, so pipeline stages send each tensor's shape before it)."""
    if not microbatches:
        raise ValueError("need at least one microbatch")
    shapes = [tuple(batch["tokens"].shape) for batch in microbatches]
    if len(set(shapes)) != 1 and not variable:
        raise ValueError(f"all microbatches must share one [micro_batch, seq] shape, got {sorted(set(shapes))} "
                         "(build the model with variable_seq_lengths=True for token-budget microbatches)")
    return shapes[0]


def raise_on_any_rank(error: Exception | None, group=None) -> None:
    """Raise on every rank of `group` if any rank has an error (its own, or a RuntimeError naming the rank),
    so that a bad input seen by one pipeline stage stops all of them before a collective can hang."""
    flag = torch.tensor([dist.get_rank() if error is not None else -1], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(flag) >= 0:
        raise RuntimeError(f"rank {int(flag)} rejected the batch (its error is in its log); stopping all ranks")


def _check_microbatches(microbatches: list[dict], loss_config: LossConfig, row_shares: int = 1,
                        vocab_size: int | None = None) -> None:
    """`check_batch` over a step's microbatches with one device read for all their value checks: the first failing
    check, in microbatch then key order, raises its ValueError."""
    checks = [check for batch in microbatches
              for check in batch_value_checks(batch, loss_config, row_shares, vocab_size)]
    if not checks:
        return
    device = checks[0][0].device
    failed = torch.stack([bad.to(device) for bad, _ in checks]).nonzero().flatten().tolist()  # the one read
    if failed:
        raise ValueError(checks[failed[0]][1]())


def forward_backward(model, microbatches: list[dict], loss_config: LossConfig, vocab_size: int,
                     forward_only: bool = False,
                     teacher_weight: torch.Tensor | Sequence[torch.Tensor | None] | None = None):
    """Forward (and backward) of `model` over `microbatches` with the SCOPE loss over the tokenizer's `vocab_size`
    tokens; returns the per-microbatch reports on the last pipeline stage ([] elsewhere).

    The last stage checks every microbatch first and all stages agree before any compute, so bad data
    stops the step before any collective: shapes and keys on the host, NaN/Inf flags computed on the device and
    read once for the whole step (teacher_hidden through the scoring pass's `teacher_hidden_nonfinite` [b] bools,
    not a scan of its values). With TP > 1, `teacher_logits` is this rank's vocabulary shard and a 2-D `teacher_hidden`
    this rank's share of the response rows (as `teacher.colocated` keeps them), all-gathered over TP per microbatch
    on the device (`TeacherHiddenLoader`).
    Gradients land in the DDP `main_grad` buffers already divided by the global loss count
    (`calculate_per_token_loss=True` in the model's config).
    `teacher_weight`: the co-located teacher's output-layer shard, for microbatches carrying `teacher_hidden`, or a
    list of one per microbatch (several teachers: each microbatch's rows read one); with `loss_config.fuses_student_logits` the student then returns its last hidden states and the loss applies
    both output layers chunk by chunk (`ops.linear_kl`), on the response positions only: neither model's logits
    are kept, and none are computed for prompt or padding positions (nor, from teacher hidden states, the teacher's
    on the logits path).
    """
    _batch_shape(microbatches, model.config.variable_seq_lengths)  # checked before any compute
    if not model.config.calculate_per_token_loss:
        raise ValueError("the SCOPE loss normalises over the global batch: build the model with "
                         "calculate_per_token_loss=True")
    error = None
    last = parallel_state.is_pipeline_last_stage()
    if last:
        try:
            _check_microbatches(microbatches, loss_config, parallel_state.get_tensor_model_parallel_world_size(),
                                vocab_size)
        except ValueError as caught:
            error = caught
    raise_on_any_rank(error)  # all ranks: data-parallel replicas would otherwise wait in the grad all-reduce
    group = parallel_state.get_tensor_model_parallel_group()
    teacher_weights = list(teacher_weight) if isinstance(teacher_weight, (list, tuple)) \
        else [teacher_weight] * len(microbatches)
    if len(teacher_weights) != len(microbatches):
        raise ValueError(f"{len(teacher_weights)} teacher weights for {len(microbatches)} microbatches")
    fused = loss_config.fuses_student_logits and any(weight is not None for weight in teacher_weights)
    loss_func = partial(scope_loss_func, loss_config, vocab_size, group=group,
                        student_weight=output_layer_weight(model) if fused else None, checked=True)
    teacher_weights = iter(teacher_weights)

    with_positions = last and (fused or any("teacher_hidden" in batch for batch in microbatches))
    positions = response_positions(microbatches) if with_positions else []
    teacher_hidden = TeacherHiddenLoader(microbatches, [len(rows) for rows in positions])
    positions = iter(positions)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if with_positions:  # output layers from hidden states run on the response positions only
            batch = {**batch, "response_positions": next(positions)}
        if "teacher_hidden" in batch:
            batch = {**batch, "teacher_hidden": teacher_hidden.next()}
        with returning_hidden_states(model) if fused else contextlib.nullcontext():
            output = model(batch["tokens"], batch["position_ids"], None)
        return output, partial(loss_func, batch, teacher_weight=next(teacher_weights))

    try:
        return run_schedule(model, microbatches, forward_step, forward_only=forward_only)
    finally:
        teacher_hidden.close()


class TeacherHiddenLoader:
    """Each microbatch's `teacher_hidden` on the device, in microbatch order; where it is this TP rank's share of
    the microbatch's m response rows ([row_share(m, TP), H], TP > 1), all-gathered over TP and cut to [m, H]
    (1 all-gather per microbatch).

    On CUDA they wait in pinned host memory since the scoring pass, whose copies there were complete when it
    returned (`teacher.colocated.log_prob_pass`). The copy of microbatch i + 1 is issued on a side stream when
    microbatch i is taken, so it overlaps i's forward and backward; the compute stream waits for it only when it
    takes i + 1 (device memory: one microbatch's gathered states and the next one's share). `close` makes the
    compute stream wait for the side stream, so the host memory may be written again after it."""

    def __init__(self, microbatches: list[dict], response_rows: list[int]):
        """`response_rows`: each microbatch's m (`loss_func.response_positions`), where it has teacher_hidden."""
        self.host = [batch.get("teacher_hidden") for batch in microbatches]
        self.response_rows = response_rows
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.device = microbatches[0]["tokens"].device if microbatches else torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.index, self.pending = 0, {}

    def _start(self, i: int) -> None:
        if i >= len(self.host) or self.host[i] is None or i in self.pending:
            return
        if self.stream is None:
            self.pending[i] = (self.host[i].to(self.device), None)
            return
        with torch.cuda.stream(self.stream):
            states = self.host[i].to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.pending[i] = (states, copied)

    def next(self) -> torch.Tensor:
        i = self.index
        self._start(i)
        states, copied = self.pending.pop(i)
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            states.record_stream(current)  # made on the side stream, used (and freed) on this one
        self.index += 1
        self._start(self.index)  # the next microbatch's copy overlaps this one's compute
        if states.dim() == 2 and self.tp > 1:  # this TP rank's share of the response rows
            states = _gather_rows(states)[: self.response_rows[i]]
        return states

    def close(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.pending.clear()


@torch.no_grad()
def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """[c, ...] row shares of the TP group's ranks -> [TP * c, ...], rank order (1 all-gather)."""
    gathered = rows.new_empty((rows.shape[0] * parallel_state.get_tensor_model_parallel_world_size(), *rows.shape[1:]))
    dist.all_gather_into_tensor(gathered, rows.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return gathered


def run_schedule(model, microbatches: list[dict], forward_step, forward_only: bool, collect_non_loss_data=False):
    """`get_forward_backward_func()` of the current parallel state over `microbatches` (one shared shape, or any
    shapes with the model's `variable_seq_lengths`)."""
    micro_batch_size, seq_length = _batch_shape(microbatches, model.config.variable_seq_lengths)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


@torch.no_grad()
def forward_collect(model, microbatches: list[dict], collect: Callable[[dict, torch.Tensor], object],
                    hidden_states: bool = False) -> list:
    """Forward only; on the last stage returns `collect(batch, output)` per microbatch ([] elsewhere), the output
    being the logits shard, or with `hidden_states` the last hidden states [b, s, hidden] (`returning_hidden_states`).

    Used for the student's temperature-1 log-probs before the step and the co-located teacher's view.
    """
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        with returning_hidden_states(model) if hidden_states else contextlib.nullcontext():
            output = model(batch["tokens"], batch["position_ids"], None)
        return output, lambda output, non_loss_data=True: collect(batch, output)

    return run_schedule(model, microbatches, forward_step, forward_only=True, collect_non_loss_data=True)
