"""A training checkpoint (checkpointing.save_checkpoint with the model's arch, Megatron-LM layout) converts to
a Hugging Face model: a TP=2 student padded beyond its own rows (as when a teacher has more) is saved after
its weights moved away from the HF source; tools/convert_megatron_to_hf.py on the checkpoint root and the
Hugging Face model the checkpoint holds (saved with `save_hf`, --save-hf: what tools/eval.py takes for the iteration
directory) are the same tensors, and give a transformers model whose logits equal the Megatron model's, with the
source's config, tokenizer and own embedding row count. A checkpoint saved without the arch, or a wrong arch, fails
with an error naming it."""

import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from tests.integration.hf_models import random_qwen2, tiny_qwen2_config
from tests.unit.data.test_hf_tokenizer import save_word_tokenizer

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS, PADDED_VOCAB = 96, 512
TOLERANCE = 1e-4


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_and_save(rank, world_size, hf_dir, root, tokens):
    """TP=2: load the HF student, move its weights, save iteration 1 without the arch, stage the HF files,
    try a wrong arch, save iteration 2 with the arch; returns the Megatron logits over the HF rows."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_scope.megatron import checkpointing
    from megatron_scope.megatron.hf_mapping import arch_from_hf_config
    from megatron_scope.megatron.model import build_gpt_model, unwrap_model, wrap_with_ddp
    from megatron_scope.config import OptimizerConfig
    from megatron_scope.megatron.optimizer import build_optimizer
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, load_hf_weights

    initialize_model_parallel(2, 1, seed=0)
    with open(os.path.join(hf_dir, "config.json")) as handle:
        arch = arch_from_hf_config(json.load(handle))
    gpt = build_gpt_model(arch, padded_vocab=PADDED_VOCAB, calculate_per_token_loss=True)
    load_hf_weights(gpt, arch, SafetensorsCheckpoint(hf_dir))
    model = wrap_with_ddp(gpt)
    optimizer, _ = build_optimizer(model, OptimizerConfig(lr=1e-3), 2)
    generator = torch.Generator().manual_seed(5)  # same draws on both ranks: replicated norms stay equal
    with torch.no_grad():
        for param in gpt.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))

    checkpointing.save_checkpoint(root, 1, model, optimizer, {"step": 1})
    if rank == 0:
        checkpointing.stage_hf_files(root, hf_dir)
    wrong_arch_error = None
    try:
        checkpointing.save_checkpoint(root, 2, model, optimizer, {"step": 2},
                                      arch=dataclasses.replace(arch, ffn_hidden_size=2 * arch.ffn_hidden_size))
    except ValueError as error:
        wrong_arch_error = (str(error), os.path.exists(checkpointing.checkpoint_dir(root, 2) + ".tmp"))
    checkpointing.save_checkpoint(root, 2, model, optimizer, {"step": 2}, arch=arch, save_hf=True)

    with torch.no_grad():
        shard = unwrap_model(model)(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).contiguous()
    shards = [torch.empty_like(shard) for _ in range(2)]
    dist.all_gather(shards, shard, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :ROWS], wrong_arch_error


def _convert_root(rank, world_size, root, output_dir, iteration_without_arch):
    to_hf = _tool("convert_megatron_to_hf")
    to_hf.main(["--megatron-dir", root, "--output-dir", output_dir])
    try:
        to_hf.convert(iteration_without_arch, output_dir + "_never")
    except ValueError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from megatron_scope.megatron.checkpointing import checkpoint_dir

    work = tmp_path_factory.mktemp("training_ckpt")
    hf_dir = work / "student_hf"
    random_qwen2(tiny_qwen2_config(vocab_size=ROWS), seed=1).save_pretrained(hf_dir)
    save_word_tokenizer(hf_dir)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tokens = torch.randint(0, ROWS, (2, 12), generator=torch.Generator().manual_seed(0))
    root = str(work / "ckpt")
    (logits, wrong_arch), _ = run_on_ranks(_train_and_save, 2, args=(str(hf_dir), root, tokens), timeout=600)
    from_root = str(work / "hf_from_root")
    (no_metadata_error,) = run_on_ranks(_convert_root, 1, args=(root, from_root, checkpoint_dir(root, 1)), timeout=600)
    from_iteration = _tool("eval").megatron_to_hf(checkpoint_dir(root, 2), str(work / "eval_out"))
    assert from_iteration == os.path.join(checkpoint_dir(root, 2), "hf_model")  # saved with the checkpoint
    return {"hf_dir": str(hf_dir), "root": root, "tokens": tokens, "logits": logits, "wrong_arch": wrong_arch,
            "no_metadata": no_metadata_error, "outputs": {"root": from_root, "iteration": from_iteration}}


def test_the_iteration_directory_describes_its_model(exported):
    from megatron_scope.megatron.checkpointing import checkpoint_dir

    iteration = checkpoint_dir(exported["root"], 2)
    with open(os.path.join(iteration, "megatron_scope_checkpoint.json")) as handle:
        metadata = json.load(handle)
    assert metadata["arch"]["vocab_size"] == ROWS and metadata["padded_vocab_size"] == PADDED_VOCAB
    assert (metadata["hf_model_type"], metadata["params_dtype"], metadata["hf_dtype"]) == ("qwen2",) + ("float32",) * 2
    assert metadata["dist_checkpoint"] == "."
    assert sorted(os.listdir(os.path.join(iteration, "hf_files"))) == sorted(os.listdir(
        os.path.join(exported["root"], "hf_files")))


@pytest.mark.parametrize("source", ["root", "iteration"])
def test_converted_model_gives_the_megatron_logits(exported, source):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported["outputs"][source], dtype=torch.float32).eval()
    assert model.get_input_embeddings().weight.shape[0] == ROWS  # the checkpoint's own rows, not the padding
    with torch.no_grad():
        logits = model(exported["tokens"]).logits
    difference = float((logits - exported["logits"]).abs().max())
    assert difference <= TOLERANCE, f"logits differ by {difference:.2e}"
    source_model = AutoModelForCausalLM.from_pretrained(exported["hf_dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((source_model(exported["tokens"]).logits - logits).abs().max()) > 1e-2  # it did move


@pytest.mark.parametrize("source", ["root", "iteration"])
def test_converted_model_carries_the_source_config_and_tokenizer(exported, source):
    from megatron_scope.data.tokenizer import check_same_tokenizer, load_tokenizer

    output = exported["outputs"][source]
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(exported["hf_dir"], name)) as a, open(os.path.join(output, name)) as b:
            assert json.load(a) == json.load(b), name
    check_same_tokenizer(load_tokenizer(output), load_tokenizer(exported["hf_dir"]))


def test_the_saved_hf_model_is_the_converted_one(exported):
    from safetensors.torch import load_file

    saved, converted = (load_file(os.path.join(exported["outputs"][source], "model.safetensors"))
                        for source in ("iteration", "root"))
    assert saved.keys() == converted.keys()
    assert all(torch.equal(saved[name], converted[name]) for name in saved)
    assert sorted(os.listdir(exported["outputs"]["iteration"])) == sorted(os.listdir(exported["outputs"]["root"]))


def test_checkpoints_without_or_with_a_wrong_arch_fail_by_name(exported):
    message, partial_written = exported["wrong_arch"]
    assert "model shard has shape" in message and not partial_written
    assert "iter_0000001 has no megatron_scope_checkpoint.json" in exported["no_metadata"]
    assert "save_checkpoint(..., arch=...)" in exported["no_metadata"]
