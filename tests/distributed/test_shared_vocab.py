"""A student and a teacher whose HF checkpoints pad the shared tokenizer vocabulary differently (as
DeepSeek-R1-Distill-Qwen-1.5B's 151936 rows and Skywork-OR1-Math-7B's 152064 rows for 151665 tokens), built
as Megatron models with one common padded vocabulary, on 2 gloo ranks at TP=1 and TP=2:

- each model's logits over the tokenizer's entries equal the transformers model's (fp32, <= 1e-4);
- the vocab-parallel KL between them (the distillation loss's op, which needs equal shards) equals the KL of
  the transformers logits over the tokenizer's vocabulary;
- `iter_hf_weights` gives back each checkpoint's own tensors bitwise (its own row count, not the padding);
- `build_gpt_model` rejects a padded vocabulary below the model's rows or not divisible by TP.
"""

import json
import os

import pytest
import torch

from megatron_scope.megatron.arch import padded_vocab_size
from megatron_scope.ops import reference
from megatron_scope.testing.multiprocess import run_on_ranks
from tests.integration.hf_models import next_token_logits, random_qwen2, tiny_qwen2_config

TOKENIZER_VOCAB = 90
ROWS = {"student": 96, "teacher": 160}  # alone, Megatron pads them to 128 and 256 rows at TP=1
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per role: the saved HF directory and the transformers model's logits on fixed tokens."""
    tokens = torch.randint(0, TOKENIZER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    result = {}
    for seed, (role, rows) in enumerate(ROWS.items()):
        config = tiny_qwen2_config(vocab_size=rows, tie_word_embeddings=role == "student")
        model = random_qwen2(config, seed=seed)
        directory = tmp_path_factory.mktemp(role)
        model.save_pretrained(directory)
        logits = torch.stack([next_token_logits(model, row.tolist()) for row in tokens])
        result[role] = {"dir": str(directory), "logits": logits}
    return tokens, result


def _check(rank, world_size, dirs, tokens):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_scope.megatron.hf_mapping import arch_from_hf_config
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, iter_hf_weights, load_hf_weights
    from megatron_scope.ops.vocab_parallel import vocab_parallel_kl

    archs = {}
    for role, directory in dirs.items():
        with open(os.path.join(directory, "config.json")) as handle:
            archs[role] = arch_from_hf_config(json.load(handle))
    results = {}
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    for tp in (1, 2):
        initialize_model_parallel(tp, 1, seed=0)
        group = parallel_state.get_tensor_model_parallel_group()
        padded = padded_vocab_size(max(arch.vocab_size for arch in archs.values()), tp)
        shards = {}
        for role, directory in dirs.items():
            model = build_gpt_model(archs[role], padded_vocab=padded)
            checkpoint = SafetensorsCheckpoint(directory)
            load_hf_weights(model, archs[role], checkpoint)
            with torch.no_grad():
                shards[role] = model(tokens, positions, None)
            gathered = [torch.empty_like(shards[role]) for _ in range(tp)]
            dist.all_gather(gathered, shards[role].contiguous(), group=group)
            results[(tp, role, "width")] = shards[role].shape[-1] * tp
            results[(tp, role, "logits")] = torch.cat(gathered, dim=-1)[..., :TOKENIZER_VOCAB]
            exported = {name: tensor.clone() for name, tensor in iter_hf_weights(model, archs[role])}
            if rank == 0:
                results[(tp, role, "export")] = (
                    sorted(exported) == sorted(checkpoint)
                    and all(torch.equal(exported[name], checkpoint[name]) for name in checkpoint))
        results[(tp, "kl")] = vocab_parallel_kl(shards["student"], shards["teacher"], group=group,
                                                vocab_size=TOKENIZER_VOCAB)
        if tp == 2:
            for bad in (archs["teacher"].vocab_size - 2, archs["teacher"].vocab_size + 1):
                try:
                    build_gpt_model(archs["teacher"], padded_vocab=bad)
                except ValueError as error:
                    results[("error", bad)] = str(error)
    return results


@pytest.fixture(scope="module")
def rank_results(models):
    tokens, data = models
    return run_on_ranks(_check, 2, args=({role: d["dir"] for role, d in data.items()}, tokens), timeout=600)


@pytest.mark.parametrize("tp", [1, 2])
def test_both_models_share_one_padded_vocabulary(rank_results, tp):
    assert padded_vocab_size(ROWS["student"], 1) != padded_vocab_size(ROWS["teacher"], 1)  # alone they differ
    for results in rank_results:
        assert results[(tp, "student", "width")] == results[(tp, "teacher", "width")] == 256


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("role", sorted(ROWS))
def test_logits_over_the_tokenizer_vocabulary_equal_transformers(models, rank_results, tp, role):
    _, data = models
    expected = data[role]["logits"][..., :TOKENIZER_VOCAB]
    for results in rank_results:
        difference = float((results[(tp, role, "logits")] - expected).abs().max())
        assert difference <= TOLERANCE, f"{role} at TP={tp}: logits differ by {difference:.2e}"


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_kl_between_the_models_matches_transformers(models, rank_results, tp):
    _, data = models
    expected = reference.kl(data["student"]["logits"][..., :TOKENIZER_VOCAB],
                            data["teacher"]["logits"][..., :TOKENIZER_VOCAB])
    for results in rank_results:
        kl = results[(tp, "kl")].double()
        assert kl.shape == expected.shape and float(kl.min()) > 0
        assert float((kl - expected).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("role", sorted(ROWS))
def test_export_gives_back_each_checkpoints_own_tensors(rank_results, tp, role):
    assert rank_results[0][(tp, role, "export")] is True


def test_build_rejects_a_bad_padded_vocabulary(rank_results):
    below, odd = ROWS["teacher"] - 2, ROWS["teacher"] + 1
    assert f"padded_vocab {below} must be >= the model's 160 embedding rows" in rank_results[0][("error", below)]
    assert "divisible by the tensor-parallel size 2" in rank_results[0][("error", odd)]
