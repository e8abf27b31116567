"""HF <-> Megatron names and layouts (one process): configs, fused QKV / SwiGLU / vocab layouts, TP split and
merge, HF checkpoint validation and the streaming safetensors writer/reader. The end-to-end checks against
real Megatron models (logits, multi-rank export) are in tests/distributed/test_hf_weights.py."""

import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from megatron_scope.megatron import hf_mapping
from megatron_scope.megatron.weight_export import (
    SafetensorsCheckpoint, iter_hf_weights, save_safetensors_checkpoint, validate_hf_tensors)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Tiny HF configs covering each family's quirks (head_dim 64 everywhere, as vLLM on CPU needs):
# qwen2: QKV bias, tied embeddings; qwen3: q/k norm, head_dim != hidden/heads; llama: untied, one KV head
# (TP=2 > query groups) and a vocabulary whose Megatron padding differs between TP=1 (384) and TP=2 (512).
TINY_HF_CONFIGS = {
    "qwen2": dict(model_type="qwen2", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, num_hidden_layers=4, vocab_size=500, max_position_embeddings=128,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=256, num_hidden_layers=4, vocab_size=500,
                  max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama": dict(model_type="llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=384, num_hidden_layers=4, vocab_size=300, max_position_embeddings=128,
                  rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def tiny_hf_model(family: str, seed: int = 0):
    """A transformers model of TINY_HF_CONFIGS[family] with random weights (norms and biases too), fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**TINY_HF_CONFIGS[family], attn_implementation="eager")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.05 + (1.0 if "norm" in name else 0.0))
    return model


def random_hf_tensors(arch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in hf_mapping.hf_param_shapes(arch).items()}


ARCHS = {family: hf_mapping.arch_from_hf_config(config) for family, config in TINY_HF_CONFIGS.items()}


def test_arch_from_hf_config_reads_every_field():
    qwen2, qwen3, llama = ARCHS["qwen2"], ARCHS["qwen3"], ARCHS["llama"]
    assert (qwen2.add_qkv_bias, qwen2.qk_layernorm, qwen2.tie_word_embeddings) == (True, False, True)
    assert (qwen3.add_qkv_bias, qwen3.qk_layernorm, qwen3.head_dim, qwen3.kv_channels) == (False, True, 64, 64)
    assert (llama.add_qkv_bias, llama.qk_layernorm, llama.num_query_groups) == (False, False, 1)
    assert (qwen2.rotary_base, qwen3.norm_epsilon, llama.rotary_base) == (1e6, 1e-5, 5e5)
    assert (qwen2.head_dim, qwen2.kv_channels, qwen2.ffn_hidden_size, llama.vocab_size) == (None, 64, 512, 300)


@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_hf_config_from_arch_inverts_arch_from_hf_config(family):
    config = hf_mapping.hf_config_from_arch(ARCHS[family], family)
    assert config["model_type"] == family
    assert config["architectures"] == [hf_mapping.SUPPORTED_MODEL_TYPES[family]]
    assert hf_mapping.arch_from_hf_config(config) == ARCHS[family]


@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_model_type_of_names_the_family_of_the_arch(family):
    assert hf_mapping.model_type_of(ARCHS[family]) == family


@pytest.mark.parametrize("change,message", [
    (dict(model_type="mistral"), "mistral"),
    (dict(hidden_act="gelu"), "gelu"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64}), "llama3"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_arch_from_hf_config_rejects_what_megatron_computes_differently(change, message):
    with pytest.raises(ValueError, match=message):
        hf_mapping.arch_from_hf_config({**TINY_HF_CONFIGS["llama"], **change})


def test_arch_from_hf_config_rejects_sliding_window():
    with pytest.raises(ValueError, match="sliding"):
        hf_mapping.arch_from_hf_config({**TINY_HF_CONFIGS["qwen2"], "use_sliding_window": True, "sliding_window": 64})


def test_hf_config_from_arch_rejects_a_family_that_cannot_express_the_arch():
    with pytest.raises(ValueError, match="llama needs add_qkv_bias=False"):
        hf_mapping.hf_config_from_arch(ARCHS["qwen2"], "llama")


@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_hf_param_shapes_are_the_transformers_models_parameters(family):
    model = tiny_hf_model(family)
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied lm_head is listed once
    assert actual == hf_mapping.hf_param_shapes(ARCHS[family])


def test_param_mapping_names_and_rejections():
    arch = ARCHS["qwen3"]
    mapping = hf_mapping.param_mapping("decoder.layers.3.self_attention.q_layernorm.weight", arch)
    assert mapping.hf_names == ("model.layers.3.self_attn.q_norm.weight",) and mapping.tp_dim is None
    assert hf_mapping.param_mapping("output_layer.weight", arch).hf_names == ("lm_head.weight",)
    tied = hf_mapping.param_mapping("output_layer.weight", ARCHS["qwen2"])
    assert tied.hf_names == ("model.embed_tokens.weight",) and not tied.exported
    for bad in ("decoder.layers.4.mlp.linear_fc1.weight",  # only 4 layers
                "decoder.layers.0.self_attention.linear_qkv.bias",  # qwen3 has no QKV bias
                "decoder.layers.0.mlp.router.weight"):
        with pytest.raises(ValueError, match="no Hugging Face counterpart"):
            hf_mapping.param_mapping(bad, arch)
    with pytest.raises(ValueError, match="q_layernorm"):
        hf_mapping.param_mapping("decoder.layers.0.self_attention.q_layernorm.weight", ARCHS["qwen2"])


@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_fused_layouts_round_trip_bitwise_through_every_tp_split(family):
    arch = ARCHS[family]
    hf = random_hf_tensors(arch)
    padded_vocab = 512
    seen = set()
    for name in hf_mapping.megatron_param_names(arch):
        mapping = hf_mapping.param_mapping(name, arch)
        full = hf_mapping.from_hf(mapping, hf.__getitem__, arch, padded_vocab)
        assert tuple(full.shape) == hf_mapping.megatron_full_shape(mapping, arch, padded_vocab)
        for hf_name, tensor in hf_mapping.to_hf(mapping, full, arch):
            assert torch.equal(tensor, hf[hf_name]), (name, hf_name)
            seen.add(hf_name)
        for tp in (1, 2, 4):
            shards = [hf_mapping.tp_shard(mapping, full, r, tp) for r in range(tp)]
            assert all(tuple(s.shape) == hf_mapping.tp_shard_shape(tuple(full.shape), mapping, tp) for s in shards)
            assert torch.equal(hf_mapping.merge_tp_shards(mapping, shards), full), (name, tp)
    assert seen == set(hf)


def test_qkv_is_interleaved_per_query_group_weight_and_bias():
    """Megatron's linear_qkv rows: for each query group g, [q heads of g, k_g, v_g] (attention.py)."""
    arch = ARCHS["qwen2"]  # 4 query heads, 2 groups, head_dim 64
    hf = random_hf_tensors(arch)
    for suffix in ("weight", "bias"):
        mapping = hf_mapping.param_mapping(f"decoder.layers.0.self_attention.linear_qkv.{suffix}", arch)
        full = hf_mapping.from_hf(mapping, hf.__getitem__, arch, 512)
        q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.{suffix}"] for p in "qkv")
        hd = 64
        expected = torch.cat([q[0:2 * hd], k[0:hd], v[0:hd], q[2 * hd:4 * hd], k[hd:2 * hd], v[hd:2 * hd]])
        assert torch.equal(full, expected)
        # TP=2 with 2 groups: rank r holds exactly group r
        assert torch.equal(hf_mapping.tp_shard(mapping, full, 1, 2), expected[4 * hd:])


def test_swiglu_fc1_tp_shard_is_gate_shard_then_up_shard():
    arch = ARCHS["qwen3"]
    hf = random_hf_tensors(arch)
    mapping = hf_mapping.param_mapping("decoder.layers.1.mlp.linear_fc1.weight", arch)
    full = hf_mapping.from_hf(mapping, hf.__getitem__, arch, 512)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(full, torch.cat([gate, up]))
    assert torch.equal(hf_mapping.tp_shard(mapping, full, 1, 2), torch.cat([gate[128:], up[128:]]))


def test_vocab_padding_rows_are_zero_on_import_and_dropped_on_export():
    arch = ARCHS["llama"]
    hf = random_hf_tensors(arch)
    mapping = hf_mapping.param_mapping("output_layer.weight", arch)
    full = hf_mapping.from_hf(mapping, hf.__getitem__, arch, 384)
    assert full.shape == (384, 128) and torch.equal(full[300:], torch.zeros(84, 128))
    full[300:] = 7.0  # whatever training does to padding rows never reaches HF
    ((name, exported),) = hf_mapping.to_hf(mapping, full, arch)
    assert name == "lm_head.weight" and torch.equal(exported, hf["lm_head.weight"])
    with pytest.raises(ValueError, match="does not divide by TP=5"):
        hf_mapping.tp_shard(mapping, full, 0, 5)


def test_validate_hf_tensors_names_every_problem():
    arch = ARCHS["qwen2"]
    good = random_hf_tensors(arch)
    validate_hf_tensors(good, arch)
    validate_hf_tensors({**good, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32),
                         "lm_head.weight": good["model.embed_tokens.weight"].clone()}, arch)
    bad = dict(good)
    del bad["model.layers.2.mlp.up_proj.weight"]
    bad["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(3)
    bad["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(64)
    with pytest.raises(ValueError) as error:
        validate_hf_tensors(bad, arch)
    for fragment in ("model.layers.2.mlp.up_proj.weight", "model.layers.0.self_attn.q_norm.weight",
                     "model.layers.0.self_attn.k_proj.bias"):
        assert fragment in str(error.value)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        validate_hf_tensors({**good, "lm_head.weight": torch.zeros(500, 256)}, arch)


def test_safetensors_writer_shards_and_lazy_reader_round_trip(tmp_path):
    arch = ARCHS["llama"]
    tensors = random_hf_tensors(arch)
    files = save_safetensors_checkpoint(iter(tensors.items()), tmp_path / "sharded", max_shard_bytes=300_000)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    reader = SafetensorsCheckpoint(tmp_path / "sharded")
    assert set(reader) == set(tensors)
    for name, tensor in tensors.items():
        assert reader.shape(name) == tuple(tensor.shape) and torch.equal(reader[name], tensor)
    assert save_safetensors_checkpoint(tensors.items(), tmp_path / "one", dtype=torch.bfloat16) == ["model.safetensors"]
    assert SafetensorsCheckpoint(tmp_path / "one")["lm_head.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="given twice"):
        save_safetensors_checkpoint([("a", torch.ones(1)), ("a", torch.ones(1))], tmp_path / "dup")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        SafetensorsCheckpoint(tmp_path / "empty")


def test_arch_dataclass_fields_are_all_set_by_the_config():
    """A DecoderArch field added later must be read from HF configs too (this fails until it is)."""
    known = {f.name for f in dataclasses.fields(ARCHS["qwen3"])}
    assert known == {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon", "tie_word_embeddings",
                     "add_qkv_bias", "qk_layernorm", "head_dim", "init_method_std"}


def test_iter_hf_weights_rejects_a_bad_bucket_size_before_communicating():
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1, got 0"):
        next(iter_hf_weights(None, ARCHS["llama"], bucket_bytes=0))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converters_reject_bad_input_before_writing(tmp_path):
    """Validation happens before torch.distributed or Megatron are touched, so it runs in this process."""
    to_megatron, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        to_megatron.convert(str(hf_dir), str(tmp_path / "out"))
    (hf_dir / "config.json").write_text(json.dumps(TINY_HF_CONFIGS["llama"]))
    tensors = random_hf_tensors(ARCHS["llama"])
    del tensors["model.norm.weight"]
    save_safetensors_checkpoint(tensors.items(), hf_dir)
    with pytest.raises(ValueError, match="model.norm.weight"):
        to_megatron.convert(str(hf_dir), str(tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="is not empty"):
        to_megatron.convert(str(hf_dir), str(tmp_path / "full"))
    with pytest.raises(ValueError, match="params_dtype 'int8'"):
        to_megatron.convert(str(hf_dir), str(tmp_path / "out"), params_dtype="int8")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="has no megatron_scope_checkpoint.json"):
        to_hf.convert(str(hf_dir), str(tmp_path / "out"))
    (tmp_path / "meg").mkdir()
    (tmp_path / "meg" / "megatron_scope_checkpoint.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        to_hf.convert(str(tmp_path / "meg"), str(tmp_path / "out"))
