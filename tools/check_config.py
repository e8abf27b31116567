"""Dry run of a SCOPE launch: validate the flags and estimate per-GPU memory, without a GPU or any weights.

    python tools/check_config.py --nnodes 4 --nproc-per-node 8 --gpu-memory-gib 80 \
        <exactly the flags of python -m megatron_scope.train>

Takes the training parser (megatron_scope.arguments, so it accepts exactly the flags of a real run) plus the
launch geometry (`--nnodes`, `--nproc-per-node` as torchrun names them, `--gpu-memory-gib`, `--rollout-gpus`)
and a few dry-run options, and builds the run's configuration with the trainer's own `build_config`. Reads
only config.json of --student-hf / --teacher-hf, the tokenizers when they are there, and --train-data (to
measure the longest prompt) when it is there. Checks the flag combinations, parallel layout, sequence lengths,
vocabularies and the rollout KV cache, then prints a per-GPU memory table (formulas:
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

from megatron_scope import memory_estimate as me  # noqa: E402
from megatron_scope.arguments import build_parser as build_training_parser  # noqa: E402
from megatron_scope.arguments import nonnegative_float, nonnegative_int, positive_float, positive_int  # noqa: E402
from megatron_scope.config import build_config  # noqa: E402
from megatron_scope.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_scope.hf_config import config_dtype, read_hf_config  # noqa: E402

#: Prompt length assumed when neither --max-prompt-tokens nor a readable --train-data + tokenizer gives it.
DEFAULT_PROMPT_TOKENS = 1024
#: Files that make a directory a Hugging Face tokenizer.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    """The training flags + the launch geometry and dry-run options."""
    parser = build_training_parser(__doc__.split("\n")[0])
    g = parser.add_argument_group("launch geometry and dry run (check_config.py only)")
    g.add_argument("--nnodes", type=positive_int, default=1, help="torchrun --nnodes.")
    g.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=positive_int, default=1,
                   help="torchrun --nproc-per-node: training ranks (GPUs) per node.")
    g.add_argument("--gpu-memory-gib", type=positive_float, default=80.0, help="Memory of one GPU.")
    g.add_argument("--rollout-gpus", type=nonnegative_int, default=0,
                   help="GPUs running the Ray engines of --rollout-placement ray apart from the training ranks "
                        "(default: the rollout engines, and --teacher-engines for a vLLM teacher and for a vLLM "
                        "reference each, x --rollout-tensor-parallel-size).")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="Longest prompt in tokens (default: measured from --train-data with the tokenizer, "
                        f"else {DEFAULT_PROMPT_TOKENS}).")
    g.add_argument("--overhead-gib", type=nonnegative_float, default=2.0,
                   help="Runtime overhead per process on a GPU (CUDA context, NCCL, allocator fragmentation).")
    g.add_argument("--host-memory-gib", type=positive_float, default=None,
                   help="Host memory of one node: an error when the pinned host memory a node holds at once (teacher "
                        "hidden states, offloaded training state, level-1 engine weights) exceeds it; unset: reported.")
    g.add_argument("--allow-overcommit", action="store_true",
                   help="A run that does not fit --gpu-memory-gib only warns (exit 0).")
    g.add_argument("--json", action="store_true", help="Print the result as JSON.")
    g.add_argument("--print-least-recompute", action="store_true",
                   help="Print only the recompute flags of the least recomputation with which the launch fits "
                        "(nothing for none) and exit 0; exit 1 with the check's report when even full recompute of "
                        "every layer does not fit (the launch scripts' RECOMPUTE=auto).")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed as the trainer parses (a bad flag value exits 2 with argparse's usage error); flag combinations
    are checked by `run_check`, which reports them with the other errors."""
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------- inputs
def read_model(path: str, flag: str) -> tuple[dict, object]:
    """(config.json dict, DecoderArch) of an HF model directory; ValueError naming the flag and the file."""
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config

    try:
        config = read_hf_config(path)
        return config, arch_from_hf_config(config)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{flag} {error}") from None


def tokenizer_present(path: str | None) -> bool:
    """A tokenizer file, or a directory holding a Hugging Face tokenizer's files."""
    if not path:
        return False
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES)
    return os.path.isfile(path)


def measure_prompts(config, tokenizer) -> int:
    """Longest prompt of --train-data in tokens, as the trainer's dataset tokenizes it (template included)."""
    from megatron_scope.data.datasets import PromptDataset

    dataset = PromptDataset.from_file(config.data.train_data, seed=config.loop.seed, tokenizer=tokenizer,
                                      keys=config.data.dataset_keys(), prompt_format=config.data.prompt_format())
    return max(len(prompt.token_ids) for prompt in dataset.prompts)


# ---------------------------------------------------------------------------------------------- the check
def run_check(args: argparse.Namespace) -> dict:
    """Every check and the memory estimate; a dict with errors, warnings, notes, facts and per-GPU memory."""
    errors, warns, notes = [], [], []
    result = {"errors": errors, "warnings": warns, "notes": notes}
    try:
        config = build_config(args)  # the trainer's own configuration: its flag-combination rules
        student_config, student = read_model(config.models.student_hf, "--student-hf")
        teachers, reference = {}, None  # by archs key: "teacher" (--teacher-hf) or "teacher NAME" (--teacher)
        for name, hf_dir in config.models.teacher_model_dirs.items():  # a served teacher's config.json is not here
            key = config.models.teacher_label(name)
            teachers[key] = read_model(hf_dir, me.model_flag(key))[1]
        if config.models.reference_hf:
            _, reference = read_model(config.models.reference_hf, "--exopd-reference-hf")
    except ValueError as error:
        errors.append(str(error))
        return result
    archs = {"student": student, **teachers, **({"reference": reference} if reference is not None else {})}
    teacher_archs = tuple(teachers.values()) or None  # every teacher, for the estimators

    # Tokenizers: the trainer's loader and identity check when the files are here.
    tokenizer_vocab, tokenizer = None, None
    if tokenizer_present(config.models.tokenizer):
        try:
            tokenizer = load_tokenizer(config.models.tokenizer)
            tokenizer_vocab = tokenizer.vocab_size
        except (ValueError, OSError, ImportError) as error:
            errors.append(f"--tokenizer {config.models.tokenizer}: {error}")
    else:
        notes.append(f"--tokenizer {config.models.tokenizer} is not here: vocabularies compared from config.json only")
    for name, path in config.models.teacher_tokenizers:
        if tokenizer is not None and tokenizer_present(path):
            from megatron_scope.data.tokenizer import check_same_tokenizer

            try:
                check_same_tokenizer(load_tokenizer(path), tokenizer)
            except (ValueError, OSError, ImportError) as error:
                errors.append(f"--teacher-tokenizer of the {config.models.teacher_label(name)} ({path}): {error}")
        else:
            notes.append(f"--teacher-tokenizer of the {config.models.teacher_label(name)} ({path}): not compared with "
                         "--tokenizer (one of them is not here)")
    vocab_errors, vocab_notes = me.check_vocabulary(tokenizer_vocab, archs)
    errors += vocab_errors
    notes += vocab_notes

    # The longest prompt.
    max_prompt, prompt_source = args.max_prompt_tokens, "--max-prompt-tokens"
    if max_prompt is None:
        max_prompt, prompt_source = DEFAULT_PROMPT_TOKENS, "assumed"
        if tokenizer is not None and os.path.isfile(config.data.train_data):
            try:
                max_prompt, prompt_source = measure_prompts(config, tokenizer), f"measured from {config.data.train_data}"
            except (ValueError, OSError) as error:
                errors.append(f"--train-data {config.data.train_data}: {error}")
        else:
            warns.append(f"longest prompt assumed {DEFAULT_PROMPT_TOKENS} tokens (--train-data or the tokenizer "
                            "is not here): pass --max-prompt-tokens")

    rollout = config.rollout
    ray_engines = rollout.engines + rollout.teacher_engines * (len(config.engine_teachers) + config.remote_reference)
    plan = me.RunPlan(
        config=config, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, max_prompt_tokens=max_prompt,
        rollout_gpus=(args.rollout_gpus or ray_engines * rollout.tensor_parallel_size)
        if rollout.placement == "ray" else 0,
        rollout_element_bytes=config_dtype(student_config).itemsize, gpu_memory_gib=args.gpu_memory_gib,
        overhead_gib=args.overhead_gib)
    if args.rollout_gpus and rollout.placement != "ray":
        warns.append(f"--rollout-gpus {args.rollout_gpus}: estimated for engines on separate GPUs, but with "
                     f"--rollout-placement {rollout.placement} the trainer runs its engines on training GPUs")
    errors += me.check_parallel_sizes(plan, archs)
    errors += me.check_sequence_length(plan, archs)
    kv_errors, kv_notes = me.check_rollout_kv_cache(plan, student)
    errors += kv_errors
    notes += kv_notes
    host = me.teacher_hidden_host_bytes(plan, student, teacher_archs)
    if config.served_teacher:
        served = "; ".join(f"{name} at {config.models.teacher_dirs[name]}" for name in config.teachers_on("server"))
        notes.append(f"teacher: served by vLLM servers ({served}), on "
                     "GPUs outside this launch: not in the memory estimate; their --max-logprobs must be at least "
                     f"--scope-topk ({config.loss.teacher_topk}) and their max_model_len the prompt + response length")
    if rollout.placement != "ray":
        where = (f"one per data-parallel replica, {plan.data_parallel} in all" if rollout.placement == "colocated"
                 else "one, on global rank 0")
        notes.append(f"rollout: vLLM engines of TP {rollout.tensor_parallel_size} on training GPUs ({where}), asleep "
                     "while they train: the rollout engine at level 2 (weights dropped, a refit follows every step), "
                     "a vLLM teacher or reference at level 1 (weights in pinned host memory); KV caches freed")
    else:
        notes.append(f"rollout: {ray_engines} Ray engine(s) of TP {rollout.tensor_parallel_size} on "
                     f"{plan.rollout_gpus} GPUs of their own (each engine's weights and KV cache resident there, the "
                     f"training GPUs hold none), {plan.world_size} GPUs train; --rollout-schedule {rollout.schedule}: "
                     + {"one-step-off": "the engines generate step k+1 while the trainer trains step k, so a step "
                                        "takes about max(rollout, training) + refit and each response is one "
                                        "optimizer step stale",
                        "async": f"the engines produce each step's rollout up to {rollout.max_staleness} step(s) ahead "
                                 "of training (each response 0 to that many optimizer steps stale), so a step takes "
                                 "about max(rollout, training) + refit on average and a slow rollout is absorbed by "
                                 "those produced ahead of it",
                        "sync": "the engines idle while the trainer trains and the trainer while they generate (a step "
                                "takes rollout + training + refit; --rollout-schedule one-step-off or async overlaps "
                                "them)"}[rollout.schedule])
        if rollout.schedule != "sync":
            ahead = rollout.staleness_bound + 1  # the rollouts produced ahead, and the one in progress
            tokens = rollout.sequences_per_step * rollout.max_new_tokens
            notes.append(f"host memory: the rollout leader (global rank 0) holds up to {ahead} step(s)' rollouts "
                         f"produced ahead, at most {ahead} x {tokens:,} response tokens (token id and sampling "
                         "log-prob each, as Python lists), and a checkpoint saves the finished ones")
        if rollout.partial_rollout_tokens is not None:
            segments = -(-rollout.max_new_tokens // rollout.partial_rollout_tokens)
            notes.append(f"rollout: --partial-rollout-tokens {rollout.partial_rollout_tokens}: a refit waits for one "
                         "segment of the rollout in progress, not the whole rollout; a response takes up to "
                         f"{segments} requests, each reading its prefix again (one prefill per segment)")
    if rollout.props is not None:
        notes.append(f"rollout: --rollout-sampler props draws each group in {rollout.props.rounds} rounds, one "
                     f"generate call after another (a step's generation takes {rollout.props.rounds} length tails, not one); "
                     "each request of a later round carries its group's earlier responses to the engine")
    if host:
        notes.append(f"host memory: the (self-)teacher's last hidden states of the local batch wait in pinned "
                     f"host memory from the scoring pass to the student's step, {host / me.GIB:.1f} GiB per rank "
                     f"({host * args.nproc_per_node / me.GIB:.1f} GiB per node of {args.nproc_per_node} ranks)")

    padded = me.common_padded_vocab(list(archs.values()), plan.tensor_parallel)
    result["facts"] = {
        "world_size": plan.world_size,
        "tensor_parallel": plan.tensor_parallel,
        "pipeline_parallel": plan.pipeline_parallel,
        "data_parallel": plan.data_parallel,
        "sequences_per_step": rollout.sequences_per_step,
        "local_sequences": plan.local_sequences,
        "microbatches": plan.num_microbatches,
        "micro_batch_rows": plan.micro_batch_rows,
        "max_prompt_tokens": max_prompt,
        "max_prompt_tokens_source": prompt_source,
        "seq_length": plan.seq_length,
        "tokenizer_vocab": tokenizer_vocab,
        "padded_vocab": padded,
        "student_params": me.hf_param_count(student),
        "teacher_params": sum(map(me.hf_param_count, teachers.values())) if teachers else None,
        "teachers": len(teachers),
        "teacher_hidden_states_host_bytes": me.teacher_hidden_host_bytes(plan, student, teacher_archs),
        "rollout_kv_bytes_per_token": me.kv_bytes_per_token(student, plan.rollout_element_bytes),
        "rollout_placement": rollout.placement,
        "rollout_tensor_parallel": rollout.tensor_parallel_size,
        "rollout_gpus": plan.rollout_gpus,
    }
    if plan.world_size % (plan.tensor_parallel * plan.pipeline_parallel):
        return result  # no data-parallel size: no memory estimate
    gpus = me.estimate_memory(plan, student, teacher_archs, reference)
    errors += me.check_engine_start(plan, 1 + len(config.engine_teachers) + config.remote_reference)
    host_terms = me.host_memory_per_node(plan, student, teacher_archs, reference)
    host_total = sum(c.bytes for c in host_terms)
    result["host_memory_per_node"] = {"total_bytes": host_total,
                                      "components": [{"name": c.name, "bytes": c.bytes} for c in host_terms]}
    if host_terms:
        summary = (f"pinned host memory per node of {args.nproc_per_node} ranks: {host_total / me.GIB:.1f} GiB ("
                   + ", ".join(f"{c.name} {c.bytes / me.GIB:.1f}" for c in host_terms) + ")")
        if args.host_memory_gib is not None and host_total > args.host_memory_gib * me.GIB:
            errors.append(f"{summary}: more than --host-memory-gib {args.host_memory_gib:g}")
        else:
            notes.append(summary)
    least = me.least_recompute(plan, student, teacher_archs, reference)
    train, extra = me.step_flops(plan, student)
    if least is None:
        result["least_recompute"] = None
        notes.append("least recompute: none fits --gpu-memory-gib, not even full recompute of every layer")
    else:
        chosen, _ = least
        chosen_train, chosen_extra = me.step_flops(chosen, student)
        flags = me.recompute_flags(chosen.config.models)
        result["least_recompute"] = {"flags": flags, "step_flops_per_gpu": chosen_train + chosen_extra,
                                     "recompute_flops_per_gpu": chosen_extra}
        notes.append(f"least recompute that fits: {' '.join(flags) or 'none'} (student step "
                     f"{(chosen_train + chosen_extra) / 1e15:.0f} PFLOP per GPU at full length, "
                     f"{chosen_extra / chosen_train:+.0%} for recompute); as given "
                     f"({' '.join(me.recompute_flags(config.models)) or 'none'}): {(train + extra) / 1e15:.0f} PFLOP, "
                     f"{extra / train:+.0%}")
    result["memory"] = me.estimate_to_dict(plan, gpus)
    result["_table"] = me.format_table(plan, gpus)
    fit = me.fit_errors(plan, gpus)
    if fit and args.allow_overcommit:
        warns += [f"{message} (--allow-overcommit)" for message in fit]
    else:
        errors += fit
    return result


def format_report(args: argparse.Namespace, result: dict) -> str:
    lines = []
    facts = result.get("facts")
    if facts:
        lines.append(
            f"launch: {args.nnodes} node(s) x {args.nproc_per_node} = {facts['world_size']} ranks; "
            f"TP {facts['tensor_parallel']}"
            f" x PP {facts['pipeline_parallel']} x DP {facts['data_parallel']}; rollout: "
            + {"ray": f"{facts['rollout_gpus']} separate GPU(s)", "rank0": "one vLLM engine on global rank 0",
               "colocated": f"one vLLM engine per replica ({facts['data_parallel']})"}[facts["rollout_placement"]]
            + f" (TP {facts['rollout_tensor_parallel']})")
        lines.append(f"student: {facts['student_params']:,} parameters ({args.student_hf})")
        if facts["teacher_params"] is not None:
            lines.append(f"teacher: {facts['teacher_params']:,} parameters ({args.teacher_hf})" if facts["teachers"] == 1
                         else f"teachers: {facts['teachers']}, {facts['teacher_params']:,} parameters in all "
                         f"({', '.join(args.teacher)})")
        lines.append(
            f"batch: {facts['sequences_per_step']} sequences per step, {facts['local_sequences']} per data-parallel rank "
            f"= {facts['microbatches']} microbatches of {facts['micro_batch_rows']}; sequence {facts['seq_length']} tokens "
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
    if args.print_least_recompute:
        least = result.get("least_recompute")
        if least is None:
            print(format_report(args, result), file=sys.stderr)
            return 1
        print(" ".join(least["flags"]))
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")} | {"ok": not result["errors"]},
                         indent=2))
    else:
        print(format_report(args, result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
