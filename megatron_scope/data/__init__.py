"""Prompt datasets, SFT tensors, the synthetic arithmetic task and its SentencePiece tokenizer."""

from megatron_scope.data.datasets import (
    DatasetFormatError,
    Prompt,
    PromptDataset,
    build_sft_tensors,
    load_sft_pairs,
    prompt_token_ids,
)
from megatron_scope.data.synthetic import (
    TASK_ALPHABET,
    Difficulty,
    Problem,
    TaskFiles,
    canonical_answer,
    check_response,
    extract_answer,
    generate_problems,
    is_held_out,
    write_task_files,
)
from megatron_scope.data.tokenizer import Tokenizer, check_same_tokenizer, train_tokenizer

__all__ = [
    "DatasetFormatError", "Prompt", "PromptDataset", "build_sft_tensors", "load_sft_pairs", "prompt_token_ids",
    "TASK_ALPHABET", "Difficulty", "Problem", "TaskFiles", "canonical_answer", "check_response", "extract_answer",
    "generate_problems", "is_held_out", "write_task_files", "Tokenizer", "check_same_tokenizer", "train_tokenizer",
]
