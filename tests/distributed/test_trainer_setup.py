"""ScopeTrainer's set-up checks fail at construction, before any rollout, naming the problem: a prompt longer
than the student's context, prompt token ids outside the vocabulary, an unwritable checkpoint directory.
(One gloo rank; the models, optimizer and engine are stand-ins: the checks never touch them.)"""

import os
import types

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import TINY_ARCH

MAX_NEW_TOKENS = 16


def _construct(rank, world_size, cases, save_root):
    from megatron_scope.data.datasets import Prompt, PromptDataset
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.trainer import ScopeTrainer

    initialize_model_parallel(1, 1, seed=0)
    tokenizer = types.SimpleNamespace(vocab_size=TINY_ARCH.vocab_size)
    outcomes = {}
    for name, (prompt_ids, save) in cases.items():
        dataset = PromptDataset([Prompt("fine", "a", "1", (1, 2, 3)), Prompt("p7", "b", "2", tuple(prompt_ids))],
                                source="prompts.jsonl")
        config = tiny_run_config(rollout=dict(prompts_per_step=2, group_size=2, max_new_tokens=MAX_NEW_TOKENS),
                                 loop=dict(train_iters=1, micro_batch_size=2, save=save and os.path.join(save_root, save)))
        try:
            ScopeTrainer(config, None, TINY_ARCH, None, None, dataset, tokenizer, None, engine=object(),
                         teacher=object())
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


def _rollout_failure(rank, world_size):
    """Rank 0's rollout raises (an engine that died, a teacher that returned nothing): every rank must raise,
    not wait in the next collective."""
    from megatron_scope.data.datasets import Prompt, PromptDataset
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.trainer import ScopeTrainer

    initialize_model_parallel(1, 1, seed=0)
    dataset = PromptDataset([Prompt(f"p{i}", "a", "1", (1, 2, 3)) for i in range(2)], source="prompts.jsonl")
    config = tiny_run_config(models=dict(teacher_backend="vllm"), loss=dict(kl="k3"),
                             rollout=dict(prompts_per_step=2, group_size=2, max_new_tokens=4),
                             loop=dict(train_iters=1, micro_batch_size=2))
    trainer = ScopeTrainer(config, None, TINY_ARCH, None, None, dataset,
                           types.SimpleNamespace(vocab_size=TINY_ARCH.vocab_size), None,
                           engine=object() if rank == 0 else None, teacher_engine=object() if rank == 0 else None)

    def failing(prompts, iteration):
        raise RuntimeError("prompt 'p1', response 0: the teacher engine returned 0 log-probs")

    trainer._sample_verify_score = failing
    try:
        trainer._rollout(1)
    except Exception as error:  # noqa: BLE001 - the test compares type and message
        return trainer.config.remote_teacher, f"{type(error).__name__}: {error}"
    return trainer.config.remote_teacher, None


def test_a_failed_rollout_on_rank_0_stops_every_rank():
    message = "prompt 'p1', response 0: the teacher engine returned 0 log-probs"
    assert run_on_ranks(_rollout_failure, 2) == [
        (True, f"RuntimeError: {message}"),
        (True, f"RuntimeError: rank 0's rollout failed: RuntimeError: {message}"),
    ]
