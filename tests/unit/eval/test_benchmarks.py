"""Benchmark loaders on fixture files written in each public schema, including malformed rows."""

import json
import os

import pytest

from megatron_scope.eval.benchmarks import (
    BENCHMARK_NAMES,
    BenchmarkFormatError,
    BenchmarkProblem,
    iter_benchmark,
    load_benchmark,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "eval")


def data(name: str) -> str:
    return os.path.join(DATA, name)


def test_aime24_huggingfaceh4_schema():
    problems = load_benchmark("aime24", data("aime24.jsonl"))
    assert [p.id for p in problems] == ["60", "61", "62"]
    assert problems[0] == BenchmarkProblem(
        "60", "Find the remainder when $7^{2024}$ is divided by $100$.", "001"
    )
    problem_id, problem, gold = problems[2]  # a plain (id, problem, gold_answer) tuple
    assert (problem_id, gold) == ("62", "101")


def test_aime24_maxwell_jia_schema_with_int_answers():
    problems = load_benchmark("aime24", data("aime24_maxwell.jsonl"))
    assert problems == [
        BenchmarkProblem("2024-I-1", "Compute $12 \\cdot 13$.", "156"),
        BenchmarkProblem("2024-I-2", "Compute $2^{9}$.", "512"),
    ]


def test_aime25_schemas():
    assert [tuple(p) for p in load_benchmark("aime25", data("aime25.jsonl"))][1] == (
        "1",
        "Compute $\\binom{10}{3}$.",
        "120",
    )
    problems = load_benchmark("aime25", data("aime25_opencompass.jsonl"))
    assert [(p.id, p.gold_answer) for p in problems] == [("aime25-0", "49"), ("aime25-1", "243")]


def test_amc23_float_answers_become_integers():
    problems = load_benchmark("amc23", data("amc23.jsonl"))
    assert [(p.id, p.gold_answer) for p in problems] == [("0", "5"), ("1", "24"), ("2", "1")]
    assert problems[1].problem == "A square has area $36$. What is its perimeter?"


def test_math500():
    problems = load_benchmark("math500", data("math500.jsonl"))
    assert [p.id for p in problems][:2] == ["test/prealgebra/1.json", "test/algebra/2.json"]
    assert [p.gold_answer for p in problems] == ["\\frac{3}{4}", "-2, 2", "[1,\\infty)", "5\\sqrt{2}"]


def test_minerva_ids_are_row_indices():
    problems = load_benchmark("minerva", data("minerva.jsonl"))
    assert [(p.id, p.gold_answer) for p in problems] == [("minerva-0", "75"), ("minerva-1", "0.25")]


def test_olympiadbench_final_answer_lists():
    problems = load_benchmark("olympiadbench", data("olympiadbench.jsonl"))
    assert [(p.id, p.gold_answer) for p in problems] == [("1606", "5"), ("1607", "-3, 3"), ("1608", "\\frac{3}{4}")]


def test_alternative_layouts_are_chosen_by_columns(tmp_path):
    path = write_jsonl(tmp_path / "ob.jsonl", [{"question": "Compute $1+1$.", "answer": "$2$", "unit": None}])
    assert load_benchmark("olympiadbench", path) == [BenchmarkProblem("olympiadbench-0", "Compute $1+1$.", "2")]
    path = write_jsonl(tmp_path / "mv.jsonl", [{"problem": "p", "answer": "3", "datasource": "minerva"}])
    assert load_benchmark("minerva", path) == [BenchmarkProblem("minerva-0", "p", "3")]
    path = write_jsonl(tmp_path / "amc.jsonl", [{"id": 4, "problem": "p", "answer": 2.5, "url": "u"}])
    assert load_benchmark("amc23", path) == [BenchmarkProblem("4", "p", "2.5")]


def test_every_benchmark_has_a_fixture():
    fixtures = {"aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"}
    assert fixtures == set(BENCHMARK_NAMES)
    for name in fixtures:
        assert len(load_benchmark(name, data(f"{name}.jsonl"))) >= 2


@pytest.mark.parametrize(
    "name, filename, message",
    [
        ("math500", "math500_bad_json.jsonl", r"math500_bad_json\.jsonl: line 3: invalid JSON"),
        ("amc23", "amc23_missing_answer.jsonl", r"amc23_missing_answer\.jsonl: line 2: missing column 'answer'"),
        (
            "olympiadbench",
            "olympiadbench_empty_final_answer.jsonl",
            r"olympiadbench_empty_final_answer\.jsonl: line 2: column 'final_answer' is an empty list",
        ),
        ("minerva", "aime24_maxwell.jsonl", r"aime24_maxwell\.jsonl: line 1: columns .* match no minerva schema"),
    ],
)
def test_malformed_fixture_files_name_file_and_line(name, filename, message):
    with pytest.raises(BenchmarkFormatError, match=message):
        load_benchmark(name, data(filename))


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q", "answer": "1"}, [1, 2]], "line 2: expected a JSON object, got list"),
        ([{"question": "q", "answer": ""}], "line 1: column 'answer' is empty"),
        ([{"question": "q", "answer": "$ $"}], "line 1: column 'answer' is empty"),
        ([{"question": "", "answer": "1"}], "line 1: column 'question' must be a non-empty str"),
        ([{"question": 3, "answer": "1"}], "line 1: column 'question' must be a non-empty str, got 3"),
        ([{"question": "q", "answer": True}], "line 1: column 'answer' must be a str or a number, got True"),
        ([{"question": "q", "answer": None}], "line 1: column 'answer' must be a str, a number or a list"),
        ([{"question": "q", "answer": float("nan")}], "line 1: column 'answer' is not finite"),
        ([{"question": "q", "answer": {"value": 1}}], "line 1: column 'answer' must be a str, a number or a list"),
    ],
)
def test_malformed_rows(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "minerva.jsonl", rows)
    with pytest.raises(BenchmarkFormatError, match=message):
        load_benchmark("minerva", path)


def test_duplicate_ids_and_bad_ids(tmp_path):
    row = {"problem": "p", "answer": "1", "id": "a"}
    path = write_jsonl(tmp_path / "aime25.jsonl", [row, {**row, "problem": "q"}])
    with pytest.raises(BenchmarkFormatError, match="line 2: id 'a' repeats the id of line 1"):
        load_benchmark("aime25", path)
    path = write_jsonl(tmp_path / "bad_id.jsonl", [{**row, "id": None}])
    with pytest.raises(BenchmarkFormatError, match="line 1: column 'id' must be a non-empty str or an int"):
        load_benchmark("aime25", path)


def test_errors_are_raised_lazily_after_good_rows_by_the_iterator(tmp_path):
    path = write_jsonl(tmp_path / "minerva.jsonl", [{"question": "q", "answer": "1"}, "{broken"])
    iterator = iter_benchmark("minerva", path)
    assert next(iterator) == BenchmarkProblem("minerva-0", "q", "1")
    with pytest.raises(BenchmarkFormatError, match="line 2: invalid JSON"):
        next(iterator)


def test_bad_file_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k", data("math500.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("math500", tmp_path / "missing.jsonl")
    csv = tmp_path / "math500.csv"
    csv.write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_benchmark("math500", csv)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(BenchmarkFormatError, match="no rows"):
        load_benchmark("math500", empty)


def test_parquet_in_the_public_schema(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet

    rows = [json.loads(line) for line in open(data("olympiadbench.jsonl"))]
    path = tmp_path / "olympiadbench.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert load_benchmark("olympiadbench", path) == load_benchmark("olympiadbench", data("olympiadbench.jsonl"))
    bad = [dict(rows[0]), dict(rows[1], final_answer=[])]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(BenchmarkFormatError, match=r"bad\.parquet: row 2: column 'final_answer' is an empty list"):
        load_benchmark("olympiadbench", tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_says_what_to_do(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "math500.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="needs pyarrow.*convert the file to JSONL"):
        load_benchmark("math500", path)
