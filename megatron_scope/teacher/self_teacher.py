"""SRPO's self-teacher (arXiv 2604.02288, which takes it from SDPO, arXiv 2601.20802): the student itself, or an EMA
copy of it, re-prompted with a successful sibling from the same group, re-reads a failed response.

Routing (on the rollout leader, `route_group`): a failed response is distilled when its group has a correct response
(never itself: it failed); the first correct response of the group is the demonstration (SDPO takes the first of
the successful ones). Correct responses, failures of all-wrong groups (no demonstration; their GRPO advantage is 0,
so they carry no gradient this step) and failures whose re-prompt does not fit the context go to GRPO.

The re-prompt: --srpo-reprompt-template with {prompt} = the rollout prompt's text after --prompt-template and
{solution} = the demonstration's text, formatted like a rollout prompt (BOS, or the chat template), followed by
the failed response's tokens. The self-teacher's forward (no gradient) over those sequences gives, at each response
token, its last hidden states, the log-prob of the sampled token and its entropy; `self_teacher_pass` re-lays them
into the student's batch positions (response token t of row i sits at prompt_length_i - 1 + t in the student's view
and at reprompt_length_i - 1 + t in the teacher's). The loss applies the self-teacher's own output layer to the
hidden states, so the KL runs on vocabulary shards exactly as with a co-located teacher (any TP/PP).

The EMA teacher (`EmaTeacher`): θ_T <- (1 - r) θ_T + r θ_S after each optimizer step (SDPO's
teacher_regularization "ema", r = teacher_update_rate), kept in float32 (a bf16 copy would round away every update
smaller than 1/(2r) of its last bit) and saved with the checkpoint.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, NamedTuple, Sequence

import torch
from megatron.core import parallel_state

from megatron_scope.data.datasets import PROMPT_PLACEHOLDER, PromptFormat, prompt_token_ids
from megatron_scope.megatron.loss_func import row_share
from megatron_scope.megatron.model import output_layer_weight, unwrap_model
from megatron_scope.rollout.batch import padded_sequence_length, sequence_multiple
from megatron_scope.teacher.colocated import host_zeros, log_prob_pass

SOLUTION_PLACEHOLDER = "{solution}"


def reprompt_text(template: str, prompt: str, solution: str) -> str:
    """`template` with each {prompt} and {solution} replaced literally in one pass (braces in either text are
    kept)."""
    fields = {PROMPT_PLACEHOLDER: prompt, SOLUTION_PLACEHOLDER: solution}
    return re.sub(r"\{prompt\}|\{solution\}", lambda match: fields[match.group(0)], template)


def reprompt_builder(tokenizer, prompt_format: PromptFormat, template: str) -> Callable[[str, str], list[int]]:
    """(row prompt text, demonstration text) -> the self-teacher's prompt ids: the rollout prompt's templated text
    placed in `template`, then tokenized as a rollout prompt is (BOS, or the chat template)."""
    outer = PromptFormat(chat=prompt_format.chat)

    def build(prompt: str, solution: str) -> list[int]:
        text = prompt_format.template.replace(PROMPT_PLACEHOLDER, prompt)
        return prompt_token_ids(tokenizer, reprompt_text(template, text, solution), outer)

    return build


def route_group(prompt: str, responses: Sequence[Sequence[int]], texts: Sequence[str], correct: Sequence[bool],
                build: Callable[[str, str], list[int]], context: int) -> list[list[int] | None]:
    """One group's self-teacher prompts, one per response: the re-prompt ids for a failed response when the group
    has a correct one and the re-prompt plus the response fit `context` positions; None otherwise (GRPO)."""
    solutions = [text for text, ok in zip(texts, correct) if ok]
    if not solutions or all(correct):  # nothing to distil from, or nothing to distil
        return [None] * len(responses)
    ids = build(prompt, solutions[0])
    return [None if ok or len(ids) + len(response) - 1 > context else ids for response, ok in zip(responses, correct)]


class SelfTeacherRow(NamedTuple):
    """One row of the local batch as the self-teacher sees it."""

    teacher_prompt: list[int] | None
    """The re-prompt ids; None: the row is not distilled."""
    prompt_length: int
    """The student's prompt length (its response starts at label position prompt_length - 1)."""
    response: Sequence[int]


def self_teacher_pass(model, microbatches: list[dict], rows: Sequence[SelfTeacherRow], micro_batch_size: int,
                      vocab_size: int, pad_id: int) -> list[dict]:
    """The self-teacher's view of the student's microbatches on the last stage ([] elsewhere): per microbatch
    teacher_hidden at the student's response rows, this TP rank's share [row_share(m, TP), H] of them (host memory
    on CUDA; as `teacher.colocated.log_prob_pass` keeps a teacher's), with teacher_hidden_nonfinite [b] (NaN/Inf on
    the response, checked on the device), teacher_log_probs and teacher_entropy [b, s], at the student's positions;
    0 on rows that are not distilled and off the response.
    `microbatches[i]["row_index"]` names each row's index in `rows`. The distilled rows run through `model` (every
    stage) in microbatches of `micro_batch_size` rows padded to one width (a multiple of TP); nothing runs when no
    row is distilled."""
    distilled = [i for i, row in enumerate(rows) if row.teacher_prompt is not None]
    chunks = [distilled[k:k + micro_batch_size] for k in range(0, len(distilled), micro_batch_size)]
    device = microbatches[0]["tokens"].device
    teacher_batches = []
    if chunks:
        width = padded_sequence_length(max(len(rows[i].teacher_prompt) + len(rows[i].response) for i in distilled),
                                       sequence_multiple(parallel_state.get_tensor_model_parallel_world_size()))
        for chunk in chunks:
            tokens = torch.full((micro_batch_size, width), pad_id, dtype=torch.long)
            labels = tokens.clone()
            response = torch.zeros(micro_batch_size, width)  # the response's positions: where hidden states are checked
            for position, i in enumerate(chunk):
                sequence = torch.tensor(list(rows[i].teacher_prompt) + list(rows[i].response))
                tokens[position, :len(sequence) - 1], labels[position, :len(sequence) - 1] = sequence[:-1], sequence[1:]
                teacher_start = len(rows[i].teacher_prompt) - 1
                response[position, teacher_start:teacher_start + len(rows[i].response)] = 1.0
            teacher_batches.append({"tokens": tokens.to(device), "labels": labels.to(device),
                                    "position_ids": torch.arange(width, device=device).expand(micro_batch_size, -1),
                                    "loss_mask": response.to(device)})
    views = (log_prob_pass(model, teacher_batches, vocab_size, keep="hidden", entropy=True, all_rows=True)
             if chunks else [])
    if not parallel_state.is_pipeline_last_stage():
        return []
    where = {}  # row -> (its teacher microbatch, its position there, its first row of that one's response rows)
    for c, chunk in enumerate(chunks):
        offsets = [0, *itertools.accumulate(len(rows[i].response) for i in chunk)]
        where.update({i: (c, position, offsets[position]) for position, i in enumerate(chunk)})
    weight = output_layer_weight(model)  # [V/TP, H]: the hidden size and dtype of the zeros when nothing ran
    dtype = views[0][0]["teacher_hidden"].dtype if views else weight.dtype
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    outputs = []
    for batch in microbatches:
        b, s = batch["labels"].shape
        row_index = batch["row_index"].tolist()
        share = row_share(max(sum(len(rows[i].response) for i in row_index), 1), tp)
        low = tp_rank * share  # this TP rank's share of the response rows, [low, low + share)
        out = {"teacher_hidden": host_zeros((share, weight.shape[-1]), dtype, device),
               "teacher_hidden_nonfinite": torch.zeros(b, dtype=torch.bool, device=device),  # checked on the device
               "teacher_log_probs": torch.zeros(b, s, device=device),
               "teacher_entropy": torch.zeros(b, s, device=device)}
        offset = 0  # this row's first response row in the microbatch
        for position, i in enumerate(row_index):
            row = rows[i]
            length = len(row.response)
            offset, first_row = offset + length, offset
            if i not in where:
                continue
            c, source, teacher_first_row = where[i]
            extras, log_probs = views[c]
            first, stop = max(first_row, low), min(first_row + length, low + share)  # its rows in this share
            if first < stop:
                out["teacher_hidden"][first - low:stop - low] = \
                    extras["teacher_hidden"][teacher_first_row + first - first_row:teacher_first_row + stop - first_row]
            start, teacher_start = row.prompt_length - 1, len(row.teacher_prompt) - 1
            out["teacher_hidden_nonfinite"][position] = extras["teacher_hidden_nonfinite"][source]
            out["teacher_log_probs"][position, start:start + length] = log_probs[source, teacher_start:teacher_start + length]
            out["teacher_entropy"][position, start:start + length] = \
                extras["teacher_entropy"][source, teacher_start:teacher_start + length]
        outputs.append(out)
    return outputs


class EmaTeacher:
    """A frozen float32 GPTModel stage with the student's TP/PP, θ_T <- (1 - r) θ_T + r θ_S after each step."""

    def __init__(self, model, rate: float):
        if not 0 < rate < 1:
            raise ValueError(f"the EMA rate must be in (0, 1), got {rate}")
        self.model, self.rate = model, rate

    @torch.no_grad()
    def update(self, student) -> None:
        """One EMA step toward `student`'s current parameters (the same architecture, TP and PP)."""
        ema, current = dict(unwrap_model(self.model).named_parameters()), dict(unwrap_model(student).named_parameters())
        if ema.keys() != current.keys():
            raise ValueError(f"the EMA teacher's parameters {sorted(ema.keys() ^ current.keys())[:3]} differ from "
                             "the student's")
        for name, param in ema.items():
            param.lerp_(current[name].to(param.dtype), self.rate)
