"""The vocab-parallel KL on one CUDA GPU: forward+backward time and extra peak memory, TP=1.

    python benchmarks/bench_vocab_parallel_gpu.py                 # the BENCHMARKS.md table
    python benchmarks/bench_vocab_parallel_gpu.py --quick         # small shapes, a smoke run

The methods of `bench_vocab_parallel.py` (`ours`, `naive`: two `log_softmax` + `F.kl_div`, and Megatron's
`vocab_parallel_cross_entropy` on one tensor of the same shape), with `ours` in several variants: the
eager or the Inductor-compiled (Triton) chunk kernels, shape-dynamic (`CUDA_COMPILE_DYNAMIC`, the default)
or static, at several chunk sizes (`CUDA_CHUNK_ELEMENTS`).

Time: all variants of one shape run interleaved (round-robin) in one process, `--rounds` times after a
warm-up that also compiles; each sample is wall time between two `torch.cuda.synchronize()`; median and
minimum reported. Memory: `torch.cuda.max_memory_allocated()` over one forward+backward minus the memory
allocated just before it (inputs alive, previous gradient freed), in fp32-shard units (tokens x vocab x 4
bytes); it includes the gradient (1.0 shard for fp32 logits, 0.5 for bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..")))
sys.path.insert(0, HERE)

FULL_SHAPES = ((4096, 32768, "float32"), (1024, 151936, "float32"), (8192, 151936, "float32"),
               (8192, 151936, "bfloat16"))
QUICK_SHAPES = ((256, 4096, "float32"), (64, 16384, "bfloat16"))
CHUNKS = (1 << 22, 1 << 24, 1 << 26)


def _variants(chunks, compile_chunks, static_chunks):
    """(label, method, backend, chunk elements, shape-dynamic compile) for every timed variant."""
    rows = [(f"ours eager 2^{c.bit_length() - 1}", "ours", "eager", c, False) for c in chunks]
    rows += [(f"ours compiled 2^{c.bit_length() - 1}", "ours", "compile", c, True) for c in compile_chunks]
    rows += [(f"ours compiled static 2^{c.bit_length() - 1}", "ours", "compile", c, False) for c in static_chunks]
    return rows + [("naive", "naive", "eager", None, False), ("megatron_ce", "megatron_ce", "eager", None, False)]


def _select(backend: str, chunk, dynamic: bool):
    from megatron_scope.ops import vocab_parallel

    os.environ[vocab_parallel.BACKEND_ENV] = backend
    vocab_parallel.CUDA_COMPILE_DYNAMIC = dynamic
    if chunk is not None:
        vocab_parallel.CUDA_CHUNK_ELEMENTS = chunk


def _cuda_inputs(tokens: int, vocab: int, dtype: str, seed: int = 0):
    """The CPU benchmark's inputs (logits ~ 4 N(0, 1), a random target), drawn on the GPU."""
    generator = torch.Generator("cuda").manual_seed(seed)
    dtype = getattr(torch, dtype)
    student = (4 * torch.randn(tokens, vocab, generator=generator, device="cuda")).to(dtype).requires_grad_()
    teacher = (4 * torch.randn(tokens, vocab, generator=generator, device="cuda")).to(dtype)
    target = torch.randint(0, vocab, (tokens,), generator=generator, device="cuda")
    return student, teacher, target


def run_shape(tokens: int, vocab: int, dtype: str, variants, rounds: int, group):
    from bench_vocab_parallel import _step_fn

    student, teacher, target = _cuda_inputs(tokens, vocab, dtype)
    steps = {label: (_step_fn(method, group, 1), setting) for label, method, *setting in variants}
    times = {label: [] for label in steps}
    memory = {}
    shard_bytes = tokens * vocab * 4
    for round_index in range(rounds + 1):  # round 0: warm-up (and compilation) plus the memory sample
        for label, (step, setting) in steps.items():
            _select(*setting)
            student.grad = None
            torch.cuda.synchronize()
            if round_index == 0:
                step(student, teacher, target)  # compile / autotune outside the memory sample
                student.grad = None
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(student, teacher, target)
                torch.cuda.synchronize()
                memory[label] = (torch.cuda.max_memory_allocated() - before) / shard_bytes
                continue
            start = time.perf_counter()
            step(student, teacher, target)
            torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
    del student, teacher, target
    torch.cuda.empty_cache()
    return {"tokens": tokens, "vocab": vocab, "dtype": dtype,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()}, "extra_peak_over_fp32_shard": memory}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--chunks", type=int, nargs="*", default=[1 << 24], help="eager chunk sizes (elements)")
    parser.add_argument("--compile-chunks", type=int, nargs="*", default=list(CHUNKS),
                        help="chunk sizes for the shape-dynamic compiled kernels (the CUDA default)")
    parser.add_argument("--static-chunks", type=int, nargs="*", default=[1 << 24],
                        help="chunk sizes for shape-static compiled kernels (ragged last chunk eager, as on CPU)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_vocab_parallel_gpu.py needs a CUDA device; use bench_vocab_parallel.py on CPU")

    from megatron.core import parallel_state

    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.parallel import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    initialize_model_parallel(1, 1, seed=1)
    group = parallel_state.get_tensor_model_parallel_group()
    variants = _variants(args.chunks, args.compile_chunks, args.static_chunks)
    results = []
    for tokens, vocab, dtype in (QUICK_SHAPES if args.quick else FULL_SHAPES):
        row = run_shape(tokens, vocab, dtype, variants, args.rounds, group)
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, rounds {args.rounds}")
    print("| tokens x vocab, dtype | method | fwd+bwd median (min) ms | median / naive | median / Megatron CE "
          "| extra peak / fp32 shard |")
    print("|---|---|---|---|---|---|")
    for row in results:
        med, low = row["median_s"], row["min_s"]
        for label in med:
            print(f"| {row['tokens']}x{row['vocab']}, {row['dtype']} | {label} | {1e3 * med[label]:.2f} "
                  f"({1e3 * low[label]:.2f}) | {med[label] / med['naive']:.2f} | {med[label] / med['megatron_ce']:.2f} "
                  f"| {row['extra_peak_over_fp32_shard'][label]:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
