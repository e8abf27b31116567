"""SCOPE and its baselines as a Megatron loss function (`forward_step` contract), on vocab-sharded logits.

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["position_ids"], None)      # [b, s, V/TP], last stage
        return logits, partial(scope_loss_func, loss_config, vocab_size, batch)

`megatron/schedule.forward_backward` wraps exactly this and first runs `check_batch` on every microbatch
(do the same when plugging the loss into another schedule). The loss runs on the last pipeline stage. It returns `(loss_sum, count, report)` for Megatron's
`calculate_per_token_loss=True` path: the schedule sums `count` over microbatches, `finalize_model_grads`
all-reduces it over data-parallel ranks and divides the gradients by it, so the gradient is that of
Σ w_i L_i / N over the whole global batch, whatever the microbatching (see losses/objectives.py).

Group-level inputs are computed before the step over whole prompt groups and travel in the batch:
`seq_weights` (SCOPE's path weights, `scope_sequence_weights`) and `advantages` (GRPO/SRPO), both set by
`add_group_inputs`. The trainer gives
each data-parallel rank whole prompt groups, so no communication is needed; a caller that spreads a group
over ranks must all-gather the per-sequence scalars (mean log-probs, correctness, group ids: 4 floats a
sequence) over the data-parallel group first and compute the weights from the gathered rows.

Microbatch keys ([b, s] unless noted; s covers prompt and response, `loss_mask` marks positions whose
label is a response token):
    labels, loss_mask, correct [b] bool, seq_weights [b];
    teacher_hidden (the co-located teacher's last hidden states; the loss applies `teacher_weight`, its output-layer
                   shard): [b, s, H_T], or the response rows [m, H_T] only (the m positions where loss_mask > 0, in
                   flat [b * s] order: what the scoring pass keeps; `schedule.forward_backward` also takes this TP
                   rank's share of them, rows [r c, (r + 1) c) with c = `row_share(m, TP)`, and all-gathers it)
                   or teacher_logits [b, s, V/TP]  (--scope-kl reverse/forward/jsd, SRPO, TrOPD forward)
    teacher_hidden_nonfinite [b] bool              (with teacher_hidden; optional with [b, s, H_T]: the scoring pass's
                                                   check, on the device, for NaN/Inf at response positions;
                                                   `check_batch` reads it instead of scanning teacher_hidden)
    teacher_log_probs                              (--scope-kl k1/k2/k3; ExOPD, TrOPD; else derived from logits)
    teacher_topk_ids, teacher_topk_log_probs [b, s, k], teacher_topk_tail_log_mass   (--scope-kl topk)
    old_log_probs, advantages [b]                  (GRPO, SRPO)      ref_log_probs (ExOPD)
    distilled [b] bool, distill_weights            (SRPO: which responses are distilled, and their tokens' entropy-
                                                   aware weights; teacher_hidden is then the self-teacher's, re-laid
                                                   into the student's positions, with the student's output layer)
    trust_uniform                                  (TrOPD's sampled trust region: one U(0, 1) draw per token)
    prefix_mask bool                               (TrOPD's guidance: the teacher-written tokens, imitated with
                                                   forward KL; the rollout IS weight is 1 there)
    rollout_log_probs                              (--rollout-is-threshold: the sampler's log-probs)
    response_positions [m] int64                   (optional: the flat indices into [b * s] where loss_mask > 0,
                                                   `response_positions`; the output layers from hidden states then
                                                   run on those rows only; `schedule.forward_backward` sets it)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from megatron.core import parallel_state

from megatron_scope.config import FULL_VOCAB_KL, SAMPLED_KL, LossConfig
from megatron_scope.losses.objectives import (
    OBJECTIVES,
    TokenStats,
    aggregate,
    group_normalized_advantages,
    rejection_keep_mask,
    rollout_log_ratios,
    tropd_inside,
    truncated_is_weights,
)
from megatron_scope.losses.scope import scope_sequence_weights
from megatron_scope.ops.linear_kl import vocab_parallel_linear_distill_loss
from megatron_scope.ops.token_stats import sampled_kl, sequence_mean_log_prob
from megatron_scope.ops.topk import topk_value_checks, vocab_parallel_topk_kl
from megatron_scope.ops.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_log_probs


def required_batch_keys(config: LossConfig, teacher_hidden: bool = False) -> set[str]:
    """The microbatch keys `scope_loss_func` reads under `config` (`teacher_hidden`: the teacher's distribution
    comes as its hidden states instead of its logits)."""
    keys = {"labels", "loss_mask", "correct", "seq_weights"}
    if config.needs_teacher_logits:
        keys.add("teacher_hidden" if teacher_hidden else "teacher_logits")
    # The teacher's log-prob of the sampled token: the k1/k2/k3 estimators, ExOPD's reward and TrOPD's trust
    # region read it (derived from teacher_logits where those are present).
    if (config.uses_kl and config.kl in SAMPLED_KL) or config.algorithm == "exopd" or (
        config.algorithm == "tropd" and not config.needs_teacher_logits
    ):
        keys.add("teacher_log_probs")
    if config.teacher_topk:
        keys |= {"teacher_topk_ids", "teacher_topk_log_probs", "teacher_topk_tail_log_mass"}
    if config.tropd_sampled_trust_region:
        keys |= {"trust_uniform", "old_log_probs"}
    if config.tropd_guidance:
        keys |= {"prefix_mask", "rollout_log_probs"}
    if config.algorithm in ("grpo", "srpo"):
        keys |= {"old_log_probs", "advantages"}
    if config.algorithm == "srpo":  # the routing and the entropy-aware weights (the trainer's `_score`)
        keys |= {"distilled", "distill_weights"}
    if config.teacher_path_loss == "ppo":  # the released teacher path: advantage log π_T - log π_old
        keys |= {"old_log_probs", "teacher_log_probs"}
    if config.algorithm == "exopd":
        keys.add("ref_log_probs")
    if config.rollout_is_threshold is not None or config.rollout_rs is not None:  # π_S / μ from the step's two
        keys |= {"old_log_probs", "rollout_log_probs"}  # views of y_t
    return keys


@torch.no_grad()
def add_group_inputs(microbatches: list[dict], config: LossConfig, group=None) -> None:
    """Set each microbatch's `seq_weights` (SCOPE's path weights; 1 for the baselines) and `advantages` (GRPO's
    group-normalised outcome), computed over all of `microbatches` (whole prompt groups) from `old_log_probs`,
    `teacher_log_probs`, `loss_mask`, `correct` and `group_ids`. With --loss-agg-mode scope-released the correct
    responses' weights are also scaled by N_tok / N_tok,correct, the response tokens of the global batch over
    those of its correct responses (1 all-reduce of 2 floats over `group`, the data-parallel group)."""
    per_row = lambda fn: torch.cat([fn(b) for b in microbatches])  # noqa: E731  (microbatch widths may differ)
    correct, group_ids = per_row(lambda b: b["correct"]), per_row(lambda b: b["group_ids"])
    if config.algorithm == "scope":
        student = per_row(lambda b: sequence_mean_log_prob(b["old_log_probs"], b["loss_mask"]))
        teacher = per_row(lambda b: sequence_mean_log_prob(b["teacher_log_probs"], b["loss_mask"]))
        weights = scope_sequence_weights(student, teacher, correct, group_ids, config)
    else:
        weights = torch.ones(len(correct), device=correct.device)
    if config.loss_agg_mode == "scope-released":
        response_tokens = per_row(lambda b: b["loss_mask"].sum(-1))
        tokens = torch.stack([response_tokens.sum(), response_tokens[correct].sum()]).double()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(tokens, group=group)
        weights = torch.where(correct, weights * (tokens[0] / tokens[1].clamp_min(1)).float(), weights)
    advantages = group_normalized_advantages(correct.float(), group_ids)
    sizes = [len(b["tokens"]) for b in microbatches]
    for batch, w, a in zip(microbatches, weights.split(sizes), advantages.split(sizes)):
        batch["seq_weights"], batch["advantages"] = w, a


def sampled_by_student(batch: dict) -> torch.Tensor:
    """The loss mask without TrOPD's teacher-written prefix tokens: the response tokens the student's engine drew."""
    mask = batch["loss_mask"]
    return mask * ~batch["prefix_mask"] if "prefix_mask" in batch else mask


PER_SEQUENCE_KEYS = ("correct", "seq_weights", "advantages", "distilled")
PER_VOCAB_KEYS = ("teacher_logits", "teacher_topk_ids", "teacher_topk_log_probs")  # a trailing vocab/k dim
MAY_BE_NEG_INF = PER_VOCAB_KEYS + ("teacher_topk_tail_log_mass",)  # masked/impossible tokens, an empty tail
TRAILING_DIM_KEYS = PER_VOCAB_KEYS + ("teacher_hidden",)


def nonfinite_sequences(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b] bool: whether each sequence of `values` [b, s, ...] holds NaN or Inf at a response position (loss_mask
    [b, s] > 0), computed on `values`' device (only the mask moves there)."""
    nonfinite = ~torch.isfinite(values).reshape(*loss_mask.shape, -1).all(-1)  # [b, s]
    return (nonfinite & (loss_mask.to(values.device) > 0)).any(-1)


def nonfinite_response_rows(rows: torch.Tensor, positions: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b] bool: whether each sequence holds NaN or Inf in `rows` [m, ...], the values at the flat `positions` [m]
    into loss_mask [b, s] (`response_positions`; a row off the response, an empty microbatch's, does not count),
    computed on the rows' device."""
    b, s = loss_mask.shape
    on_response = loss_mask.to(rows.device).flatten().index_select(0, positions) > 0
    bad = (~torch.isfinite(rows).reshape(len(positions), -1).all(-1) & on_response).to(torch.int32)
    return torch.zeros(b, dtype=torch.int32, device=rows.device).index_add_(0, positions // s, bad) > 0


def response_positions(microbatches: list[dict]) -> list[torch.Tensor]:
    """Per microbatch, the flat indices into [b * s] of its response positions (loss_mask > 0), for one device read
    (their counts) for all microbatches. A microbatch without any gets position 0 (its loss coefficients are 0
    there, as everywhere off the response), so that the fused op has a row to run the TP group's collectives on."""
    masks = [batch["loss_mask"].flatten() > 0 for batch in microbatches]
    if not masks:
        return []
    counts = torch.stack([mask.sum() for mask in masks]).tolist()
    return [torch.nonzero_static(mask, size=max(count, 1), fill_value=0).flatten()
            for mask, count in zip(masks, counts)]


def row_share(num_rows: int, shares: int) -> int:
    """Rows per share when `num_rows` rows are split into `shares` equal contiguous shares (the last ones padded):
    ceil(num_rows / shares); how the TP ranks split a microbatch's response rows of teacher hidden states."""
    return -(-num_rows // shares)


def spread_rows(values: torch.Tensor, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-row `values` [m, ...] of the flat `positions` (into prod(shape)) laid out as [*shape, ...], 0 elsewhere."""
    flat = values.new_zeros((math.prod(shape), *values.shape[1:]))
    return flat.index_copy_(0, positions, values).view(*shape, *values.shape[1:])


def check_batch(batch: dict, config: LossConfig, vocab_size: int | None = None) -> None:
    """Raise ValueError naming the key if a microbatch lacks an input, has the wrong shape or holds NaN/Inf.

    Run it on every rank before `forward_backward_func` so that bad data stops the step before any
    collective (an error inside the last stage's loss would leave the other stages waiting).
    `teacher_hidden`'s values are not read when `teacher_hidden_nonfinite` comes with them (the scoring pass
    checked them on the device; this reads [b] flags), only scanned where it does not. Reads the device once per
    check; `schedule.forward_backward` reads a whole step's checks at once (`batch_value_checks`).
    """
    for bad, message in batch_value_checks(batch, config, vocab_size=vocab_size):
        if bool(bad):
            raise ValueError(message())


def batch_value_checks(batch: dict, config: LossConfig, row_shares: int = 1,
                       vocab_size: int | None = None) -> list[tuple[torch.Tensor, Callable[[], str]]]:
    """Check a microbatch's keys, shapes and dtypes (ValueError naming the key; nothing read from the device) and
    return its value checks, each (a 0-d bool tensor on the values' device, True where they hold NaN/Inf or a count
    is wrong: computed without a device-to-host read; the ValueError message to raise then). A 2-D `teacher_hidden`
    is a share of the response rows: of `row_shares` (TP) equal shares, `row_share(m, row_shares)` rows each
    (m = the positions where loss_mask > 0, at least 1). With `vocab_size` (the tokenizer's), a
    teacher's top-k is checked too (`ops.topk.topk_value_checks`: ids in range and distinct, log-probs and tail
    <= 0, head mass <= 1), so the loss need not check it again (`scope_loss_func(..., checked=True)`)."""
    required = required_batch_keys(config, teacher_hidden="teacher_hidden" in batch)
    missing = sorted(required - batch.keys())
    if missing:
        raise ValueError(f"{config.algorithm} (--scope-kl {config.kl}) needs batch keys {missing}")
    labels_shape = tuple(batch["labels"].shape)
    if len(labels_shape) != 2:
        raise ValueError(f"batch['labels'] must be [batch, seq], got shape {labels_shape}")
    for key in ("correct", "distilled"):
        if key in required and batch[key].dtype != torch.bool:
            raise ValueError(f"batch[{key!r}] must be bool (one per response), got {batch[key].dtype}")
    response = batch["loss_mask"] > 0
    checks = []
    for key in sorted(required - {"labels"}):
        value = batch[key]
        expected = labels_shape[:1] if key in PER_SEQUENCE_KEYS else labels_shape
        if key == "teacher_hidden" and value.dim() == 2:  # a share of the response rows
            checks.append(_response_rows_check(value.shape[0], response, row_shares))
            expected = value.shape[:1]
        extra_dims = 1 if key in TRAILING_DIM_KEYS else 0
        if tuple(value.shape[: len(expected)]) != expected or value.dim() != len(expected) + extra_dims:
            raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, expected {expected}"
                             f"{' + (k,)' if extra_dims else ''} to match labels {labels_shape}")
        if key == "teacher_hidden":
            checks.append(_teacher_hidden_check(batch, labels_shape[0]))
            continue
        if not value.dtype.is_floating_point:
            continue
        if key in MAY_BE_NEG_INF:
            bad = (torch.isnan(value) | (value == torch.inf)).any()
        elif key in PER_SEQUENCE_KEYS:
            bad = ~torch.isfinite(value).all()
        else:
            bad = (~torch.isfinite(value) & response.to(value.device)).any()
        message = f"batch[{key!r}] holds NaN or Inf" + ("" if key in MAY_BE_NEG_INF else " on response tokens")
        checks.append((bad, lambda message=message: message))
    if vocab_size is not None and config.teacher_topk:
        checks += topk_value_checks(batch["teacher_topk_ids"], batch["teacher_topk_log_probs"],
                                    batch["teacher_topk_tail_log_mass"], vocab_size)
    return checks


def _response_rows_check(rows: int, response: torch.Tensor, shares: int) -> tuple[torch.Tensor, Callable[[], str]]:
    """Whether `rows` is not one share of the response rows, row_share(m, shares) with m = max(response.sum(), 1)
    (`response_positions` gives an empty microbatch one row), as a device flag."""
    count = response.sum().clamp(min=1)
    wrong = (count <= (rows - 1) * shares) | (count > rows * shares)
    return wrong, lambda: (f"batch['teacher_hidden'] has {rows} rows, not {'one share' if shares > 1 else 'the count'} "
                           f"of the microbatch's {int(count)} response positions (loss_mask > 0)"
                           + (f" split over {shares} tensor-parallel ranks" if shares > 1 else ""))


def _teacher_hidden_check(batch: dict, num_sequences: int) -> tuple[torch.Tensor, Callable[[], str]]:
    """NaN/Inf in `teacher_hidden` at response positions, read from `teacher_hidden_nonfinite` (the scoring pass's
    [b] flags) or, without it (a batch built elsewhere), scanned on teacher_hidden's own device."""
    flags = batch.get("teacher_hidden_nonfinite")
    if flags is None:
        if batch["teacher_hidden"].dim() == 2:
            raise ValueError("batch['teacher_hidden'] as response rows [m, H] needs batch['teacher_hidden_nonfinite'] "
                             "(the scoring pass's per-sequence check; give [b, s, H] to have it scanned here)")
        flags = nonfinite_sequences(batch["teacher_hidden"], batch["loss_mask"])
    elif tuple(flags.shape) != (num_sequences,):
        raise ValueError(f"batch['teacher_hidden_nonfinite'] has shape {tuple(flags.shape)}, expected "
                         f"({num_sequences},): one flag per sequence")

    def message() -> str:
        return (f"batch['teacher_hidden'] holds NaN or Inf on response tokens of sequences "
                f"{flags.nonzero().flatten().tolist()} (of {num_sequences} in this microbatch)")

    return flags.any(), message


def rollout_correction(config: LossConfig, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(truncated IS weights, rejection keep-mask) of --rollout-is-threshold/--rollout-is and --rollout-rs, each None
    when off, from the step's two views of each token: π_S (`old_log_probs`) and the sampler μ (`rollout_log_probs`).
    Tokens the student's engine did not draw (TrOPD's teacher prefix) get weight 1, are kept, and stay out of the
    sequence-level products."""
    sampled = sampled_by_student(batch)
    weights = keep = None
    if config.rollout_is_threshold is not None:
        log_ratios = rollout_log_ratios(batch["old_log_probs"], batch["rollout_log_probs"], sampled, config.rollout_is)
        weights = torch.where(sampled.bool(), truncated_is_weights(log_ratios, config.rollout_is_threshold), 1.0)
    if config.rollout_rs is not None:
        log_ratios = rollout_log_ratios(batch["old_log_probs"], batch["rollout_log_probs"], sampled, config.rollout_rs)
        keep = rejection_keep_mask(log_ratios, config.rejection_band)
    return weights, keep


def _loss_sum(config: LossConfig, stats: TokenStats, batch: dict):
    """(Σ w_i L_i, its count, the per-token loss, the truncated IS weights or None, the rejection keep-mask or None)
    of one microbatch; rejected tokens leave both the sum and the count."""
    token_loss = OBJECTIVES[config.algorithm](stats, config)
    is_weights, keep = rollout_correction(config, batch)
    if is_weights is not None:
        token_loss = token_loss * is_weights.to(token_loss.dtype)
    mask = stats.mask if keep is None else stats.mask * keep.to(stats.mask.dtype)
    loss_sum, count = aggregate(token_loss, mask, batch["seq_weights"], config.loss_agg_mode)
    return loss_sum, count, token_loss, is_weights, keep


def _fused_stats(batch: dict, **per_token) -> TokenStats:
    """The fused objectives' (SCOPE's, OPD's) token statistics, from `per_token` kl and student_log_probs."""
    return TokenStats(mask=batch["loss_mask"].to(per_token["kl"].dtype), correct=batch["correct"],
                      teacher_log_probs=batch.get("teacher_log_probs", per_token.pop("teacher_log_probs", None)),
                      old_log_probs=batch.get("old_log_probs"), advantages=batch.get("advantages"), **per_token)


def _fused_coefficients(config: LossConfig, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(d L / d KL_t, d L / d log π_S(y_t)) per token for L = this microbatch's loss sum, read off the loss itself by
    autograd at KL = log π_S = 0. The objectives that fuse (`LossConfig.fuses_student_logits`: SCOPE with its KL
    teacher path, OPD) are linear in both, with coefficients set by the batch alone (routing, sequence weights,
    masks, normalisers, truncated IS weights), so these are exact everywhere (SCOPE's PPO teacher path, which is
    not, needs a sampled KL and never fuses)."""
    kl = torch.zeros(batch["labels"].shape, device=batch["labels"].device, requires_grad=True)
    log_probs = torch.zeros_like(kl, requires_grad=True)
    with torch.enable_grad():
        loss_sum = _loss_sum(config, _fused_stats(batch, kl=kl, student_log_probs=log_probs), batch)[0]
        grads = torch.autograd.grad(loss_sum, (kl, log_probs), allow_unused=True)
    return tuple(torch.zeros_like(kl) if grad is None else grad for grad in grads)


def _token_stats(config: LossConfig, vocab: int, batch: dict, output: torch.Tensor, group, student_weight,
                 teacher_weight, checked: bool = False) -> tuple[TokenStats, torch.Tensor, torch.Tensor | None]:
    """The objectives' per-token inputs, the student's entropy (for the report) and, for the fused KL from hidden
    states, the loss sum whose gradient the fused op computed in its forward pass (`ops.linear_kl`; the statistics
    then carry no gradient); None otherwise."""
    labels = batch["labels"]
    positions = batch.get("response_positions")
    teacher_rows = "teacher_hidden" in batch and batch["teacher_hidden"].dim() == 2  # the response rows only
    if teacher_rows and positions is None:
        positions = response_positions([batch])[0]
    if student_weight is not None:  # `output` is the student's last hidden states: nothing vocabulary-sized kept
        kl_coef, log_prob_coef = _fused_coefficients(config, batch)
        student_hidden, teacher_hidden, targets = output, batch["teacher_hidden"], labels
        if positions is not None:  # both output layers on the response positions only (the coefficients are 0
            # elsewhere, so the loss and its gradient are the same); the statistics are 0 off the response
            student_hidden, kl_coef, targets, log_prob_coef = (
                value.flatten(0, 1).index_select(0, positions)
                for value in (student_hidden, kl_coef, targets, log_prob_coef))
            if not teacher_rows:
                teacher_hidden = teacher_hidden.flatten(0, 1).index_select(0, positions)
        loss_sum, fused = vocab_parallel_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, kl_coef, targets, log_prob_coef,
            kind=config.kl, group=group, vocab_size=vocab, beta=config.jsd_beta)
        if positions is not None:
            fused = type(fused)(*(None if value is None else spread_rows(value, positions, labels.shape)
                                  for value in fused))
        stats = _fused_stats(batch, kl=fused.kl, student_log_probs=fused.student_log_probs,
                             teacher_log_probs=fused.teacher_log_probs)
        return stats, fused.student_entropy, loss_sum
    logits = output
    student_log_probs = vocab_parallel_log_probs(logits, labels, group=group, vocab_size=vocab)
    teacher_logits = batch.get("teacher_logits")
    if teacher_logits is None and "teacher_hidden" in batch:  # this microbatch's teacher logits, no gradient
        with torch.no_grad():
            teacher_logits = batch["teacher_hidden"] @ teacher_weight.t()
            if teacher_rows:  # 0 off the response (a uniform teacher where the loss mask is 0)
                teacher_logits = spread_rows(teacher_logits, positions, labels.shape)
    teacher_log_probs = batch.get("teacher_log_probs")
    if teacher_log_probs is None and teacher_logits is not None:
        with torch.no_grad():
            teacher_log_probs = vocab_parallel_log_probs(teacher_logits, labels, group=group, vocab_size=vocab)

    kl = forward_kl = None
    if config.uses_kl:
        if config.kl in FULL_VOCAB_KL:
            kl = vocab_parallel_kl(logits, teacher_logits, kind=config.kl, group=group, beta=config.jsd_beta,
                                   vocab_size=vocab)
        elif config.kl in SAMPLED_KL:
            kl = sampled_kl(student_log_probs, teacher_log_probs, kind=config.kl)
        else:
            kl = vocab_parallel_topk_kl(logits, batch["teacher_topk_ids"], batch["teacher_topk_log_probs"],
                                        group=group, vocab_size=vocab,
                                        teacher_tail_log_mass=batch["teacher_topk_tail_log_mass"],
                                        renormalize=config.topk_renormalize, validate=not checked)
    if config.tropd_forward_outliers and teacher_logits is not None:
        forward_kl = vocab_parallel_kl(logits, teacher_logits, kind="forward", group=group, vocab_size=vocab)
    elif config.tropd_forward_outliers:  # KL(π_T‖π_S) over the teacher's top-k and the tail (a vLLM teacher too)
        forward_kl = vocab_parallel_topk_kl(logits, batch["teacher_topk_ids"], batch["teacher_topk_log_probs"],
                                            kind="forward", group=group, vocab_size=vocab,
                                            teacher_tail_log_mass=batch["teacher_topk_tail_log_mass"],
                                            renormalize=config.topk_renormalize, validate=not checked)
    entropy = vocab_parallel_entropy(logits.detach(), group=group, vocab_size=vocab)
    return TokenStats(
        mask=batch["loss_mask"].to(student_log_probs.dtype),
        correct=batch["correct"],
        student_log_probs=student_log_probs,
        kl=kl,
        teacher_log_probs=teacher_log_probs,
        distilled=batch["distilled"] if config.algorithm == "srpo" else None,
        distill_weights=batch["distill_weights"] if config.algorithm == "srpo" else None,
        forward_kl=forward_kl,
        old_log_probs=batch.get("old_log_probs"),
        ref_log_probs=batch.get("ref_log_probs"),
        advantages=batch.get("advantages"),
        trust_uniform=batch.get("trust_uniform"),
        prefix=batch.get("prefix_mask"),
    ), entropy, None


@torch.no_grad()
def _report(stats: TokenStats, batch: dict, student_entropy: torch.Tensor) -> dict:
    """Per-path sums as [sum, count] tensors (summed over microbatches and ranks by `reduce_reports`)."""
    mask = stats.mask
    lengths = mask.sum(-1)
    student_mean = sequence_mean_log_prob(stats.student_log_probs, mask)
    per_sequence = {
        "mle": -student_mean,
        "student_ppl": torch.exp(-student_mean),
        "entropy": sequence_mean_log_prob(student_entropy, mask),
        "response_length": lengths,
        "weight": batch["seq_weights"].to(mask.dtype),
    }
    teacher_view = {}
    if stats.teacher_log_probs is not None:
        teacher_view["teacher_ppl"] = torch.exp(-sequence_mean_log_prob(stats.teacher_log_probs, mask))
    if stats.kl is not None:
        teacher_view["kl"] = sequence_mean_log_prob(stats.kl.detach(), mask)
    report = {"correct_fraction": torch.stack([stats.correct.sum().to(mask.dtype), mask.new_tensor(len(lengths))])}
    if stats.distilled is not None:  # SRPO: a teacher's view exists on the distilled responses only
        count = stats.distilled.sum().to(mask.dtype)
        report.update({f"distilled/{name}": torch.stack([values[stats.distilled].sum(), count])
                       for name, values in teacher_view.items()})
    else:
        per_sequence.update(teacher_view)
    for path, members in (("correct", stats.correct), ("incorrect", ~stats.correct)):
        count = members.sum().to(mask.dtype)
        for name, values in per_sequence.items():
            report[f"{path}/{name}"] = torch.stack([values[members].sum(), count])
        weights = per_sequence["weight"][members]  # an empty path: -inf with count 0, omitted by reduce_reports
        report[f"{path}/weight_max"] = torch.stack([weights.max() if len(weights) else mask.new_tensor(-torch.inf),
                                                    count])
    return report


def scope_loss_func(config: LossConfig, vocab_size: int, batch: dict, output: torch.Tensor, group=None,
                    student_weight: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                    checked: bool = False):
    """Megatron loss_func: `(Σ w_i L_i over this microbatch, its count of sequences or tokens, report)`.

    `output` is the student's vocabulary shard of logits [b, s, V/TP] of a vocabulary padded from `vocab_size`
    (the tokenizer's; padded entries take no probability); or, given `student_weight` (its output-layer shard
    [V/TP, H_S], with `config.fuses_student_logits` and `teacher_hidden` in the batch), its last hidden states
    [b, s, H_S], and the loss applies both output layers chunk by chunk (`ops.linear_kl`). `teacher_weight`: the
    teacher's output-layer shard [V/TP, H_T], needed with `teacher_hidden`. `group` defaults to Megatron's TP group.
    The batch must have passed `check_batch` (`schedule.forward_backward` checks every microbatch before the
    schedule runs, so the teacher's inputs are not scanned twice); `checked`: it passed with the vocabulary, so the
    teacher's top-k is not read from the device again here.
    """
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    if "teacher_hidden" in batch and teacher_weight is None:
        raise ValueError("batch['teacher_hidden'] needs teacher_weight, the teacher's output-layer shard")
    if student_weight is not None and not (config.fuses_student_logits and "teacher_hidden" in batch):
        raise ValueError("student_weight (the fused KL from hidden states) needs a config whose fuses_student_logits "
                         "is true and batch['teacher_hidden']")
    if config.logprob_temperature != 1.0:  # the student's distribution at temperature T (logits are linear in
        output = output / config.logprob_temperature  # the hidden states: dividing those divides the logits)
    stats, student_entropy, fused_loss_sum = _token_stats(config, vocab_size, batch, output, group, student_weight,
                                                          teacher_weight, checked)
    loss_sum, count, token_loss, is_weights, keep = _loss_sum(config, stats, batch)
    if fused_loss_sum is not None:  # the value from the statistics, the gradient from the fused op (the same sum)
        loss_sum = loss_sum.detach() + (fused_loss_sum - fused_loss_sum.detach()).to(loss_sum.dtype)
    report = _report(stats, batch, student_entropy)
    sampled = sampled_by_student(batch)  # the response tokens the student's engine drew
    tokens = sampled.sum()
    if config.rollout_is_threshold is not None:  # the weights' mean and how often C cut them, over sampled tokens
        report["is_weight"] = torch.stack([(is_weights * sampled).sum(), tokens])
        truncated = is_weights >= config.rollout_is_threshold
        report["is_truncated_fraction"] = torch.stack([(truncated * sampled).sum(), tokens])
    if keep is not None:  # the share of the student's tokens --rollout-rs rejected
        report["rs_rejected_fraction"] = torch.stack([(~keep * sampled).sum(), tokens])
    if config.algorithm == "tropd":  # the share of the student's tokens outside the trust region (the outliers)
        outside = (~tropd_inside(stats, config)).to(sampled.dtype) * sampled
        report["tropd_outlier_fraction"] = torch.stack([outside.sum(), tokens])
    if stats.prefix is not None:  # guidance: the prefix tokens' share, their forward-KL k1 estimate, and how far
        # the teacher engine's sampling log-probs lie from the teacher's view here (~0: both are the teacher's)
        prefix = (stats.mask > 0) & stats.prefix
        prefix_tokens = prefix.sum().to(stats.mask.dtype)
        k1 = torch.where(prefix, stats.teacher_log_probs - stats.student_log_probs.detach(), 0.0)
        engine_gap = torch.where(prefix, (batch["rollout_log_probs"] - stats.teacher_log_probs).abs(), 0.0)
        report["prefix_token_fraction"] = torch.stack([prefix_tokens, stats.mask.sum()])
        report["prefix_forward_kl_k1"] = torch.stack([k1.sum(), prefix_tokens])
        report["prefix_teacher_logprob_abs_diff"] = torch.stack([engine_gap.sum(), prefix_tokens])
    report["loss"] = torch.stack([loss_sum.detach().clone(), count.to(loss_sum.dtype)])
    response = stats.mask > 0  # a NaN/Inf per-token loss makes the step's loss non-finite: say how many tokens
    report["nonfinite_token_fraction"] = torch.stack([(~torch.isfinite(token_loss.detach()) & response).sum(),
                                                      response.sum()]).to(loss_sum.dtype)
    return loss_sum, count.to(torch.int), report


def reduce_reports(reports: list[dict], group=None) -> dict[str, float]:
    """Microbatch reports -> one value each: sums over microbatches (and `group`, e.g. data-parallel) divided
    by counts; keys ending in `_max` take the maximum instead; keys whose count is 0 are omitted."""
    return reduce_reports_by_label(reports, [0] * len(reports), 1, group)[0] if reports else {}


def reduce_reports_by_label(reports: list[dict], labels: list[int], num_labels: int, group=None) -> list[dict]:
    """`reduce_reports` per label: result[l] reduces the reports of the microbatches labelled l (e.g. the teacher
    each one reads) over `group`, one all-reduce for all labels; a label with no report anywhere gives {}. Every
    rank of `group` calls it with at least one report, and all reports hold the same keys."""
    keys = sorted(reports[0])
    values = torch.stack([torch.stack([r[k][0] for k in keys]) for r in reports]).double()  # [reports, keys]
    device = values.device
    report_counts = torch.stack([torch.stack([r[k][1] for k in keys]) for r in reports]).double().to(device)
    index = torch.tensor(labels, device=device)
    is_max = torch.tensor([k.endswith("_max") for k in keys], device=device)
    sums = torch.zeros(num_labels, len(keys), dtype=torch.float64, device=device).index_add_(
        0, index, torch.where(is_max, 0.0, values))
    maxima = torch.full((num_labels, len(keys)), -torch.inf, dtype=torch.float64, device=device).index_reduce_(
        0, index, values, "amax")
    counts = torch.zeros_like(sums).index_add_(0, index, report_counts)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(counts, group=group)
    sums, maxima, counts, is_max = sums.tolist(), maxima.tolist(), counts.tolist(), is_max.tolist()
    # A path with no member this step (e.g. nothing correct yet) is left out, not reported as 0.
    return [{k: maxima[label][i] if is_max[i] else sums[label][i] / counts[label][i]
             for i, k in enumerate(keys) if counts[label][i] > 0} for label in range(num_labels)]
