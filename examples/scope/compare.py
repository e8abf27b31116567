"""Mini study: SCOPE against OPD, GRPO and SFT at equal budget on the demo task, several seeds.

Reuses the demo's workspace (`make demo` first: task, tokenizer, SFT'd teacher and student). Every
(method, seed) run starts from the same student, trains the same number of iterations on the same number of
rollouts, in a fresh process, and is evaluated on the held-out problems with the same sampling seed.

    python examples/scope/compare.py --workdir outputs/demo --methods scope opd grpo sft --seeds 0 1 2

Writes <workdir>/compare/results.json, results.md (mean ± std over seeds) and compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor

import demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/demo", help="A finished `make demo` directory.")
    parser.add_argument("--methods", nargs="+", default=["scope", "opd", "grpo", "sft"],
                        choices=["scope", "opd", "exopd", "srpo", "tropd", "grpo", "sft"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4, help="Distillation learning rate (Adam, cosine to lr/10).")
    return parser.parse_args(argv)


def _run(args, method, seed):
    """One (method, seed): train from the demo's student, then evaluate; returns (history, eval results)."""
    from megatron_scope.arguments import parse_run_config
    from megatron_scope.data.tokenizer import Tokenizer
    from megatron_scope.train import build_trainer

    work = args.workdir
    trainer = build_trainer(parse_run_config(demo.distillation_flags(
        work, method, seed, args.iters, args.prompts_per_step, args.group_size, args.max_new_tokens, args.lr,
        extra=["--log-interval", "10"])))
    tokenizer = Tokenizer.load(f"{work}/tokenizer.model")
    problems = demo.held_out_problems(f"{work}/task/eval.jsonl")
    try:
        history = trainer.train()
        result = demo.evaluate_model(trainer.engine, tokenizer, problems, args.eval_samples, args.max_new_tokens,
                                     f"{method} seed {seed}")
    finally:
        trainer.close()
    return [{k: h[k] for k in ("iteration", "rollout/accuracy", "loss/loss")} for h in history], result


def summarize(runs: dict, n: int, references: dict | None = None) -> str:
    """Markdown table: one row per method (mean ± population std over seeds), after `references` rows
    (name -> one evaluation, e.g. the starting student and the teacher)."""
    ks = sorted(next(iter(runs.values()))[0][1]["pass"])
    lines = [f"| method | Avg@{n} | " + " | ".join(f"Pass@{k}" for k in ks) + " | seeds |",
             "|---|---|" + "---|" * len(ks) + "---|"]
    for name, result in (references or {}).items():
        lines.append(f"| {name} | {result['avg']:.3f} | " + " | ".join(f"{result['pass'][k]:.3f}" for k in ks)
                     + " | - |")
    for method, seed_runs in runs.items():
        def cell(values):  # mean ± population std over seeds; a single seed has no spread to report
            if len(values) == 1:
                return f"{values[0]:.3f}"
            return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"
        lines.append(f"| {method} | {cell([r['avg'] for _, r in seed_runs])} | "
                     + " | ".join(cell([r['pass'][k] for _, r in seed_runs]) for k in ks) + f" | {len(seed_runs)} |")
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


def _references(workdir: str) -> dict:
    """The demo's own evaluations of the starting student and the teacher (metrics.json), if there."""
    path = os.path.join(workdir, "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        results = json.load(handle)["results"]
    names = {"student_before": "student before (all methods start here)", "teacher": "teacher"}
    return {label: {"avg": results[key]["avg"], "pass": {int(k): v for k, v in results[key]["pass"].items()}}
            for key, label in names.items() if key in results}  # JSON turned the k of Pass@k into strings


def run_in_fresh_process(fn, *args):
    """`fn(*args)` in a new spawned process (its own torch.distributed world and vLLM engine)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(argv=None):
    args = parse_args(argv)
    for needed in ("student_hf", "teacher_hf", "tokenizer.model", "task/train.jsonl", "task/eval.jsonl"):
        if not os.path.exists(os.path.join(args.workdir, needed)):
            raise FileNotFoundError(f"{args.workdir}/{needed} is missing: run `make demo` first")
    out = os.path.join(args.workdir, "compare")
    os.makedirs(out, exist_ok=True)
    runs = {}
    for method in args.methods:
        runs[method] = [run_in_fresh_process(_run, args, method, seed) for seed in args.seeds]
        with open(os.path.join(out, "results.json"), "w") as handle:
            json.dump({"args": vars(args), "runs": runs}, handle, indent=1)
    table = summarize(runs, args.eval_samples, _references(args.workdir))
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(table + "\n")
    plot(runs, os.path.join(out, "compare.png"))
    print(table)


if __name__ == "__main__":
    main()
