"""tools/eval.py end to end with a real transformers tokenizer directory and a scripted engine.

The vLLM engine constructor is replaced by `ScriptedEngine` (plumbing only, see scripted_engine.py):
this checks argument handling, tokenizer loading, the chat template path, and the written report.
test_eval_cli_vllm.py runs the same tool with the real engine.
"""

import json
import os

import pytest

from tests.unit.eval.scripted_engine import ScriptedEngine

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "eval")

SCRIPT = {
    "Compute $12 \\cdot 13$.": ["\\boxed{156}", "\\boxed{155}"],
    "Compute $2^{9}$.": ["\\boxed{512}", "\\boxed{512.0}"],
}


def run_tool(eval_tool, monkeypatch, model_dir, output_dir, *extra):
    engines = []

    def build_scripted_engine(model, args):
        assert model == model_dir
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        engines.append(ScriptedEngine(tokenizer, SCRIPT, eos_token_id=tokenizer.eos_token_id))
        return engines[-1]

    monkeypatch.setattr(eval_tool, "build_engine", build_scripted_engine)
    argv = [
        "--model", model_dir,
        "--eval-data", f"aime24={os.path.join(DATA, 'aime24_maxwell.jsonl')}",
        "--eval-samples-per-prompt", "2", "--output-dir", str(output_dir),
        "--prompt-template", "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.",
        "--no-progress", "--kv-cache-gib", "0.1", *extra,
    ]  # fmt: skip
    paths = eval_tool.main(argv)
    return engines[0], paths


def test_cli_writes_the_report(eval_tool, monkeypatch, model_dir, tmp_path, capsys):
    engine, paths = run_tool(eval_tool, monkeypatch, model_dir, tmp_path, "--eval-temperature", "0.6",
                             "--eval-top-p", "0.95")
    with open(paths["json"]) as handle:
        results = json.load(handle)
    assert results["benchmarks"]["aime24"]["avg@2"] == pytest.approx(0.75)
    assert results["benchmarks"]["aime24"]["pass@2"] == pytest.approx(1.0)
    assert results["sampling"] == {"max_new_tokens": 256, "temperature": 0.6, "top_p": 0.95, "seed": 1234}
    assert results["ks"] == [1, 2]  # the powers of two below n, and n
    assert os.path.getsize(paths["plot"]) > 0
    assert engine.closed
    prompts, params, _ = engine.calls[0]
    assert prompts[0].startswith("Compute $12 \\cdot 13$.\nPlease reason step by step")
    assert params.stop_token_ids == (256,) and params.vocab_size == 257  # the tokenizer's EOS and vocabulary
    assert "| aime24 | 2 | 75.00 | 75.00 | 100.00 |" in capsys.readouterr().out


def test_cli_chat_template(eval_tool, monkeypatch, model_dir, tmp_path):
    extra = ["--apply-chat-template", "--prompt-template", "Q: {prompt}"]
    engine, _ = run_tool(eval_tool, monkeypatch, model_dir, tmp_path, *extra)
    prompts, _, _ = engine.calls[0]
    assert prompts[0] == "<|user|>Q: Compute $12 \\cdot 13$.<|assistant|>"


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--eval-data", "gsm8k=missing.jsonl"], FileNotFoundError, "missing.jsonl"),
        (["--eval-data", "aime24"], ValueError, "expected NAME=VALUE"),
        (["--k", "4"], ValueError, "k=4 must be an int in \\[1, num_samples=2\\]"),
        (["--prompt-template", "no placeholder"], ValueError, "exactly once"),
        (["--prompt-template", "Q: {problem}"], ValueError, "exactly once"),
        (["--reward-by-source", "aime24=nope"], ValueError, "VERIFIER one of"),
    ],
)
def test_cli_rejects_bad_arguments_before_building_the_engine(
    eval_tool, monkeypatch, model_dir, tmp_path, extra, error, message
):
    def must_not_build(model, args):
        raise AssertionError("the engine must not be built for bad arguments")

    monkeypatch.setattr(eval_tool, "build_engine", must_not_build)
    argv = ["--model", model_dir, "--eval-data", f"aime24={os.path.join(DATA, 'aime24.jsonl')}",
            "--eval-samples-per-prompt", "2"]
    argv += ["--k", "1", "--output-dir", str(tmp_path), "--kv-cache-gib", "0.1", *extra]
    with pytest.raises(error, match=message):
        eval_tool.main(argv)
