"""A training step at a long-tailed response-length distribution: every row padded to the batch's longest (one
sequence per microbatch, the launch scripts' old default) against token-budget microbatches (their default now),
side by side in one process.

    .venv/bin/python benchmarks/bench_padding.py                     # 32 rows, responses up to 1024 tokens
    .venv/bin/python benchmarks/bench_padding.py --rows 8 --max-response 256 --rounds 1   # a smoke run

One process (TP = PP = DP = 1, gloo), a Megatron student (hidden 256, 4 layers, vocabulary 2048, sdpa attention,
fp32), the SFT objective (the loss reads only the student: what is measured is the student's forward and backward,
which every method shares). Lengths: prompts of `--prompt` tokens; responses drawn from a log-normal whose median
is a sixth of `--max-response`, capped there, and one row at the cap (as in a step of long reasoning traces, where
the longest response sets everyone's width). Reported per layout: the step's real and padded token positions
(`rollout.batch.token_counts`, the trainer's `tokens/*` metrics), the forward+backward seconds (median of
`--rounds` after a warm-up; layouts interleaved) and its ratio to the padded layout. Gradients agree between the
layouts (checked: the loss is normalised over the whole batch, `calculate_per_token_loss`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def long_tailed_batch(rows: int, prompt: int, max_response: int, vocab: int, seed: int = 0) -> dict:
    """A rollout batch as `build_batch` lays it out, with long-tailed response lengths."""
    from megatron_scope.rollout.batch import padded_sequence_length

    generator = torch.Generator().manual_seed(seed)
    median = max_response / 6
    lengths = torch.exp(torch.log(torch.tensor(median)) + 0.9 * torch.randn(rows, generator=generator))
    lengths = lengths.clamp(1, max_response).round().long()
    lengths[0] = max_response
    seq = padded_sequence_length(prompt + max_response, 8)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=generator)
    position = torch.arange(seq)[None, :]
    loss_mask = ((position >= prompt - 1) & (position < prompt - 1 + lengths[:, None])).float()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": position.expand(rows, -1).contiguous(), "correct": torch.ones(rows, dtype=torch.bool),
            "seq_weights": torch.ones(rows), "sequence_lengths": prompt - 1 + lengths}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--max-response", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rows per token-budget microbatch, at most")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_padding.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.arch import DecoderArch
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.schedule import forward_backward
    from megatron_scope.rollout.batch import split_by_token_budget, split_rows, token_counts

    arch = DecoderArch(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=1024,
                       vocab_size=2048, max_position_embeddings=args.prompt + args.max_response + 8)
    initialize_model_parallel(1, 1, seed=3)
    model = wrap_with_ddp(build_gpt_model(arch, calculate_per_token_loss=True, attention_backend="sdpa",
                                          variable_seq_lengths=True))
    batch = long_tailed_batch(args.rows, args.prompt, args.max_response, arch.vocab_size)
    budget = batch["tokens"].shape[1]  # the launch scripts' MAX_TOKENS_PER_MICROBATCH = the longest sequence
    layouts = {"padded (1 row each, batch width)": split_rows(batch, args.rows),
               f"token budget ({budget} tokens, <= {args.micro_batch_size} rows)":
                   split_by_token_budget(batch, budget, args.micro_batch_size)}
    config = LossConfig(algorithm="sft")
    times = {name: [] for name in layouts}
    grads = {}
    for round_index in range(args.rounds + 1):  # round 0: warm-up
        for name, microbatches in layouts.items():
            model.zero_grad_buffer()
            start = time.perf_counter()
            forward_backward(model, microbatches, config, arch.vocab_size)
            seconds = time.perf_counter() - start
            if round_index:
                times[name].append(seconds)
            grads[name] = torch.cat([p.main_grad.flatten() for p in model.parameters()]).clone()
    reference = next(iter(grads.values()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6, msg=name)
    rows = {}
    base = None
    for name, microbatches in layouts.items():
        real, padded = (int(x) for x in token_counts(batch, microbatches))
        median = statistics.median(times[name])
        base = base or median
        rows[name] = {"real_tokens": real, "padded_tokens": padded, "padded_over_real": padded / real,
                      "microbatches": len(microbatches), "median_s": median, "vs_padded": median / base}
    lengths = (batch["sequence_lengths"] - args.prompt + 1).tolist()
    print(f"{args.rows} rows, prompt {args.prompt}, responses: median {statistics.median(lengths):.0f}, max "
          f"{max(lengths)} tokens; model hidden 256 x 4 layers, fp32, {args.threads} thread(s); {args.rounds} rounds")
    print("| layout | microbatches | real tokens | padded tokens | padded / real | fwd+bwd median s | time vs padded |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['microbatches']} | {row['real_tokens']} | {row['padded_tokens']} | "
              f"{row['padded_over_real']:.2f} | {row['median_s']:.3f} | {row['vs_padded']:.2f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"args": vars(args), "lengths": lengths, "rows": rows, "all_s": times}, handle, indent=1)


if __name__ == "__main__":
    main()
