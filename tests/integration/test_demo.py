"""`make demo` and the mini study end to end at toy size: examples/scope/demo.py (task, tokenizer, teacher and
student SFT with Megatron, vLLM evaluation, SCOPE, summary, plot, metrics, TensorBoard) and compare.py on the
demo's workspace. The full-size numbers are in BENCHMARKS.md; this checks that the README's main command and
the study run and write what they promise."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "scope")
TOY = ["--prompts-per-step", "8", "--eval-samples", "2", "--max-new-tokens", "16"]


def _run_script(name: str, *argv: str) -> str:
    """`python examples/scope/<name> argv` as `make demo` runs it; its stdout."""
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *argv], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_demo_and_compare_run_and_write_their_outputs(tmp_path):
    out = str(tmp_path / "demo")
    summary = _run_script("demo.py", "--out", out, "--num-train", "200", "--num-eval", "4", "--teacher-sft-iters",
                          "10", "--student-sft-iters", "5", "--scope-iters", "2", *TOY)
    with open(os.path.join(out, "metrics.json")) as handle:
        metrics = json.load(handle)
    results = metrics["results"]
    assert sorted(results) == ["student_after", "student_before", "teacher"]
    for result in results.values():
        assert 0 <= result["avg"] <= 1 and sorted(map(int, result["pass"])) == [1, 2]
    assert "SCOPE demo summary (held-out problems, 2 samples each)" in summary and "student after" in summary
    assert [h["iteration"] for h in metrics["history"]] == [1, 2]
    # validation during SCOPE: before the first step and after the last, on the held-out problems, graded strictly
    assert [e["iteration"] for e in metrics["evaluations"]] == [0, 2]
    assert all(0 <= e["eval/heldout/avg@2"] <= e["eval/heldout/pass@2"] <= 1 for e in metrics["evaluations"])
    assert " validation at iteration 2 | heldout/avg@2: " in summary
    with open(os.path.join(out, "scope_demo.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tensorboard")))

    _run_script("compare.py", "--workdir", out, "--methods", "scope-released", "--seeds", "0", "--iters", "1", *TOY)
    with open(os.path.join(out, "compare-synthetic-strict", "results.md")) as handle:
        table = handle.read().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| student before (all methods start here)", "| teacher", "| scope-released"]
    assert table[2].split(" | ")[1] == f"{results['student_before']['avg']:.3f}"
    with open(os.path.join(out, "compare-synthetic-strict", "compare.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
