"""Dry run of a SCOPE launch: validate the flags and estimate per-GPU memory, without a GPU or any weights.

    python tools/check_config.py --nnodes 4 --nproc-per-node 8 --gpu-memory-gib 80 \
        <exactly the flags of examples/scope/train_scope.py>

Takes train_scope.py's own parser (so it accepts exactly the flags of a real run) plus the launch geometry
(`--nnodes`, `--nproc-per-node` as torchrun names them, `--gpu-memory-gib`, `--rollout-gpus`) and a few
dry-run options. Reads only config.json of --student-hf / --teacher-hf, the tokenizers when they are there,
and --train-data (to measure the longest prompt) when it is there. Checks the parallel layout, sequence
lengths, vocabularies and the rollout KV cache, then prints a per-GPU memory table (formulas:
megatron_scope/memory_estimate.py). Exit status: 0 when the run is valid and fits, 1 otherwise (a run that
does not fit only warns with --allow-overcommit), 2 for a flag argparse rejects. `--json` prints the result
as JSON instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# megatron-core warns at import that Apex / Transformer Engine are absent: irrelevant to a dry run.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "scope"))

from megatron_scope.arguments import (  # noqa: E402
    nonnegative_float, nonnegative_int, parse_scope_args, positive_float, positive_int,
)
from megatron_scope import memory_estimate as me  # noqa: E402
from megatron_scope.megatron.loss_func import ScopeLossConfig, check_teacher_engine_objective  # noqa: E402
from train_scope import add_training_args  # noqa: E402

#: Bytes per element of the HF config's dtype (vLLM loads the checkpoint in it: dtype "auto").
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
#: Prompt length assumed when neither --max-prompt-tokens nor a readable --train-data + tokenizer gives it.
DEFAULT_PROMPT_TOKENS = 1024
#: Files that make a directory a Hugging Face tokenizer.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    """train_scope.py's flags + the launch geometry and dry-run options."""
    parser = add_training_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    g = parser.add_argument_group("launch geometry and dry run (check_config.py only)")
    g.add_argument("--nnodes", type=positive_int, default=1, help="torchrun --nnodes.")
    g.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=positive_int, default=1,
                   help="torchrun --nproc-per-node: training ranks (GPUs) per node.")
    g.add_argument("--gpu-memory-gib", type=positive_float, default=80.0, help="Memory of one GPU.")
    g.add_argument("--rollout-gpus", type=nonnegative_int, default=0,
                   help="GPUs running vLLM engines apart from the training ranks (default: --rollout-engines x "
                        "--rollout-tensor-parallel-size); 0: one engine co-located on global rank 0's GPU.")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="Longest prompt in tokens (default: measured from --train-data with the tokenizer, "
                        f"else {DEFAULT_PROMPT_TOKENS}).")
    g.add_argument("--overhead-gib", type=nonnegative_float, default=2.0,
                   help="Runtime overhead per process on a GPU (CUDA context, NCCL, allocator fragmentation).")
    g.add_argument("--assume-flash-attention", action="store_true",
                   help="Plan for a flash-attention layer spec: drop the s^2 attention-score terms "
                        "(train_scope.py builds megatron-core's local spec, which materialises them).")
    g.add_argument("--allow-overcommit", action="store_true",
                   help="A run that does not fit --gpu-memory-gib only warns (exit 0).")
    g.add_argument("--json", action="store_true", help="Print the result as JSON.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and validated as train_scope.parse_args does (a bad flag exits 2 with argparse's usage error)."""
    parser = build_parser()
    args = parse_scope_args(argv, parser)
    try:
        prompt_format(args)
    except ValueError as error:
        parser.error(f"--prompt-template: {error}")
    return args


# ---------------------------------------------------------------------------------------------- inputs
def read_model(path: str, flag: str) -> tuple[dict, object]:
    """(config.json dict, DecoderArch) of an HF model directory; ValueError naming the flag and the file."""
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{flag} {path}: no config.json there (a Hugging Face model directory is expected)")
    try:
        with open(config_file) as handle:
            config = json.load(handle)
        return config, arch_from_hf_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{flag} {path}: {config_file}: {error}") from None


def tokenizer_present(path: str | None) -> bool:
    """A tokenizer file, or a directory holding a Hugging Face tokenizer's files."""
    if not path:
        return False
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES)
    return os.path.isfile(path)


def load_tokenizer(path: str):
    """The trainer's own loader (megatron_scope.data.tokenizer), so the dry run accepts what the run accepts."""
    from megatron_scope.data import tokenizer as tokenizer_module

    loader = getattr(tokenizer_module, "load_tokenizer", None) or tokenizer_module.Tokenizer.load
    return loader(path)


def prompt_format(args: argparse.Namespace):
    """The PromptFormat train_scope.py builds from --prompt-template / --apply-chat-template (None before
    those flags existed)."""
    from megatron_scope.data import datasets

    if not hasattr(args, "prompt_template") or not hasattr(datasets, "PromptFormat"):
        return None
    return datasets.PromptFormat(args.prompt_template, getattr(args, "apply_chat_template", False))


def measure_prompts(args: argparse.Namespace, tokenizer) -> int:
    """Longest prompt of --train-data in tokens, as the trainer's dataset tokenizes it (template included)."""
    from megatron_scope.data.datasets import PromptDataset

    fmt = prompt_format(args)
    kwargs = {} if fmt is None else {"prompt_format": fmt}
    dataset = PromptDataset.from_jsonl(args.train_data, seed=args.seed, tokenizer=tokenizer, **kwargs)
    return max(len(prompt.token_ids) for prompt in dataset.prompts)


# ---------------------------------------------------------------------------------------------- the check
def run_check(args: argparse.Namespace) -> dict:
    """Every check and the memory estimate; a dict with errors, warnings, notes, facts and per-GPU memory."""
    errors, warns, notes = [], [], []
    result = {"errors": errors, "warnings": warns, "notes": notes}
    try:
        student_config, student = read_model(args.student_hf, "--student-hf")
    except ValueError as error:
        errors.append(str(error))
        return result
    teacher = None
    if args.teacher_hf:
        try:
            _, teacher = read_model(args.teacher_hf, "--teacher-hf")
        except ValueError as error:
            errors.append(str(error))
            return result
    archs = {"student": student, **({"teacher": teacher} if teacher is not None else {})}

    # Tokenizers: the trainer's loader and identity check when the files are here.
    tokenizer_vocab, tokenizer = None, None
    if tokenizer_present(args.tokenizer):
        try:
            tokenizer = load_tokenizer(args.tokenizer)
            tokenizer_vocab = tokenizer.vocab_size
        except (ValueError, OSError, ImportError) as error:
            errors.append(f"--tokenizer {args.tokenizer}: {error}")
    else:
        notes.append(f"--tokenizer {args.tokenizer} is not here: vocabularies compared from config.json only")
    if args.teacher_tokenizer:
        if tokenizer is not None and tokenizer_present(args.teacher_tokenizer):
            from megatron_scope.data.tokenizer import check_same_tokenizer

            try:
                check_same_tokenizer(load_tokenizer(args.teacher_tokenizer), tokenizer)
            except (ValueError, OSError, ImportError) as error:
                errors.append(f"--teacher-tokenizer {args.teacher_tokenizer}: {error}")
        else:
            notes.append(f"--teacher-tokenizer {args.teacher_tokenizer}: not compared with --tokenizer "
                         "(one of them is not here)")
    vocab_errors, vocab_notes = me.check_vocabulary(tokenizer_vocab, archs)
    errors += vocab_errors
    notes += vocab_notes

    # The longest prompt.
    max_prompt, prompt_source = args.max_prompt_tokens, "--max-prompt-tokens"
    if max_prompt is None:
        max_prompt, prompt_source = DEFAULT_PROMPT_TOKENS, "assumed"
        if tokenizer is not None and os.path.isfile(args.train_data):
            try:
                max_prompt, prompt_source = measure_prompts(args, tokenizer), f"measured from {args.train_data}"
            except (ValueError, OSError) as error:
                errors.append(f"--train-data {args.train_data}: {error}")
        else:
            warns.append(f"longest prompt assumed {DEFAULT_PROMPT_TOKENS} tokens (--train-data or the tokenizer "
                            "is not here): pass --max-prompt-tokens")

    dtype_name = student_config.get("dtype") or student_config.get("torch_dtype") or "float32"
    plan = me.RunPlan(
        nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size, prompts_per_step=args.prompts_per_step,
        group_size=args.scope_group_size, micro_batch_size=args.micro_batch_size, max_prompt_tokens=max_prompt,
        max_new_tokens=args.max_new_tokens, bf16=args.bf16, distributed_optimizer=args.use_distributed_optimizer,
        algorithm=args.scope_algorithm, kl=args.scope_kl, topk=args.scope_topk,
        rollout_kv_cache_gib=args.rollout_kv_cache_gib,
        rollout_tensor_parallel=args.rollout_tensor_parallel_size, rollout_gpus=args.rollout_gpus or args.rollout_engines * args.rollout_tensor_parallel_size,
        rollout_element_bytes=DTYPE_BYTES.get(str(dtype_name), 4), gpu_memory_gib=args.gpu_memory_gib,
        overhead_gib=args.overhead_gib, flash_attention=args.assume_flash_attention,
        teacher_backend=args.teacher_backend)

    # What the trainer refuses at set-up (trainer._check_setup) or at its first step.
    if plan.needs_teacher and teacher is None:
        errors.append(f"--scope-algorithm {args.scope_algorithm} reads the teacher: give --teacher-hf")
    if args.teacher_backend == "vllm" and plan.needs_teacher:
        try:
            check_teacher_engine_objective(ScopeLossConfig.from_args(args, vocab_size=1))  # the check reads no vocab
        except ValueError as error:
            errors.append(str(error))
    if args.rollout_gpus and not args.rollout_engines:
        warns.append(f"--rollout-gpus {args.rollout_gpus}: estimated for engines on separate GPUs, but without "
                     "--rollout-engines train_scope.py runs its engine inside global rank 0")
    errors += me.check_parallel_sizes(plan, archs)
    errors += me.check_sequence_length(plan, archs)
    kv_errors, kv_notes = me.check_rollout_kv_cache(plan, student)
    errors += kv_errors
    notes += kv_notes

    padded = me.common_padded_vocab(list(archs.values()), plan.tensor_parallel)
    result["facts"] = {
        "world_size": plan.world_size,
        "tensor_parallel": plan.tensor_parallel,
        "pipeline_parallel": plan.pipeline_parallel,
        "data_parallel": plan.data_parallel,
        "sequences_per_step": plan.prompts_per_step * plan.group_size,
        "local_sequences": plan.local_sequences,
        "microbatches": plan.num_microbatches,
        "max_prompt_tokens": max_prompt,
        "max_prompt_tokens_source": prompt_source,
        "seq_length": plan.seq_length,
        "tokenizer_vocab": tokenizer_vocab,
        "padded_vocab": padded,
        "student_params": me.hf_param_count(student),
        "teacher_params": me.hf_param_count(teacher) if teacher is not None else None,
        "keeps_teacher_logits": plan.keeps_teacher_logits and teacher is not None,
        "rollout_kv_bytes_per_token": me.kv_bytes_per_token(student, plan.rollout_element_bytes),
    }
    if plan.world_size % (plan.tensor_parallel * plan.pipeline_parallel):
        return result  # no data-parallel size: no memory estimate
    gpus = me.estimate_memory(plan, student, teacher)
    result["memory"] = me.estimate_to_dict(plan, gpus)
    result["_table"] = me.format_table(plan, gpus)
    fit = me.fit_errors(plan, gpus)
    if fit and args.allow_overcommit:
        warns += [f"{message} (--allow-overcommit)" for message in fit]
    else:
        errors += fit
    if plan.keeps_teacher_logits and teacher is not None and not any("teacher logits" in m for m in fit):
        teacher_logits = next((c for g in gpus for c in g.components if c.name.startswith("teacher logits")), None)
        if teacher_logits is not None and teacher_logits.bytes > 0.25 * plan.gpu_memory_gib * me.GIB:
            warns.append(f"the full-vocabulary KL (--scope-kl {args.scope_kl}) keeps the teacher's logits for the "
                            f"whole local batch: {teacher_logits.bytes / me.GIB:.1f} GiB ({teacher_logits.detail}); "
                            f"{teacher_logits.advice}")
    return result


def format_report(args: argparse.Namespace, result: dict) -> str:
    lines = []
    facts = result.get("facts")
    if facts:
        lines.append(
            f"launch: {args.nnodes} node(s) x {args.nproc_per_node} = {facts['world_size']} ranks; "
            f"TP {facts['tensor_parallel']}"
            f" x PP {facts['pipeline_parallel']} x DP {facts['data_parallel']}; rollout: "
            + (f"{args.rollout_gpus} separate GPU(s)" if args.rollout_gpus else "vLLM on global rank 0")
            + f" (TP {args.rollout_tensor_parallel_size})")
        lines.append(f"student: {facts['student_params']:,} parameters ({args.student_hf})")
        if facts["teacher_params"] is not None:
            lines.append(f"teacher: {facts['teacher_params']:,} parameters ({args.teacher_hf})")
        lines.append(
            f"batch: {facts['sequences_per_step']} sequences per step, {facts['local_sequences']} per data-parallel rank "
            f"= {facts['microbatches']} microbatches of {args.micro_batch_size}; sequence {facts['seq_length']} tokens "
            f"(prompt {facts['max_prompt_tokens']}, {facts['max_prompt_tokens_source']}; + {args.max_new_tokens} new)")
        lines.append(f"vocabulary: tokenizer {facts['tokenizer_vocab'] or 'not read'}, padded {facts['padded_vocab']} "
                     f"({facts['padded_vocab'] // facts['tensor_parallel']} per TP rank)")
        lines.append("")
    if "_table" in result:
        lines += [result["_table"], ""]
    for level in ("errors", "warnings", "notes"):
        for message in result[level]:
            lines.append(f"{level[:-1].upper()}: {message}")
    lines.append("OK" if not result["errors"] else f"FAILED: {len(result['errors'])} error(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_check(args)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")} | {"ok": not result["errors"]},
                         indent=2))
    else:
        print(format_report(args, result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
