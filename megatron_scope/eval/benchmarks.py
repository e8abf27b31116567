"""Loaders for the paper's math benchmarks from local JSONL or parquet files in their public schemas.

SCOPE (arXiv 2604.10688) evaluates on AIME24, AIME25, AMC23, MATH500, Minerva and OlympiadBench. The user
supplies the files (nothing is fetched at run time); each loader yields `BenchmarkProblem(id, problem,
gold_answer)` tuples. A benchmark accepts the column layouts of its common public Hugging Face copies
(listed per benchmark in `BENCHMARK_SCHEMAS`); the first layout whose columns are all present in the
first row is used for the whole file, and every later row must have them too.

File formats: ``.jsonl`` (one JSON object per line; blank lines are skipped) and ``.parquet`` (needs
pyarrow, which is optional). A malformed row raises `BenchmarkFormatError` naming the file and the
1-based line (JSONL) or row (parquet) and the offending column.

Gold answers: strings are stripped; an integral float such as AMC's ``27.0`` becomes ``"27"``; a list
(OlympiadBench's ``final_answer``) of one string becomes that string, of several becomes their
comma-joined set; one pair of enclosing ``$`` is removed from each.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, NamedTuple, Sequence

from megatron_scope.data.datasets import read_jsonl_rows
from megatron_scope.rewards.math_verifier import normalize_gold_answer


class BenchmarkProblem(NamedTuple):
    """One problem: a stable id, the problem statement and the reference final answer."""

    id: str
    problem: str
    gold_answer: str


class BenchmarkFormatError(ValueError):
    """A benchmark file (or one of its rows) does not match the benchmark's public schema."""


@dataclasses.dataclass(frozen=True)
class ColumnLayout:
    """Where one public copy of a benchmark keeps the id, problem and answer."""

    source: str
    """The public dataset this layout follows (a Hugging Face dataset id)."""
    problem_column: str
    answer_column: str
    id_column: str | None
    """None when the dataset has no id column: ids become "<benchmark>-<row index from 0>"."""

    def required_columns(self) -> tuple[str, ...]:
        return tuple(c for c in (self.id_column, self.problem_column, self.answer_column) if c is not None)


BENCHMARK_SCHEMAS: dict[str, tuple[ColumnLayout, ...]] = {
    # HuggingFaceH4/aime_2024: id (int64), problem, solution, answer (string), url, year.
    # Maxwell-Jia/AIME_2024: ID, Problem, Solution, Answer (int).
    "aime24": (
        ColumnLayout("HuggingFaceH4/aime_2024", "problem", "answer", "id"),
        ColumnLayout("Maxwell-Jia/AIME_2024", "Problem", "Answer", "ID"),
    ),
    # math-ai/aime25: id, problem, answer. yentinglin/aime_2025 has the aime_2024 columns (a superset).
    # opencompass/AIME2025: question, answer (no id).
    "aime25": (
        ColumnLayout("math-ai/aime25", "problem", "answer", "id"),
        ColumnLayout("opencompass/AIME2025", "question", "answer", None),
    ),
    # math-ai/amc23: question, answer (float64), with or without id; AI-MO/aimo-validation-amc: id, problem,
    # answer (float64), url.
    "amc23": (
        ColumnLayout("math-ai/amc23", "question", "answer", "id"),
        ColumnLayout("AI-MO/aimo-validation-amc", "problem", "answer", "id"),
        ColumnLayout("math-ai/amc23 (no id)", "question", "answer", None),
    ),
    # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id.
    "math500": (ColumnLayout("HuggingFaceH4/MATH-500", "problem", "answer", "unique_id"),),
    # math-ai/minervamath (test.jsonl): question, answer (no id). Copies such as guanning/minervamath use
    # problem, answer.
    "minerva": (
        ColumnLayout("math-ai/minervamath", "question", "answer", None),
        ColumnLayout("guanning/minervamath", "problem", "answer", None),
    ),
    # Hothan/OlympiadBench (OE_TO_maths_en_COMP): id (int64), question, solution (list of str),
    # final_answer (list of str), context, image_1..5, modality, difficulty, is_multiple_answer, unit,
    # answer_type, error, question_type, subfield, subject, language. math-ai/olympiadbench (test.jsonl):
    # question, answer (with "$"), with or without id.
    "olympiadbench": (
        ColumnLayout("Hothan/OlympiadBench", "question", "final_answer", "id"),
        ColumnLayout("math-ai/olympiadbench", "question", "answer", "id"),
        ColumnLayout("math-ai/olympiadbench (no id)", "question", "answer", None),
    ),
}
"""Accepted column layouts per benchmark, in order of preference."""

BENCHMARK_NAMES = tuple(BENCHMARK_SCHEMAS)


def load_benchmark(name: str, path: str | os.PathLike) -> list[BenchmarkProblem]:
    """All problems of benchmark `name` (one of BENCHMARK_NAMES) from the JSONL or parquet file `path`."""
    return list(iter_benchmark(name, path))


def load_eval_sets(sets: Sequence[tuple[str, str]], data) -> dict[str, list[BenchmarkProblem]]:
    """The problems of each --eval-data NAME=PATH: a benchmark of BENCHMARK_NAMES in its known layouts, any other
    NAME read as training reads --train-data (JSONL, parquet or a `datasets` directory; the key flags of `data`, a
    `config.DataConfig`, name the id, prompt and gold columns)."""
    from megatron_scope.data.datasets import PromptDataset

    keys = {**data.dataset_keys(), "data_source": None}
    problems = {}
    for name, path in sets:
        if name in BENCHMARK_SCHEMAS:
            problems[name] = load_benchmark(name, path)
        else:
            rows = PromptDataset.from_file(path, keys=keys).prompts
            problems[name] = [BenchmarkProblem(row.id, row.prompt, row.answer) for row in rows]
    return problems


def iter_benchmark(name: str, path: str | os.PathLike) -> Iterator[BenchmarkProblem]:
    """Yield the problems of `path` in file order (see the module docstring for the rules)."""
    if name not in BENCHMARK_SCHEMAS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path!r} for {name!r} does not exist")
    layouts = BENCHMARK_SCHEMAS[name]
    layout = None
    seen_ids: dict[str, str] = {}
    for row_index, (location, row) in enumerate(_read_rows(path)):
        if layout is None:
            layout = _choose_layout(name, layouts, row, path, location)
        problem = _row_to_problem(name, layout, row, row_index, path, location)
        if problem.id in seen_ids:
            raise BenchmarkFormatError(
                f"{path}: {location}: id {problem.id!r} repeats the id of {seen_ids[problem.id]}"
            )
        seen_ids[problem.id] = location
        yield problem
    if layout is None:
        raise BenchmarkFormatError(f"{path}: no rows")


def _read_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(location, row dict) per row; location is "line N" (JSONL) or "row N" (parquet), 1-based."""
    if path.endswith(".jsonl"):
        for line_number, row in read_jsonl_rows(path, error=BenchmarkFormatError):
            yield f"line {line_number}", row
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow, which is not installed: `pip install pyarrow`, or convert the "
                "file to JSONL"
            ) from None
        table = pyarrow.parquet.read_table(path)
        for row_number, row in enumerate(table.to_pylist(), start=1):
            yield f"row {row_number}", row
    else:
        raise ValueError(f"{path}: unsupported file type; expected .jsonl or .parquet")


def _choose_layout(name, layouts, row, path, location) -> ColumnLayout:
    for layout in layouts:
        if all(column in row for column in layout.required_columns()):
            return layout
    expected = " or ".join(f"{list(layout.required_columns())} ({layout.source})" for layout in layouts)
    raise BenchmarkFormatError(
        f"{path}: {location}: columns {sorted(row)} match no {name} schema; expected {expected}"
    )


def _row_to_problem(name, layout, row, row_index, path, location) -> BenchmarkProblem:
    def fail(message):
        raise BenchmarkFormatError(f"{path}: {location}: {message}")

    for column in layout.required_columns():
        if column not in row:
            fail(f"missing column {column!r} (schema of {layout.source})")
    if layout.id_column is None:
        problem_id = f"{name}-{row_index}"
    else:
        raw_id = row[layout.id_column]
        id_is_valid = isinstance(raw_id, int) and not isinstance(raw_id, bool)
        id_is_valid = id_is_valid or (isinstance(raw_id, str) and bool(raw_id.strip()))
        if not id_is_valid:
            fail(f"column {layout.id_column!r} must be a non-empty str or an int, got {raw_id!r}")
        problem_id = str(raw_id).strip()
    problem = row[layout.problem_column]
    if not isinstance(problem, str) or not problem.strip():
        fail(f"column {layout.problem_column!r} must be a non-empty str, got {problem!r}")
    gold_answer = _normalize_answer(row[layout.answer_column], layout.answer_column, fail)
    return BenchmarkProblem(problem_id, problem, gold_answer)


def _normalize_answer(value, column, fail) -> str:
    if isinstance(value, list):
        if not value:
            fail(f"column {column!r} is an empty list")
        parts = [_normalize_scalar_answer(item, column, fail) for item in value]
        return parts[0] if len(parts) == 1 else ", ".join(parts)
    return _normalize_scalar_answer(value, column, fail)


def _normalize_scalar_answer(value, column, fail) -> str:
    if isinstance(value, bool):
        fail(f"column {column!r} must be a str or a number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            fail(f"column {column!r} is not finite: {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        answer = normalize_gold_answer(value)
        if not answer:
            fail(f"column {column!r} is empty: {value!r}")
        return answer
    fail(f"column {column!r} must be a str, a number or a list of those, got {type(value).__name__}: {value!r}")
