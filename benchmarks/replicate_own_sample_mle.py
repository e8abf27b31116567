"""Own-sample MLE ("--scope-algorithm sft": SFT on the student's own verified-correct samples) on the demo's
synthetic arithmetic task, replicated outside the project's training code: plain transformers `generate` for
the rollouts, plain torch for the loss, Adam and the LR schedule. It checks (a) that the project's own-sample
MLE result is not an artefact of its Megatron/vLLM path and (b) why it collapses at lr 5e-4: the final-answer
verifier ("--reward synthetic") only reads the last "A: <int>", the answers are small and guessable, so the kept
"correct" samples increasingly have wrong working (lucky guesses) and the student learns to skip its steps.

    .venv/bin/python benchmarks/replicate_own_sample_mle.py --workdir outputs/demo --iters 50 \
        --lrs 5e-4 5e-5 --seeds 0 1 2 --train-reward synthetic            # -> outputs/demo/replicate-mle

Setting (examples/scope/demo.py `distillation_flags`): per iteration the next 64 train prompts
(megatron_scope.data.datasets.PromptDataset's seeded, epoch-wise order), G=2 samples each at temperature 1,
top-p 1, no top-k, at most 40 new tokens, stopped by EOS (kept as the response's last token, as the vLLM
engine does); prompt ids = BOS + pieces of the prompt (`prompt_token_ids`). Kept = accepted by the training
verifier (`build_synthetic_verifier(--train-reward)`). Loss (losses/objectives.py `sft_objective` with
`aggregate` "seq-mean-token-mean"): L = sum over kept i of mean_t -log p(y_it) / (number of ALL samples);
log-probs over the tokenizer's vocabulary. Adam (betas 0.9/0.98, eps 1e-8, no weight decay), global grad-norm
clip 1.0 (the project's --clip-grad default), Megatron's OptimizerParamScheduler: iteration k steps with the
LR of num_steps = k - 1, linear warm-up from 0 over min(20, iters - 1) steps, then cosine to lr/10 at `iters`
(so iteration 1 steps with lr 0). fp32, torch.manual_seed(seed). Held-out: every row of task/eval.jsonl (the
demo's 64 problems, `held_out_problems`), 8 samples at temperature 1 with sampling seed --eval-seed (0, as
`evaluate_model`), graded once by the strict verifier: Avg@8 of the final answer (correct + wrong_steps) and
of the working too (correct), `megatron_scope.eval.metrics.avg_at_k`. Evaluations fork the RNG, so they do not
change the training samples. Only the RNG streams differ from the project's (vLLM seeds each sample).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import transformers

from megatron_scope.data.datasets import PromptDataset, prompt_token_ids
from megatron_scope.data.tokenizer import Tokenizer
from megatron_scope.eval.metrics import avg_at_k
from megatron_scope.rewards.math_verifier import STATUS_CORRECT
from megatron_scope.rewards.synthetic import (GOLD_COLUMNS, STATUS_WRONG_STEPS, StrictSyntheticTaskVerifier,
                                              build_synthetic_verifier)

PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS, EVAL_SAMPLES = 64, 2, 40, 8
BETAS, ADAM_EPS, CLIP_GRAD, MAX_WARMUP = (0.9, 0.98), 1e-8, 1.0, 20
FINAL_OK = (STATUS_CORRECT, STATUS_WRONG_STEPS)  # the final-answer grading accepts lucky guesses too


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/demo")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 5e-5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-reward", choices=sorted(GOLD_COLUMNS), default="synthetic")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: <workdir>/replicate-mle")
    return parser.parse_args(argv)


def megatron_lr(num_steps: int, lr: float, iters: int) -> float:
    """OptimizerParamScheduler.get_lr with the demo's settings (init_lr 0 when warming up, cosine to lr/10)."""
    warmup, min_lr = min(MAX_WARMUP, iters - 1), lr / 10
    if warmup > 0 and num_steps <= warmup:
        return lr * num_steps / warmup
    if num_steps > iters:
        return min_lr
    ratio = (num_steps - warmup) / (iters - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


class _VocabMask(transformers.LogitsProcessor):
    """Rows beyond the tokenizer's vocabulary are never sampled (the engine's logit bias, the trainer's vocab)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        scores[:, self.vocab:] = -math.inf
        return scores


@torch.no_grad()
def sample(model, prompts: list[list[int]], n: int, tok: Tokenizer) -> tuple[list[list[int]], list[list[float]]]:
    """n responses per prompt (prompt i's sample j at row i n + j): token ids up to and including EOS, and the
    sampler's log-prob of each token (temperature 1, tokenizer vocabulary)."""
    rows = [p for p in prompts for _ in range(n)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(rows):  # left-padded
        ids[i, width - len(p):], attention[i, width - len(p):] = torch.tensor(p), 1
    vocab = tok.vocab_size
    out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                         logits_processor=[_VocabMask(vocab)] if model.config.vocab_size > vocab else None,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, width:]
    logp = torch.stack(out.logits, 1).float()[..., :vocab].log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
    responses, log_probs = [], []
    for row, row_logp in zip(new.tolist(), logp.tolist()):
        cut = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
        responses.append(row[:cut])
        log_probs.append(row_logp[:cut])
    return responses, log_probs


def mle_loss(model, prompts, responses, kept, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seq-mean-token-mean MLE over the kept responses / number of all responses, [n, seq] token log-probs and
    response mask): tokens = x[:-1], labels = x[1:], right-padded, no attention mask (causal), as build_batch."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs)) - 1
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels, mask = tokens.clone(), torch.zeros(len(seqs), width)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s = p + r
        tokens[i, :len(s) - 1], labels[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    logits = model(input_ids=tokens).logits.float()[..., :vocab]
    token_logp = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    correct = torch.tensor(kept, dtype=torch.bool)
    token_loss = torch.where(correct[:, None], -token_logp, torch.zeros_like(token_logp))
    per_seq = torch.where(mask > 0, token_loss, torch.zeros_like(token_loss)).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / len(seqs), token_logp.detach(), mask


def evaluate(model, problems: list[dict], tok: Tokenizer, eval_seed: int) -> dict:
    """Avg@8 of the held-out problems under both gradings (one sampling pass, the strict verifier's statuses)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(eval_seed)
        responses, _ = sample(model, [prompt_token_ids(tok, p["prompt"]) for p in problems], EVAL_SAMPLES, tok)
    verdicts = StrictSyntheticTaskVerifier().judge_batch(
        [tok.decode(r) for r in responses], [p["solution"] for p in problems for _ in range(EVAL_SAMPLES)])
    rows = [verdicts[i * EVAL_SAMPLES:(i + 1) * EVAL_SAMPLES] for i in range(len(problems))]
    return {"avg_final": avg_at_k([[v.status in FINAL_OK for v in row] for row in rows]),
            "avg_strict": avg_at_k([[v.status == STATUS_CORRECT for v in row] for row in rows]),
            "lucky_fraction": sum(v.status == STATUS_WRONG_STEPS for v in verdicts) / len(verdicts),
            "mean_length": statistics.fmean(map(len, responses))}


def run(args, lr: float, seed: int, tok: Tokenizer, problems: list[dict], rows_by_id: dict) -> dict:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(args.workdir, "student_hf"),
                                                              dtype=torch.float32)
    model.eval()  # no dropout anywhere; gradients still flow
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=BETAS, eps=ADAM_EPS, weight_decay=0.0)
    dataset = PromptDataset.from_file(os.path.join(args.workdir, "task/train.jsonl"), seed=seed, tokenizer=tok,
                                       keys={"answer": GOLD_COLUMNS[args.train_reward]})
    train_verifier, strict = build_synthetic_verifier(args.train_reward), StrictSyntheticTaskVerifier()
    evals = {0: evaluate(model, problems, tok, args.eval_seed)}
    print(f"[{args.train_reward} lr {lr:g} seed {seed}] it 0 eval {evals[0]}", flush=True)
    history = []
    for it in range(1, args.iters + 1):
        start = time.perf_counter()
        batch = dataset.next_batch(PROMPTS_PER_STEP)
        prompts = [list(p.token_ids) for p in batch]
        responses, sampler_logp = sample(model, prompts, GROUP_SIZE, tok)
        sample_time = time.perf_counter() - start
        texts = [tok.decode(r) for r in responses]
        golds = [p.answer for p in batch for _ in range(GROUP_SIZE)]  # the training reward's column
        kept = train_verifier.verify_batch(texts, golds)
        solutions = [rows_by_id[p.id]["solution"] for p in batch for _ in range(GROUP_SIZE)]
        statuses = [v.status for v in strict.judge_batch(texts, solutions)]
        repeated = [p for p in prompts for _ in range(GROUP_SIZE)]
        loss, token_logp, mask = mle_loss(model, repeated, responses, kept, tok.vocab_size, tok.pad_id)
        lr_now = megatron_lr(it - 1, lr, args.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD))
        if math.isfinite(loss.item()) and math.isfinite(grad_norm):  # guarded_step: skip a non-finite step
            optimizer.step()
        mismatch = sum(abs(a - float(b)) for lp, row, m in zip(sampler_logp, token_logp, mask)
                       for a, b in zip(lp, row[m > 0])) / float(mask.sum())
        n = len(responses)
        record = {
            "iteration": it, "lr": lr_now, "loss": loss.item(), "grad_norm": grad_norm,
            "kept": sum(kept), "kept_right_working": sum(k and s == STATUS_CORRECT for k, s in zip(kept, statuses)),
            "mean_response_length": statistics.fmean(map(len, responses)),
            "kept_mean_response_length": statistics.fmean([len(r) for r, k in zip(responses, kept) if k] or [0]),
            "accuracy_final": sum(s in FINAL_OK for s in statuses) / n,
            "accuracy_strict": sum(s == STATUS_CORRECT for s in statuses) / n,
            "truncated_fraction": sum(r[-1] != tok.eos_id for r in responses) / n,
            "logprob_abs_diff": mismatch, "sample_s": sample_time, "iteration_s": time.perf_counter() - start,
        }
        history.append(record)
        if it % args.eval_every == 0 or it == args.iters:
            evals[it] = evaluate(model, problems, tok, args.eval_seed)
        print(f"[{args.train_reward} lr {lr:g} seed {seed}] it {it} loss {record['loss']:.4f} lr {lr_now:.2e} "
              f"kept {record['kept']} right {record['kept_right_working']} len {record['mean_response_length']:.1f} "
              f"acc {record['accuracy_final']:.3f}/{record['accuracy_strict']:.3f} |dlogp| {mismatch:.1e} "
              f"{record['iteration_s']:.1f}s" + (f" eval {evals[it]}" if it in evals else ""), flush=True)
    return {"train_reward": args.train_reward, "lr": lr, "seed": seed, "history": history,
            "evals": {str(k): v for k, v in evals.items()}}


def cell(values, digits=3) -> str:
    """mean ± population std over seeds (just the mean for one seed)."""
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def markdown(runs: list[dict], iters: int, command: str) -> str:
    settings = sorted({(r["train_reward"], r["lr"]) for r in runs}, key=lambda s: (s[0], -s[1]))
    at = sorted({min(k, iters) for k in (25, 35, 50)})
    tracked = sorted({k for k in (1, 10, 25, 35, 50) if k <= iters} | {iters})
    lines = [f"# Own-sample MLE replicated with transformers + torch ({iters} iterations)", "", f"`{command}`", "",
             "Held-out Avg@8 (mean ± population std over seeds) under the final-answer grading and the strict one "
             "(working too); at iteration k: kept samples / kept with right working / mean response length (tokens, "
             "all 128 samples).", "",
             "| train reward | lr | seeds | Avg@8 final start | Avg@8 final end | Avg@8 strict start | Avg@8 strict end | "
             + " | ".join(f"it {k}: kept / right / len" for k in at) + " |",
             "|" + "---|" * (7 + len(at))]
    for reward, lr in settings:
        group = [r for r in runs if (r["train_reward"], r["lr"]) == (reward, lr)]
        end = str(iters)
        row = [reward, f"{lr:g}", str(len(group))]
        row += [cell([r["evals"][k][m] for r in group]) for m in ("avg_final",) for k in ("0", end)]
        row += [cell([r["evals"][k]["avg_strict"] for r in group]) for k in ("0", end)]
        for k in at:
            h = [r["history"][k - 1] for r in group]
            row.append(" / ".join(f"{statistics.fmean(x[m] for x in h):.1f}"
                                  for m in ("kept", "kept_right_working", "mean_response_length")))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per iteration, mean over seeds: kept / kept with right working / mean length / rollout accuracy "
              "(final answer) / rollout accuracy (strict)", "",
              "| train reward | lr | " + " | ".join(f"it {k}" for k in tracked) + " |",
              "|" + "---|" * (2 + len(tracked))]
    for reward, lr in settings:
        group = [r for r in runs if (r["train_reward"], r["lr"]) == (reward, lr)]
        row = [reward, f"{lr:g}"]
        for k in tracked:
            h = [r["history"][k - 1] for r in group]
            row.append(" / ".join(f"{statistics.fmean(x[m] for x in h):{f}}" for m, f in (
                ("kept", ".1f"), ("kept_right_working", ".1f"), ("mean_response_length", ".1f"),
                ("accuracy_final", ".3f"), ("accuracy_strict", ".3f"))))
        lines.append("| " + " | ".join(row) + " |")
    first = [r for r in runs if r["history"]]
    lines += ["", "First-iteration loss (initial weights; iteration 1 steps with lr 0): "
              + ", ".join(f"{r['train_reward']} lr {r['lr']:g} seed {r['seed']}: {r['history'][0]['loss']:.4f}"
                          for r in first), ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join(args.workdir, "replicate-mle")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer.load(os.path.join(args.workdir, "tokenizer.model"))
    with open(os.path.join(args.workdir, "task/eval.jsonl")) as handle:
        problems = [json.loads(line) for line in handle if line.strip()]  # every row, as held_out_problems
    with open(os.path.join(args.workdir, "task/train.jsonl")) as handle:
        rows_by_id = {row["id"]: row for row in map(json.loads, filter(str.strip, handle))}
    command = "python benchmarks/replicate_own_sample_mle.py " + " ".join(
        [f"--workdir {args.workdir} --iters {args.iters} --lrs", *map(str, args.lrs), "--seeds", *map(str, args.seeds),
         f"--train-reward {args.train_reward} --out {out}"])
    runs, start = [], time.perf_counter()
    for lr in args.lrs:
        for seed in args.seeds:
            runs.append(run(args, lr, seed, tok, problems, rows_by_id))
            with open(os.path.join(out, "results.json"), "w") as handle:
                json.dump({"command": command, "runs": runs}, handle, indent=1)
            with open(os.path.join(out, "results.md"), "w") as handle:
                handle.write(markdown(runs, args.iters, command))
    print(markdown(runs, args.iters, command))
    print(f"wall time {(time.perf_counter() - start) / 60:.1f} min; wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
