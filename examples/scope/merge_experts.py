"""CPU miniature of merging domain experts back into their student (G-OPD's ExOPD setting; issue 31).

1. a task of two domains, two operation families of the demo's arithmetic: "addsub" (+ and -, 2-4 operands) and
   "mul" (*, 2-3 operands); every training row names its domain in a "domain" column, and one SentencePiece
   tokenizer covers both;
2. a student pre-trained briefly by SFT on both domains (the demo's 2-layer recipe);
3. two experts, each the student fine-tuned by SFT on one domain only (as G-OPD's experts are the student after
   domain-specific training);
4. the student merged from both experts with routed teachers (--teacher addsub=... --teacher mul=...
   --teacher-route-key domain), by OPD, by ExOPD at λ = 1.25 (its reference the student's initial weights) and by
   SCOPE; each (method, seed) in a fresh process through `megatron_scope.train`, from the same student;
5. Avg@n and Pass@n of every model on each domain's held-out problems, graded by --reward (strict by default: every
   written step and the final answer).

    python examples/scope/merge_experts.py --out outputs/merge --seeds 0 1 2

Writes <out>/results.json and <out>/results.md (mean ± population std over seeds). The workspace (task, tokenizer,
student, experts and their evaluations) is built once and reused by later calls with the same --out, and a later
call with other --methods and the same settings adds them to the table (`--methods exopd-1`: ExOPD at λ = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics

import compare
import demo

DOMAINS = ("addsub", "mul")
"""The task's domains, each one expert's."""

ROUTE_KEY = "domain"
"""The training rows' column naming their domain, the teacher each prompt is routed to."""

MERGE_METHODS = {
    "opd": ("opd", []),
    "exopd": ("exopd", ["--exopd-lambda", "1.25"]),  # G-OPD's reward extrapolation; π_ref = the initial student
    "exopd-1": ("exopd", ["--exopd-lambda", "1.0"]),  # the same sampled-token reward without extrapolation (OPD-k1)
    "scope": ("scope", []),
}
"""Method name -> (--scope-algorithm, extra flags)."""


def domain_difficulty(domain: str):
    """The demo task's difficulty for `domain` (megatron_scope.data.synthetic.Difficulty)."""
    from megatron_scope.data.synthetic import Difficulty

    if domain == "addsub":
        return Difficulty(operations="+-")
    if domain == "mul":
        return Difficulty(max_operands=3, operations="*")
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/merge", help="Working directory (task, models, results).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the workspace: task, student and experts.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Seeds of the merges.")
    parser.add_argument("--methods", nargs="+", choices=list(MERGE_METHODS), default=["opd", "exopd", "scope"])
    parser.add_argument("--num-train", type=int, default=2000, help="Training problems per domain.")
    parser.add_argument("--num-eval", type=int, default=64, help="Held-out problems per domain.")
    parser.add_argument("--student-sft-iters", type=int, default=250)
    parser.add_argument("--expert-sft-iters", type=int, default=300)
    parser.add_argument("--expert-lr", type=float, default=1e-3)
    parser.add_argument("--merge-iters", type=int, default=100)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4, help="Merge learning rate (Adam, cosine to lr/10).")
    parser.add_argument("--eval-samples", type=int, default=8, help="n responses per held-out problem.")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--reward", choices=demo.SYNTHETIC_REWARDS, default="synthetic-strict")
    return parser.parse_args(argv)


def write_task(out: str, num_train: int, num_eval: int, seed: int) -> dict:
    """Each domain's splits under <out>/task/<domain>/, and <out>/task/train.jsonl: both domains' training rows,
    shuffled, ids prefixed by the domain, each with its ROUTE_KEY column; <out>/task/corpus.txt for the tokenizer."""
    from megatron_scope.data.synthetic import write_task_files

    rows, corpus = [], []
    files = {}
    for domain in DOMAINS:
        files[domain] = write_task_files(os.path.join(out, "task", domain), num_train, num_eval, seed,
                                         domain_difficulty(domain))
        with open(files[domain].train_jsonl) as handle:
            rows += [{**row, "id": f"{domain}-{row['id']}", ROUTE_KEY: domain} for row in map(json.loads, handle)]
        with open(files[domain].corpus_txt) as handle:
            corpus.append(handle.read())
    random.Random(seed).shuffle(rows)
    with open(os.path.join(out, "task", "train.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out, "task", "corpus.txt"), "w") as handle:
        handle.write("".join(corpus))
    return files


def build_workspace(args) -> None:
    """Task, tokenizer, student and experts under --out (demo.py's layout: student_hf, tokenizer.model,
    task/train.jsonl), unless already there."""
    from megatron_scope.data.datasets import build_sft_tensors, load_sft_pairs
    from megatron_scope.data.synthetic import TASK_ALPHABET
    from megatron_scope.data.tokenizer import train_tokenizer
    from megatron_scope.megatron.parallel import init_distributed

    files = write_task(args.out, args.num_train, args.num_eval, args.seed)
    tokenizer = train_tokenizer(os.path.join(args.out, "task", "corpus.txt"), os.path.join(args.out, "tokenizer.model"),
                                required_chars=TASK_ALPHABET)
    init_distributed()
    sft = lambda path: build_sft_tensors(load_sft_pairs(path), tokenizer, seq_length=48)  # noqa: E731
    student = demo.pretrain(demo.ModelRecipe("student", 2, 128, args.student_sft_iters, 2e-3), tokenizer,
                            sft(os.path.join(args.out, "task", "train.jsonl")), args.out, args.seed + 1)
    for domain in DOMAINS:
        demo.pretrain(demo.ModelRecipe(f"expert_{domain}", 0, 0, args.expert_sft_iters, args.expert_lr), tokenizer,
                      sft(files[domain].train_jsonl), args.out, args.seed + 2, init_hf=student)


def evaluate_domains(args, engine, label: str) -> dict:
    """{domain: demo.evaluate_model result} of `engine`'s weights on each domain's held-out problems."""
    from megatron_scope.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(os.path.join(args.out, "tokenizer.model"))
    return {domain: demo.evaluate_model(
                engine, tokenizer, demo.held_out_problems(os.path.join(args.out, "task", domain, "eval.jsonl")),
                args.eval_samples, args.max_new_tokens, f"{label}, {domain}", reward=args.reward)
            for domain in DOMAINS}


def _evaluate_checkpoint(args, hf_dir: str, label: str) -> dict:
    from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    engine = VLLMRolloutEngine(VLLMEngineConfig(hf_dir, kv_cache_bytes=1 << 30, seed=0))
    try:
        return evaluate_domains(args, engine, label)
    finally:
        engine.close()


def expert_dirs(out: str) -> dict[str, str]:
    """Each domain's expert's HF directory under `out`."""
    return {domain: os.path.join(out, f"expert_{domain}_hf") for domain in DOMAINS}


def merge_flags(args, method: str, seed: int) -> list[str]:
    """The training flags of one merge: the demo's (`demo.distillation_flags`) from the student, each domain's
    expert a --teacher routed by the ROUTE_KEY column, token-budget microbatches (about 16 sequences: a microbatch
    holds one teacher's groups)."""
    algorithm, extra = MERGE_METHODS[method]
    return demo.distillation_flags(
        args.out, algorithm, seed, args.merge_iters, args.prompts_per_step, args.group_size, args.max_new_tokens,
        args.lr, reward=args.reward, teachers=expert_dirs(args.out),
        extra=["--teacher-route-key", ROUTE_KEY, "--max-tokens-per-microbatch", "1024", "--log-interval", "10",
               *extra])


def _merge(args, method: str, seed: int):
    """One (method, seed): the student merged from the experts, then evaluated on each domain."""
    from megatron_scope.arguments import parse_run_config
    from megatron_scope.train import build_trainer

    trainer = build_trainer(parse_run_config(merge_flags(args, method, seed)))
    try:
        history = trainer.train()
        with trainer.awake_engine() as engine:
            result = evaluate_domains(args, engine, f"{method} seed {seed}")
    finally:
        trainer.close()
    kept = lambda key: key in ("iteration", "rollout/accuracy", "loss/loss") or (  # noqa: E731
        key.startswith("teacher/") and key.endswith(("/prompt_fraction", "/accuracy", "/loss")))
    return [{k: v for k, v in h.items() if kept(k)} for h in history], result


def summarize(references: dict, runs: dict, n: int) -> str:
    """Markdown: Avg@n and Pass@n per domain and their mean, one row per model (merges: mean ± std over seeds)."""
    def cell(values):
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"

    def columns(results):
        values = [[r[d]["avg"] for r in results] for d in DOMAINS]
        passes = [[r[d]["pass"][max(r[d]["pass"])] for r in results] for d in DOMAINS]
        both = [statistics.mean(r[d]["avg"] for d in DOMAINS) for r in results]
        return [cell(v) for pair in zip(values, passes) for v in pair] + [cell(both)]

    header = [f"{kind}@{n} {d}" for d in DOMAINS for kind in ("Avg", "Pass")] + [f"Avg@{n} both"]
    lines = ["| model | " + " | ".join(header) + " | seeds |", "|---|" + "---|" * (len(header) + 1)]
    for name, result in references.items():
        lines.append(f"| {name} | " + " | ".join(columns([result])) + " | - |")
    for method, seed_runs in runs.items():
        results = [r for _, r in seed_runs]
        lines.append(f"| merged by {method} | " + " | ".join(columns(results)) + f" | {len(results)} |")
    return "\n".join(lines)


def _int_keys(result: dict) -> dict:
    """A domain result read back from JSON, its Pass@k keys ints again."""
    return {domain: {**r, "pass": {int(k): v for k, v in r["pass"].items()}} for domain, r in result.items()}


SETTINGS = ("num_train", "num_eval", "student_sft_iters", "expert_sft_iters", "expert_lr", "merge_iters",
            "prompts_per_step", "group_size", "lr", "eval_samples", "max_new_tokens", "reward", "seeds")
"""What a merge's numbers depend on (besides its method): a later call with the same ones adds to the table."""


def earlier_runs(args) -> dict:
    """The runs of <out>/results.json of other methods than --methods, when made with the same SETTINGS (a later
    call adds methods to the table); else none."""
    path = os.path.join(args.out, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        earlier = json.load(handle)
    if any(earlier["args"].get(name) != getattr(args, name) for name in SETTINGS):
        return {}
    return {method: [(history, _int_keys(result)) for history, result in seed_runs]
            for method, seed_runs in earlier["runs"].items() if method not in args.methods}


def main(argv=None):
    from megatron_scope.quiet import quiet_python_warnings

    quiet_python_warnings()
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not all(os.path.isdir(d) for d in expert_dirs(args.out).values()):
        compare.run_in_fresh_process(build_workspace, args)
    references_json = os.path.join(args.out, "references.json")
    if os.path.exists(references_json):
        with open(references_json) as handle:
            references = {name: _int_keys(r) for name, r in json.load(handle).items()}
    else:
        models = {"student (every merge starts here)": os.path.join(args.out, "student_hf"),
                  **{f"expert {domain}": hf_dir for domain, hf_dir in expert_dirs(args.out).items()}}
        references = {name: compare.run_in_fresh_process(_evaluate_checkpoint, args, hf_dir, name)
                      for name, hf_dir in models.items()}
        with open(references_json, "w") as handle:
            json.dump(references, handle, indent=1)
    runs = earlier_runs(args)
    for method in args.methods:
        runs[method] = [compare.run_in_fresh_process(_merge, args, method, seed) for seed in args.seeds]
        with open(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump({"args": vars(args), "references": references, "runs": runs}, handle, indent=1)
    table = summarize(references, runs, args.eval_samples)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    return references, runs


if __name__ == "__main__":
    main()
