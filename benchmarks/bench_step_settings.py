"""A training step at a long-tailed response-length distribution on TP = 2 (two gloo ranks), per memory setting:
without and with --sequence-parallel, under each recompute setting (none, selective, full recompute of half the
layers, of all of them); token-budget microbatches (the launch scripts' layout). Side by side in one run, settings
interleaved round by round.

    .venv/bin/python benchmarks/bench_step_settings.py                    # 16 rows, responses up to 512 tokens
    .venv/bin/python benchmarks/bench_step_settings.py --rows 4 --max-response 128 --rounds 1   # a smoke run

The batch is `bench_padding.long_tailed_batch` (one row at the cap, the rest log-normal); the model hidden 256,
4 layers, vocabulary 2048, sdpa attention, fp32; the SFT objective (the student's forward and backward, which
every method shares). Reported per setting: real and padded token positions, the forward+backward seconds (median
of `--rounds` after a warm-up, the slower rank) and the step's measured extra peak on rank 0 (the resident-set
high-water mark above the state before the step, glibc told to mmap blocks >= 64 KiB so freed tensors leave at
once, as tests/distributed/test_memory_calibration.py measures), with both as ratios to no SP, no recompute. Every
setting's gradients equal the first's (each rank's own shard).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by each spawned rank's glibc at start

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_padding import long_tailed_batch  # noqa: E402

from megatron_scope.testing.multiprocess import run_on_ranks  # noqa: E402

LAYERS = 4
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full, 2 of 4 layers": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "full, every layer": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))


def _run(rank, world_size, args):
    import torch

    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.arch import DecoderArch
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.schedule import forward_backward
    from megatron_scope.rollout.batch import sequence_multiple, split_by_token_budget, token_counts

    torch.set_num_threads(1)
    arch = DecoderArch(num_layers=LAYERS, hidden_size=256, num_attention_heads=4, num_query_groups=4,
                       ffn_hidden_size=1024, vocab_size=2048,
                       max_position_embeddings=args.prompt + args.max_response + 8)
    initialize_model_parallel(world_size, 1, seed=3)
    batch = long_tailed_batch(args.rows, args.prompt, args.max_response, arch.vocab_size)
    budget = batch["tokens"].shape[1]
    microbatches = split_by_token_budget(batch, budget, args.micro_batch_size, sequence_multiple(world_size))
    real, padded = (int(x) for x in token_counts(batch, microbatches))
    settings = {(split, name): options for split in (False, True) for name, options in RECOMPUTE.items()}
    models = {key: wrap_with_ddp(build_gpt_model(arch, calculate_per_token_loss=True, attention_backend="sdpa",
                                                 variable_seq_lengths=True, sequence_parallel=key[0], **options))
              for key, options in settings.items()}
    first = next(iter(models.values()))
    with torch.no_grad():  # one set of weights (each build draws its own)
        for model in models.values():
            for mine, theirs in zip(model.parameters(), first.parameters(), strict=True):
                mine.copy_(theirs)
    config = LossConfig(algorithm="sft")
    times = {key: [] for key in settings}
    peaks = {key: [] for key in settings}
    grads = {}
    for round_index in range(args.rounds + 1):  # round 0: warm-up
        for key, model in models.items():
            model.zero_grad_buffer()
            gc.collect()
            torch.distributed.barrier()
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            before = _status_bytes("VmRSS")
            start = time.perf_counter()
            forward_backward(model, microbatches, config, arch.vocab_size)
            seconds = time.perf_counter() - start
            peak = _status_bytes("VmHWM") - before
            if round_index:
                times[key].append(seconds)
                peaks[key].append(peak)
            grads[key] = torch.cat([p.main_grad.flatten() for p in model.parameters()]).clone()
    reference = next(iter(grads.values()))
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6, msg=str(key))
    return {"times": {repr(k): v for k, v in times.items()}, "peaks": {repr(k): v for k, v in peaks.items()},
            "real": real, "padded": padded, "microbatches": len(microbatches)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--max-response", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "bench_step_settings.json"))
    args = parser.parse_args(argv)
    ranks = run_on_ranks(_run, 2, args=(args,), timeout=3600)
    first = ranks[0]
    print(f"TP = 2 (2 gloo ranks, 1 thread each); {args.rows} rows, prompt {args.prompt}, responses up to "
          f"{args.max_response}; {first['microbatches']} token-budget microbatches, {first['real']} real / "
          f"{first['padded']} padded token positions ({first['padded'] / first['real']:.2f}); {args.rounds} rounds")
    print("| sequence parallel | recompute | fwd+bwd median s | time vs none | extra peak MiB (rank 0) "
          "| peak vs none |")
    print("|---|---|---|---|---|---|")
    base_time = base_peak = None
    rows = []
    for split in (False, True):
        for name in RECOMPUTE:
            key = repr((split, name))
            seconds = statistics.median(max(r["times"][key][i] for r in ranks) for i in range(args.rounds))
            peak = statistics.median(first["peaks"][key])
            base_time, base_peak = base_time or seconds, base_peak or peak
            rows.append({"sequence_parallel": split, "recompute": name, "median_s": seconds, "peak_bytes": peak})
            print(f"| {'yes' if split else 'no'} | {name} | {seconds:.3f} | {seconds / base_time:.2f} | "
                  f"{peak / 2**20:.1f} | {peak / base_peak:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"args": vars(args), "rows": rows, "ranks": ranks}, handle, indent=1)


if __name__ == "__main__":
    main()
