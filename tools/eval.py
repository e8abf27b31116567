"""Evaluate a Hugging Face checkpoint on math benchmarks: Avg@n and unbiased Pass@k (SCOPE, arXiv 2604.10688).

    python tools/eval.py --model /path/to/hf_checkpoint \\
        --benchmark aime24=data/aime24.jsonl --benchmark math500=data/math500.jsonl \\
        --n 16 --k 1 2 4 8 16 --max-new-tokens 4096 --temperature 0.6 --top-p 0.95 \\
        --gpu-memory-utilization 0.85 --output-dir out/eval

The checkpoint directory holds the model and its tokenizer files. Benchmarks are local JSONL/parquet files
in their public schemas (megatron_scope/eval/benchmarks.py); nothing is downloaded. Writes results.json,
results.md, samples.jsonl and accuracy_vs_k.png to --output-dir and prints the markdown table.
Megatron checkpoints: convert to Hugging Face format first (not supported directly yet).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from megatron_scope.eval.benchmarks import BENCHMARK_NAMES, load_benchmark
from megatron_scope.eval.runner import DEFAULT_PROMPT_TEMPLATE, EvalConfig, evaluate, write_report
from megatron_scope.rewards.math_verifier import MathVerifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="Hugging Face checkpoint directory (model + tokenizer), or a Megatron checkpoint written "
                             "by tools/convert_hf_to_megatron.py (converted to HF under --output-dir first)")
    parser.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help=f"a benchmark file; NAME is one of {', '.join(BENCHMARK_NAMES)}; repeat for several",
    )
    parser.add_argument("--n", type=int, required=True, help="responses sampled per problem")
    parser.add_argument("--k", type=int, nargs="+", required=True, help="the k of each reported Pass@k")
    parser.add_argument("--output-dir", required=True)
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--prompt-template", help="prompt text containing {problem} once")
    template.add_argument("--prompt-template-file", help="a file holding the prompt template")
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the formatted prompt as one user turn with the tokenizer's chat template",
    )
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-token-id", type=int, action="append", default=[], help="extra stop token (the EOS is always one)"
    )
    parser.add_argument("--prompts-per-call", type=int, default=32, help="problems per engine.generate call")
    parser.add_argument("--verify-workers", type=int, default=2, help="math-verify worker processes")
    parser.add_argument("--verify-timeout", type=float, default=10.0, help="hard seconds per graded answer")
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


class _PromptTokenizer:
    """encode/decode over a transformers tokenizer; with a chat template, the prompt becomes one user turn."""

    def __init__(self, hf_tokenizer, use_chat_template: bool):
        self.hf_tokenizer = hf_tokenizer
        self.use_chat_template = use_chat_template

    def encode(self, text: str) -> list[int]:
        if self.use_chat_template:
            text = self.hf_tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return list(self.hf_tokenizer.encode(text, add_special_tokens=False))  # the template has them
        return list(self.hf_tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return self.hf_tokenizer.decode(token_ids, skip_special_tokens=True)


def parse_benchmark_args(values: list[str]) -> dict[str, str]:
    benchmarks = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--benchmark {value!r}: expected NAME=PATH")
        if name not in BENCHMARK_NAMES:
            raise ValueError(f"--benchmark {value!r}: unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")
        if name in benchmarks:
            raise ValueError(f"--benchmark {name!r} given twice")
        benchmarks[name] = path
    return benchmarks


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
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a directory")
    # A converted Megatron checkpoint or a training iteration directory (metadata file), or a training root.
    if any(os.path.isfile(os.path.join(args.model, name))
           for name in ("megatron_scope_checkpoint.json", "latest_checkpointed_iteration.txt")):
        args.model = megatron_to_hf(args.model, args.output_dir)
    template = DEFAULT_PROMPT_TEMPLATE
    if args.prompt_template is not None:
        template = args.prompt_template
    elif args.prompt_template_file is not None:
        with open(args.prompt_template_file, encoding="utf-8") as handle:
            template = handle.read()

    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(args.model)
    if hf_tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {args.model!r} has no EOS token; cannot stop responses")
    if args.chat_template and not getattr(hf_tokenizer, "chat_template", None):
        raise ValueError(f"--chat-template given but the tokenizer of {args.model!r} has no chat template")
    stop_token_ids = tuple(dict.fromkeys([hf_tokenizer.eos_token_id, *args.stop_token_id]))

    config = EvalConfig(  # validates n, k, template and sampling before anything expensive
        num_samples=args.n,
        ks=tuple(args.k),
        prompt_template=template,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=stop_token_ids,
        prompts_per_call=args.prompts_per_call,
    )
    benchmarks = {name: load_benchmark(name, path) for name, path in parse_benchmark_args(args.benchmark).items()}
    tokenizer = _PromptTokenizer(hf_tokenizer, args.chat_template)

    with MathVerifier(num_workers=args.verify_workers, timeout_seconds=args.verify_timeout) as verifier:
        for name, problems in benchmarks.items():  # fail on bad gold answers before starting the engine
            verifier.check_gold_answers([problem.gold_answer for problem in problems])
        engine = build_engine(args.model, args)
        try:
            report = evaluate(engine, tokenizer, benchmarks, config, verifier, show_progress=not args.no_progress)
        finally:
            engine.close()
    paths = write_report(report, args.output_dir)
    print(report.to_markdown())
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
