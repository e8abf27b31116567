"""Mini study: SCOPE against OPD, GRPO and SFT at equal budget on the demo task, several seeds.

Reuses the demo's workspace (`make demo` first: task, tokenizer, SFT'd teacher and student). Every
(method, seed) run starts from the same student, trains the same number of iterations on the same number of
rollouts, in a fresh process, and is evaluated on the held-out problems with the same sampling seed.

    python examples/scope/compare.py --workdir outputs/demo --methods scope opd grpo sft --seeds 0 1 2
    python examples/scope/compare.py --workdir outputs/demo --reward synthetic-strict \
        --methods scope scope-released scope-no-student-weights scope-no-mle opd opd-k1

A method is an algorithm (--scope-algorithm) or one of the named variants of STUDY_METHODS (an algorithm
and extra training flags: SCOPE as the authors released it, SCOPE ablations, OPD with the k1 estimator, SRPO's
teacher variants, TrOPD with its off-policy guidance).

--reward picks the study's verifier, for the training reward and the held-out grading alike:
"synthetic-strict" (every written step too, the demo's default) or "synthetic" (the final "A: <int>" only). The
table adds the other grading's Avg@n, so a gap between them counts the right answers reached with wrong working.

Writes <out>/results.json, results.md (mean ± std over seeds) and compare.png; <out> is --out, by default
<workdir>/compare-<reward>.
"""

from __future__ import annotations

import argparse
import json
import os
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor

import demo

# The SCOPE authors' released recipe (machine981/SCOPE run_experiment_distill_1_5b.sh), as RECIPE=released in
# examples/scope/launch_paper.sh: PPL_S^(-1/τ) student-path weights, the k1 advantage through PPO's clip and dual
# clip, per-path token means, rollout and student log-probs at temperature 0.6, constant LR, weight decay 0.01.
RELEASED_RECIPE = ["--scope-kl", "k1", "--scope-teacher-path-loss", "ppo", "--scope-student-path-exponent", "-1",
                   "--loss-agg-mode", "scope-released", "--rollout-temperature", "0.6", "--logprob-temperature", "0.6",
                   "--lr-decay-style", "constant", "--weight-decay", "0.01"]

ONE_STEP_OFF = ["--rollout-engines", "1", "--rollout-schedule", "one-step-off"]
ASYNC_2 = ["--rollout-engines", "1", "--rollout-schedule", "async", "--max-staleness", "2"]
SEQUENCE_IS = ["--rollout-is", "sequence", "--rollout-is-threshold", "5"]
PROPS = ["--rollout-sampler", "props"]  # --props-rounds: compare.py's --group-size (one sample per round)

# method name -> (--scope-algorithm, extra flags)
STUDY_METHODS = {
    **{name: (name, []) for name in ("scope", "opd", "exopd", "srpo", "tropd", "grpo", "sft")},
    "scope-released": ("scope", RELEASED_RECIPE),
    "scope-no-student-weights": ("scope", ["--no-scope-student-path-weights"]),  # uniform MLE on correct responses
    "scope-no-mle": ("scope", ["--no-scope-student-path"]),  # correct responses get no loss: the teacher path only
    "opd-k1": ("opd", ["--scope-kl", "k1"]),  # the sampled-token estimator in policy-gradient form
    "srpo-current": ("srpo", ["--srpo-teacher", "current"]),  # the self-teacher without EMA ("srpo": EMA, SDPO's)
    "srpo-external": ("srpo", ["--srpo-teacher", "external"]),  # failures distilled toward the external teacher
    "tropd-guided": ("tropd", ["--tropd-prefix-fraction", "0.5"]),  # half the prompts continue teacher prefixes
    "tropd-mask": ("tropd", ["--tropd-outlier", "mask"]),  # outliers get no loss ("tropd": the paper's forward KL)
    # one Ray engine generating step k+1 from the weights before step k while step k trains (issue 29), uncorrected
    # or with sequence-level truncated IS against the stale sampler
    "scope-one-step-off": ("scope", ONE_STEP_OFF),
    "scope-one-step-off-seq-is": ("scope", [*ONE_STEP_OFF, *SEQUENCE_IS]),
    "opd-one-step-off": ("opd", ONE_STEP_OFF),
    "opd-one-step-off-seq-is": ("opd", [*ONE_STEP_OFF, *SEQUENCE_IS]),
    # the producer up to 2 steps ahead (async, η = 2): responses 0-2 optimizer steps stale
    "scope-async-2": ("scope", ASYNC_2),
    "scope-async-2-seq-is": ("scope", [*ASYNC_2, *SEQUENCE_IS]),
    "opd-async-2": ("opd", ASYNC_2),
    "opd-async-2-seq-is": ("opd", [*ASYNC_2, *SEQUENCE_IS]),
    # each group drawn in rounds from PROPS's behaviour policy (issue 32; --props-rounds: as many as the group size)
    "scope-props": ("scope", PROPS),
    "opd-props": ("opd", PROPS),
    "grpo-props": ("grpo", PROPS),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/demo", help="A finished `make demo` directory.")
    parser.add_argument("--methods", nargs="+", default=["scope", "opd", "grpo", "sft"],
                        choices=list(STUDY_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4, help="Distillation learning rate (Adam, cosine to lr/10).")
    parser.add_argument("--reward", choices=demo.SYNTHETIC_REWARDS, default="synthetic-strict",
                        help="The study's verifier (training reward and held-out grading): synthetic-strict (every "
                             "written step too) or synthetic (the final answer only).")
    parser.add_argument("--out", default=None,
                        help="Output directory; default <workdir>/compare-<reward> (so studies do not overwrite "
                             "each other).")
    return parser.parse_args(argv)


def output_dir(args) -> str:
    """Where the study writes: --out, else <workdir>/compare-<reward>."""
    if args.out:
        return args.out
    return os.path.join(args.workdir, f"compare-{args.reward}")


def _run(args, method, seed):
    """One (method, seed): train from the demo's student, then evaluate; returns (history, eval results)."""
    from megatron_scope.arguments import parse_run_config
    from megatron_scope.data.tokenizer import Tokenizer
    from megatron_scope.train import build_trainer

    work = args.workdir
    algorithm, extra = STUDY_METHODS[method]
    trainer = build_trainer(parse_run_config(demo.distillation_flags(
        work, algorithm, seed, args.iters, args.prompts_per_step, args.group_size, args.max_new_tokens, args.lr,
        extra=["--log-interval", "10", *extra, *props_rounds(extra, args.group_size)], reward=args.reward)))
    tokenizer = Tokenizer.load(f"{work}/tokenizer.model")
    problems = demo.held_out_problems(f"{work}/task/eval.jsonl")
    try:
        history = trainer.train()
        with trainer.awake_engine() as engine:
            result = demo.evaluate_model(engine, tokenizer, problems, args.eval_samples, args.max_new_tokens,
                                         f"{method} seed {seed}", reward=args.reward)
    finally:
        trainer.close()
    kept = lambda key: key in ("iteration", "rollout/accuracy", "loss/loss", "rollout/sampling_error") or \
        key.startswith(("srpo/", "tropd/"))  # noqa: E731
    return [{k: v for k, v in h.items() if kept(k)} for h in history], result


def props_rounds(extra, group_size: int) -> list[str]:
    """A PROPS method draws each group one sample per round (the most its band allows it to correct)."""
    return ["--props-rounds", str(group_size)] if "--rollout-sampler" in extra else []


def summarize(runs: dict, n: int, references: dict | None = None, reward: str | None = None) -> str:
    """Markdown table: one row per method (mean ± population std over seeds), after `references` rows
    (name -> one evaluation, e.g. the starting student and the teacher). With `reward` and results that carry
    both gradings ("by_reward", demo.evaluate_model), a last column gives the other grading's Avg@n."""
    ks = sorted(next(iter(runs.values()))[0][1]["pass"])
    results = [r for _, r in (references or {}).items()] + [r for seed_runs in runs.values() for _, r in seed_runs]
    other = None
    if reward is not None and all("by_reward" in r for r in results):
        other = next(name for name in demo.SYNTHETIC_REWARDS if name != reward)

    def cell(values):  # mean ± population std over seeds; a single seed has no spread to report
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"

    def other_cell(seed_results):
        return f" {cell([r['by_reward'][other]['avg'] for r in seed_results])} |" if other else ""

    lines = [f"| method | Avg@{n} | " + " | ".join(f"Pass@{k}" for k in ks) + " |"
             + (f" Avg@{n} ({other}) |" if other else "") + " seeds |",
             "|---|---|" + "---|" * len(ks) + ("---|" if other else "") + "---|"]
    for name, result in (references or {}).items():
        lines.append(f"| {name} | {result['avg']:.3f} | " + " | ".join(f"{result['pass'][k]:.3f}" for k in ks)
                     + " |" + other_cell([result]) + " - |")
    for method, seed_runs in runs.items():
        lines.append(f"| {method} | {cell([r['avg'] for _, r in seed_runs])} | "
                     + " | ".join(cell([r['pass'][k] for _, r in seed_runs]) for k in ks) + " |"
                     + other_cell([r for _, r in seed_runs]) + f" {len(seed_runs)} |")
    return "\n".join(lines)


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, seed_runs in runs.items():
        curves = [[h["rollout/accuracy"] for h in history] for history, _ in seed_runs]
        mean = [statistics.mean(step) for step in zip(*curves)]
        ax.plot(range(1, len(mean) + 1), mean, label=f"{method} (mean of {len(curves)} seeds)")
    ax.set(xlabel="iteration", ylabel="rollout accuracy (train prompts)", title="Equal-budget comparison", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REFERENCE_LABELS = {"student_before": "student before (all methods start here)", "teacher": "teacher"}
"""metrics.json's result key -> the table's row label."""


def _references(workdir: str, reward: str = "synthetic") -> dict:
    """The demo's own evaluations of the starting student and the teacher (metrics.json), if there, graded by
    `reward` (a metrics.json without both gradings was graded by the final answer: used for "synthetic" only)."""
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        results = json.load(handle)["results"]
    references = {}
    for key, label in REFERENCE_LABELS.items():
        if key not in results:
            continue
        result = results[key]
        if "by_reward" in result:
            graded = result["by_reward"][reward]
        elif reward == "synthetic":
            graded = result
        else:
            continue
        references[label] = {"avg": graded["avg"], "pass": {int(k): v for k, v in graded["pass"].items()}}
        if "by_reward" in result:  # JSON turned the k of Pass@k into strings
            references[label]["by_reward"] = result["by_reward"]
    return references


def _evaluate(args, hf_dir: str, label: str) -> dict:
    """`demo.evaluate_model` of the HF checkpoint `hf_dir` in a vLLM engine of its own (demo's sampling seed)."""
    from megatron_scope.data.tokenizer import Tokenizer
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    engine = VLLMRolloutEngine(VLLMEngineConfig(hf_dir, kv_cache_bytes=1 << 30, seed=0))
    try:
        return demo.evaluate_model(engine, Tokenizer.load(f"{args.workdir}/tokenizer.model"),
                                   demo.held_out_problems(f"{args.workdir}/task/eval.jsonl"), args.eval_samples,
                                   args.max_new_tokens, label, reward=args.reward)
    finally:
        engine.close()


def references(args, out: str) -> dict:
    """The starting student's and the teacher's evaluations graded by --reward: the demo's (metrics.json) where
    it graded them so, else evaluated here once and kept in <out>/references.json."""
    found = _references(args.workdir, args.reward)
    path = os.path.join(out, "references.json")
    if len(found) < len(REFERENCE_LABELS):
        if os.path.exists(path):
            with open(path) as handle:
                found = {label: {**r, "pass": {int(k): v for k, v in r["pass"].items()}}
                         for label, r in json.load(handle).items()}
        else:
            found = {label: run_in_fresh_process(_evaluate, args, os.path.join(args.workdir, hf), label)
                     for hf, label in zip(("student_hf", "teacher_hf"), REFERENCE_LABELS.values())}
            with open(path, "w") as handle:
                json.dump(found, handle, indent=1)
    return found


def run_in_fresh_process(fn, *args):
    """`fn(*args)` in a new spawned process (its own torch.distributed world and vLLM engine)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv=None):
    args = parse_args(argv)
    for needed in ("student_hf", "teacher_hf", "tokenizer.model", "task/train.jsonl", "task/eval.jsonl"):
        if not os.path.exists(os.path.join(args.workdir, needed)):
            raise FileNotFoundError(f"{args.workdir}/{needed} is missing: run `make demo` first")
    out = output_dir(args)
    os.makedirs(out, exist_ok=True)
    reference_results = references(args, out)
    runs = {}
    for method in args.methods:
        runs[method] = [run_in_fresh_process(_run, args, method, seed) for seed in args.seeds]
        with open(os.path.join(out, "results.json"), "w") as handle:
            json.dump({"args": vars(args), "runs": runs}, handle, indent=1)
    table = summarize(runs, args.eval_samples, reference_results, args.reward)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(table + "\n")
    plot(runs, os.path.join(out, "compare.png"))
    print(table)


if __name__ == "__main__":
    main()
