"""The expert-merging miniature (examples/scope/merge_experts.py): its task routes every training row to one of the
two domains' experts, its merges are the runs their names say, and its table averages the seeds."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "scope"))
import merge_experts  # noqa: E402

from megatron_scope.arguments import parse_run_config  # noqa: E402


def test_the_task_tags_each_row_with_its_domain(tmp_path):
    from megatron_scope.data.synthetic import extract_answer
    from megatron_scope.train import check_teacher_routes, load_prompts

    files = merge_experts.write_task(str(tmp_path), num_train=40, num_eval=8, seed=0)
    rows = [json.loads(line) for line in open(tmp_path / "task" / "train.jsonl")]
    assert len(rows) == 80 and len({row["id"] for row in rows}) == 80  # ids prefixed by the domain: no clash
    by_domain = {d: [row for row in rows if row["domain"] == d] for d in merge_experts.DOMAINS}
    assert {d: len(r) for d, r in by_domain.items()} == {"addsub": 40, "mul": 40}
    assert all("*" not in row["prompt"] for row in by_domain["addsub"])
    assert all(set(row["prompt"][3:-1]) <= set("0123456789*") for row in by_domain["mul"])
    assert [row["domain"] for row in rows] != sorted(row["domain"] for row in rows)  # shuffled together
    assert all(extract_answer(row["solution"]) == row["answer"] for row in rows)
    for domain in merge_experts.DOMAINS:  # each domain's held-out problems apart
        assert os.path.exists(files[domain].eval_jsonl)
    # the merge's flags route every row to its domain's expert, and the strict verifier's gold is each row's solution
    config = parse_run_config(merge_experts.merge_flags(merge_experts.parse_args(["--out", str(tmp_path)]), "scope", 0))
    dataset = load_prompts(config.data)
    check_teacher_routes(dataset, config)
    assert {p.teacher for p in dataset.prompts} == set(merge_experts.DOMAINS)
    assert {p.id: p.teacher for p in dataset.prompts} == {row["id"]: row["domain"] for row in rows}


@pytest.mark.parametrize("method", sorted(merge_experts.MERGE_METHODS))
def test_each_merge_distills_the_routed_experts_into_the_student(method):
    args = merge_experts.parse_args(["--out", "w"])
    config = parse_run_config(merge_experts.merge_flags(args, method, seed=1))
    assert config.loss.algorithm == method.split("-")[0] and config.models.student_hf == "w/student_hf"
    assert config.models.teacher_dirs == {"addsub": "w/expert_addsub_hf", "mul": "w/expert_mul_hf"}
    assert config.data.teacher_route_key == "domain" and config.colocated_teacher
    if method.startswith("exopd"):  # G-OPD's λ = 1.25 (or 1: no extrapolation) against the initial student
        assert config.loss.baselines.exopd_lambda == (1.25 if method == "exopd" else 1.0)
        assert config.models.reference_hf is None


def test_the_table_averages_the_seeds():
    def result(addsub, mul):
        return {"addsub": {"avg": addsub, "pass": {8: addsub}}, "mul": {"avg": mul, "pass": {8: mul}}}

    table = merge_experts.summarize({"student": result(0.2, 0.6)}, {"opd": [([], result(0.3, 0.7)),
                                                                            ([], result(0.5, 0.7))]}, 8)
    lines = table.splitlines()
    assert lines[0] == "| model | Avg@8 addsub | Pass@8 addsub | Avg@8 mul | Pass@8 mul | Avg@8 both | seeds |"
    assert lines[2] == "| student | 0.200 | 0.200 | 0.600 | 0.600 | 0.400 | - |"
    assert lines[3] == ("| merged by opd | 0.400 ± 0.100 | 0.400 ± 0.100 | 0.700 ± 0.000 | 0.700 ± 0.000 | "
                        "0.550 ± 0.050 | 2 |")


def test_a_later_call_adds_its_methods_to_the_table_of_the_same_settings(tmp_path):
    def result(value):
        return {"addsub": {"avg": value, "pass": {"8": value}}, "mul": {"avg": value, "pass": {"8": value}}}

    args = merge_experts.parse_args(["--out", str(tmp_path), "--methods", "exopd-1", "opd"])
    earlier = {"args": vars(merge_experts.parse_args(["--out", str(tmp_path)])), "references": {},
               "runs": {"opd": [[[], result(0.1)]], "scope": [[[], result(0.3)]]}}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    kept = merge_experts.earlier_runs(args)
    assert list(kept) == ["scope"] and kept["scope"][0][1]["mul"]["pass"] == {8: 0.3}  # opd is run again
    other = merge_experts.parse_args(["--out", str(tmp_path), "--methods", "exopd-1", "--merge-iters", "7"])
    assert merge_experts.earlier_runs(other) == {}  # other settings: not the same study
