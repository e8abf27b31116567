"""Rollout transfer benchmark: a whole step pickled to every rank (`broadcast_object_list`, the trainer's former
rank0/Ray path) against each data-parallel rank's packed share (`rollout/wire.py`: pack, scatter, unpack).

    .venv/bin/python benchmarks/bench_rollout_transfer.py [--sizes 32x8x1024 64x16x2048] [--repeats 3]

Two gloo ranks on CPU, DP=2 (one rank per replica): rank 0 holds a synthetic step of PROMPTS x G responses of
TOKENS tokens each (random ids below 151936, float log-probs, 256-token prompts, verdicts). Per size: the bytes rank
1 receives and the seconds from the leader's send to the rank holding its groups as Python objects (median over the
repeats; rank 0's and rank 1's), for each method.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time


def _step(prompts: int, group_size: int, tokens: int):
    import torch

    from megatron_scope.rewards.base import Verdict
    from megatron_scope.rollout.batch import RolloutGroup
    from megatron_scope.rollout.engine import Completion

    g = torch.Generator().manual_seed(0)
    groups = []
    for i in range(prompts):
        completions = [Completion(torch.randint(0, 151936, (tokens,), generator=g).tolist(),
                                  (-torch.rand(tokens, generator=g, dtype=torch.float64)).tolist(), "stop")
                       for _ in range(group_size)]
        correct = [j % 2 == 0 for j in range(group_size)]
        verdicts = [Verdict(ok, "correct" if ok else "wrong", "1") for ok in correct]
        groups.append(RolloutGroup(f"p{i}", torch.randint(0, 151936, (256,), generator=g).tolist(), completions,
                                   correct, verdicts=verdicts))
    return groups


def _bench(rank: int, world_size: int, sizes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    from megatron_scope.rollout import wire

    torch.set_num_threads(1)
    alone = [dist.new_group([r]) for r in range(world_size)]  # each rank is its own replica (TP = PP = 1)
    rows = []
    for prompts, group_size, tokens in sizes:
        groups = _step(prompts, group_size, tokens) if rank == 0 else None
        per_rank = prompts // world_size
        seconds = {"rollout": 1.0, "busy": 1.0}
        timings = {"pickled": [], "packed": []}
        received = {}
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            payload = [(groups, seconds)] if rank == 0 else [None]
            dist.broadcast_object_list(payload, src=0)
            mine = payload[0][0][rank * per_rank : (rank + 1) * per_rank]
            timings["pickled"].append(time.perf_counter() - start)
            received["pickled"] = len(pickle.dumps(payload[0])) if rank else 0
            dist.barrier()
            start = time.perf_counter()
            shares = None
            if rank == 0:
                shares = [wire.pack(groups[d * per_rank : (d + 1) * per_rank], (d * per_rank, seconds))
                          for d in range(world_size)]
            buffer = wire.deliver(shares, torch.device("cpu"), alone[rank], rank, scatter_group=dist.group.WORLD,
                                  scatter_source=0)
            mine_packed, _ = wire.unpack(buffer)
            timings["packed"].append(time.perf_counter() - start)
            received["packed"] = buffer.numel()
            assert [g.prompt_id for g in mine_packed] == [g.prompt_id for g in mine]
        rows.append({"size": f"{prompts}x{group_size}x{tokens}",
                     **{f"{m}_bytes": received[m] for m in timings},
                     **{f"{m}_s": statistics.median(t) for m, t in timings.items()}})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["32x8x1024", "64x16x2048"],
                        help="PROMPTSxGxTOKENS per step")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes]

    from megatron_scope.testing.multiprocess import run_on_ranks

    leader, other = run_on_ranks(_bench, 2, args=(sizes, args.repeats), timeout=600)
    print("DP=2, 2 gloo ranks on CPU; bytes rank 1 receives, seconds from send to groups in hand (median, "
          "rank 0 / rank 1)")
    print("| step (prompts x G x tokens) | pickled bytes | pickled s | packed share bytes | packed s |")
    print("|---|---|---|---|---|")
    for ours, theirs in zip(leader, other):
        print(f"| {ours['size']} | {theirs['pickled_bytes']:,} | {ours['pickled_s']:.2f} / {theirs['pickled_s']:.2f} | "
              f"{theirs['packed_bytes']:,} | {ours['packed_s']:.2f} / {theirs['packed_s']:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
