"""Forward+backward time and extra peak memory of vocab_parallel_kl vs the naive path vs Megatron's CE.

    .venv/bin/python benchmarks/bench_vocab_parallel.py            # the BENCHMARKS.md table
    .venv/bin/python benchmarks/bench_vocab_parallel.py --quick    # small shapes, a smoke run

Methods, each on `[tokens, vocab/TP]` fp32 shards, per token summed into one scalar, then backward:
- `ours`: `vocab_parallel_kl(student, teacher, "reverse", group)` (gradient into student only).
- `naive`: all-gather both shards over the vocabulary (TP > 1), two `log_softmax`, `F.kl_div`
  (log_target) per token, backward; the rank's gradient is its slice of the full gradient.
- `megatron_ce`: `megatron.core.tensor_parallel.vocab_parallel_cross_entropy(student, target)`: one
  tensor of the same shape (the lower bound a two-tensor KL is measured against).

Time: in one process per (shape, TP), the methods run interleaved (round-robin), `--rounds` times after
one warm-up each; the median (and the minimum, the least disturbed sample) is reported, so load from
other processes on the machine hits all methods alike. Ratios between methods of the same run are the
numbers to read. One torch thread per rank by default: on a shared, oversubscribed 2-core machine
OpenMP barriers with 2 threads per process made every method several times slower and erratic.

Memory: torch on CPU allocates through malloc (no allocator statistics), and large blocks are
mmap-ed and returned to the OS when freed, so the kernel's resident-set high-water mark (VmHWM)
tracks the tensors alive at the peak. Each (method, shape, TP) runs in a fresh process: inputs are
allocated (and the compiled kernels built on a small input with the same chunk shape), the
high-water mark is reset to the current RSS (`echo 5 > /proc/self/clear_refs`, Linux), one
forward+backward runs, and VmHWM minus that RSS is the extra peak, gradient included, reported per
rank as a multiple of one fp32 logits shard (tokens x vocab/TP x 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

METHODS = ("ours", "naive", "megatron_ce")
FULL_SHAPES = ((4096, 32768), (1024, 151936))
QUICK_SHAPES = ((256, 4096), (64, 16384))


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS; return that RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _proc_status_bytes("VmRSS")


def _inputs(tokens: int, local_vocab: int, rank: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed + rank)
    student = (4 * torch.randn(tokens, local_vocab, generator=generator)).requires_grad_()
    teacher = 4 * torch.randn(tokens, local_vocab, generator=generator)
    target = torch.randint(0, local_vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    return student, teacher, target


def _step_fn(method: str, group, world_size: int):
    """A closure running one forward+backward of `method` on (student, teacher, target)."""
    from megatron_scope.ops.vocab_parallel import vocab_parallel_kl

    if method == "ours":

        def step(student, teacher, target):
            vocab_parallel_kl(student, teacher, "reverse", group).sum().backward()

    elif method == "naive":

        def step(student, teacher, target):
            if world_size > 1:
                import torch.distributed as dist

                shards_s = [torch.empty_like(student) for _ in range(world_size)]
                shards_t = [torch.empty_like(teacher) for _ in range(world_size)]
                dist.all_gather(shards_s, student.detach().contiguous(), group=group)
                dist.all_gather(shards_t, teacher.contiguous(), group=group)
                full_s = torch.cat(shards_s, dim=-1).requires_grad_()
                full_t = torch.cat(shards_t, dim=-1)
                del shards_s, shards_t
            else:
                full_s, full_t = student, teacher
            log_p = F.log_softmax(full_s, dim=-1)
            log_q = F.log_softmax(full_t, dim=-1)
            F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).sum().backward()
            if world_size > 1:
                rank = torch.distributed.get_rank(group)
                width = student.shape[-1]
                student.grad = full_s.grad[:, rank * width : (rank + 1) * width].clone()

    elif method == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def step(student, teacher, target):
            vocab_parallel_cross_entropy(student, target).sum().backward()

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return step


def _setup(rank: int, world_size: int):
    """Megatron TP group over all ranks (Megatron's CE reads it from parallel_state)."""
    from megatron.core import parallel_state

    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1, seed=1)
    return parallel_state.get_tensor_model_parallel_group()


def _warm_compile(step, local_vocab: int, rank: int):
    """Build the compiled kernels (if any) on a small input with the production chunk shape."""
    from megatron_scope.ops import vocab_parallel

    rows = max(1, vocab_parallel.CHUNK_ELEMENTS // local_vocab)
    tokens = max(rows * 2 + 1, vocab_parallel.COMPILE_MIN_ELEMENTS // local_vocab + 1)
    student, teacher, target = _inputs(tokens, local_vocab, rank, seed=99)
    step(student, teacher, target)


def time_case(rank: int, world_size: int, tokens: int, vocab: int, rounds: int, methods):
    """Median fwd+bwd seconds per method, methods interleaved round-robin in this process."""
    group = _setup(rank, world_size)
    local_vocab = vocab // world_size
    student, teacher, target = _inputs(tokens, local_vocab, rank)
    steps = {m: _step_fn(m, group, world_size) for m in methods}
    compile_seconds = None
    if "ours" in steps:
        start = time.perf_counter()
        _warm_compile(steps["ours"], local_vocab, rank)
        compile_seconds = time.perf_counter() - start
    times = {m: [] for m in methods}
    for round_index in range(rounds + 1):  # round 0: warm-up
        for method in methods:
            student.grad = None
            if world_size > 1:
                torch.distributed.barrier()
            start = time.perf_counter()
            steps[method](student, teacher, target)
            elapsed = time.perf_counter() - start
            if round_index:
                times[method].append(elapsed)
    return {"median_s": {m: statistics.median(v) for m, v in times.items()},
            "min_s": {m: min(v) for m, v in times.items()}, "all_s": times,
            "warm_compile_s": compile_seconds}


def memory_case(rank: int, world_size: int, tokens: int, vocab: int, method: str):
    """Extra resident-set peak (bytes) of one fwd+bwd of `method`, in this fresh process."""
    group = _setup(rank, world_size)
    local_vocab = vocab // world_size
    step = _step_fn(method, group, world_size)
    if method == "ours":
        _warm_compile(step, local_vocab, rank)
    student, teacher, target = _inputs(tokens, local_vocab, rank)
    if world_size > 1:
        torch.distributed.barrier()
    before = _reset_peak_rss()
    step(student, teacher, target)
    after = _proc_status_bytes("VmHWM")
    return {"extra_peak_bytes": after - before, "shard_bytes": tokens * local_vocab * 4}


THREADS_PER_RANK = 1


def _run(fn_name: str, world_size: int, *args):
    """Run fn on `world_size` fresh gloo ranks (a fresh process even for TP=1)."""
    from megatron_scope.testing.multiprocess import run_on_ranks

    fn = globals()[fn_name]
    return run_on_ranks(fn, world_size, args=args, timeout=3600, threads_per_rank=THREADS_PER_RANK)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (median reported)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="torch threads per rank (1: a loaded 2-core machine makes OpenMP barriers spin)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    global THREADS_PER_RANK
    THREADS_PER_RANK = args.threads_per_rank
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    results = []
    for tokens, vocab in shapes:
        for tp in args.tp:
            timing = {"median_s": {}}
            if not args.skip_timing:
                timing = _run("time_case", tp, tokens, vocab, args.rounds, tuple(args.methods))[0]
            memory = {}
            if not args.skip_memory:
                for method in args.methods:
                    per_rank = _run("memory_case", tp, tokens, vocab, method)
                    memory[method] = max(r["extra_peak_bytes"] for r in per_rank) / per_rank[0]["shard_bytes"]
            row = {"tokens": tokens, "vocab": vocab, "tp": tp, **timing, "extra_peak_over_shard": memory}
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"threads per rank: {THREADS_PER_RANK}; rounds: {args.rounds}; compile backend: "
          f"{os.environ.get('MEGATRON_SCOPE_VOCAB_OPS_BACKEND', 'auto')}")
    print("| tokens x vocab | TP | method | fwd+bwd median (min) s | median / naive | median (min) / Megatron CE | extra peak / fp32 shard |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        med = row["median_s"]
        for method in args.methods:
            vs_naive = f"{med[method] / med['naive']:.2f}" if "naive" in med else "-"
            low = row.get("min_s", {})
            vs_ce = (f"{med[method] / med['megatron_ce']:.2f} ({low[method] / low['megatron_ce']:.2f})"
                     if "megatron_ce" in med else "-")
            seconds = f"{med[method]:.3f} ({low[method]:.3f})" if method in med else "-"
            mem = row["extra_peak_over_shard"].get(method)
            mem_text = f"{mem:.2f}" if mem is not None else "-"
            print(f"| {row['tokens']}x{row['vocab']} | {row['tp']} | {method} | {seconds} | {vs_naive} | {vs_ce} | {mem_text} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
