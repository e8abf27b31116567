"""Evaluation runner: sample n responses per problem, verify them, report Avg@n and Pass@k per benchmark.

The protocol of SCOPE's evaluation (arXiv 2604.10688, Sec. 4): for each benchmark problem, n responses
are sampled from the model; each is graded by the same verifier as the training reward (the set's data
source's, `rewards.routing`); the report gives Avg@n (mean accuracy over the n samples) and Pass@k for
several k (unbiased estimator, see megatron_scope.eval.metrics), per benchmark and as the unweighted mean
over benchmarks, as a markdown table, JSON, a per-sample JSONL, and a plot of accuracy against k.

Training's validation (--eval-interval, `trainer.ScopeTrainer.validate`) and tools/eval.py run the same
three steps: `prepare_sets` (checks, prompts encoded as training encodes its own), `sample_and_grade` (one
part of the problems per engine, seeded by the problem's index in its set) and `build_report`; the same
flags on the same weights give the same numbers.

The runner talks to any `RolloutEngine` (token ids in and out) and the project's tokenizers
(`data.tokenizer`: `encode(text, add_bos)`, `decode(ids)`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from megatron_scope.data.datasets import PromptFormat, prompt_token_ids
from megatron_scope.eval.benchmarks import BenchmarkProblem
from megatron_scope.eval.metrics import avg_at_k, mean_pass_at_k
from megatron_scope.rewards.base import Verifier
from megatron_scope.rewards.routing import RoutedVerifier
from megatron_scope.rollout.engine import RolloutEngine, SamplingParams
from megatron_scope.rollout.seeds import StepSeeds


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to sample and report."""

    num_samples: int
    """n: responses sampled per problem."""
    ks: tuple[int, ...]
    """The k of each reported Pass@k; each in [1, num_samples]."""
    prompt_format: PromptFormat = PromptFormat()
    """How a problem becomes the prompt's token ids: training's --prompt-template (one "{prompt}", replaced
    literally) and --apply-chat-template (`data.datasets.prompt_token_ids`)."""
    max_new_tokens: int = 1024
    """Response length cap."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy (then n > 1 only makes sense with a seeded sampler)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    seed: int | None = 0
    """Run seed: sample j of a benchmark's problem i is seeded with hash(seed, 0, i, j, "evaluation")
    (`rollout.seeds`), whatever prompts_per_call is and whichever engine samples it. None: unseeded."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response, e.g. the tokenizer's EOS."""
    vocab_size: int | None = None
    """Sample only ids below this (the tokenizer's vocabulary, as training's rollouts); None: every row."""
    prompts_per_call: int = 32
    """Problems per RolloutEngine.generate call; the progress bar advances per call."""
    verify_chunk_size: int = 256
    """Responses per verifier call; the verification progress bar advances per chunk."""

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(self.ks))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"EvalConfig.num_samples must be an int >= 1, got {self.num_samples!r}")
        if not self.ks:
            raise ValueError("EvalConfig.ks must name at least one k")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_samples:
                raise ValueError(f"EvalConfig.ks: k={k!r} must be an int in [1, num_samples={self.num_samples}]")
        if len(set(self.ks)) != len(self.ks) or list(self.ks) != sorted(self.ks):
            raise ValueError(f"EvalConfig.ks must be strictly increasing, got {self.ks}")
        for name in ("prompts_per_call", "verify_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be an int >= 1, got {value!r}")
        self.sampling_params()  # SamplingParams validates max_new_tokens, temperature, top_p

    @classmethod
    def of_run(cls, validation, data, seed: int, stop_token_ids, vocab_size: int | None, **options) -> "EvalConfig":
        """The runner's settings of a run's `config.ValidationConfig` and `config.DataConfig` (its prompt format),
        as training's validation and tools/eval.py both use them; `options` sets the other fields (ks too)."""
        options.setdefault("ks", validation.ks)
        return cls(num_samples=validation.samples_per_prompt, prompt_format=data.prompt_format(),
                   max_new_tokens=validation.max_new_tokens, temperature=validation.temperature,
                   top_p=validation.top_p, seed=seed, stop_token_ids=stop_token_ids, vocab_size=vocab_size, **options)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            n=self.num_samples,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop_token_ids=self.stop_token_ids,
            vocab_size=self.vocab_size,
        )


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One benchmark, checked and encoded: its problems and each one's prompt token ids."""

    name: str
    """Its report name, and the data source whose verifier grades it (`rewards.routing.RoutedVerifier`)."""
    problems: tuple[BenchmarkProblem, ...]
    prompt_token_ids: tuple[tuple[int, ...], ...]

    def part(self, index: int, count: int) -> range:
        """The problems of part `index` of `count` near-equal contiguous parts (one per engine)."""
        size = len(self.problems)
        return range(size * index // count, size * (index + 1) // count)


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One graded response."""

    benchmark: str
    problem_id: str
    sample_index: int
    correct: bool
    status: str
    """The verifier's status (megatron_scope.rewards.math_verifier.STATUS_*, or rewards.synthetic's)."""
    answer: str | None
    """The extracted final answer (the boxed one for math)."""
    gold_answer: str
    finish_reason: str
    num_tokens: int
    response: str


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """Scores of one benchmark."""

    name: str
    num_problems: int
    num_samples: int
    avg_at_n: float
    """Mean accuracy over the n samples per problem, averaged over problems."""
    pass_at_k: dict[int, float]
    """Unbiased Pass@k averaged over problems, per requested k."""
    num_correct_per_problem: dict[str, int]
    status_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    """Verdict status -> number of samples with it (e.g. the strict synthetic verifier's "wrong_steps": right
    final answer, wrong working)."""

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Its scalars for the training log: {prefix}/{name}/avg@n and /pass@k."""
        return {f"{prefix}/{self.name}/avg@{self.num_samples}": self.avg_at_n,
                **{f"{prefix}/{self.name}/pass@{k}": value for k, value in self.pass_at_k.items()}}


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Per-benchmark results, their unweighted mean, and every graded sample."""

    config: EvalConfig
    benchmarks: list[BenchmarkResult]
    samples: list[SampleRecord]

    def average(self) -> tuple[float, dict[int, float]]:
        """(Avg@n, {k: Pass@k}) averaged over benchmarks with equal weight (as papers report "Avg.")."""
        count = len(self.benchmarks)
        avg = sum(result.avg_at_n for result in self.benchmarks) / count
        passes = {k: sum(result.pass_at_k[k] for result in self.benchmarks) / count for k in self.config.ks}
        return avg, passes

    def to_json(self) -> dict:
        average_avg, average_pass = self.average()
        n = self.config.num_samples
        return {
            "num_samples": n,
            "ks": list(self.config.ks),
            "pass_at_k_estimator": "unbiased: 1 - C(n-c,k)/C(n,k) (Chen et al. 2021)",
            "sampling": {
                "max_new_tokens": self.config.max_new_tokens,
                "temperature": self.config.temperature,
                "top_p": self.config.top_p,
                "seed": self.config.seed,
            },
            "prompt_template": self.config.prompt_format.template,
            "apply_chat_template": self.config.prompt_format.chat,
            "benchmarks": {
                result.name: {
                    "num_problems": result.num_problems,
                    f"avg@{n}": result.avg_at_n,
                    **{f"pass@{k}": value for k, value in result.pass_at_k.items()},
                    "num_correct_per_problem": result.num_correct_per_problem,
                    "statuses": result.status_counts,
                }
                for result in self.benchmarks
            },
            "average": {f"avg@{n}": average_avg, **{f"pass@{k}": value for k, value in average_pass.items()}},
        }

    def to_markdown(self) -> str:
        """A table in percent: one row per benchmark and an "average" row."""
        n = self.config.num_samples
        header = ["benchmark", "problems", f"avg@{n}"] + [f"pass@{k}" for k in self.config.ks]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for result in self.benchmarks:
            cells = [result.name, str(result.num_problems), f"{100 * result.avg_at_n:.2f}"]
            cells += [f"{100 * result.pass_at_k[k]:.2f}" for k in self.config.ks]
            lines.append("| " + " | ".join(cells) + " |")
        average_avg, average_pass = self.average()
        cells = ["average", str(sum(r.num_problems for r in self.benchmarks)), f"{100 * average_avg:.2f}"]
        cells += [f"{100 * average_pass[k]:.2f}" for k in self.config.ks]
        lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    benchmarks: Mapping[str, Sequence[BenchmarkProblem]],
    config: EvalConfig,
    verifier: Verifier,
    show_progress: bool = True,
) -> EvalReport:
    """Sample `config.num_samples` responses per problem of every benchmark, grade them, score them.

    Everything that can be checked is checked before the first generate call (`prepare_sets`)."""
    sets = prepare_sets(benchmarks, tokenizer, config.prompt_format, verifier)
    return build_report(sets, sample_and_grade(engine, tokenizer, sets, config, verifier, show_progress=show_progress),
                        config)


def prepare_sets(benchmarks: Mapping[str, Sequence[BenchmarkProblem]], tokenizer, prompt_format: PromptFormat,
                 verifier: Verifier) -> list[EvalSet]:
    """Check and encode: benchmark contents, duplicate ids, gold answers each set's verifier can grade against
    (GoldAnswerError), prompts encodable with `prompt_format` (`data.datasets.prompt_token_ids`, exactly as
    training encodes its prompts)."""
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    prompt_format.check(tokenizer)
    sets = []
    for name, raw_problems in benchmarks.items():
        if len(raw_problems) == 0:
            raise ValueError(f"benchmark {name!r} has no problems")
        problems, seen = [], set()
        for raw in raw_problems:
            if not isinstance(raw, tuple) or len(raw) != 3 or not all(isinstance(field, str) for field in raw):
                raise ValueError(f"benchmark {name!r}: expected (id, problem, gold_answer) str tuples, got {raw!r}")
            if raw[0] in seen:
                raise ValueError(f"benchmark {name!r}: duplicate problem id {raw[0]!r}")
            seen.add(raw[0])
            problems.append(BenchmarkProblem(*raw))
        _grader(verifier, name).check_gold_answers([problem.gold_answer for problem in problems])
        encoded = tuple(tuple(_encode(tokenizer, problem, prompt_format, name)) for problem in problems)
        sets.append(EvalSet(name, tuple(problems), encoded))
    return sets


def sample_and_grade(engine: RolloutEngine, tokenizer, sets: Sequence[EvalSet], config: EvalConfig,
                     verifier: Verifier, part: tuple[int, int] = (0, 1), show_progress: bool = True
                     ) -> list[SampleRecord]:
    """Sample and grade part `part[0]` of `part[1]` of each set's problems (`EvalSet.part`; one part per engine:
    each problem's seeds are its index in the whole set, so the parts' records are the one engine's records)."""
    params = config.sampling_params()
    seeds = None if config.seed is None else StepSeeds(config.seed, 0)
    samples = []
    for eval_set in sets:
        indices = eval_set.part(*part)
        if not indices:
            continue
        completions = _sample(engine, eval_set.prompt_token_ids, indices, params, seeds, config.prompts_per_call,
                              eval_set.name, show_progress)
        responses, golds, meta = [], [], []
        for index, problem_completions in zip(indices, completions):
            for sample_index, completion in enumerate(problem_completions):
                responses.append(tokenizer.decode(list(completion.token_ids)))
                golds.append(eval_set.problems[index].gold_answer)
                meta.append((eval_set.problems[index], sample_index, completion))
        grader, verdicts = _grader(verifier, eval_set.name), []
        for start in tqdm(
            range(0, len(responses), config.verify_chunk_size),
            desc=f"verifying {eval_set.name}",
            unit="chunk",
            disable=not show_progress,
        ):
            end = start + config.verify_chunk_size
            verdicts.extend(grader.judge_batch(responses[start:end], golds[start:end]))
        for (problem, sample_index, completion), verdict, response in zip(meta, verdicts, responses):
            samples.append(
                SampleRecord(
                    benchmark=eval_set.name,
                    problem_id=problem.id,
                    sample_index=sample_index,
                    correct=verdict.correct,
                    status=verdict.status,
                    answer=verdict.answer,
                    gold_answer=problem.gold_answer,
                    finish_reason=completion.finish_reason,
                    num_tokens=len(completion.token_ids),
                    response=response,
                )
            )
    return samples


def build_report(sets: Sequence[EvalSet], samples: Sequence[SampleRecord], config: EvalConfig) -> EvalReport:
    """Avg@n, Pass@k and status counts per set from every sample of it (in any order: the parts of several
    engines concatenated); ValueError when a problem lacks samples or has too many."""
    results = []
    for eval_set in sets:
        correct: dict[str, list[bool]] = {problem.id: [] for problem in eval_set.problems}
        statuses = collections.Counter()
        for sample in samples:
            if sample.benchmark == eval_set.name:
                correct[sample.problem_id].append(sample.correct)
                statuses[sample.status] += 1
        incomplete = [pid for pid, row in correct.items() if len(row) != config.num_samples]
        if incomplete:
            raise ValueError(f"benchmark {eval_set.name!r}: problem {incomplete[0]!r} has "
                             f"{len(correct[incomplete[0]])} samples, expected {config.num_samples}")
        rows = list(correct.values())
        results.append(
            BenchmarkResult(
                name=eval_set.name,
                num_problems=len(rows),
                num_samples=config.num_samples,
                avg_at_n=avg_at_k(rows),
                pass_at_k={k: mean_pass_at_k(rows, k) for k in config.ks},
                num_correct_per_problem={pid: sum(row) for pid, row in correct.items()},
                status_counts=dict(sorted(statuses.items())),
            )
        )
    order = {eval_set.name: i for i, eval_set in enumerate(sets)}
    samples = sorted(samples, key=lambda s: order[s.benchmark])  # stable: each set's samples in problem order
    return EvalReport(config=config, benchmarks=results, samples=list(samples))


def _grader(verifier: Verifier, name: str) -> Verifier:
    """The verifier of benchmark `name`: its data source's, when `verifier` routes by source."""
    return verifier.of(name) if isinstance(verifier, RoutedVerifier) else verifier


def _encode(tokenizer, problem: BenchmarkProblem, prompt_format: PromptFormat, benchmark: str) -> list[int]:
    try:
        token_ids = list(prompt_token_ids(tokenizer, problem.problem, prompt_format))
    except ValueError as error:
        raise ValueError(f"benchmark {benchmark!r} problem {problem.id!r}: cannot encode its prompt: {error}") from None
    if not token_ids or not all(isinstance(token, int) for token in token_ids):
        raise ValueError(
            f"benchmark {benchmark!r} problem {problem.id!r}: the tokenizer returned {token_ids[:8]!r}..., "
            "expected a non-empty list of ints"
        )
    return token_ids


def _sample(engine, prompts, indices: range, params, seeds: StepSeeds | None, prompts_per_call, name,
            show_progress):
    """params.n completions per prompt of `indices` (sample j of problem i seeded by `seeds.seed(i, j,
    "evaluation")`, None: unseeded), checked for shape, with a progress bar over samples."""
    completions = []
    with tqdm(total=len(indices) * params.n, desc=f"sampling {name}", unit="sample", disable=not show_progress) as bar:
        for start in range(0, len(indices), prompts_per_call):
            problems = indices[start : start + prompts_per_call]  # the problem's index, not its place, picks its seeds
            batch = [list(prompts[i]) for i in problems]
            outputs = engine.generate(batch, params, None if seeds is None else seeds.groups(problems, params.n,
                                                                                              "evaluation"))
            if len(outputs) != len(batch) or any(len(per_prompt) != params.n for per_prompt in outputs):
                shape = [len(per_prompt) for per_prompt in outputs]
                raise RuntimeError(
                    f"{type(engine).__name__}.generate returned {len(outputs)} prompts with {shape} completions; "
                    f"expected {len(batch)} prompts with {params.n} each"
                )
            completions.extend(outputs)
            bar.update(len(batch) * params.n)
    return completions


def plot_accuracy_vs_k(report: EvalReport, path: str | os.PathLike) -> None:
    """A PNG of Pass@k against k (log2 axis) per benchmark and on average, Avg@n as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(report.config.ks)
    n = report.config.num_samples
    figure, axes = plt.subplots(figsize=(7, 4.5))
    average_avg, average_pass = report.average()
    series = [(r.name, r.pass_at_k, r.avg_at_n, 1.2) for r in report.benchmarks]
    series.append(("average", average_pass, average_avg, 2.5))
    for index, (name, pass_at_k, avg_at_n, width) in enumerate(series):
        color = "black" if name == "average" else f"C{index % 10}"
        pass_percent = [100 * pass_at_k[k] for k in ks]
        axes.plot(ks, pass_percent, marker="o", color=color, linewidth=width, label=f"{name} pass@k")
        axes.axhline(100 * avg_at_n, color=color, linestyle="--", linewidth=0.8)
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("k")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"Pass@k (unbiased, n={n}); dashed: avg@{n}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=120)
    plt.close(figure)


def write_report(report: EvalReport, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write results.json, results.md, samples.jsonl and accuracy_vs_k.png; return their paths by kind."""
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, "results.json"),
        "markdown": os.path.join(output_dir, "results.md"),
        "samples": os.path.join(output_dir, "samples.jsonl"),
        "plot": os.path.join(output_dir, "accuracy_vs_k.png"),
    }
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(report.to_json(), handle, indent=2)
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(report.to_markdown())
    with open(paths["samples"], "w", encoding="utf-8") as handle:
        for sample in report.samples:
            handle.write(json.dumps(dataclasses.asdict(sample), ensure_ascii=False) + "\n")
    plot_accuracy_vs_k(report, paths["plot"])
    return paths
