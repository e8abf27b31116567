"""The on-policy distillation loop: rollout -> verify -> score -> Megatron forward/backward -> step -> sync.

One iteration (every rank runs it; an engine's leader rank drives it, see --rollout-placement):
  1. prompts: the next `prompts_per_step` from the resumable dataset (identical on every rank);
  2. rollout: with --rl-offload-*-during-inference the optimizer state, gradient buffers and forward-only models
     leave the GPUs (`megatron/offload.py`; back after the rollout); every rank of the rollout group frees
     PyTorch's cached device memory; the leader wakes its engine's KV cache, samples G responses per prompt from
     the current student, verifies them, puts the engine to sleep at level 2 (vLLM sleep mode, CUDA; a refit
     always follows) and sends token ids, sampling log-probs and
     outcomes to the ranks it serves, packed in flat tensors (`rollout/wire.py`), each data-parallel replica only
     its own prompt groups. "colocated" (default): one engine per data-parallel replica, led by the
     replica's first rank, generates exactly the replica's prompt groups and sends them inside the replica
     (only per-step scalars cross replicas); "rank0" and "ray": global rank 0 gets the whole step, scatters the
     replicas' shares to their first ranks, and each of those broadcasts its share inside its replica. The step's
     prompt i's sample j has seed hash(--seed, iteration, i, j, "rollout") (`rollout/seeds.py`) under any placement.
     With TrOPD's guidance the teacher's engine first writes prefixes for a share of the prompts, and their
     responses continue them (`rollout/guidance.py`);
  3. each data-parallel rank takes its whole prompt groups (so group statistics need no communication),
     builds [n, seq] tensors and splits them into microbatches;
  4. scoring, forward only: the student's log-probs (temperature 1, or --logprob-temperature as the released
     SCOPE code uses the rollout temperature),
     the co-located teacher's vocabulary-sharded logits or their top-k (and its sampled-token log-probs),
     the reference model's log-probs for ExOPD (`teacher/colocated.py`), or SRPO's self-teacher re-reading the
     failed responses it distils (`teacher/self_teacher.py`; the leader routed them in step 2); then SCOPE's path
     weights and GRPO advantages per group (`megatron/loss_func.add_group_inputs`) and SRPO's entropy-aware weights.
     A remote teacher (a vLLM engine beside each rollout engine, or servers elsewhere: `teacher_engines`, each
     prompt's own) instead scores the responses on the leader in step 2 and sends its sampled-token log-probs
     (k1/k2/k3 estimators, SCOPE's weights) and, for --scope-kl topk, its top-k with the rollouts;
  5. the student's forward/backward with the selected loss (`megatron/loss_func.py`);
  6. the Megatron optimizer step, skipped when the loss or the gradient norm is not finite (then SRPO's EMA
     teacher's update);
  7. after a free of cached device memory, the leader wakes its engine's weights (not yet its KV cache) and the
     new weights stream to it from its own replica's shards (`iter_hf_weights` with the leader as destination ->
     `update_weights`; nothing crosses replicas), also after a skipped step;
  8. logging (last rank: TensorBoard, progress bar, Megatron-style log lines), validation (--eval-interval: the
     engines sample the --eval-data sets, each replica's engine a part of every set; Avg@n / Pass@k per set,
     `validate`) and checkpoints.

--rollout-schedule one-step-off and async (Ray engines only: they have devices of their own and never sleep): the
leader's producer thread (`rollout/producer.py`) runs step 2 for the coming steps while steps 3-6 run, each step's
rollout as soon as the staleness bound η admits it (one-step-off: step k + 1's from the weights before step k; async:
up to --max-staleness steps ahead, greedily); step 7 waits for the rollout in progress. Each group carries the version
of the weights that sampled it (`RolloutGroup.weight_version`), staleness and the sampler-vs-learner gap are logged,
and a checkpoint holds the rollouts produced for the coming steps (`buffer`), so nothing is lost or produced twice on
resume (one-step-off resumes exactly as the uninterrupted run).

Engines on one leader's GPUs (rollout, teacher, reference) share a `DeviceResidency`: at most one is awake.
A failure in a leader (its engine died, a verifier raised) reaches every rank at the end of that phase (one
small all_gather_object per rollout and per weight sync), so no rank waits in a collective for a rank that
stopped; the iteration is not saved. tools/check_config.py estimates each memory term.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import time
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_scope.config import RunConfig
from megatron_scope.eval.runner import EvalConfig, EvalSet, SampleRecord, build_report, sample_and_grade
from megatron_scope.megatron import checkpointing
from megatron_scope.losses.objectives import IS_LOG_RATIO_BOUND, srpo_distill_weights
from megatron_scope.megatron.loss_func import (add_group_inputs, reduce_reports, reduce_reports_by_label,
                                               sampled_by_student)
from megatron_scope.megatron.model import output_layer_weight
from megatron_scope.megatron.offload import RolloutOffload, TeacherTurns
from megatron_scope.megatron.optimizer import guarded_step
from megatron_scope.megatron.parallel import collective_device
from megatron_scope.megatron.schedule import forward_backward
from megatron_scope.megatron.weight_export import iter_hf_weights
from megatron_scope.rollout import wire
from megatron_scope.rollout.batch import (RolloutGroup, build_batch, check_token_ids, longest_sequence,
                                          padded_sequence_length, sequence_multiple, split_by_token_budget, split_rows,
                                          split_runs, token_counts)
from megatron_scope.rollout.buckets import drain
from megatron_scope.rollout.engine import RolloutEngineDiedError, SamplingParams, close_engines
from megatron_scope.rollout.guidance import guidance_alpha, guided_generate
from megatron_scope.rollout.partial import generate_in_segments, token_versions
from megatron_scope.rollout.producer import RolloutProducer
from megatron_scope.rewards.base import STATUS_CORRECT, STATUS_VERIFIER_ERROR, Verdict, Verifier
from megatron_scope.rewards.routing import RoutedVerifier
from megatron_scope.rollout.seeds import StepSeeds
from megatron_scope.teacher.colocated import HostBuffer, log_prob_pass, teacher_pass
from megatron_scope.teacher.remote import score_responses
from megatron_scope.teacher.self_teacher import SelfTeacherRow, route_group, reprompt_builder, self_teacher_pass
from megatron_scope.tracking import ScalarWriters

logger = logging.getLogger("megatron_scope.trainer")

# The log line's method-specific numbers, where the run has them (all are in TensorBoard and the history).
METHOD_LOG_METRICS = (("srpo/distilled_fraction", "SRPO distilled fraction"),
                      ("tropd/guided_fraction", "TrOPD guided fraction"),
                      ("loss/tropd_outlier_fraction", "TrOPD outlier fraction"),
                      ("loss/is_truncated_fraction", "IS truncated fraction"),
                      ("loss/rs_rejected_fraction", "RS rejected fraction"))


def log_line(iteration: int, train_iters: int, metrics: dict) -> str:
    """One iteration's line, in Megatron-LM's training_log layout; a loss no token reached prints NAN."""
    return (f" iteration {iteration:8d}/{train_iters:8d} |"
            f" elapsed time per iteration (ms): {1000 * metrics['time/iteration_s']:.1f} |"
            f" learning rate: {metrics['optimizer/lr']:.3E} |"
            f" loss: {metrics.get('loss/loss', float('nan')):.6E} |"
            f" rollout accuracy: {metrics['rollout/accuracy']:.4f} |"
            + "".join(f" {key.removeprefix('rollout/')}: {value:.4f} |" for key, value in metrics.items()
                      if key.startswith("rollout/accuracy/"))
            + f" response length min/mean/max: {metrics['rollout/response_length_min']:.0f}/"
            f"{metrics['rollout/response_length']:.1f}/{metrics['rollout/response_length_max']:.0f} |"
            + verdict_counts(metrics)
            + "".join(f" {label}: {metrics[key]:.4f} |" for key, label in METHOD_LOG_METRICS if key in metrics)
            + (f" padded token fraction: {metrics['tokens/padding_fraction']:.4f} |"
               if "tokens/padding_fraction" in metrics else "")
            + f" grad norm: {metrics['optimizer/grad_norm']:.4f} |"
            f" non-finite tokens: {metrics.get('loss/nonfinite_token_fraction', 0.0):.4f} |"
            f" number of skipped iterations: {int(metrics['optimizer/skipped_total'])} |")


def validation_line(iteration: int, metrics: dict) -> str:
    """An evaluation's line, in the layout of Megatron-LM's "validation loss at iteration N" block."""
    fields = "".join(f" {key.removeprefix('eval/')}: {value:.4f} |" for key, value in metrics.items()
                     if key.startswith("eval/"))
    rule = "-" * 100
    return f"{rule}\n validation at iteration {iteration} |{fields}\n{rule}"


def verdict_counts(metrics: dict) -> str:
    """The log line's field of the step's verifier statuses other than correct that occurred, e.g.
    " verdicts: wrong 40, no_answer 3, verifier_error 1 |" ("" when every response was correct)."""
    counts = [(key.removeprefix("verifier/"), int(value)) for key, value in metrics.items()
              if key.startswith("verifier/") and key != f"verifier/{STATUS_CORRECT}" and value]
    return f" verdicts: {', '.join(f'{status} {count}' for status, count in counts)} |" if counts else ""


@dataclasses.dataclass
class Rollout:
    """One step's verified prompt groups: `groups[0]` is the step's group `first`; `seconds`: the leader's phase times
    ("busy": all of them; with a producer, "engine_idle": the engines' wait for admission before it). A rank trains
    on its data-parallel replica's share, with `longest`: the tokens of the longest prompt + response that fix the
    batch width (the whole step's; co-located, the replica's). None: `groups` is the whole step (a rank0/Ray
    leader's, one restored from a checkpoint), which `ScopeTrainer._share` cuts."""

    iteration: int
    groups: list[RolloutGroup]
    first: int
    seconds: dict
    longest: int | None = None


@dataclasses.dataclass
class RolloutInFlight:
    """A step's rollout on its way: its prompts are drawn; on the leader, `future` gives (groups, seconds)."""

    iteration: int
    first: int
    future: concurrent.futures.Future | None


class NonFiniteStepError(RuntimeError):
    """Raised with exit_on_nonfinite when a step's loss or gradient norm is NaN/Inf."""


class VerifierError(RuntimeError):
    """Too many of a step's responses ended in the verifier's own error (--max-verifier-error-fraction)."""


def _clip(text: str, limit: int = 200) -> str:
    """`text`, cut to `limit` characters with a marker saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def free_cached_device_memory() -> None:
    """Return the CUDA caching allocator's unused blocks to the device (nothing on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rollout_group(placement: str):
    """(process group, global rank of its leader): the ranks that share one engine's rollouts. "colocated": this
    rank's model-parallel replica (its TP x PP ranks), led by its lowest rank (TP rank 0 of the first stage);
    "rank0" and "ray": every rank (group None), led by global rank 0."""
    if placement == "colocated":
        group = parallel_state.get_model_parallel_group()
        return group, min(dist.get_process_group_ranks(group))
    return None, 0


class ScopeTrainer:
    """Runs `config.loop.train_iters` SCOPE (or baseline) steps; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        student,
        student_arch,
        optimizer,
        scheduler,
        dataset,
        tokenizer,
        verifier: Verifier,
        engine=None,
        teachers: dict | None = None,
        reference=None,
        teacher_engines: dict | None = None,
        ema_teacher=None,
        reference_engine=None,
        eval_sets: Sequence[EvalSet] = (),
    ):
        """`student`: DDP-wrapped GPTModel stage; `teachers` ({--teacher name: model}, or {"teacher": the one}) and
        `reference`: GPTModel stages, forward only, same TP/PP as the student (co-located); `engine`: a RolloutEngine
        on this rank exactly when it is a rollout leader (`rollout_leader`; None elsewhere); `teacher_engines`: instead
        of `teachers`, on the leader, {name: a vLLM engine of the teacher beside the rollout engine, or a
        `teacher.served.ServedTeacher` (its servers elsewhere)}: their `score` / `score_topk` give sampled-token
        log-probs and top-k; a vLLM engine also writes TrOPD's guidance prefixes (also beside co-located teachers);
        `reference_engine`: instead of `reference`, a vLLM engine serving ExOPD's reference beside the rollout engine
        (its `score`); `ema_teacher`: SRPO's EMA self-teacher
        (`teacher.self_teacher.EmaTeacher`, --srpo-teacher ema);
        `verifier` grades the responses (`rewards.base.Verifier`: its statuses are counted every step);
        `tokenizer` decodes responses, gives eos/pad and the vocabulary the loss works over; `eval_sets`: the
        --eval-data sets (`eval.runner.prepare_sets`), which `validate` samples."""
        self.config = config
        self.student, self.arch, self.teachers, self.reference = student, student_arch, dict(teachers or {}), reference
        self.teacher_engines, self.ema_teacher, self.reference_engine = dict(teacher_engines or {}), ema_teacher, \
            reference_engine
        # SRPO's self-teacher: the EMA copy, or the student itself (--srpo-teacher current)
        self.self_teacher = None
        if config.loss.self_teacher:
            self.self_teacher = ema_teacher.model if ema_teacher is not None else student
            self.build_reprompt = reprompt_builder(tokenizer, config.data.prompt_format(),
                                                   config.loss.baselines.srpo_reprompt_template)
        self.optimizer, self.scheduler = optimizer, scheduler
        # the co-located teachers' hidden states of a step, from their scoring passes to the step: one buffer, shared
        # by the step's teachers and reused every step
        self.teacher_hidden_buffer = HostBuffer(pinned=torch.cuda.is_available())  # the models live on CUDA
        # --teacher-residency scoring: the teachers' weights, output layers excepted, wait in host memory outside
        # their own scoring passes
        self.teacher_turns, heads = None, {}
        if config.models.teacher_residency == "scoring":
            heads = {name: [w for w in (output_layer_weight(model),) if w is not None]
                     for name, model in self.teachers.items()}
            self.teacher_turns = TeacherTurns(self.teachers, heads)

        def resident():  # the frozen parameters on the device between steps (read only with the offload flag)
            for name, model in self.teachers.items():
                yield from heads[name] if name in heads else model.parameters()
            for model in (reference, ema_teacher.model if ema_teacher is not None else None):
                yield from model.parameters() if model is not None else ()

        # training state that waits off the GPUs while the engines generate (nothing without the flags)
        self.rollout_offload = RolloutOffload(student, optimizer, resident(), config.rollout.offload_optimizer,
                                              config.rollout.offload_teacher)
        self.dataset, self.tokenizer, self.verifier, self.engine = dataset, tokenizer, verifier, engine
        prompts = getattr(dataset, "prompts", ())
        self.data_source_of = {p.id: p.data_source for p in prompts if p.data_source is not None}
        self.data_sources = sorted(set(self.data_source_of.values()))  # every rank sums them in this order
        self.teacher_names = list(config.models.teacher_dirs) if config.loss.needs_teacher else []
        self.teacher_of = {p.id: p.teacher for p in prompts if p.teacher is not None}  # --teacher-route-key's column
        self._logged_verifier_errors: set[str] = set()  # each distinct error is logged once per run
        self.vocab_size = tokenizer.vocab_size
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.is_logging_rank = self.rank == self.world_size - 1  # Megatron-LM logs from the last rank
        self.rollout_group, self.rollout_leader = rollout_group(config.rollout.placement)
        self.replica_group, self.replica_head = rollout_group("colocated")  # where a replica's share is broadcast
        self.iteration = 0
        self.history: list[dict] = []
        self.eval_sets = list(eval_sets)
        self.eval_config = EvalConfig.of_run(config.validation, config.data, config.loop.seed,
                                             stop_token_ids=(tokenizer.eos_id,), vocab_size=self.vocab_size)
        self.evaluations: list[dict] = []
        """Every validation's metrics with its "iteration" (before that iteration's step: after iteration - 1)."""
        self.buffer: collections.deque[Rollout] = collections.deque()
        """Rollouts of the coming steps restored from a checkpoint (one-step-off and async produce ahead): rank 0, which
        writes checkpoints, holds whole steps, every other rank its shares; the steps consume them first."""
        self._producer: RolloutProducer | None = None  # the leader's, with one-step-off and async (`_produce`)
        self._check_setup()
        if config.loop.save:
            checkpointing.check_writable(config.loop.save)
        self._writers = ScalarWriters(config) if self.is_logging_rank else None  # TensorBoard, W&B

    # ---- set-up checks: all before any rollout ----

    def _check_setup(self) -> None:
        config, leads = self.config, self.rank == self.rollout_leader
        if (self.engine is None) == leads:
            raise ValueError(f"--rollout-placement {config.rollout.placement}: the rollout engine of rank {self.rank} "
                             f"must live on global rank {self.rollout_leader} (rank {self.rank} "
                             f"{'has none' if self.engine is None else 'has one'})")
        engines = [name for name in config.models.teacher_dirs
                   if name in config.engine_teachers + config.teachers_on("server")] if leads else []
        if list(self.teacher_engines) != engines:
            raise ValueError(f"--teacher-backend {config.models.teacher_backend}: rank {self.rank} has teacher engines "
                             f"{list(self.teacher_engines)}, not {engines} (they live beside each rollout engine "
                             "exactly when the objective reads a vLLM teacher, served or not, or TrOPD's guidance "
                             "writes prefixes)")
        expected = config.teachers_on("megatron")
        if list(self.teachers) != expected:
            raise ValueError(f"--scope-algorithm {config.loss.algorithm} with --teacher-backend "
                             f"{config.models.teacher_backend} needs the co-located teachers {expected} (--teacher-hf or "
                             f"--teacher); the trainer got {list(self.teachers)}")
        if (self.ema_teacher is not None) != config.loss.ema_teacher:
            raise ValueError(f"--srpo-teacher {config.loss.baselines.srpo_teacher}: the trainer "
                             f"{'got' if self.ema_teacher is not None else 'lacks'} an EMA teacher")
        if (self.reference is not None) != config.colocated_reference:
            raise ValueError(f"--scope-algorithm {config.loss.algorithm} with --exopd-reference-backend "
                             f"{config.models.reference_backend} {'needs' if config.colocated_reference else 'takes no'} "
                             "co-located reference model (--exopd-reference-hf, or the initial student)")
        if (self.reference_engine is not None) != (leads and config.remote_reference):
            raise ValueError(f"--exopd-reference-backend {config.models.reference_backend}: rank {self.rank} "
                             f"{'has' if self.reference_engine is not None else 'lacks'} a reference engine (one lives "
                             "beside each rollout engine exactly when ExOPD's reference is served by vLLM)")
        errors = config.batch_errors(self.dp_size)
        if errors:
            raise ValueError(errors[0])
        peers = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
        heads = self.rank == self.replica_head
        if config.rollout.placement != "colocated" and heads != (self.rollout_leader in peers):
            raise ValueError(f"rank {self.rank}: the first ranks of the model-parallel replicas, which receive their "
                             f"replica's rollout share from rank {self.rollout_leader}, must be its data-parallel "
                             f"group (this rank's replica starts at rank {self.replica_head}, its data-parallel group "
                             f"is {peers})")
        self._check_prompts()
        self._check_eval_sets()
        if self.self_teacher is not None:
            self._check_reprompts()

    def _check_prompts(self) -> None:
        """Every prompt fits the student's context with max_new_tokens, and its ids are in the vocabulary."""
        context, vocab, max_new_tokens = self.arch.max_position_embeddings, self.vocab_size, self.config.rollout.max_new_tokens
        source = getattr(self.dataset, "source", "the dataset")
        for prompt in getattr(self.dataset, "prompts", ()):
            ids = prompt.token_ids
            if ids is None:
                continue
            if len(ids) + max_new_tokens > context:
                raise ValueError(f"prompt {prompt.id!r} ({source}) has {len(ids)} tokens: with max_new_tokens "
                                 f"{max_new_tokens} it needs {len(ids) + max_new_tokens} "
                                 f"positions, more than the student's context of {context} (max_position_embeddings)")
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise ValueError(f"prompt {prompt.id!r} ({source}) has token ids outside the vocabulary [0, {vocab}): "
                                 f"{[t for t in ids if not 0 <= t < vocab][:5]}")

    def _check_eval_sets(self) -> None:
        """The --eval-data sets are the configured ones, their prompts fit the context with --eval-max-new-tokens,
        and every --reward-by-source source is a training row's or an eval set's."""
        names = [name for name, _ in self.config.validation.data]
        if [s.name for s in self.eval_sets] != names:
            raise ValueError(f"--eval-data names sets {names}; the trainer got {[s.name for s in self.eval_sets]}")
        context, max_new_tokens = self.arch.max_position_embeddings, self.config.validation.max_new_tokens
        for eval_set in self.eval_sets:
            for problem, ids in zip(eval_set.problems, eval_set.prompt_token_ids):
                if len(ids) + max_new_tokens > context:
                    raise ValueError(f"--eval-data {eval_set.name}: problem {problem.id!r} has {len(ids)} prompt "
                                     f"tokens: with --eval-max-new-tokens {max_new_tokens} it needs "
                                     f"{len(ids) + max_new_tokens} positions, more than the student's {context}")
                if min(ids) < 0 or max(ids) >= self.vocab_size:
                    raise ValueError(f"--eval-data {eval_set.name}: problem {problem.id!r} has token ids outside the "
                                     f"vocabulary [0, {self.vocab_size})")
        sources = set(self.data_sources) | set(names)
        unknown = [source for source, _ in self.config.data.reward_by_source if source not in sources]
        if unknown:
            raise ValueError(f"--reward-by-source names data source(s) {unknown} that no training row (--data-source-key "
                             f"{self.config.data.data_source_key}) and no --eval-data set has; known: {sorted(sources)}")

    def _check_reprompts(self) -> None:
        """SRPO's re-prompt tokenizes for every prompt (its template's text too: ValueError naming what the tokenizer
        cannot encode), and a warning when even an empty demonstration leaves no room for two responses of
        --max-new-tokens (such failures go to GRPO; `srpo/reprompt_too_long_fraction` counts them)."""
        template = self.config.loss.baselines.srpo_reprompt_template
        longest = 0
        for prompt in getattr(self.dataset, "prompts", ()):
            try:
                longest = max(longest, len(self.build_reprompt(prompt.prompt, "")))
            except ValueError as error:
                raise ValueError(f"--srpo-reprompt-template {template!r} for prompt {prompt.id!r}: {error}") from None
        room = self.arch.max_position_embeddings - longest
        if longest and room < 2 * self.config.rollout.max_new_tokens:
            logger.warning("SRPO: the longest re-prompt (%d tokens with an empty demonstration) leaves %d of %d "
                           "positions for a demonstration and a response of up to --max-new-tokens %d each; failures "
                           "whose re-prompt does not fit are trained with GRPO", longest, room,
                           self.arch.max_position_embeddings, self.config.rollout.max_new_tokens)

    # ---- one iteration ----

    def _rollout(self, iteration: int) -> Rollout:
        """The sync schedule's rollout of step `iteration`: the training state offloaded (--rl-offload-*), cached
        device memory freed, the leader produces its share while every rank it serves waits."""
        self.rollout_offload.offload()
        try:
            self._free_device_memory()
            return self._finish_rollout(self._start_rollout(iteration))
        finally:
            self.rollout_offload.restore()

    def _start_rollout(self, iteration: int) -> RolloutInFlight:
        """Every rank draws step `iteration`'s prompts; the leader samples, verifies and scores its share
        (`_sample_verify_score`) from the engine's weights, those of iteration `self.iteration`."""
        per_step = self.config.rollout.prompts_per_step
        prompts = self.dataset.next_batch(per_step)
        first, count = (0, per_step)
        if self.config.rollout.placement == "colocated":
            count = per_step // self.dp_size
            first = self.dp_rank * count
        future = None
        if self.rank == self.rollout_leader:
            future = concurrent.futures.Future()
            try:
                future.set_result(self._sample_verify_score(prompts[first:first + count], first, iteration,
                                                            self.iteration))
            except Exception as caught:  # noqa: BLE001 - every rank raises it in _finish_rollout
                future.set_exception(caught)
        return RolloutInFlight(iteration, first, future)

    def _produce(self, iteration: int, weight_version: int, engine_idle_s: float) -> tuple[list[RolloutGroup], dict]:
        """The producer's rollout of step `iteration` (one-step-off, async; the leader of Ray engines, which serves the
        whole step): its prompts drawn here, in iteration order, then `_sample_verify_score` (with partial rollouts,
        refits may come between its segments)."""
        prompts = self.dataset.next_batch(self.config.rollout.prompts_per_step)
        groups, seconds = self._sample_verify_score(prompts, 0, iteration, weight_version,
                                                    self._producer.between_segments)
        return groups, {**seconds, "engine_idle": engine_idle_s}

    def _start_producer(self, iteration: int) -> None:
        """The leader's producer, started at this run's first step `iteration` (the engines hold the weights of
        version iteration - 1), from the first step the restored `buffer` does not cover."""
        rollout = self.config.rollout
        self._producer = RolloutProducer(self._produce, rollout.staleness_bound, first=iteration + len(self.buffer),
                                         last=self.config.loop.train_iters, version=iteration - 1,
                                         ordered=rollout.schedule == "one-step-off")
        self._producer.start()  # after the assignment: `_produce` reads it

    def _holding_engines(self, new_version: int | None = None, interrupt: bool = False):
        """The engines for the trainer's own use (a refit to `new_version`, a validation, a checkpoint's snapshot),
        free of the producer's rollouts (`RolloutProducer.holding_engines`; `interrupt`: between two segments of a
        partial rollout); no wait without a producer."""
        if self._producer is None:
            return contextlib.nullcontext()
        return self._producer.holding_engines(new_version, interrupt)

    def _finish_rollout(self, in_flight: RolloutInFlight) -> Rollout:
        """Every rank the leader serves: wait for the leader's rollout and receive this rank's data-parallel share of
        it, packed (`wire.pack`; all raise if the leader failed). Co-located, the leader's groups are its replica's
        share, broadcast inside the replica; rank0/Ray, the leader's are the whole step: `wire.deliver` scatters
        each replica's share to its first rank, which broadcasts it inside its replica."""
        shares, error = None, None
        if in_flight.future is not None:
            try:
                groups, seconds = in_flight.future.result()
                if self.config.rollout.placement == "colocated":
                    shares = [wire.pack(groups, (in_flight.first, longest_sequence(groups), seconds))]
                else:
                    whole = Rollout(in_flight.iteration, groups, in_flight.first, seconds)
                    shares = [wire.pack(share.groups, (share.first, share.longest, seconds))
                              for share in self._shares(whole)]
            except Exception as caught:  # noqa: BLE001 - every rank raises it in _raise_if_any_failed
                error = caught
        self._raise_if_any_failed(error, "rollout")
        scatter = {}
        if self.config.rollout.placement != "colocated" and self.dp_size > 1 and self.rank == self.replica_head:
            scatter = dict(scatter_group=parallel_state.get_data_parallel_group(), scatter_source=self.rollout_leader)
        buffer = wire.deliver(shares, collective_device(), self.replica_group, self.replica_head, **scatter)
        groups, (first, longest, seconds) = wire.unpack(buffer)
        return Rollout(in_flight.iteration, groups, first, seconds, longest)

    def _shares(self, rollout: Rollout) -> list[Rollout]:
        """Every data-parallel rank's share of a whole step's `rollout`, in rank order, each with the whole step's
        `longest` (read once)."""
        per_rank = self.config.rollout.prompts_per_step // self.dp_size
        longest = longest_sequence(rollout.groups)
        return [Rollout(rollout.iteration, rollout.groups[first - rollout.first : first - rollout.first + per_rank],
                        first, rollout.seconds, longest) for first in range(0, self.dp_size * per_rank, per_rank)]

    def _share(self, rollout: Rollout) -> Rollout:
        """This rank's share of `rollout` (`_shares`); a share is returned as it is."""
        return rollout if rollout.longest is not None else self._shares(rollout)[self.dp_rank]

    def _rollout_metrics(self, rollout: Rollout) -> dict:
        """Accuracy (and per data source), length (mean, min, max), truncation, the staleness of the weights that
        sampled (optimizer steps behind the ones it trains: min, mean, max) and the count of each verifier status over
        the whole step (each rank holds its data-parallel share: counts summed, extremes reduced over the replicas)
        and the slowest engine's times; stops the run when the verifier failed on too many responses
        (`_check_verifier_errors`)."""
        groups, seconds, iteration = rollout.groups, rollout.seconds, rollout.iteration
        completions = [c for g in groups for c in g.completions]
        lengths = [len(c.token_ids) for c in completions]
        staleness = [self.iteration - g.weight_version for g in groups]
        statuses = self.verifier.statuses
        bound = self.config.rollout.staleness_bound
        sums = [sum(o for g in groups for o in g.correct), len(completions), sum(lengths),
                sum(c.finish_reason == "length" for c in completions),
                sum(s * len(g.completions) for s, g in zip(staleness, groups)),
                sum(len(g.completions) for g, lag in zip(groups, staleness) if lag == bound)]
        for source in self.data_sources:  # correct and sampled responses of each source
            mine = [g for g in groups if self.data_source_of[g.prompt_id] == source]
            sums += [sum(o for g in mine for o in g.correct), sum(len(g.correct) for g in mine)]
        routed = self.teacher_names if len(self.teacher_names) > 1 else []
        for name in routed:  # correct and sampled responses of each teacher's prompts
            mine = [g for g in groups if self._teacher(g.prompt_id) == name]
            sums += [sum(o for g in mine for o in g.correct), sum(len(g.correct) for g in mine)]
        extra = len(sums)  # the method's counts start here
        if self.config.loss.tropd_guidance:  # TrOPD's guided responses (a prefix of at least one token)
            sums.append(sum(k > 0 for g in groups for k in g.prefix_lengths))
        if self.self_teacher is not None:  # SRPO's routing: distilled, no demonstration, re-prompt too long
            routes = [(ok, prompt is not None, any(g.correct)) for g in groups
                      for ok, prompt in zip(g.correct, g.self_teacher_prompts)]
            sums += [sum(d for _, d, _ in routes), sum(not ok and not sibling for ok, _, sibling in routes),
                     sum(not ok and sibling and not d for ok, d, sibling in routes)]
        partial_at = len(sums)
        if self.config.rollout.partial_rollout_tokens is not None:  # responses a refit interrupted; token staleness
            runs = [token_versions(c, g.weight_version) for g in groups for c in g.completions]
            sums += [sum(len(r) > 1 for r in runs), sum(k * (self.iteration - v) for r in runs for k, v in r)]
        sums += [sum(v.status == status for g in groups for v in g.verdicts) for status in statuses]  # last
        times = [seconds["rollout"], seconds.get("teacher_score", 0.0), seconds.get("reference_score", 0.0),
                 max(lengths), -min(lengths), max(staleness), -min(staleness)]  # reduced with MAX: minus the least
        if self.dp_size > 1:
            device, group = collective_device(), parallel_state.get_data_parallel_group()
            totals = torch.tensor(sums, dtype=torch.float64, device=device)
            slowest = torch.tensor(times, dtype=torch.float64, device=device)
            dist.all_reduce(totals, group=group)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
            sums, times = totals.tolist(), slowest.tolist()
        correct, samples, tokens, truncated, stale, at_bound = sums[:6]
        counts = dict(zip(statuses, sums[len(sums) - len(statuses):]))
        self._check_verifier_errors(groups, counts.get(STATUS_VERIFIER_ERROR, 0.0), samples, iteration)
        stats = {
            "rollout/accuracy": correct / samples,
            "rollout/response_length": tokens / samples,
            "rollout/response_length_min": -times[4],
            "rollout/response_length_max": times[3],
            "rollout/truncated_fraction": truncated / samples,
            "rollout/staleness_min": -times[6],
            "rollout/staleness_mean": stale / samples,
            "rollout/staleness_max": times[5],
            "time/rollout_s": times[0],
            "throughput/rollout_tokens_per_s": tokens / max(times[0], 1e-9),
        }
        stats.update({f"verifier/{status}": float(count) for status, count in counts.items()})
        if "teacher_score" in seconds:
            stats["time/teacher_score_s"] = times[1]
        if "reference_score" in seconds:
            stats["time/reference_score_s"] = times[2]
        if self.config.rollout.schedule != "sync":
            stats["rollout/staleness_at_bound_fraction"] = at_bound / samples
        for i, source in enumerate(self.data_sources):  # a source none of the step's prompts came from: NaN
            source_correct, source_samples = sums[6 + 2 * i:8 + 2 * i]
            stats[f"rollout/accuracy/{source}"] = source_correct / source_samples if source_samples else float("nan")
        for i, name in enumerate(routed):  # a teacher none of the step's prompts went to: accuracy NaN
            teacher_correct, teacher_samples = sums[6 + 2 * (len(self.data_sources) + i):][:2]
            stats[f"teacher/{name}/prompt_fraction"] = teacher_samples / samples  # G responses per prompt
            stats[f"teacher/{name}/accuracy"] = teacher_correct / teacher_samples if teacher_samples else float("nan")
        if self.config.loss.tropd_guidance:
            stats["tropd/guided_fraction"] = sums[extra] / samples
            stats["tropd/prefix_alpha"] = guidance_alpha(iteration, self.config.loop.train_iters)
        if self.config.rollout.partial_rollout_tokens is not None:
            stats["rollout/interrupted_fraction"] = sums[partial_at] / samples
            stats["rollout/staleness_token_mean"] = sums[partial_at + 1] / tokens
        if self.self_teacher is not None:
            stats["srpo/distilled_fraction"] = sums[extra] / samples
            stats["srpo/failed_without_demonstration_fraction"] = sums[extra + 1] / samples
            stats["srpo/reprompt_too_long_fraction"] = sums[extra + 2] / samples
        return stats

    def _sample_verify_score(self, prompts, first: int, iteration: int, weight_version: int,
                             between_segments=None) -> tuple[list[RolloutGroup], dict]:
        """The leader: sample G responses per prompt (prompt k is the step's prompt `first + k`, which fixes its
        seeds) from the engine's weights (those of iteration `weight_version`; with --partial-rollout-tokens in
        segments, `between_segments()` giving each later segment's version), verify them, score them with the teacher
        engine if any, and let both engines sleep."""
        rollout = self.config.rollout
        start = time.perf_counter()
        params = SamplingParams(n=rollout.group_size, max_new_tokens=rollout.max_new_tokens,
                                temperature=rollout.temperature, top_p=rollout.top_p,
                                stop_token_ids=(self.tokenizer.eos_id,),
                                vocab_size=self.vocab_size, props=rollout.props)  # no extra embedding rows
        prompt_ids, indices = [list(p.token_ids) for p in prompts], range(first, first + len(prompts))
        seeds = StepSeeds(self.config.loop.seed, iteration)
        prefix_lengths = [None] * len(prompts)
        samples, graded = [None] * len(prompts), [None] * len(prompts)  # per prompt: its group, (texts, verdicts)
        if self.config.loss.tropd_guidance:  # some responses continue a teacher's prefix (it wakes each engine)
            samples, prefix_lengths = guided_generate(
                self.engine, [self.teacher_engines[self._teacher(p.id)] for p in prompts], prompt_ids, indices,
                params, seeds,
                self.config.loss.baselines.tropd_prefix_fraction,
                guidance_alpha(iteration, self.config.loop.train_iters))
        else:
            self.engine.wake(["kv_cache"])  # its weights woke for the refit
            if rollout.partial_rollout_tokens is None:  # each engine's share graded while the others generate
                for share, groups in self.engine.generate_shares(prompt_ids, params,
                                                                 seeds.groups(indices, params.n, "rollout")):
                    for i, group, grades in zip(share, groups, self._grade([prompts[i] for i in share], groups)):
                        samples[i], graded[i] = group, grades
            else:  # async's producer: refits may come between segments
                samples = generate_in_segments(self.engine, prompt_ids, params, seeds, indices,
                                               rollout.partial_rollout_tokens, weight_version, between_segments)
        if self.config.rollout.schedule == "sync":  # a refit follows every step, a skipped one included: nothing to
            self.engine.sleep(level=2)  # keep (one-step-off: Ray engines keep their own devices and generate again)
        seconds = {"rollout": time.perf_counter() - start}
        if graded[0] is None:
            graded = self._grade(prompts, samples)
        texts = [text for group_texts, _ in graded for text in group_texts]
        verdicts = [verdict for _, group_verdicts in graded for verdict in group_verdicts]
        correct = [verdict.correct for verdict in verdicts]
        def scored_by(engine, timer: str, scored_prompts, scored_samples, topk: int = 0):
            """`engine`'s view of the responses of `scored_prompts` (`score_responses`), the engine awake only
            meanwhile; its seconds add to `seconds[timer]`."""
            begin = time.perf_counter()
            free_cached_device_memory()
            engine.wake()
            scores = score_responses(engine, [p.id for p in scored_prompts], [p.token_ids for p in scored_prompts],
                                     scored_samples, topk=topk, vocab_size=self.vocab_size)
            engine.sleep()
            seconds[timer] = seconds.get(timer, 0.0) + time.perf_counter() - begin
            return scores

        teacher_scores = reference_scores = [None] * len(prompts)
        if self.config.remote_teacher:  # each prompt's responses by its own teacher (a co-located one's: later)
            teacher_scores = [None] * len(prompts)
            for name in self.config.teachers_on("vllm", "server"):
                engine = self.teacher_engines[name]
                mine = [i for i, p in enumerate(prompts) if self._teacher(p.id) == name]
                if mine:
                    scores = scored_by(engine, "teacher_score", [prompts[i] for i in mine], [samples[i] for i in mine],
                                       self.config.loss.teacher_topk)
                    for i, score in zip(mine, scores):
                        teacher_scores[i] = score
        if self.reference_engine is not None:  # ExOPD's reference, served by vLLM: its sampled-token log-probs
            reference_scores = scored_by(self.reference_engine, "reference_score", prompts, samples)
        n = rollout.group_size
        self_teacher_prompts = [None] * len(prompts)
        if self.self_teacher is not None:
            self_teacher_prompts = [
                route_group(p.prompt, [c.token_ids for c in group], texts[i * n : (i + 1) * n],
                            correct[i * n : (i + 1) * n], self.build_reprompt, self.arch.max_position_embeddings)
                for i, (p, group) in enumerate(zip(prompts, samples))]
        groups = [RolloutGroup(p.id, list(p.token_ids), group, correct[i * n : (i + 1) * n], teacher_scores[i],
                               self_teacher_prompts[i], prefix_lengths[i], reference_scores[i],
                               verdicts[i * n : (i + 1) * n], weight_version)
                  for i, (p, group) in enumerate(zip(prompts, samples))]
        check_token_ids(groups, self.vocab_size)
        seconds["busy"] = time.perf_counter() - start
        return groups, seconds

    def _grade(self, prompts, samples: list[list]) -> list[tuple[list[str], list[Verdict]]]:
        """Each prompt's (response texts, verdicts): its G responses decoded and graded against its gold answer (by
        its source's verifier with --reward-by-source), the verdicts checked (`_check_verdicts`)."""
        n = self.config.rollout.group_size
        texts = [self.tokenizer.decode(c.token_ids) for group in samples for c in group]
        answers = [p.answer for p in prompts for _ in range(n)]
        if isinstance(self.verifier, RoutedVerifier):  # each response graded by its prompt's source's verifier
            sources = [self.data_source_of.get(p.id) for p in prompts for _ in range(n)]
            verdicts = self.verifier.judge_batch(texts, answers, sources)
        else:
            verdicts = self.verifier.judge_batch(texts, answers)
        self._check_verdicts(verdicts, texts, answers)
        return [(texts[i * n:(i + 1) * n], verdicts[i * n:(i + 1) * n]) for i in range(len(prompts))]

    def _check_verdicts(self, verdicts: Sequence[Verdict], texts: Sequence[str], answers: Sequence[str]) -> None:
        """The leader: one verdict per response, each status one of the verifier's; a WARNING the first time each
        distinct verifier error occurs, with the answer (or the response) and the gold, truncated."""
        name, statuses = self.verifier.name, self.verifier.statuses
        if len(verdicts) != len(texts):
            raise RuntimeError(f"verifier {name}: {len(verdicts)} verdicts for {len(texts)} responses")
        unknown = sorted({v.status for v in verdicts} - set(statuses))
        if unknown:
            raise RuntimeError(f"verifier {name} returned status(es) {unknown} outside its statuses {statuses}")
        for verdict, text, gold in zip(verdicts, texts, answers):
            if verdict.status == STATUS_VERIFIER_ERROR and verdict.error not in self._logged_verifier_errors:
                self._logged_verifier_errors.add(verdict.error)
                answer = verdict.answer if verdict.answer is not None else text
                logger.warning("verifier %s failed (%s) on answer %r, gold %r; such answers count as incorrect "
                               "(verifier/verifier_error), and the run stops when they exceed "
                               "--max-verifier-error-fraction of a step", name, verdict.error, _clip(answer),
                               _clip(gold))

    def _check_verifier_errors(self, groups: list[RolloutGroup], errors: float, samples: float, iteration: int) -> None:
        """Every rank: stop the run (VerifierError naming the verifier and the step's first error message) when more
        than --max-verifier-error-fraction of the step's responses ended in the verifier's own error. `errors` and
        `samples` are the step's totals, the same on every rank."""
        limit = self.config.data.max_verifier_error_fraction
        if errors <= limit * samples:
            return
        first = next((v.error for g in groups for v in g.verdicts if v.status == STATUS_VERIFIER_ERROR), None)
        if self.dp_size > 1:  # each replica holds its own share
            firsts = [None] * self.dp_size
            dist.all_gather_object(firsts, first, group=parallel_state.get_data_parallel_group())
            first = next(message for message in firsts if message is not None)
        self._raise_if_any_failed(VerifierError(
            f"verifier {self.verifier.name}: {int(errors)} of {int(samples)} responses of iteration {iteration} "
            f"({errors / samples:.1%}) ended in the verifier's own error, more than --max-verifier-error-fraction "
            f"{limit}; the first: {first}"), "verification")

    def _raise_if_any_failed(self, error: BaseException | None, phase: str) -> None:
        """Every rank learns whether any rank failed in `phase` (one all_gather_object of None or the error's
        text) and raises: the failing rank its own error, the others one naming it (RolloutEngineDiedError
        when that is what it was), so no rank waits in a collective for a rank that stopped.

        Each rank logs the error it raises before a last barrier: a traceback prints only after `close` has shut
        the rank's engines down (seconds), and torchrun SIGTERMs the ranks still running once one has exited."""
        reports = [None] * self.world_size
        dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)))
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        if error is None:
            rank, (name, text) = failed[0]
            kind = RolloutEngineDiedError if name == RolloutEngineDiedError.__name__ else RuntimeError
            error = kind(f"rank {rank}'s {phase} failed: {name}: {text}")
        logger.error("rank %d stops: %s: %s", self.rank, type(error).__name__, error)
        dist.barrier()
        raise error

    def _score(self, microbatches: list[dict], owners: list[str | None],
               self_teacher_rows: list[SelfTeacherRow] | None = None) -> None:
        """Add the loss inputs to the last stage's microbatches (forward passes run on every stage): the student's
        temperature-1 log-probs, the co-located teachers' view (`owners`: the teacher each microbatch reads) or SRPO's
        self-teacher's (`self_teacher_rows`: the local batch's rows), the reference's log-probs, then the group inputs
        (SCOPE's weights, advantages) and SRPO's entropy-aware weights."""
        student = log_prob_pass(self.student, microbatches, self.vocab_size,
                                temperature=self.config.loss.logprob_temperature)
        teacher = []
        if self.self_teacher is not None:
            teacher = self_teacher_pass(self.self_teacher, microbatches, self_teacher_rows,
                                        self.config.loop.micro_batch_size, self.vocab_size, self.tokenizer.pad_id)
        elif self.teachers and self.is_last_stage:
            teacher = [None] * len(microbatches)
        self.teacher_hidden_buffer.new_step()  # the last step's hidden states are read: each teacher's go after
        for name, model in self.teachers.items():  # each teacher over its own microbatches, one after the other
            mine = [i for i, owner in enumerate(owners) if owner == name]
            if mine:
                with self.teacher_turns.on_device(name) if self.teacher_turns else contextlib.nullcontext():
                    views = teacher_pass(model, [microbatches[i] for i in mine], self.config.loss, self.vocab_size,
                                         self.teacher_hidden_buffer)
                for i, view in zip(mine, views):  # nothing off the last stage
                    teacher[i] = view
        reference = log_prob_pass(self.reference, microbatches, self.vocab_size) if self.reference is not None else []
        if not self.is_last_stage:
            return
        for i, batch in enumerate(microbatches):
            batch["old_log_probs"] = student[i][1]
            if teacher and teacher[i] is not None:  # None: a remote teacher's microbatch (scored at the rollout)
                batch.update(teacher[i])
            if reference:
                batch["ref_log_probs"] = reference[i][1]
        if self.config.loss.tropd_sampled_trust_region:
            # TrOPD's acceptance draws: one per token, the same on every TP rank of this replica, new each step
            generator = torch.Generator().manual_seed(
                (self.config.loop.seed * 1_000_003 + self.iteration) * 1_009 + self.dp_rank)
            for batch in microbatches:
                batch["trust_uniform"] = torch.rand(batch["labels"].shape, generator=generator).to(
                    batch["labels"].device)
        add_group_inputs(microbatches, self.config.loss, parallel_state.get_data_parallel_group())
        if self.config.loss.algorithm == "srpo":
            weights = srpo_distill_weights([b.pop("teacher_entropy") for b in microbatches],
                                           [b["loss_mask"] * b["distilled"][:, None] for b in microbatches],
                                           self.config.loss.baselines.srpo_beta,
                                           parallel_state.get_data_parallel_group())
            for batch, w in zip(microbatches, weights):
                batch["distill_weights"] = w

    def _teacher(self, prompt_id: str) -> str | None:
        """The teacher a prompt is distilled from: its --teacher-route-key value, else the one teacher (None when the
        objective reads none)."""
        if not self.teacher_names:
            return None
        return self.teacher_of[prompt_id] if self.config.data.teacher_route_key else self.teacher_names[0]

    def _sampler_gap(self, microbatches: list[dict], prefix_statistics: list[tuple]) -> dict:
        """How far the sampler μ (the engine's log-probs) lies from the learner π (Megatron's `old_log_probs`, the
        weights about to be updated) on the response tokens the student's engine drew, over the whole step:
        mean |log μ - log π| (and the largest data-parallel rank's own mean: with co-located engines the worst
        engine's), the KL(μ || π) estimates k1 = E_μ[log μ - log π] and k3 = E_μ[r - 1 - log r] with r = π / μ
        (Schulman's estimators), the importance weights' effective sample size as a fraction of the tokens,
        (Σ r)² / (N Σ r²), and the mean and largest behaviour ratio μ / π (PROPS's π_b / π_θ).

        When --logprob-temperature equals the rollout temperature and top-p is 1, the sync schedule samples from the
        weights it trains and all are ~0 (ESS 1, ratio 1) up to numerics: a large gap then means an engine samples
        from other weights than the ones being trained. With --rollout-schedule one-step-off they measure one step's
        drift; with --rollout-sampler props the behaviour policy's deliberate gap (ratios within [1 - ε, 1 + ε]).

        Also PROPS's sampling error: Σ_s N_s KL(p̂_s || π_s) / Σ_s N_s over the prefixes s the step's groups share
        (`rollout.props.prefix_statistics`: the mean of log p̂ - log π over the tokens drawn there), and the share of
        the drawn tokens that were drawn at a shared prefix (`prefix_statistics`: per microbatch, build_batch's
        shared_prefix and empirical_log_probs).
        """
        sampled = [sampled_by_student(b) for b in microbatches]  # TrOPD's prefix tokens were sampled by the teacher
        sums = []  # per microbatch: Σ|d|, Σ d, Σ k3, Σ r, Σ r², count, Σ 1/r, shared count, Σ shared (log p̂ - log π)
        worst = []  # per microbatch: the largest 1/r = μ / π
        for batch, mask, (shared, empirical) in zip(microbatches, sampled, prefix_statistics, strict=True):
            gap = torch.where(mask.bool(), batch["rollout_log_probs"] - batch["old_log_probs"], 0.0).double()
            ratio = torch.exp((-gap).clamp(-IS_LOG_RATIO_BOUND, IS_LOG_RATIO_BOUND)) * mask
            behaviour = torch.exp(gap.clamp(-IS_LOG_RATIO_BOUND, IS_LOG_RATIO_BOUND)) * mask
            shared = shared & mask.bool()
            error = torch.where(shared, empirical - batch["old_log_probs"], 0.0).double()
            sums.append(torch.stack([gap.abs().sum(), gap.sum(), ((ratio - 1 + gap) * mask).sum(), ratio.sum(),
                                     (ratio * ratio).sum(), mask.sum().double(), behaviour.sum(),
                                     shared.sum().double(), error.sum()]))
            worst.append(behaviour.max() if behaviour.numel() else behaviour.new_zeros(()))
        totals = torch.stack(sums).sum(0)  # no host read before the reduction
        group, device = parallel_state.get_data_parallel_group(), collective_device()
        worst = torch.stack([totals[0] / totals[5].clamp_min(1.0), torch.stack(worst).max()]).to(device)
        totals = totals.to(device)
        dist.all_reduce(totals, group=group)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        abs_gap, k1, k3, ratio, ratio_squared, count, behaviour, shared, error = totals.tolist()
        count = max(count, 1.0)
        return {"rollout/logprob_abs_diff": abs_gap / count, "rollout/logprob_abs_diff_max": float(worst[0]),
                "rollout/sampler_kl_k1": k1 / count, "rollout/sampler_kl_k3": k3 / count,
                "rollout/is_ess_fraction": ratio * ratio / max(count * ratio_squared, 1e-300),
                "rollout/behaviour_ratio_mean": behaviour / count, "rollout/behaviour_ratio_max": float(worst[1]),
                "rollout/sampling_error": error / max(shared, 1.0), "rollout/shared_prefix_fraction": shared / count}

    def _token_counts(self, batch: dict, microbatches: list[dict]) -> dict:
        """`token_counts` summed over the data-parallel replicas, and the share of padding."""
        counts = torch.stack(token_counts(batch, microbatches)).to(collective_device(), torch.float64)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        real, padded = counts.tolist()
        return {"tokens/real": real, "tokens/padded": padded, "tokens/padding_fraction": 1.0 - real / max(padded, 1.0)}

    def _free_device_memory(self) -> None:
        """Every rank that shares the engine's GPUs returns PyTorch's cached blocks to the device before the engine
        wakes (vLLM allocates outside PyTorch's allocator, in its own processes); the barrier over the rollout group
        puts the leader's wake after every rank's free (on CPU only the barrier runs, so CI runs the order)."""
        free_cached_device_memory()
        dist.barrier(group=self.rollout_group)

    def sync_weights(self, version: int | None = None) -> float:
        """Wake the engine's weights (its KV cache wakes for the next rollout, after the refit) and stream the
        student's weights into them from this replica's own shards (every rank of the replica takes part; with
        "rank0"/"ray" only the replica of global rank 0); with a producer, once its rollout in progress has ended,
        and `version` (the optimizer steps the weights have taken) admits the rollouts it allows. Returns seconds."""
        start = time.perf_counter()
        self._free_device_memory()
        stream = iter_hf_weights(self.student, self.arch, bucket_bytes=self.config.loop.weight_sync_bucket_mib << 20,
                                 dst_rank=self.rollout_leader)
        error = None
        if self.engine is not None:
            try:
                with self._holding_engines(version, interrupt=True):
                    self.engine.wake(["weights"])
                    self.engine.update_weights(stream)
            except Exception as caught:  # noqa: BLE001 - every rank raises it in _raise_if_any_failed
                error = caught
        drain(stream)  # the rest of the replica is inside the stream's collectives
        self._raise_if_any_failed(error, "weight sync")
        return time.perf_counter() - start

    @contextlib.contextmanager
    def awake_engine(self):
        """The rollout engine, refit from the student's current weights and awake, for a caller's own `generate`
        calls between steps (evaluation); asleep at level 2 again afterwards. Every rank of the replica enters it
        (the refit's collectives); the engine is None on ranks that do not lead one."""
        self.sync_weights()
        self._free_device_memory()
        if self.engine is not None:
            self.engine.wake(["kv_cache"])
        try:
            yield self.engine
        finally:
            if self.engine is not None:
                self.engine.sleep(level=2)

    def validate(self) -> dict:
        """Evaluate the student's current weights on the --eval-data sets and return {eval/<set>/avg@n,
        eval/<set>/pass@k, time/eval_s} (every rank). Each rollout engine samples and grades its part of every set
        (co-located: replica r of D takes part r of D; one engine otherwise), each problem seeded by its index in its
        set (`eval.runner.sample_and_grade`), so the numbers are tools/eval.py's on this checkpoint with the same
        flags. The engine's KV cache wakes (the training state offloaded as for a rollout) and it sleeps at level 2
        afterwards, then is refit: every rank of a replica enters. With a producer (one-step-off, async) the Ray
        engines, awake on devices of their own, are held from its rollouts meanwhile and hold the current weights
        throughout: neither sleep nor refit."""
        start = time.perf_counter()
        part = (self.dp_rank, self.dp_size) if self.config.rollout.placement == "colocated" else (0, 1)
        records, error = [], None
        sync = self.config.rollout.schedule == "sync"
        self.rollout_offload.offload()
        try:
            self._free_device_memory()
            if self.engine is not None:
                try:
                    with self._holding_engines(interrupt=True):
                        self.engine.wake(["kv_cache"])
                        records = sample_and_grade(self.engine, self.tokenizer, self.eval_sets, self.eval_config,
                                                   self.verifier, part, show_progress=False)
                        if sync:
                            self.engine.sleep(level=2)
                except Exception as caught:  # noqa: BLE001 - every rank raises it in _raise_if_any_failed
                    error = caught
            self._raise_if_any_failed(error, "validation")
        finally:
            self.rollout_offload.restore()
        # each problem's grades, without the response texts, to every rank
        grades = [(r.benchmark, r.problem_id, r.sample_index, r.correct, r.status) for r in records]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, grades)
        samples = [SampleRecord(benchmark=name, problem_id=problem, sample_index=index, correct=correct, status=status,
                                answer=None, gold_answer="", finish_reason="", num_tokens=0, response="")
                   for part_grades in gathered for name, problem, index, correct, status in part_grades]
        report = build_report(self.eval_sets, samples, self.eval_config)
        metrics = {key: value for result in report.benchmarks for key, value in result.metrics().items()}
        if sync:
            self.sync_weights()  # the engine slept at level 2: the next rollout needs the weights back
        metrics["time/eval_s"] = time.perf_counter() - start
        return metrics

    def _validate_and_log(self, bar=None) -> None:
        """`validate` at the current iteration: recorded in `evaluations`, TensorBoard/W&B and one log line."""
        metrics = self.validate()
        self.evaluations.append({"iteration": self.iteration, **metrics})
        if self.is_logging_rank:
            self._writers.add_scalars(metrics, self.iteration)
            (bar.write if bar is not None else print)(validation_line(self.iteration, metrics))

    def train_step(self, iteration: int) -> dict:
        """One iteration under --rollout-schedule: "sync" produces step `iteration`'s rollout, learns from it and
        refits; "one-step-off" and "async" learn from the rollout the producer made ahead (waiting for it if it is not
        done) while the producer goes on with the coming steps', then refit once the rollout in progress has ended.
        A rollout restored from a checkpoint (`buffer`) comes first under any schedule.

        time/trainer_idle_s: waiting for the rollout (sync: all of it); time/engine_idle_s: sync, the iteration less
        the engines' work and the refit; with a producer, its wait for admission before this rollout."""
        start = time.perf_counter()
        producing = self.config.rollout.schedule != "sync"
        if producing and self.engine is not None and self._producer is None:
            self._start_producer(iteration)
        if self.buffer:
            rollout = self._share(self.buffer.popleft())
        elif not producing:
            rollout = self._rollout(iteration)
        else:
            future = self._producer.result(iteration) if self.engine is not None else None
            rollout = self._finish_rollout(RolloutInFlight(iteration, 0, future))
        trainer_idle = time.perf_counter() - start
        metrics = self._rollout_metrics(rollout)
        outcome = self.learn(rollout.groups, metrics, rollout.first, rollout.longest)
        metrics["time/sync_s"] = self.sync_weights(version=iteration)  # also after a skipped step
        metrics["time/iteration_s"] = time.perf_counter() - start
        metrics["time/trainer_idle_s"] = trainer_idle
        if "engine_idle" in rollout.seconds:
            metrics["time/engine_idle_s"] = rollout.seconds["engine_idle"]
        else:
            metrics["time/engine_idle_s"] = max(
                metrics["time/iteration_s"] - rollout.seconds["busy"] - metrics["time/sync_s"], 0.0)
        if not outcome.updated:
            logger.warning("iteration %d: skipped the optimizer step: %s", iteration, outcome.skipped_reason)
            if self.config.loop.exit_on_nonfinite:
                raise NonFiniteStepError(f"iteration {iteration}: {outcome.skipped_reason}")
        return metrics

    def learn(self, groups: list[RolloutGroup], metrics: dict, first: int = 0, longest: int | None = None):
        """Steps 3-6 on this rank's verified groups (`groups[0]` is the step's group `first`; they hold this
        data-parallel rank's share): batch, scoring passes, the student's forward/backward and the optimizer
        step; adds loss, optimizer and time metrics to `metrics` and returns the step's `StepOutcome`. `longest`: the
        tokens of the prompt + response that fix the batch width (`Rollout.longest`; None: the longest of `groups`)."""
        per_rank = self.config.rollout.prompts_per_step // self.dp_size
        start = self.dp_rank * per_rank - first
        local = groups[start : start + per_rank]
        if len(self.teacher_names) > 1:  # each teacher's prompt groups together (in step order): microbatches of one
            rank_of = {name: i for i, name in enumerate(self.teacher_names)}
            local = sorted(local, key=lambda g: rank_of[self._teacher(g.prompt_id)])
        multiple = sequence_multiple(self.config.parallel.tensor_model_parallel_size)  # widths split over TP (SP)
        longest = longest_sequence(groups) if longest is None else longest
        batch = build_batch(local, padded_sequence_length(longest, multiple), self.tokenizer.pad_id,
                            group_offset=self.dp_rank * per_rank)
        self_teacher_rows = None
        if self.self_teacher is not None:  # SRPO: failed responses with a demonstration; each row's place in the batch
            self_teacher_rows = [SelfTeacherRow(prompt, len(g.prompt_token_ids), c.token_ids) for g in local
                                 for c, prompt in zip(g.completions, g.self_teacher_prompts)]
            batch["distilled"] = torch.tensor([row.teacher_prompt is not None for row in self_teacher_rows])
            batch["row_index"] = torch.arange(len(self_teacher_rows))
        elif self.config.loss.algorithm == "srpo":  # the external teacher: every failed response
            batch["distilled"] = ~batch["correct"]
        device = next(self.student.parameters()).device  # CUDA under NCCL: the models' and collectives' device
        batch = {key: value.to(device) for key, value in batch.items()}
        loop = self.config.loop
        owners = [self._teacher(g.prompt_id) for g in local for _ in g.completions]  # each row's teacher (or None)
        microbatches, microbatch_owners = [], []  # one teacher's rows per microbatch
        for owner, rows in split_runs(batch, owners):
            if loop.max_tokens_per_microbatch is None:
                parts = split_rows(rows, len(rows["tokens"]) // loop.micro_batch_size)
            else:
                parts = split_by_token_budget(rows, loop.max_tokens_per_microbatch, loop.micro_batch_size, multiple)
            microbatches += parts
            microbatch_owners += [owner] * len(parts)
        metrics.update(self._token_counts(batch, microbatches))

        score_start = time.perf_counter()
        self._score(microbatches, microbatch_owners, self_teacher_rows)
        # what only the metrics read, out of the microbatches the model and loss take
        prefix_statistics = [(b.pop("shared_prefix"), b.pop("empirical_log_probs")) for b in microbatches]
        if self.is_last_stage:
            metrics.update(self._sampler_gap(microbatches, prefix_statistics))
        train_start = time.perf_counter()
        self.student.zero_grad_buffer()
        teacher_weight = None
        if self.config.loss.needs_teacher_logits and self.self_teacher is not None:
            teacher_weight = output_layer_weight(self.self_teacher)
        elif self.config.loss.needs_teacher_logits:
            teacher_weight = [output_layer_weight(self.teachers[owner]) for owner in microbatch_owners]
        reports = forward_backward(self.student, microbatches, self.config.loss, self.vocab_size,
                                   teacher_weight=teacher_weight)
        loss_metrics, teacher_metrics = {}, {}
        if self.is_last_stage:
            group = parallel_state.get_data_parallel_group()
            loss_metrics = reduce_reports(reports, group)
            if len(self.teacher_names) > 1:  # each teacher's own view: its microbatches' reports
                labels = [self.teacher_names.index(owner) for owner in microbatch_owners]
                for name, view in zip(self.teacher_names, reduce_reports_by_label(reports, labels,
                                                                                  len(self.teacher_names), group)):
                    teacher_metrics.update({f"teacher/{name}/{key}": value for key, value in view.items()})
        loss_is_finite = math.isfinite(loss_metrics.get("loss", 0.0))
        outcome = guarded_step(self.optimizer, self.scheduler, loss_is_finite)
        if outcome.updated and self.ema_teacher is not None:
            self.ema_teacher.update(self.student)
        train_seconds = time.perf_counter() - train_start

        metrics.update({f"loss/{k}": v for k, v in loss_metrics.items()})
        metrics.update(teacher_metrics)
        metrics.update({
            "optimizer/grad_norm": outcome.grad_norm,
            "optimizer/lr": self.optimizer.param_groups[0]["lr"],
            "optimizer/skipped": 0.0 if outcome.updated else 1.0,
            "optimizer/skipped_total": sum(h["optimizer/skipped"] for h in self.history) + (not outcome.updated),
            "time/score_s": train_start - score_start,
            "time/train_s": train_seconds,
            "throughput/train_tokens_per_s": float(batch["loss_mask"].sum()) * self.dp_size / max(train_seconds, 1e-9),
        })
        return outcome

    def close(self) -> None:
        """Shut down the engines this rank holds (the rollout engine, and a teacher's and a reference's, on a leader)
        and the verifier's workers (after the producer thread's rollout in progress, if any), and free the teacher's
        host buffer."""
        if self._producer is not None:
            self._producer.close()
        close_engines((self.engine, *self.teacher_engines.values(), self.reference_engine))
        self.verifier.close()
        self.teacher_hidden_buffer.release()
        if self._writers is not None:
            self._writers.close()

    # ---- the loop ----

    def resume(self) -> None:
        """Restore the latest complete checkpoint under --load, if any."""
        load = self.config.loop.load
        if not load:
            return
        state = checkpointing.load_checkpoint(load, self.student, self.optimizer, self._extra_models())
        if state is None:
            logger.info("no checkpoint under %s: starting from iteration 0", load)
            return
        buffer = state.get("rollout_buffer", [])
        self._check_buffer(load, buffer, state["iteration"])
        self._check_teachers(load, state.get("teachers"))
        self.dataset.load_state_dict(state["dataset"])  # raises if the checkpoint saw other prompts or seed
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.history = state["iteration"], state["history"]
        self.evaluations = state.get("evaluations", [])
        self.buffer = collections.deque(buffer if self.rank == 0 else map(self._share, buffer))  # rank 0 saves them
        logger.info("resumed from iteration %d (RNG restored: %s)", self.iteration, state["rng_restored"])

    def _check_buffer(self, load: str, buffer: list[Rollout], iteration: int) -> None:
        """Before any state changes on resume: the rollouts a checkpoint of `iteration` holds for the coming steps can
        be consumed by this run: whole steps (a leader that serves every rank: not co-located), the step's prompt
        count, and each response within this schedule's staleness bound at the step it goes to."""
        rollout = self.config.rollout
        for j, produced in enumerate(buffer, start=iteration + 1):
            lag = max(j - 1 - g.weight_version for g in produced.groups)
            fits = rollout.placement != "colocated" and len(produced.groups) == rollout.prompts_per_step
            if produced.iteration != j or not fits or lag > rollout.staleness_bound:
                raise ValueError(
                    f"{load}: the checkpoint holds iteration {produced.iteration}'s rollout ({len(produced.groups)} "
                    f"prompt groups, from weights {lag} steps before the step that trains on it), produced ahead by "
                    f"one leader for every rank; this run (--rollout-placement {rollout.placement}, --prompts-per-step "
                    f"{rollout.prompts_per_step}, --rollout-schedule {rollout.schedule}, staleness bound "
                    f"{rollout.staleness_bound}) cannot train on it: resume with --rollout-placement ray or rank0, "
                    f"--prompts-per-step {len(produced.groups)} and a schedule whose bound is at least {lag} "
                    "(--rollout-schedule async --max-staleness)")

    def _check_teachers(self, load: str, recorded: dict[str, str] | None) -> None:
        """On resume: the checkpoint's run read the teachers this run reads (None: a checkpoint from before the
        teacher set was recorded); a served teacher by its name only (its servers may have moved)."""
        if recorded is None:
            return
        current = self._teacher_set()
        served = self.config.teachers_on("server")  # compared by name only: their servers may move
        located = lambda teachers: {n: d for n, d in teachers.items() if n not in served}  # noqa: E731
        if recorded.keys() != current.keys() or located(recorded) != located(current):
            raise ValueError(f"{load}: the checkpoint's run distilled from the teachers {recorded} (name: HF "
                             f"directory); this run has {current}: resume with the same --teacher-hf / "
                             "--teacher flags, or start a new run")

    def _teacher_set(self) -> dict[str, str]:
        """The teachers the objective reads, name: HF directory (or a served one's URLs): what a checkpoint records."""
        return {name: self.config.models.teacher_dirs[name] for name in self.teacher_names}

    def _extra_models(self) -> dict:
        """Trained state a checkpoint keeps beside the student's: SRPO's EMA teacher."""
        return {"srpo_ema_teacher": self.ema_teacher.model} if self.ema_teacher is not None else {}

    def save(self) -> None:
        """A checkpoint of the current iteration; with a producer, its finished rollouts of the coming steps and the
        data position after them, snapshotted while it is held (after its rollout in progress). A rollout ahead that
        failed stops every rank here, with its error, before anything is written."""
        ahead, error = [], None
        with self._holding_engines():
            try:
                ahead = [Rollout(j, groups, 0, seconds) for j, (groups, seconds) in
                         (self._producer.produced() if self._producer is not None else [])]
            except Exception as caught:  # noqa: BLE001 - every rank raises it in _raise_if_any_failed
                error = caught
            dataset = self.dataset.state_dict()
        self._raise_if_any_failed(error, "rollout")
        state = {"scheduler": self.scheduler.state_dict(), "dataset": dataset, "history": self.history,
                 "evaluations": self.evaluations, "seed": self.config.loop.seed,
                 "rollout_buffer": list(self.buffer) + ahead, "teachers": self._teacher_set()}
        path = checkpointing.save_checkpoint(self.config.loop.save, self.iteration, self.student, self.optimizer, state,
                                             arch=self.arch, extra_models=self._extra_models(),
                                             save_hf=self.config.loop.save_hf)
        logger.info("saved checkpoint %s", path)

    def train(self) -> list[dict]:
        """Run to --train-iters; returns the per-iteration metrics (the logging rank's view; validations are in
        `evaluations`)."""
        s = self.config.loop
        self.resume()
        self.sync_weights()  # the engine starts from the student's current (possibly resumed) weights
        if s.train_iters > self.iteration and self.config.validation.at_start and not any(
                e["iteration"] == self.iteration for e in self.evaluations):  # not again after a resume
            self._validate_and_log()
        bar = None
        if s.progress_bar and self.is_logging_rank:
            from tqdm import tqdm

            bar = tqdm(total=s.train_iters, initial=self.iteration, desc="scope", unit="it", dynamic_ncols=True)
        while self.iteration < s.train_iters:
            metrics = self.train_step(self.iteration + 1)
            self.iteration += 1
            metrics["iteration"] = self.iteration
            self.history.append(metrics)
            self._log(metrics, bar)
            if self.config.validation.due(self.iteration, s.train_iters):
                self._validate_and_log(bar)
            exiting = bool(s.exit_interval) and self.iteration % s.exit_interval == 0
            if s.save and (self.iteration == s.train_iters or exiting
                           or (s.save_interval and self.iteration % s.save_interval == 0)):
                self.save()
            if exiting:
                logger.info("exiting at iteration %d (--exit-interval %d)", self.iteration, s.exit_interval)
                break
        if bar is not None:
            bar.close()
        if self._writers is not None:
            self._writers.flush()
        return self.history

    def _log(self, metrics: dict, bar) -> None:
        if not self.is_logging_rank:
            return
        self._writers.add_scalars({key: value for key, value in metrics.items() if key != "iteration"}, self.iteration)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss/loss', float('nan')):.4f}",
                            acc=f"{metrics['rollout/accuracy']:.2f}")
        if self.iteration % self.config.loop.log_interval == 0:
            line = log_line(self.iteration, self.config.loop.train_iters, metrics)
            (bar.write if bar is not None else print)(line)
