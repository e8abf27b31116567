"""A tiny SCOPE workspace on disk for trainer tests: the synthetic task, a SentencePiece tokenizer and
random Qwen2 student/teacher checkpoints in Hugging Face format (head_dim 64 for vLLM's CPU attention)."""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_scope.data.synthetic import TASK_ALPHABET, write_task_files
from megatron_scope.data.tokenizer import train_tokenizer


@dataclasses.dataclass
class Workspace:
    root: str
    train_jsonl: str
    eval_jsonl: str
    tokenizer: str
    student_hf: str
    teacher_hf: str


def save_random_qwen2(path: str, vocab_size: int, num_layers: int, hidden_size: int, seed: int) -> str:
    """A randomly initialised Qwen2ForCausalLM (heads of 64, GQA 2:1 when possible) saved as safetensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = hidden_size // 64
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=128, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def make_workspace(root: str, num_train: int = 64, num_eval: int = 16, seed: int = 0) -> Workspace:
    files = write_task_files(os.path.join(root, "task"), num_train, num_eval, seed)
    tokenizer_path = os.path.join(root, "tokenizer.model")
    tokenizer = train_tokenizer(files.corpus_txt, tokenizer_path, required_chars=TASK_ALPHABET)
    return Workspace(
        root=root,
        train_jsonl=files.train_jsonl,
        eval_jsonl=files.eval_jsonl,
        tokenizer=tokenizer_path,
        student_hf=save_random_qwen2(os.path.join(root, "student_hf"), tokenizer.vocab_size, 2, 128, seed),
        teacher_hf=save_random_qwen2(os.path.join(root, "teacher_hf"), tokenizer.vocab_size, 2, 128, seed + 1),
    )


def train_history(rank: int, world_size: int, argv: list[str]) -> list[dict]:
    """One rank of `python -m megatron_scope.train <argv>` (for `run_on_ranks`): the run's metrics history."""
    from megatron_scope.train import main

    _, history = main(argv)
    return history


def sft_hf_model(rank: int, world_size: int, hf_dir: str, train_jsonl: str, tokenizer_path: str, out_dir: str,
                 iters: int, lr: float = 2e-3, seed: int = 0) -> str:
    """One rank (for `run_on_ranks`): `hf_dir` fine-tuned for `iters` steps on the task's reference solutions with
    Megatron (`megatron.sft`) and exported to `out_dir`, so it solves some of the task (accuracy far from 0)."""
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.data.datasets import build_sft_tensors, load_sft_pairs
    from megatron_scope.data.tokenizer import load_tokenizer
    from megatron_scope.hf_config import read_hf_config
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.sft import train_sft
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, export_hf_checkpoint, load_hf_weights

    initialize_model_parallel(1, 1, seed=seed)
    arch = arch_from_hf_config(read_hf_config(hf_dir))
    gpt = build_gpt_model(arch, calculate_per_token_loss=True)
    load_hf_weights(gpt, arch, SafetensorsCheckpoint(hf_dir))
    model = wrap_with_ddp(gpt)
    optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=lr, min_lr=lr / 10, lr_warmup_iters=iters // 10,
                                                                  adam_beta2=0.98), iters)
    data = build_sft_tensors(load_sft_pairs(train_jsonl), load_tokenizer(tokenizer_path), seq_length=48)
    train_sft(model, optimizer, scheduler, data, iters, global_batch_size=64, micro_batch_size=32, seed=seed)
    export_hf_checkpoint(model, arch, out_dir)
    return out_dir


def train_and_evaluations(rank: int, world_size: int, argv: list[str]) -> tuple[list[dict], list[dict]]:
    """One rank of `python -m megatron_scope.train <argv>`: (the metrics history, the validations' metrics)."""
    from megatron_scope.train import main

    trainer, history = main(argv)
    return history, trainer.evaluations
