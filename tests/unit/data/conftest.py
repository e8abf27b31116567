"""A real task and a real SentencePiece model, built once per test session in a temporary directory."""

import pytest

from megatron_scope.data.synthetic import TASK_ALPHABET, Difficulty, write_task_files
from megatron_scope.data.tokenizer import train_tokenizer

DEMO_DIFFICULTY = Difficulty(min_operands=2, max_operands=4, max_operand=9, operations="+-*")


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    return write_task_files(tmp_path_factory.mktemp("task"), num_train=3000, num_eval=200, seed=0,
                            difficulty=DEMO_DIFFICULTY)


@pytest.fixture(scope="session")
def tokenizer(task_files, tmp_path_factory):
    return train_tokenizer(task_files.corpus_txt, tmp_path_factory.mktemp("tok") / "arith.model",
                           required_chars=TASK_ALPHABET)
