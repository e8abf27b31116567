"""Evaluate a Hugging Face checkpoint, or a training checkpoint, on held-out sets: Avg@n and unbiased Pass@k (SCOPE,
arXiv 2604.10688).

    python tools/eval.py --model /path/to/hf_checkpoint \\
        --eval-data aime24=data/aime24.jsonl --eval-data math500=data/math500.parquet \\
        --prompt-template $'{prompt}\\nPlease reason step by step, and put your final answer within \\\\boxed{}.' \\
        --apply-chat-template --reward math --eval-samples-per-prompt 16 --eval-max-new-tokens 4096 \\
        --eval-temperature 0.6 --eval-top-p 0.95 --gpu-memory-utilization 0.85 --output-dir out/eval

The sets, prompt template, verifiers and sampling flags are the training run's own (--eval-data, --prompt-template,
--apply-chat-template, --reward, --reward-by-source, the key flags, --eval-*, --seed; `megatron_scope.arguments`):
given a run's flags, this gives the numbers its validation logged for the same checkpoint. --model is a Hugging Face
directory (model + tokenizer), a training checkpoint's iteration directory or root (its --save-hf model, else
converted to HF under --output-dir first). Files are local; nothing is downloaded. Writes results.json, results.md,
samples.jsonl and accuracy_vs_k.png to --output-dir and prints the markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from megatron_scope.arguments import add_row_args, add_validation_args
from megatron_scope.config import build_data_config, build_validation_config
from megatron_scope.eval.benchmarks import load_eval_sets
from megatron_scope.eval.runner import EvalConfig, build_report, prepare_sets, sample_and_grade, write_report
from megatron_scope.rewards.routing import build_verifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="Hugging Face checkpoint directory (model + tokenizer), or a training checkpoint (an "
                             "iter_XXXXXXX directory or the --save root: its latest iteration)")
    parser.add_argument("--tokenizer", default=None,
                        help="the run's --tokenizer (a SentencePiece model file or an HF tokenizer directory); "
                             "default: the model directory's")
    parser.add_argument("--output-dir", required=True)
    add_row_args(parser.add_argument_group(title="data"))
    add_validation_args(parser, training=False)
    # training's defaults of the flags the --eval-* sampling flags fall back to, and of training-only ones
    parser.set_defaults(rollout_temperature=1.0, rollout_top_p=1.0, max_new_tokens=256, eval_interval=0,
                        eval_at_start=False, data_source_key=None, max_verifier_error_fraction=0.05)
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="the k of each reported Pass@k (default: 1, 2, 4, ... below n, and n)")
    parser.add_argument("--seed", type=int, default=1234, help="the run's --seed (the same default)")
    parser.add_argument(
        "--stop-token-id", type=int, action="append", default=[], help="extra stop token (the EOS is always one)"
    )
    parser.add_argument("--prompts-per-call", type=int, default=32, help="problems per engine.generate call")
    engine = parser.add_argument_group("vLLM engine")
    memory = engine.add_mutually_exclusive_group(required=True)
    memory.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB")
    memory.add_argument(
        "--gpu-memory-utilization", type=float, help="fraction of device memory for vLLM (on CPU: of host memory)"
    )
    engine.add_argument("--tensor-parallel-size", type=int, default=1)
    engine.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    engine.add_argument(
        "--max-model-len", type=int, default=None, help="prompt + response tokens; default: the model's positions"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def build_engine(model_dir: str, args: argparse.Namespace):
    """The vLLM rollout engine for `model_dir`. The only place that knows the engine's constructor."""
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    return VLLMRolloutEngine(
        VLLMEngineConfig(
            model_dir,
            kv_cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * (1 << 30)),
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            seed=args.seed,
        )
    )


def megatron_to_hf(megatron_dir: str, output_dir: str) -> str:
    """The HF model of a Megatron checkpoint: the one a training checkpoint saved with --save-hf holds
    (iter_XXXXXXX/hf_model), else `output_dir`/hf_model converted with tools/convert_megatron_to_hf.py in its own
    process (its own process group, away from the vLLM engine's); returns that directory."""
    from megatron_scope.megatron.checkpointing import HF_MODEL_SUBDIR, read_model_metadata

    saved = os.path.join(read_model_metadata(megatron_dir)[0], HF_MODEL_SUBDIR)
    if os.path.isfile(os.path.join(saved, "config.json")):
        return saved
    hf_dir = os.path.join(output_dir, "hf_model")
    converter = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_megatron_to_hf.py")
    subprocess.run([sys.executable, converter, "--megatron-dir", megatron_dir, "--output-dir", hf_dir], check=True)
    return hf_dir


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    data, validation = build_data_config(args, train_data=None), build_validation_config(args)  # checked first
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a directory")
    # A converted Megatron checkpoint or a training iteration directory (metadata file), or a training root.
    if any(os.path.isfile(os.path.join(args.model, name))
           for name in ("megatron_scope_checkpoint.json", "latest_checkpointed_iteration.txt")):
        args.model = megatron_to_hf(args.model, args.output_dir)

    from megatron_scope.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer.eos_id is None:
        raise ValueError(f"the tokenizer {args.tokenizer or args.model!r} has no EOS token; cannot stop responses")
    options = {"prompts_per_call": args.prompts_per_call}
    if args.k is not None:
        options["ks"] = tuple(args.k)
    config = EvalConfig.of_run(validation, data, args.seed, stop_token_ids=(tokenizer.eos_id, *args.stop_token_id),
                               vocab_size=tokenizer.vocab_size, **options)
    with build_verifier(data) as verifier:
        # sets, gold answers and prompts checked before the engine starts
        sets = prepare_sets(load_eval_sets(validation.data, data), tokenizer, config.prompt_format, verifier)
        engine = build_engine(args.model, args)
        try:
            samples = sample_and_grade(engine, tokenizer, sets, config, verifier, show_progress=not args.no_progress)
        finally:
            engine.close()
    report = build_report(sets, samples, config)
    paths = write_report(report, args.output_dir)
    print(report.to_markdown())
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
