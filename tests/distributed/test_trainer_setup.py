"""ScopeTrainer's set-up checks fail at construction, before any rollout, naming the problem: a prompt longer
than the student's context, prompt token ids outside the vocabulary, an unwritable checkpoint directory, an eval
set's problem that does not fit with --eval-max-new-tokens, a --reward-by-source source nothing has.
(One gloo rank; the models, optimizer and engine are stand-ins: the checks never touch them.)"""

import os
import types

import pytest

from megatron_scope.rollout.engine import RolloutEngine
from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH

MAX_NEW_TOKENS = 16


def _construct(rank, world_size, cases, save_root):
    from megatron_scope.data.datasets import Prompt, PromptDataset
    from megatron_scope.eval.benchmarks import BenchmarkProblem
    from megatron_scope.eval.runner import EvalSet
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.trainer import ScopeTrainer

    initialize_model_parallel(1, 1, seed=0)
    tokenizer = types.SimpleNamespace(vocab_size=TINY_ARCH.vocab_size, eos_id=2)
    outcomes = {}
    for name, (prompt_ids, save, *eval_case) in cases.items():
        dataset = PromptDataset([Prompt("fine", "a", "1", (1, 2, 3)), Prompt("p7", "b", "2", tuple(prompt_ids))],
                                source="prompts.jsonl")
        eval_ids, routes = eval_case or ([1], ())
        eval_sets = [EvalSet("heldout", (BenchmarkProblem("q3", "c", "3"),), (tuple(eval_ids),))]
        config = tiny_run_config(rollout=dict(prompts_per_step=2, group_size=2, max_new_tokens=MAX_NEW_TOKENS),
                                 loop=dict(train_iters=1, micro_batch_size=2, save=save and os.path.join(save_root, save)),
                                 data=dict(reward_by_source=routes),
                                 validation=dict(data=(("heldout", "h.jsonl"),), max_new_tokens=2 * MAX_NEW_TOKENS))
        try:
            ScopeTrainer(config, None, TINY_ARCH, None, None, dataset, tokenizer, None, engine=object(),
                         teachers={"teacher": object()}, eval_sets=eval_sets)
            outcomes[name] = None
        except Exception as error:  # noqa: BLE001 - the test compares type and message
            outcomes[name] = f"{type(error).__name__}: {error}"
    return outcomes


def test_bad_prompts_and_unwritable_checkpoint_directory_fail_at_construction(tmp_path):
    context = TINY_ARCH.max_position_embeddings  # 256
    (tmp_path / "a_file").write_text("not a directory")
    cases = {
        "at_the_limit": ([1] * (context - MAX_NEW_TOKENS), "ckpt"),
        "too_long": ([1] * (context - MAX_NEW_TOKENS + 1), None),
        "unknown_ids": ([1, TINY_ARCH.vocab_size, 7, -2], None),
        "unwritable": ([1, 2], "a_file/ckpt"),
        "eval_at_the_limit": ([1], None, [1] * (context - 2 * MAX_NEW_TOKENS), (("heldout", "math"),)),
        "eval_too_long": ([1], None, [1] * (context - 2 * MAX_NEW_TOKENS + 1), ()),
        "eval_unknown_ids": ([1], None, [3, TINY_ARCH.vocab_size], ()),
        "unknown_source": ([1], None, [1], (("gsm8k", "math"),)),
    }
    (outcomes,) = run_on_ranks(_construct, 1, args=(cases, str(tmp_path)), timeout=300)
    assert outcomes["at_the_limit"] is None and os.path.isdir(tmp_path / "ckpt")
    assert outcomes["too_long"] == (
        "ValueError: prompt 'p7' (prompts.jsonl) has 241 tokens: with max_new_tokens 16 it needs 257 positions, "
        "more than the student's context of 256 (max_position_embeddings)")
    assert outcomes["unknown_ids"] == (
        "ValueError: prompt 'p7' (prompts.jsonl) has token ids outside the vocabulary [0, 500): [500, -2]")
    assert outcomes["unwritable"].startswith(
        f"PermissionError: checkpoint directory '{tmp_path}/a_file/ckpt' is not writable: ")
    assert outcomes["eval_at_the_limit"] is None
    assert outcomes["eval_too_long"] == (
        "ValueError: --eval-data heldout: problem 'q3' has 225 prompt tokens: with --eval-max-new-tokens 32 it needs "
        "257 positions, more than the student's 256")
    assert outcomes["eval_unknown_ids"] == (
        "ValueError: --eval-data heldout: problem 'q3' has token ids outside the vocabulary [0, 500)")
    assert outcomes["unknown_source"] == (
        "ValueError: --reward-by-source names data source(s) ['gsm8k'] that no training row (--data-source-key "
        "None) and no --eval-data set has; known: ['heldout']")


def _stand_in_trainer(rank, placement, leaders, engine=None, remote_teacher=True, verifier=None, prompts=2,
                      group_size=2, train_iters=2, **rollout):
    """A ScopeTrainer of one gloo rank of a DP-only world whose models are stand-ins; `leaders`: the ranks that
    hold an engine (and, with `remote_teacher`, a vLLM teacher's engine; else a co-located teacher). Prompt i's gold
    answer is "i"; the tokenizer decodes a response [t, ...] as "A: t"; the verifier (default: the synthetic task's)
    grades it; `rollout`: more RolloutConfig fields."""
    from megatron.core import parallel_state

    from megatron_scope.data.datasets import Prompt, PromptDataset
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.rewards.synthetic import SyntheticTaskVerifier
    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.trainer import ScopeTrainer

    if not parallel_state.model_parallel_is_initialized():  # a second stand-in in the same process
        initialize_model_parallel(1, 1, seed=0)
    dataset = PromptDataset([Prompt(f"p{i}", "a", str(i), (1, 2, 3)) for i in range(prompts)], source="prompts.jsonl")
    config = tiny_run_config(models=dict(teacher_backend="vllm" if remote_teacher else "megatron"), loss=dict(kl="k3"),
                             rollout=dict(prompts_per_step=prompts, group_size=group_size, max_new_tokens=4,
                                          placement=placement, **rollout),
                             loop=dict(train_iters=train_iters, micro_batch_size=1))
    tokenizer = types.SimpleNamespace(vocab_size=TINY_ARCH.vocab_size, eos_id=2, decode=lambda ids: f"A: {ids[0]}")
    leads = rank in leaders
    return ScopeTrainer(config, None, TINY_ARCH, None, None, dataset, tokenizer, verifier or SyntheticTaskVerifier(),
                        engine=(engine or object()) if leads else None,
                        teachers=None if remote_teacher else {"teacher": object()},
                        teacher_engines={"teacher": object()} if leads and remote_teacher else None)


def _rollout_failure(rank, world_size, placement, failing_rank, error_type):
    """The rollout of `failing_rank` raises (an engine that died, a teacher that returned nothing): every rank
    must raise, not wait in the next collective."""
    from megatron_scope.rollout.engine import RolloutEngineDiedError

    trainer = _stand_in_trainer(rank, placement, [0] if placement == "rank0" else range(world_size))

    def sample(prompts, first, iteration, weight_version):
        if rank == failing_rank:
            raise {"RuntimeError": RuntimeError, "RolloutEngineDiedError": RolloutEngineDiedError}[error_type](
                f"{len(prompts)} prompts from the step's prompt {first}: the engine failed")
        return [], {"rollout": 0.0}

    trainer._sample_verify_score = sample
    try:
        trainer._rollout(1)
    except Exception as error:  # noqa: BLE001 - the test compares type and message
        return f"{type(error).__name__}: {error}"
    return None


def test_a_failed_rollout_on_rank_0_stops_every_rank():
    message = "2 prompts from the step's prompt 0: the engine failed"
    assert run_on_ranks(_rollout_failure, 2, args=("rank0", 0, "RuntimeError")) == [
        f"RuntimeError: {message}",
        f"RuntimeError: rank 0's rollout failed: RuntimeError: {message}",
    ]


def test_an_engine_death_in_replica_1_stops_every_rank():
    """Co-located at DP=2: each rank leads its own engine over its own prompt (replica 1 generates the second)."""
    message = "1 prompts from the step's prompt 1: the engine failed"
    assert run_on_ranks(_rollout_failure, 2, args=("colocated", 1, "RolloutEngineDiedError")) == [
        f"RolloutEngineDiedError: rank 1's rollout failed: RolloutEngineDiedError: {message}",
        f"RolloutEngineDiedError: {message}",
    ]


class _RecordingEngine(RolloutEngine):
    """A rollout engine stand-in that records the order of the calls the trainer makes."""

    def __init__(self, calls, dies_in_refit=False, before_generating=lambda seeds: None):
        self.calls, self.dies_in_refit, self.before_generating = calls, dies_in_refit, before_generating

    def generate(self, prompts, params, seeds, max_new_tokens=None):
        """Response j of a prompt is [5 + j, 2] (2: the stop token); in segments of one token (partial rollouts) the
        prompt's request draws [5 + j] and its continuation [2]."""
        from megatron_scope.rollout.engine import Completion

        self.calls.append(("generate", seeds))
        self.before_generating(seeds)
        if max_new_tokens is None:
            return [[Completion([5 + j, 2], [-0.1, -0.2], "stop") for j in range(params.n)] for _ in prompts]
        if len(prompts[0]) == 3:  # the first segment (the stand-in's prompts have 3 tokens)
            return [[Completion([5 + j], [-0.1], "length") for j in range(params.n)] for _ in prompts]
        return [[Completion([2], [-0.2], "stop")] for _ in prompts]

    def update_weights(self, stream):
        from megatron_scope.rollout.engine import RolloutEngineDiedError

        if self.dies_in_refit:
            next(stream)  # the engine's process dies after the first bucket
            raise RolloutEngineDiedError("the engine's process died during update_weights")
        self.calls.append(("update_weights", [name for name, _ in stream]))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def close(self):
        pass

    def wake(self, tags=None):
        self.calls.append(("wake", tags))


def _step_calls(rank, world_size, refit_dies_on=None):
    """Two train_steps of a co-located DP=2 stand-in trainer (learning replaced by a recorder whose first
    optimizer step is skipped, the weight stream by two names, PyTorch's cache frees recorded): the calls rank
    `rank`'s engine received, or the error the steps raised when the engine of rank `refit_dies_on` dies in its
    refit."""
    import torch

    from megatron_scope import trainer as trainer_module

    calls = []
    engine = _RecordingEngine(calls, dies_in_refit=rank == refit_dies_on)
    trainer = _stand_in_trainer(rank, "colocated", range(world_size), engine=engine, remote_teacher=False)
    trainer_module.free_cached_device_memory = lambda: calls.append(("free",))
    trainer.rollout_offload = types.SimpleNamespace(offload=lambda: calls.append(("offload",)),  # the flags' hooks
                                                    restore=lambda: calls.append(("restore",)))

    def learn(groups, metrics, first, longest):
        assert len(groups) == 1
        calls.append(("learn", first))
        return types.SimpleNamespace(updated=sum(call[0] == "learn" for call in calls) > 1, skipped_reason="a test")

    def weights(model, arch, bucket_bytes, dst_rank):
        assert dst_rank == rank  # each replica refits its own engine from its own shards
        yield from [("a", torch.zeros(1)), ("b", torch.ones(1))]

    trainer.learn = learn
    trainer_module.iter_hf_weights = weights
    try:
        trainer.train_step(1)
        trainer.train_step(2)
    except Exception as error:  # noqa: BLE001 - the test compares type and message
        return f"{type(error).__name__}: {error}"
    return calls


def test_each_replicas_engine_sleeps_while_it_trains_and_wakes_for_its_refit():
    """Two steps at DP=2, co-located, each in vLLM's RL order: training state off the GPUs (--rl-offload-*) -> free
    PyTorch's cached memory -> wake the KV cache -> generate the replica's prompt (seeded by the iteration and the
    prompt's place in the step) -> sleep at level 2 -> training state back before the replica learns -> free ->
    wake the weights only -> refit from the replica's own shards. The first step's optimizer step is skipped, and
    the refit still follows: a level-2 sleep kept no weights."""
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    run_seed = tiny_run_config().loop.seed
    for rank, calls in enumerate(run_on_ranks(_step_calls, 2)):
        steps = [[("offload",), ("free",), ("wake", ["kv_cache"]),
                  ("generate", StepSeeds(run_seed, iteration).groups([rank], 2, "rollout")), ("sleep", 2),
                  ("restore",), ("learn", rank), ("free",), ("wake", ["weights"]), ("update_weights", ["a", "b"])]
                 for iteration in (1, 2)]
        assert calls == steps[0] + steps[1], rank


def test_an_engine_death_in_replica_1_during_its_refit_stops_every_rank():
    message = "the engine's process died during update_weights"
    assert run_on_ranks(_step_calls, 2, args=(1,)) == [
        f"RolloutEngineDiedError: rank 1's weight sync failed: RolloutEngineDiedError: {message}",
        f"RolloutEngineDiedError: {message}",
    ]


class _ThreadRecords(list):
    """The engine's calls, each appended to calls["main"] or calls["producer"] by the thread that made it."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def append(self, call):
        import threading

        self.calls["main" if threading.current_thread() is threading.main_thread() else "producer"].append(call)


def _three_steps(trainer, learn):
    """train_steps 1-3 of a stand-in trainer whose learning is `learn` and whose weight stream is one tensor; the
    trainer is closed afterwards (its producer stopped)."""
    import torch

    from megatron_scope import trainer as trainer_module

    trainer.learn = learn
    trainer_module.iter_hf_weights = lambda model, arch, bucket_bytes, dst_rank: iter([("w", torch.zeros(1))])
    try:
        for iteration in (1, 2, 3):
            trainer.iteration = iteration - 1
            trainer.train_step(iteration)
    finally:
        trainer.close()


def _one_step_off(rank, world_size):
    """`_one_step_off_calls` of a run whose rollouts all succeed, then of one whose rollout of iteration 2 fails."""
    return _one_step_off_calls(rank), _one_step_off_calls(rank, failing_iteration=2)


def _one_step_off_calls(rank, failing_iteration=None):
    """Three train_steps of a one-step-off stand-in trainer with one Ray-placed engine (global rank 0 leads): the
    calls made from the trainer's thread and from the producer's, or the error the steps raised when generating
    iteration `failing_iteration`'s rollout fails. Learning waits until the producer has generated the next step's
    rollout, and that generation waits until learning has begun: a trainer that ran them in series would hit a
    deadline in one of them."""
    import threading

    from megatron_scope import trainer as trainer_module
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    calls = {"main": [], "producer": []}
    learning, generated = threading.Event(), threading.Event()
    seed = tiny_run_config().loop.seed


    def before_generating(seeds):
        iteration = next(k for k in (1, 2, 3) if seeds == StepSeeds(seed, k).groups([0, 1], 2, "rollout"))
        if iteration == failing_iteration:
            generated.set()
            raise RuntimeError(f"the engine failed on iteration {iteration}'s rollout")
        if iteration > 1:  # the producer: step iteration - 1 is learning meanwhile
            assert learning.wait(timeout=30), "the next step's rollout did not overlap learning"
            learning.clear()
            generated.set()

    engine = _RecordingEngine(_ThreadRecords(calls), before_generating=before_generating) if rank == 0 else None
    trainer = _stand_in_trainer(rank, "ray", [0], engine=engine, remote_teacher=False, train_iters=3, engines=1,
                                schedule="one-step-off")
    trainer_module.free_cached_device_memory = lambda: calls["main"].append(("free",))

    def learn(groups, metrics, first, longest):
        calls["main"].append(("learn", [g.weight_version for g in groups], metrics["rollout/staleness_mean"]))
        if trainer.iteration + 1 < 3:  # a next step's rollout is being produced
            learning.set()
            if rank == 0:
                assert generated.wait(timeout=30), "learning did not overlap the next step's rollout"
                generated.clear()
        return types.SimpleNamespace(updated=True, skipped_reason=None)

    try:
        _three_steps(trainer, learn)
    except Exception as error:  # noqa: BLE001 - the test compares type and message
        return f"{type(error).__name__}: {error}"
    return calls


def test_one_step_off_generates_the_next_step_while_this_one_learns():
    """--rollout-schedule one-step-off at DP=2 with a Ray-placed engine (led by rank 0): the leader's producer thread
    generates step 1's rollout, then each step's learning overlaps its rollout of the next step, sampled from the
    weights before that step (version k - 1 for step k + 1), and the refit waits for it; nothing sleeps (the engines
    have devices of their own), and the trainer's thread never generates. Every rank learns from version-stamped
    groups, staleness 0 then 1. A rollout that fails in the producer thread stops every rank after the step it
    overlapped. Each rank receives its own prompt group only."""
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    seeds = [StepSeeds(tiny_run_config().loop.seed, k).groups([0, 1], 2, "rollout") for k in (1, 2, 3)]
    refit = [("free",), ("wake", ["weights"]), ("update_weights", ["w"])]
    (leader, leader_failure), (other, other_failure) = run_on_ranks(_one_step_off, 2)
    assert leader["main"] == [("learn", [0], 0.0), *refit, ("learn", [0], 1.0), *refit, ("learn", [1], 1.0), *refit]
    assert leader["producer"] == [call for k in range(3) for call in (("wake", ["kv_cache"]), ("generate", seeds[k]))]
    assert other["main"] == [("learn", [0], 0.0), ("free",), ("learn", [0], 1.0), ("free",), ("learn", [1], 1.0),
                             ("free",)] and other["producer"] == []
    message = "the engine failed on iteration 2's rollout"
    assert (leader_failure, other_failure) == (
        f"RuntimeError: {message}", f"RuntimeError: rank 0's rollout failed: RuntimeError: {message}")


def _async_two_ahead(rank, world_size):
    """Three train_steps of an async (η = 2) stand-in trainer at DP=2, one Ray-placed engine led by rank 0: the
    engine's calls per thread and, per step, the sampling versions, mean staleness and share at the bound each rank
    learned from. Step 1's learning waits (with a deadline) until the producer has begun iteration 3's rollout: the
    producer must run two steps ahead of training, so all three rollouts come from θ_0."""
    import threading

    from megatron_scope import trainer as trainer_module
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    calls = {"main": [], "producer": []}
    third_begun = threading.Event()
    seed = tiny_run_config().loop.seed


    def before_generating(seeds):
        if seeds == StepSeeds(seed, 3).groups([0, 1], 2, "rollout"):
            third_begun.set()

    engine = _RecordingEngine(_ThreadRecords(calls), before_generating=before_generating) if rank == 0 else None
    trainer = _stand_in_trainer(rank, "ray", [0], engine=engine, remote_teacher=False, train_iters=3, engines=1,
                                schedule="async", max_staleness=2)
    trainer_module.free_cached_device_memory = lambda: None

    def learn(groups, metrics, first, longest):
        calls["main"].append(("learn", [g.weight_version for g in groups], metrics["rollout/staleness_mean"],
                              metrics["rollout/staleness_at_bound_fraction"]))
        if rank == 0 and trainer.iteration == 0:
            assert third_begun.wait(timeout=30), "the producer did not run two steps ahead of step 1"
        return types.SimpleNamespace(updated=True, skipped_reason=None)

    _three_steps(trainer, learn)
    return calls


def _async_runs(rank, world_size):
    """`_async_two_ahead`, then `_async_partial`, in the same processes (one start of the ranks for both)."""
    return _async_two_ahead(rank, world_size), _async_partial(rank, world_size)


@pytest.fixture(scope="module")
def async_runs():
    """Per rank (the leader's, the other's): the calls of `_async_two_ahead` and of `_async_partial`."""
    return run_on_ranks(_async_runs, 2)


def test_async_runs_the_producer_up_to_max_staleness_steps_ahead(async_runs):
    """--rollout-schedule async --max-staleness 2: the producer generates iterations 1-3 from θ_0 before step 1's
    refit (all three admitted at version 0), so steps 1-3 train on responses 0, 1 and 2 steps stale (the last all at
    the bound), on every rank; the trainer's thread only learns and refits."""
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    seeds = [StepSeeds(tiny_run_config().loop.seed, k).groups([0, 1], 2, "rollout") for k in (1, 2, 3)]
    refit = [("wake", ["weights"]), ("update_weights", ["w"])]
    steps = [("learn", [0], 0.0, 0.0), ("learn", [0], 1.0, 0.0), ("learn", [0], 2.0, 1.0)]  # each rank's one group
    (leader, _), (other, _) = async_runs
    assert leader["main"] == [call for step in steps for call in (step, *refit)]
    assert leader["producer"] == [call for k in range(3) for call in (("wake", ["kv_cache"]), ("generate", seeds[k]))]
    assert other == {"main": steps, "producer": []}

def _async_partial(rank, world_size):
    """Three train_steps of an async (η = 1) stand-in trainer at DP=2 with partial rollouts (segments of one token),
    one Ray-placed engine led by rank 0: the engine's calls per thread and, per step, each response's version runs
    and the partial-rollout metrics each rank learned from. Step 1's learning waits until rollout 2's first segment
    has begun, and that segment lasts until step 1's refit is asked for, so the refit comes between rollout 2's
    segments; step 2's learning waits until rollout 3's second segment has begun (before step 2's refit)."""
    import threading
    import time

    from megatron_scope import trainer as trainer_module
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    calls = {"main": [], "producer": []}
    second_begun, third_continued = threading.Event(), threading.Event()
    seed = tiny_run_config().loop.seed
    deadline = 30

    def before_generating(seeds):
        if seeds == StepSeeds(seed, 2).groups([0, 1], 2, "rollout"):
            second_begun.set()
            start = time.monotonic()
            while not trainer._producer._interrupts:  # step 1's refit is asked for during this segment
                assert time.monotonic() - start < deadline, "step 1's refit was not asked for"
                time.sleep(0.001)
        if seeds[0] == [StepSeeds(seed, 3).seed(0, 0, "resubmission", 1)]:
            third_continued.set()

    engine = _RecordingEngine(_ThreadRecords(calls), before_generating=before_generating) if rank == 0 else None
    trainer = _stand_in_trainer(rank, "ray", [0], engine=engine, remote_teacher=False, train_iters=3, engines=1,
                                schedule="async", max_staleness=1, partial_rollout_tokens=1)
    trainer_module.free_cached_device_memory = lambda: None

    def learn(groups, metrics, first, longest):
        calls["main"].append(("learn", [c.versions for g in groups for c in g.completions],
                              metrics["rollout/staleness_mean"], metrics["rollout/staleness_token_mean"],
                              metrics["rollout/interrupted_fraction"]))
        waits = {0: (second_begun, "rollout 2 did not begin during step 1"),
                 1: (third_continued, "rollout 3 did not go on during step 2")}
        if rank == 0 and trainer.iteration in waits:
            event, message = waits[trainer.iteration]
            assert event.wait(timeout=deadline), message
        return types.SimpleNamespace(updated=True, skipped_reason=None)

    _three_steps(trainer, learn)
    return calls


def test_a_refit_comes_between_the_segments_of_a_partial_rollout(async_runs):
    """--rollout-schedule async --max-staleness 1 --partial-rollout-tokens 1: step 1's refit does not wait for rollout
    2, in progress: it runs between the rollout's segments, whose second token is sampled by θ_1 and stamped so
    (versions ((0, 0), (1, 1)); at step 2 its tokens are 1 and 0 steps stale, the responses' oldest 1), on every rank;
    every later segment is a request of its own on the resubmission stream."""
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.testing.tiny import tiny_run_config

    seeds = [StepSeeds(tiny_run_config().loop.seed, k) for k in (1, 2, 3)]
    refit = [("wake", ["weights"]), ("update_weights", ["w"])]
    steps = [("learn", [((0, 0),)] * 2, 0.0, 0.0, 0.0), ("learn", [((0, 0), (1, 1))] * 2, 1.0, 0.5, 1.0),
             ("learn", [((0, 1),)] * 2, 1.0, 1.0, 0.0)]  # each rank's one group of G = 2
    (_, leader), (_, other) = async_runs
    assert leader["main"] == [call for step in steps for call in (step, *refit)]
    assert leader["producer"] == [
        call for step in seeds for call in (("wake", ["kv_cache"]), ("generate", step.groups([0, 1], 2, "rollout")),
                                            ("generate", [[step.seed(i, j, "resubmission", 1)] for i in (0, 1)
                                                          for j in (0, 1)]))]
    assert other == {"main": steps, "producer": []}


class _LengthsEngine(_RecordingEngine):
    """Sample j of the k-th prompt it is given: [k if j == 0 else 9] + [3] * (k + j) + [2] ("A: k" or "A: 9"; prompt
    i's gold is "i"), truncated at j = 1: lengths, outcomes and finish reasons differ across the step."""

    def generate(self, prompts, params, seeds, max_new_tokens=None):
        from megatron_scope.rollout.engine import Completion

        return [[Completion([k if j == 0 else 9] + [3] * (k + j) + [2], [-0.25 * (k + j)] * (k + j + 2),
                            "length" if j else "stop") for j in range(params.n)] for k in range(len(prompts))]


def _steps_from_shares(rank, world_size, placement):
    """A stand-in at DP = `world_size` whose one engine rank 0 leads (--rollout-placement `placement`, 4 prompts x
    G = 2): a sync step, then a step on a rollout a resume restored from a checkpoint. Per step, what each rank learned
    from: (prompt ids, first group, longest sequence, rollout metrics less times). Nothing is broadcast as pickled
    objects."""
    import dataclasses

    import torch

    from megatron_scope import trainer as trainer_module
    from megatron_scope.rewards.base import Verdict
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.rollout.engine import Completion

    def no_pickles(*args, **kwargs):
        raise AssertionError("a rollout went out as pickled objects")

    trainer_module.dist.broadcast_object_list = no_pickles
    trainer_module.free_cached_device_memory = lambda: None
    trainer_module.iter_hf_weights = lambda *args, **kwargs: iter([("w", torch.zeros(1))])
    trainer = _stand_in_trainer(rank, placement, [0], engine=_LengthsEngine([]) if rank == 0 else None,
                                remote_teacher=False, prompts=4, **(dict(engines=1) if placement == "ray" else {}))
    learned = []

    def learn(groups, metrics, first, longest):
        metrics = {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/"))}
        learned.append(([g.prompt_id for g in groups], first, longest, metrics))
        return types.SimpleNamespace(updated=True)

    trainer.learn = learn
    trainer.train_step(1)
    restored = [trainer_module.Rollout(2, [  # prompt k: k + 2 tokens, its responses k + 2 and 1 (k right, 9 wrong)
        RolloutGroup(f"p{k}", [1] * (k + 2), [Completion([k] + [3] * (k + 1), [-0.5] * (k + 2), "stop"),
                                              Completion([9], [-1.0], "length")], [True, False],
                     verdicts=[Verdict(True, "correct", str(k)), Verdict(False, "wrong", "9")], weight_version=1)
        for k in range(4)], 0, {"rollout": 1.0, "busy": 1.0})]
    state = dict(rollout_buffer=restored, iteration=1, dataset=trainer.dataset.state_dict(), scheduler={},
                 history=[], rng_restored=False)
    trainer_module.checkpointing.load_checkpoint = lambda *args: state
    trainer.scheduler = types.SimpleNamespace(load_state_dict=lambda state: None)
    trainer.config = dataclasses.replace(trainer.config, loop=dataclasses.replace(trainer.config.loop, load="ckpt"))
    trainer.resume()
    held = [(len(r.groups), r.longest) for r in trainer.buffer]
    trainer.train_step(2)
    return learned, held


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["rank0"])  # ray's delivery is the same code (one leader, every rank)
def test_each_replica_receives_only_its_share_and_the_metrics_are_the_whole_steps(placement):
    """--rollout-placement rank0 at DP=2: rank 0 samples the whole step and each data-parallel rank receives
    only its own prompt groups (with the step's longest sequence, which fixes the batch width as the whole step
    would); the rollout metrics reduced over the replicas equal those of the whole step on one rank (DP=1), and so do
    those of a rollout restored by a resume (rank 0, which writes checkpoints, keeps the whole step, rank 1 its
    share)."""
    ((whole, _),) = run_on_ranks(_steps_from_shares, 1, args=(placement,))
    shares = run_on_ranks(_steps_from_shares, 2, args=(placement,))
    assert [held for _, held in shares] == [[(4, None)], [(2, 10)]]
    for step, (ids, first, longest, metrics) in enumerate(whole):
        assert first == 0 and len(ids) == 4 and longest == (9, 10)[step]
        assert metrics["rollout/truncated_fraction"] == 0.5 and metrics["verifier/wrong"] >= 4
        for rank, (learned, _) in enumerate(shares):
            assert learned[step] == (ids[2 * rank : 2 * rank + 2], 2 * rank, longest, metrics), (step, rank)


def _buffer_checks(rank, world_size):
    """`_check_buffer` on a checkpoint of iteration 1 that holds rollouts 2 and 3 (2 prompt groups each, both from
    version 0), produced ahead by --rollout-schedule async --max-staleness 2, for runs resuming under several set-ups:
    None where the resume may go on, else the error's message."""
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.trainer import Rollout

    buffer = [Rollout(j, [RolloutGroup(f"p{i}", [1, 2], [], [], weight_version=0) for i in range(2)], 0, {})
              for j in (2, 3)]
    results = {}
    for placement, rollout in (("ray", dict(engines=1, schedule="async", max_staleness=2)), ("rank0", {}),
                               ("ray", dict(engines=1, schedule="one-step-off")), ("colocated", {})):
        trainer = _stand_in_trainer(rank, placement, [0], remote_teacher=False, **rollout)
        try:
            trainer._check_buffer("ckpt", buffer, 1)
            results[placement, rollout.get("schedule", "sync")] = None
        except ValueError as error:
            results[placement, rollout.get("schedule", "sync")] = str(error)
    return results


def test_a_resume_refuses_rollouts_ahead_it_cannot_train_on_within_its_bound():
    """The rollouts a checkpoint holds for the coming steps go to a run whose leader serves whole steps and whose
    staleness bound covers them: iteration 3's rollout from θ_0 is 2 steps stale at step 3, within async η = 2 but
    not one-step-off's 1 (iteration 2's, 1 step stale, is not within sync's 0); co-located engines serve shares of a
    step, not whole steps."""
    def refusal(iteration, lag, placement, schedule, bound):
        return (f"ckpt: the checkpoint holds iteration {iteration}'s rollout (2 prompt groups, from weights {lag} steps "
                "before the step that trains on it), produced ahead by one leader for every rank; this run "
                f"(--rollout-placement {placement}, --prompts-per-step 2, --rollout-schedule {schedule}, staleness "
                f"bound {bound}) cannot train on it: resume with --rollout-placement ray or rank0, --prompts-per-step 2 "
                f"and a schedule whose bound is at least {lag} (--rollout-schedule async --max-staleness)")

    (results,) = run_on_ranks(_buffer_checks, 1)
    assert results == {("ray", "async"): None, ("rank0", "sync"): refusal(2, 1, "rank0", "sync", 0),
                       ("ray", "one-step-off"): refusal(3, 2, "ray", "one-step-off", 1),
                       ("colocated", "sync"): refusal(2, 1, "colocated", "sync", 0)}
