"""Forward+backward time and extra peak memory of vocab_parallel_linear_kl vs materialised logits vs Megatron CE.

    .venv/bin/python benchmarks/bench_linear_kl.py --rounds 3      # the BENCHMARKS.md table (~21 min, 1 core)
    .venv/bin/python benchmarks/bench_linear_kl.py --quick         # small shapes, a smoke run
    .venv/bin/python benchmarks/bench_linear_kl.py --vocab-divisor 1   # issue 16's full shapes (~2.5 h)

Methods, fp32, student hidden h_S [tokens, H_S], student output layer W_S [V/TP, H_S], teacher h_T
[tokens, H_T], W_T [V/TP, H_T]; forward + backward of `(per_token * w).sum()` with a fixed random
per-token weight w (so the per-token output's upstream gradient is not all ones); gradients into h_S and
W_S only:
- `fused`: `vocab_parallel_linear_kl(h_S, W_S, h_T, W_T, "reverse", group)`: no [tokens, V/TP] logits
  beyond one token chunk; 6 matmuls (the backward recomputes both logit chunks).
- `fused_loss`: `vocab_parallel_linear_distill_loss(h_S, W_S, h_T, W_T, w, kind="reverse", group=group)`, the
  same sum with its per-token coefficients w given up front (as the SCOPE and OPD losses give them): the gradient
  is taken in the forward pass while each chunk's logits exist; 4 matmuls, the backward only scales.
- `materialised` (issue 16's (a)): s = Megatron's output layer (h_S, W_S) (the column-parallel linear's
  autograd function, `linear_with_grad_accumulation_and_async_allreduce`: s = h_S W_S^T, its backward
  computes dW = ds^T h_S), t = h_T W_T^T without grad, then `vocab_parallel_kl(s, t, "reverse", group)`:
  two logits shards and their gradient; 4 matmuls.
- `megatron_ce` (issue 16's (b)): the same output layer for s, then
  `megatron.core.tensor_parallel.vocab_parallel_cross_entropy(s, target)` (one logits shard, softmax and
  gradient in place): the lower bound; 3 matmuls.

Shapes (issue 16): tokens x H_S x V/TP of 4096 x 1536 x 151936 (TP=1), 4096 x 1536 x 75968 (TP=2's
per-rank work, in one process: the fused op communicates only per-token statistics and one [tokens, H_S]
all-reduce, so one rank's time is the work of its vocabulary shard) and 2048 x 4096 x 151936; teacher
hidden 3584 (a 7B teacher) for H_S = 1536, 5120 for H_S = 4096. Every method's work and memory is linear
in the vocabulary shard (matmuls and softmax passes alike), so `--vocab-divisor` (default 8) divides the
local vocabulary to fit the run into ~25 minutes on one core: ratios between methods and memory in shard
units keep their meaning, and the fused op keeps about the issue's token chunking (rows per chunk:
min(CHUNK_ELEMENTS / (V/TP), ceil(tokens / MIN_CHUNKS)): 256, 256, 128 rows here against 110, 220, 110 at
the full vocabulary). Dividing the tokens instead would shrink each chunk's matmul to 16-32 rows, which
runs at about half the GEMM throughput of 110-256 rows on this CPU and would misstate the fused op's time.

Time and memory are measured as in `bench_vocab_parallel.py` (whose helpers this script imports): the
methods interleaved round-robin in one fresh process per shape, after one warm-up round, `--rounds`
timed rounds, median and min; one torch thread by default. Memory: one fresh process per (method,
shape, with glibc's mmap threshold fixed at 1 MiB (`MMAP_THRESHOLD`: every tensor from 1 MiB up is
mapped on allocation and unmapped on free, so the high-water mark tracks live tensors, as it does at the
issue's vocabulary); compiled kernels built first on an input with the same chunk shape, inputs
allocated, freed heap pages returned to the OS (malloc_trim), the resident-set high-water mark reset to the
current RSS, one forward+backward; the extra peak is VmHWM minus that RSS minus the returned gradients
(h_S and W_S, which every method must produce), in units of one fp32 logits shard (tokens x V/TP x 4 B).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vocab_parallel as bvp  # noqa: E402  (its timing/memory helpers)

METHODS = ("fused", "fused_loss", "materialised", "megatron_ce")
#: (label, tokens, student hidden, teacher hidden, local vocabulary V/TP): issue 16's shapes.
FULL_SHAPES = (
    ("TP=1", 4096, 1536, 3584, 151936),
    ("TP=2, one rank", 4096, 1536, 3584, 75968),
    ("TP=1", 2048, 4096, 5120, 151936),
)
#: Smoke shapes: the first large enough for the compiled kernels, the second runs them eagerly.
QUICK_SHAPES = (
    ("TP=1", 512, 64, 96, 16384),
    ("TP=1", 256, 128, 160, 8192),
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "bench_linear_kl{}.json")


def _inputs(tokens: int, student_hidden: int, teacher_hidden: int, local_vocab: int, seed: int = 0):
    """Hidden states ~ N(0, 1), weights ~ N(0, 16 / hidden): logits ~ 4 N(0, 1), as bench_vocab_parallel's."""
    generator = torch.Generator().manual_seed(seed)
    h_s = torch.randn(tokens, student_hidden, generator=generator).requires_grad_()
    w_s = (torch.randn(local_vocab, student_hidden, generator=generator) * (4 / student_hidden**0.5)).requires_grad_()
    h_t = torch.randn(tokens, teacher_hidden, generator=generator)
    w_t = torch.randn(local_vocab, teacher_hidden, generator=generator) * (4 / teacher_hidden**0.5)
    target = torch.randint(0, local_vocab, (tokens,), generator=generator)
    weight = torch.rand(tokens, generator=generator)
    return SimpleNamespace(h_s=h_s, w_s=w_s, h_t=h_t, w_t=w_t, target=target, w=weight)


def _output_layer(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Megatron's column-parallel output layer (no bias, no sequence parallelism, TP group of one)."""
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

    return linear_with_grad_accumulation_and_async_allreduce(
        hidden, weight, None, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False
    )


def _step_fn(method: str, group):
    """A closure running one forward+backward of `method` on the inputs namespace."""
    if method == "fused":
        from megatron_scope.ops.linear_kl import vocab_parallel_linear_kl

        def step(x):
            (vocab_parallel_linear_kl(x.h_s, x.w_s, x.h_t, x.w_t, "reverse", group) * x.w).sum().backward()

    elif method == "fused_loss":
        from megatron_scope.ops.linear_kl import vocab_parallel_linear_distill_loss

        def step(x):
            vocab_parallel_linear_distill_loss(x.h_s, x.w_s, x.h_t, x.w_t, x.w, kind="reverse", group=group)[0].backward()

    elif method == "materialised":
        from megatron_scope.ops.vocab_parallel import vocab_parallel_kl

        def step(x):
            student = _output_layer(x.h_s, x.w_s)
            with torch.no_grad():
                teacher = x.h_t @ x.w_t.t()
            (vocab_parallel_kl(student, teacher, "reverse", group) * x.w).sum().backward()

    elif method == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def step(x):
            (vocab_parallel_cross_entropy(_output_layer(x.h_s, x.w_s), x.target) * x.w).sum().backward()

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return step


def _warm_compile(method: str, step, group, tokens: int, local_vocab: int, rank: int):
    """Build the compiled chunk kernels `method` will use (if any) on inputs of the same chunk shape."""
    if method in ("fused", "fused_loss"):
        # The chunk shape depends on tokens and V/TP only: the same ones with hidden size 8 are cheap.
        step(_inputs(tokens, 8, 8, local_vocab, seed=99))
    elif method == "materialised":
        bvp._warm_compile(bvp._step_fn("ours", group, 1), local_vocab, rank)


def _clear(x):
    x.h_s.grad = None
    x.w_s.grad = None


def time_case(rank: int, world_size: int, tokens: int, hs: int, ht: int, local_vocab: int, rounds: int, methods):
    """Median fwd+bwd seconds per method, methods interleaved round-robin in this process."""
    group = bvp._setup(rank, world_size)
    steps = {m: _step_fn(m, group) for m in methods}
    compile_seconds = {}
    for method in methods:
        start = time.perf_counter()
        _warm_compile(method, steps[method], group, tokens, local_vocab, rank)
        compile_seconds[method] = time.perf_counter() - start
    x = _inputs(tokens, hs, ht, local_vocab)
    times = {m: [] for m in methods}
    for round_index in range(rounds + 1):  # round 0: warm-up
        for method in methods:
            _clear(x)
            gc.collect()
            start = time.perf_counter()
            steps[method](x)
            elapsed = time.perf_counter() - start
            if round_index:
                times[method].append(elapsed)
    return {"median_s": {m: statistics.median(v) for m, v in times.items()},
            "min_s": {m: min(v) for m, v in times.items()}, "all_s": times,
            "warm_compile_s": compile_seconds}


def _malloc_trim() -> None:
    """Return freed heap pages to the OS, so a reused free chunk shows up in the high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: large tensors are mmap-ed anyway
        pass


#: glibc serves blocks below its mmap threshold from the heap, and the threshold adapts upwards to 32 MiB
#: as mmap-ed blocks are freed; a freed heap block stays resident and is reused, so the high-water mark
#: stops tracking live tensors for blocks of a few MiB. The fused op's chunk temporaries are 64 MiB at the
#: issue's vocabulary (mmap-ed) but 9 MiB with `--vocab-divisor 8` (heap: measured 0.52 shard of extra
#: peak instead of 0.21, the difference being freed chunks kept by malloc). A fixed 1 MiB threshold makes
#: every tensor of 1 MiB and more an mmap of its own, as at the full vocabulary. None: glibc's default.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _set_mmap_threshold() -> None:
    if MMAP_THRESHOLD is None:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


def memory_case(rank: int, world_size: int, tokens: int, hs: int, ht: int, local_vocab: int, method: str):
    """Extra resident-set peak (bytes) of one fwd+bwd of `method`, in this fresh process."""
    _set_mmap_threshold()
    group = bvp._setup(rank, world_size)
    step = _step_fn(method, group)
    _warm_compile(method, step, group, tokens, local_vocab, rank)
    x = _inputs(tokens, hs, ht, local_vocab)
    gc.collect()
    _malloc_trim()
    before = bvp._reset_peak_rss()
    step(x)
    after = bvp._proc_status_bytes("VmHWM")
    grad_bytes = sum(g.numel() * g.element_size() for g in (x.h_s.grad, x.w_s.grad))
    return {"extra_peak_bytes": after - before - grad_bytes, "peak_with_grads_bytes": after - before,
            "grad_bytes": grad_bytes, "shard_bytes": tokens * local_vocab * 4}


THREADS = 1


def _run(fn_name: str, *args):
    """Run fn in a fresh single-rank gloo process (Megatron's CE needs its TP group)."""
    from megatron_scope.testing.multiprocess import run_on_ranks

    return run_on_ranks(globals()[fn_name], 1, args=args, timeout=3 * 3600, threads_per_rank=THREADS)[0]


def _ratio(values: dict, method: str, base: str) -> str:
    return f"{values[method] / values[base]:.2f}" if method in values and base in values else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method (median reported)")
    parser.add_argument("--vocab-divisor", type=int, default=8,
                        help="divide each shape's local vocabulary by this (1: issue 16's full shapes)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a loaded 2-core machine makes OpenMP barriers spin)")
    parser.add_argument("--json", help="raw results (default: benchmarks/results/bench_linear_kl[_quick].json)")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if args.quick:
        shapes = QUICK_SHAPES
        divisor = 1
    else:
        divisor = args.vocab_divisor
        shapes = tuple((label, t, hs, ht, v // divisor) for label, t, hs, ht, v in FULL_SHAPES)
    results = []
    for label, tokens, hs, ht, local_vocab in shapes:
        timing = {"median_s": {}, "min_s": {}}
        if not args.skip_timing:
            timing = _run("time_case", tokens, hs, ht, local_vocab, args.rounds, tuple(args.methods))
        memory = {}
        if not args.skip_memory:
            for method in args.methods:
                case = _run("memory_case", tokens, hs, ht, local_vocab, method)
                memory[method] = {k: case[k] / case["shard_bytes"] for k in ("extra_peak_bytes", "peak_with_grads_bytes")}
        row = {"case": label, "tokens": tokens, "student_hidden": hs, "teacher_hidden": ht,
               "local_vocab": local_vocab, "issue_local_vocab": local_vocab * divisor, **timing,
               "extra_peak_over_shard": {m: v["extra_peak_bytes"] for m, v in memory.items()},
               "peak_with_grads_over_shard": {m: v["peak_with_grads_bytes"] for m, v in memory.items()}}
        results.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"torch threads: {THREADS}; rounds: {args.rounds}; compile backend: "
          f"{os.environ.get('MEGATRON_SCOPE_VOCAB_OPS_BACKEND', 'auto')}; fp32; reverse KL")
    if divisor != 1:
        print(f"local vocabulary divided by {divisor} from issue 16's shapes (time on this machine); "
              "every method is linear in it, so ratios and shard units compare (see the docstring)")
    print("| tokens x H_S (H_T) x V/TP | case | method | fwd+bwd median (min) s | median (min) / materialised "
          "| median (min) / Megatron CE | extra peak / fp32 shard |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        med, low = row["median_s"], row["min_s"]
        shape = f"{row['tokens']}x{row['student_hidden']} ({row['teacher_hidden']})x{row['local_vocab']}"
        for method in args.methods:
            seconds = f"{med[method]:.3f} ({low[method]:.3f})" if method in med else "-"
            vs_mat = f"{_ratio(med, method, 'materialised')} ({_ratio(low, method, 'materialised')})"
            vs_ce = f"{_ratio(med, method, 'megatron_ce')} ({_ratio(low, method, 'megatron_ce')})"
            mem = row["extra_peak_over_shard"].get(method)
            mem_text = f"{mem:.2f}" if mem is not None else "-"
            print(f"| {shape} | {row['case']} | {method} | {seconds} | {vs_mat} | {vs_ce} | {mem_text} |")
    path = args.json or DEFAULT_JSON.format("_quick" if args.quick else "")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"argv": sys.argv[1:], "vocab_divisor": divisor, "threads": THREADS, "rounds": args.rounds,
                   "backend": os.environ.get("MEGATRON_SCOPE_VOCAB_OPS_BACKEND", "auto"), "results": results},
                  handle, indent=1)
    print(f"raw results: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
