"""Turn sampled groups into the token tensors Megatron trains on.

For a prompt p (length P) and response r (length R) the sequence is x = p + r; the model reads
tokens = x[:-1] and predicts labels = x[1:], so position t's label is a response token exactly for
t in [P-1, P-1+R). Sequences are right-padded to one length (causal attention: padding never
influences earlier positions, and the loss mask is 0 there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from megatron_scope.ops.topk import tail_log_mass_from_topk, uniform_topk
from megatron_scope.rewards.base import Verdict
from megatron_scope.rollout.engine import Completion, SequenceScores
from megatron_scope.rollout.props import prefix_statistics


@dataclasses.dataclass
class RolloutGroup:
    """The G responses sampled for one prompt, with their verifier outcomes (and a remote teacher's scores of
    each response, `teacher.remote.score_responses`, when the teacher is a vLLM engine; SRPO's self-teacher
    prompt of each response, `teacher.self_teacher.route_group`, None where it is not distilled; with TrOPD's
    guidance, how many first tokens of each response the teacher wrote, `rollout.guidance`; ExOPD's reference's scores
    of each response when a vLLM engine serves it; the verifier's verdict on each response, whose `correct` is
    `correct`'s; the version of the weights that sampled them)."""

    prompt_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    correct: list[bool]
    teacher_scores: list[SequenceScores] | None = None
    self_teacher_prompts: list[list[int] | None] | None = None
    prefix_lengths: list[int] | None = None
    reference_scores: list[SequenceScores] | None = None
    verdicts: list[Verdict] | None = None
    weight_version: int = 0
    """The student weights the responses were sampled from: those after this many optimizer steps (iterations)."""

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise ValueError(f"prompt {self.prompt_id!r} has no tokens")
        if len(self.completions) != len(self.correct):
            raise ValueError(f"prompt {self.prompt_id!r}: {len(self.completions)} completions but "
                             f"{len(self.correct)} verifier outcomes")
        if self.verdicts is not None and [v.correct for v in self.verdicts] != list(self.correct):
            raise ValueError(f"prompt {self.prompt_id!r}: the verdicts' outcomes "
                             f"{[v.correct for v in self.verdicts]} are not `correct` {list(self.correct)}")
        if self.self_teacher_prompts is not None and len(self.self_teacher_prompts) != len(self.completions):
            raise ValueError(f"prompt {self.prompt_id!r}: {len(self.completions)} completions but "
                             f"{len(self.self_teacher_prompts)} self-teacher prompts")
        if self.prefix_lengths is not None and (
                len(self.prefix_lengths) != len(self.completions)
                or any(not 0 <= k <= len(c.token_ids) for k, c in zip(self.prefix_lengths, self.completions))):
            raise ValueError(f"prompt {self.prompt_id!r}: prefix lengths {self.prefix_lengths} do not fit responses of "
                             f"{[len(c.token_ids) for c in self.completions]} tokens")
        for model, scored in (("teacher", self.teacher_scores), ("reference", self.reference_scores)):
            for j, (completion, scores) in enumerate(zip(self.completions, scored or (), strict=scored is not None)):
                if len(scores.log_probs) != len(completion.token_ids):
                    raise ValueError(f"prompt {self.prompt_id!r}: response {j} has {len(completion.token_ids)} "
                                     f"tokens but {len(scores.log_probs)} {model} log-probs")


def check_token_ids(groups: Sequence[RolloutGroup], vocab_size: int) -> None:
    """Raise ValueError naming the prompt (and sample) if any prompt or response token id lies outside
    [0, vocab_size): Megatron's embedding would read a padding row (ids below the padded vocabulary) or
    fail with an opaque index error, and the loss would score a token the teacher never saw."""
    for group in groups:
        sources = [("prompt", group.prompt_token_ids)]
        sources += [(f"response {j}", c.token_ids) for j, c in enumerate(group.completions)]
        sources += [(f"self-teacher prompt {j}", ids) for j, ids in enumerate(group.self_teacher_prompts or ()) if ids]
        for what, ids in sources:
            if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                bad = [t for t in ids if not 0 <= t < vocab_size]
                raise ValueError(f"prompt {group.prompt_id!r}: {what} has token ids outside the vocabulary "
                                 f"[0, {vocab_size}): {bad[:5]}")


def sequence_multiple(tensor_model_parallel_size: int = 1) -> int:
    """What every batch width is a multiple of: 8 and TP (sequence parallelism splits positions over TP ranks)."""
    return math.lcm(8, tensor_model_parallel_size)


def padded_sequence_length(longest_tokens: int, multiple_of: int = 8) -> int:
    """The batch length for sequences of at most `longest_tokens` (prompt + response): inputs and labels are
    shifted by one, so `longest_tokens - 1` positions, rounded up to a multiple of `multiple_of`."""
    return max(multiple_of, -(-(longest_tokens - 1) // multiple_of) * multiple_of)


def longest_sequence(groups: Sequence[RolloutGroup]) -> int:
    """Tokens of the longest prompt + response of `groups` (0 when they hold no response)."""
    return max((len(g.prompt_token_ids) + len(c.token_ids) for g in groups for c in g.completions), default=0)


def sequence_length_for(groups: Sequence[RolloutGroup], multiple_of: int = 8) -> int:
    """Shortest padded length that holds every prompt + response of `groups` (`padded_sequence_length`)."""
    if not any(g.completions for g in groups):
        raise ValueError("no response to fit a sequence length to")
    return padded_sequence_length(longest_sequence(groups), multiple_of)


def build_batch(groups: Sequence[RolloutGroup], seq_length: int, pad_id: int, group_offset: int = 0) -> dict:
    """Tensors for `groups` in order, G rows per prompt: tokens, labels, loss_mask, position_ids [n, seq_length];
    correct (bool), group_ids (group_offset + index of the prompt), sequence_lengths (the positions a row uses:
    prompt + response - 1) [n]; plus rollout_log_probs [n, seq_length]
    (the engine's sampling log-probs at the label positions, 0 elsewhere). When the groups carry a remote
    teacher's scores: teacher_log_probs laid out the same way, and with a top-k teacher_topk_ids [n, seq, k],
    teacher_topk_log_probs [n, seq, k] and teacher_topk_tail_log_mass [n, seq] (the engine gives no tail: it is
    `ops.topk.tail_log_mass_from_topk` of the top-k); off the response positions those hold ids 0..k-1 with
    log-probs -log(k + 1) (a valid top-k with a non-empty tail, so the top-k KL stays finite where the loss mask
    zeroes it). When the groups carry a reference's scores (ExOPD's, served by vLLM): ref_log_probs laid out the same
    way. empirical_log_probs [n, seq]: at the label position of each response token drawn at a prefix the group shares
    (`rollout.props.prefix_statistics`), log p̂ of that token among the group's draws there, else 0; shared_prefix [n,
    seq] bool marks those positions. When the groups carry prefix lengths (TrOPD's guidance): prefix_mask [n, seq]
    bool, True at the label positions of the teacher-written tokens. An empty response is legal: its row has no
    loss-mask position.
    With several teachers of mixed backends only the remote teachers' groups carry scores: the other groups' rows
    hold the off-response placeholders everywhere, and their microbatches get their co-located teacher's view from
    its scoring pass (`ScopeTrainer._score` replaces those tensors).
    Token ids are not checked here: the trainer runs `check_token_ids` on the whole step's groups first."""
    scored = {g.teacher_scores is not None for g in groups}
    for what in ("prefix_lengths", "reference_scores"):
        if len({getattr(g, what) is not None for g in groups}) > 1:
            raise ValueError(f"some groups carry {what.replace('_', ' ')} and some do not")
    rows = [(gi, g, c, ok) for gi, g in enumerate(groups) for c, ok in zip(g.completions, g.correct)]
    teacher_scores = ([s for g in groups for s in (g.teacher_scores or [None] * len(g.completions))]
                      if True in scored else None)
    k = max((s.topk_ids.shape[-1] for s in teacher_scores or () if s is not None), default=0)
    n = len(rows)
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length)
    rollout_log_probs = torch.zeros(n, seq_length)
    teacher_log_probs = torch.zeros(n, seq_length) if teacher_scores is not None else None
    reference_scores = ([s for g in groups for s in g.reference_scores]
                        if groups and groups[0].reference_scores is not None else None)
    ref_log_probs = torch.zeros(n, seq_length) if reference_scores is not None else None
    if k:
        topk_ids, topk_log_probs, _ = uniform_topk((n, seq_length), k, torch.int32)
    empirical_log_probs, shared_prefix = torch.zeros(n, seq_length), torch.zeros(n, seq_length, dtype=torch.bool)
    empirical = [shares for g in groups for shares in prefix_statistics([c.token_ids for c in g.completions])]
    for i, (_, group, completion, _) in enumerate(rows):
        sequence = group.prompt_token_ids + list(completion.token_ids)
        if len(sequence) - 1 > seq_length:
            raise ValueError(f"prompt {group.prompt_id!r}: prompt + response is {len(sequence)} tokens, "
                             f"longer than seq_length + 1 = {seq_length + 1}")
        start, length = len(group.prompt_token_ids) - 1, len(completion.token_ids)
        if len(completion.log_probs) != length:
            raise ValueError(f"prompt {group.prompt_id!r}: a response of {length} tokens has "
                             f"{len(completion.log_probs)} log-probs")
        tokens[i, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        labels[i, : len(sequence) - 1] = torch.tensor(sequence[1:])
        loss_mask[i, start : start + length] = 1.0
        if empirical[i]:
            empirical_log_probs[i, start : start + len(empirical[i])] = torch.tensor(empirical[i])
            shared_prefix[i, start : start + len(empirical[i])] = True
        if length:
            rollout_log_probs[i, start : start + length] = torch.tensor(completion.log_probs, dtype=torch.float32)
            if ref_log_probs is not None:
                ref_log_probs[i, start : start + length] = reference_scores[i].log_probs
            if teacher_log_probs is not None and teacher_scores[i] is not None:
                scores = teacher_scores[i]
                teacher_log_probs[i, start : start + length] = scores.log_probs
                if k:
                    topk_ids[i, start : start + length] = scores.topk_ids
                    topk_log_probs[i, start : start + length] = scores.topk_log_probs
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq_length).expand(n, -1).contiguous(),
        "correct": torch.tensor([ok for *_, ok in rows], dtype=torch.bool),
        "group_ids": torch.tensor([group_offset + gi for gi, *_ in rows], dtype=torch.long),
        "rollout_log_probs": rollout_log_probs,
        "empirical_log_probs": empirical_log_probs,
        "shared_prefix": shared_prefix,
        "sequence_lengths": torch.tensor([len(g.prompt_token_ids) + len(c.token_ids) - 1 for _, g, c, _ in rows],
                                         dtype=torch.long),
    }
    if teacher_log_probs is not None:
        batch["teacher_log_probs"] = teacher_log_probs
    if ref_log_probs is not None:
        batch["ref_log_probs"] = ref_log_probs
    if groups and groups[0].prefix_lengths is not None:
        prefix = torch.tensor([g.prefix_lengths[j] for g in groups for j in range(len(g.completions))])
        start = torch.tensor([len(g.prompt_token_ids) - 1 for g in groups for _ in g.completions])
        position = torch.arange(seq_length)
        batch["prefix_mask"] = (position >= start[:, None]) & (position < (start + prefix)[:, None])
    if k:
        batch["teacher_topk_ids"], batch["teacher_topk_log_probs"] = topk_ids, topk_log_probs
        batch["teacher_topk_tail_log_mass"] = tail_log_mass_from_topk(topk_log_probs).float()
    return batch


def split_by_token_budget(batch: dict, max_tokens: int, max_rows: int, multiple_of: int = 8) -> list[dict]:
    """Micro-batches of whole rows of `batch` for a token budget: rows sorted by `sequence_lengths`, longest first
    (stable), taken greedily while a micro-batch holds at most `max_rows` rows and rows x width <= `max_tokens`
    padded tokens (a row longer than the budget goes alone), where width is the micro-batch's longest sequence
    rounded up to `multiple_of` (at most the batch's width). [n, seq, ...] tensors are cut to that width, [n]
    tensors follow their rows. Every row lands in exactly one micro-batch; losses normalised over the whole batch
    (`calculate_per_token_loss`) do not depend on the grouping."""
    lengths = batch["sequence_lengths"].tolist()
    full_width = batch["tokens"].shape[1]
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))  # sorted() is stable
    width_of = lambda i: min(padded_sequence_length(int(lengths[i]) + 1, multiple_of), full_width)  # noqa: E731
    groups, current, width = [], [], 0
    for i in order:
        if current and (len(current) == max_rows or (len(current) + 1) * width > max_tokens):
            groups.append((current, width))
            current = []
        if not current:
            width = width_of(i)
        current.append(i)
    if current:
        groups.append((current, width))
    microbatches = []
    for rows, width in groups:
        index = torch.tensor(rows, dtype=torch.long, device=batch["tokens"].device)
        microbatches.append({k: v[index, :width] if v.dim() >= 2 and v.shape[1] == full_width else v[index]
                             for k, v in batch.items()})
    return microbatches


def token_counts(batch: dict, microbatches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, padded) token positions of a step, 0-d tensors on the batch's device (no host sync): the positions its
    rows use (prompt + response - 1 each, `sequence_lengths`), and the ones its microbatches compute, rows x width
    each, which every forward, backward and output layer runs over."""
    real = batch["sequence_lengths"].sum()
    padded = torch.tensor(sum(microbatch["tokens"].numel() for microbatch in microbatches), device=real.device)
    return real, padded


def split_runs(batch: dict, labels: Sequence) -> list[tuple[object, dict]]:
    """(label, rows) for each run of consecutive rows of `batch` with one label (`labels[i]`: row i's, e.g. the
    teacher it reads), in row order."""
    if len(labels) != len(batch["tokens"]):
        raise ValueError(f"{len(labels)} labels for {len(batch['tokens'])} rows")
    runs, start = [], 0
    for end in range(1, len(labels) + 1):
        if end == len(labels) or labels[end] != labels[start]:
            runs.append((labels[start], {k: v[start:end] for k, v in batch.items()}))
            start = end
    return runs


def split_rows(batch: dict, num_parts: int) -> list[dict]:
    """Split every [n, ...] tensor of `batch` into `num_parts` equal consecutive row blocks."""
    n = len(batch["tokens"])
    if num_parts < 1 or n % num_parts:
        raise ValueError(f"{n} rows do not split into {num_parts} equal parts")
    size = n // num_parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(num_parts)]
