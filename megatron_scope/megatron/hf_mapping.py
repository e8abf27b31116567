"""The one place that knows Hugging Face <-> Megatron names and tensor layouts (Qwen2/Qwen2.5, Qwen3, Llama).

Megatron side: `GPTModel` built by `megatron_scope.megatron.model.build_gpt_model` (local layer spec). Names
here are *global*: `decoder.layers.{i}` counts layers over all pipeline stages (weight_export.py translates a
stage's local names). Layouts, checked against megatron-core 0.16 (`SelfAttention.get_query_key_value_tensors`,
`mlp.apply_swiglu_sharded_factory`, `VocabParallelEmbedding`):

- fused QKV `linear_qkv` [ng * (np/ng + 2) * hd, h]: query groups one after another, each
  [its np/ng query heads, its key head, its value head]; the bias follows the same layout. Column parallel:
  TP rank r holds the r-th contiguous chunk of dim 0 (whole groups when ng >= TP; a piece of one group when
  TP > ng, which Megatron reassembles with an all-gather in the forward).
- fused SwiGLU `linear_fc1` [2 * ffn, h] = [gate; up]. TP rank r holds [gate_r; up_r], NOT the r-th
  contiguous chunk of [gate; up].
- `linear_proj` and `linear_fc2` are row parallel (dim 1); norms (including Qwen3's per-head q/k RMSNorm,
  weight [hd]) are replicated.
- word embeddings and `output_layer` [padded_vocab, h] are split over TP along dim 0; rows >= arch.vocab_size
  (the HF checkpoint's own row count) are Megatron's padding: zero on import, dropped on export, so an
  export has exactly the rows the HF config declares whatever the padding (which may be larger than this
  model alone needs: a student and teacher share one, see `model.build_gpt_model`).
- tied embeddings: the first stage's `embedding.word_embeddings.weight` is the HF `model.embed_tokens.weight`;
  with PP > 1 the last stage holds a copy in `output_layer.weight`, which is filled on import and never
  exported. HF's `lm_head.weight` exists only when untied.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import torch

from megatron_scope.megatron.arch import DecoderArch

#: HF `model_type` -> the architecture class written to config.json.
SUPPORTED_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
#: HF `model_type` -> the (add_qkv_bias, qk_layernorm) its models have.
_FAMILY_LAYOUT = {"qwen2": (True, False), "qwen3": (False, True), "llama": (False, False)}

#: HF tensors that are not parameters (old checkpoints store rotary tables); accepted and never read.
IGNORED_HF_NAME = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

REPLICATED, ROW, VOCAB, QKV, GATE_UP = "replicated", "row", "vocab", "qkv", "gate_up"
_TP_DIM = {REPLICATED: None, ROW: 1, VOCAB: 0, QKV: 0, GATE_UP: 0}

# suffix after `decoder.layers.{i}.` -> (layout, HF names after `model.layers.{i}.`)
_LAYER_PARAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": (REPLICATED, ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        QKV, ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (
        QKV, ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": (REPLICATED, ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": (REPLICATED, ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": (ROW, ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": (REPLICATED, ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": (GATE_UP, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": (ROW, ("mlp.down_proj.weight",)),
}
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """How one Megatron parameter corresponds to HF tensors."""

    megatron_name: str
    """Global Megatron name (layer index counted over all pipeline stages)."""
    hf_names: tuple[str, ...]
    """HF tensors it is made of, in fusion order (q, k, v / gate, up)."""
    layout: str
    """One of replicated, row, vocab, qkv, gate_up (see the module docstring)."""
    exported: bool = True
    """False for the tied copy of the embedding on the last pipeline stage."""

    @property
    def tp_dim(self) -> int | None:
        """Dimension split over tensor-parallel ranks (None: replicated)."""
        return _TP_DIM[self.layout]


# --------------------------------------------------------------------------------------------- configs
def _config_dict(config: Any) -> dict:
    """HF config (PretrainedConfig or config.json dict) normalised by transformers' own config class."""
    if isinstance(config, Mapping):
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"HF model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
        from transformers import AutoConfig

        config = AutoConfig.for_model(**dict(config))
    return config.to_dict()


def arch_from_hf_config(config: Any) -> DecoderArch:
    """DecoderArch of a Qwen2/Qwen2.5, Qwen3 or Llama HF config (a PretrainedConfig or a config.json dict).

    Raises ValueError for anything the Megatron model would compute differently: another activation,
    rope scaling (llama3, yarn, ...), sliding-window layers, biases other than Qwen2's QKV bias.
    """
    cfg = _config_dict(config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"HF model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    if cfg.get("hidden_act") != "silu":
        raise ValueError(f"{model_type}: hidden_act {cfg.get('hidden_act')!r} is not supported (only 'silu')")
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{model_type}: rope_type {rope_type!r} (rope scaling) is not supported; only 'default'")
    if "rope_theta" not in rope:
        raise ValueError(f"{model_type}: config has no rope_theta")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise ValueError(f"{model_type}: sliding-window attention layers are not supported")
    if model_type in ("qwen3", "llama") and cfg.get("attention_bias"):
        raise ValueError(f"{model_type}: attention_bias=True (bias on o_proj) is not supported")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{model_type}: mlp_bias=True is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return DecoderArch(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rotary_base=float(rope["rope_theta"]),
        norm_epsilon=float(cfg["rms_norm_eps"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        add_qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
        head_dim=None if head_dim * heads == cfg["hidden_size"] else head_dim,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )


def hf_config_from_arch(arch: DecoderArch, model_type: str, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents of the HF model of `model_type` with architecture `arch` (inverse of
    `arch_from_hf_config`). Raises ValueError when the family cannot express `arch` (e.g. Llama with QKV bias)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    needs = _FAMILY_LAYOUT[model_type]
    if (arch.add_qkv_bias, arch.qk_layernorm) != needs:
        raise ValueError(
            f"{model_type} needs add_qkv_bias={needs[0]}, qk_layernorm={needs[1]}; "
            f"arch has add_qkv_bias={arch.add_qkv_bias}, qk_layernorm={arch.qk_layernorm}")
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type,
        architectures=[SUPPORTED_MODEL_TYPES[model_type]],
        num_hidden_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        intermediate_size=arch.ffn_hidden_size,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rotary_base},
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        initializer_range=arch.init_method_std,
        hidden_act="silu",
        dtype=dtype,
    )
    return config.to_dict()


def model_type_of(arch: DecoderArch) -> str:
    """The HF model_type with `arch`'s layout: qwen2 (QKV bias), qwen3 (q/k norm) or llama (neither)."""
    layout = (arch.add_qkv_bias, arch.qk_layernorm)
    for model_type, family_layout in _FAMILY_LAYOUT.items():
        if family_layout == layout:
            return model_type
    raise ValueError(f"no supported HF model_type has add_qkv_bias={layout[0]} and qk_layernorm={layout[1]}")


# --------------------------------------------------------------------------------------------- names
def param_mapping(megatron_name: str, arch: DecoderArch) -> ParamMapping:
    """The mapping of one global Megatron parameter name; ValueError if `arch`'s model has no such parameter."""
    if megatron_name == EMBEDDING:
        return ParamMapping(megatron_name, ("model.embed_tokens.weight",), VOCAB)
    if megatron_name == OUTPUT_LAYER:
        if arch.tie_word_embeddings:
            return ParamMapping(megatron_name, ("model.embed_tokens.weight",), VOCAB, exported=False)
        return ParamMapping(megatron_name, ("lm_head.weight",), VOCAB)
    if megatron_name == FINAL_NORM:
        return ParamMapping(megatron_name, ("model.norm.weight",), REPLICATED)
    match = _LAYER_NAME.match(megatron_name)
    if match and match.group(2) in _LAYER_PARAMS and int(match.group(1)) < arch.num_layers:
        layer, suffix = int(match.group(1)), match.group(2)
        present = {
            "self_attention.linear_qkv.bias": arch.add_qkv_bias,
            "self_attention.q_layernorm.weight": arch.qk_layernorm,
            "self_attention.k_layernorm.weight": arch.qk_layernorm,
        }.get(suffix, True)
        if present:
            layout, hf_suffixes = _LAYER_PARAMS[suffix]
            return ParamMapping(megatron_name, tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes), layout)
    raise ValueError(f"Megatron parameter {megatron_name!r} has no Hugging Face counterpart for {arch}")


def megatron_param_names(arch: DecoderArch) -> list[str]:
    """Global names of every parameter of the unsplit (TP=1, PP=1) Megatron model of `arch`, in model order."""
    names = [EMBEDDING]
    for layer in range(arch.num_layers):
        for suffix in _LAYER_PARAMS:
            name = f"decoder.layers.{layer}.{suffix}"
            try:
                param_mapping(name, arch)
            except ValueError:
                continue
            names.append(name)
    names.append(FINAL_NORM)
    if not arch.tie_word_embeddings:
        names.append(OUTPUT_LAYER)
    return names


def hf_param_shapes(arch: DecoderArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of `arch`'s model and its shape (what a complete checkpoint holds)."""
    h, hd = arch.hidden_size, arch.kv_channels
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (arch.ffn_hidden_size, h), "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for name in megatron_param_names(arch):
        for hf_name in param_mapping(name, arch).hf_names:
            layer_match = re.match(r"^model\.layers\.\d+\.(.+)$", hf_name)
            if layer_match:
                shapes[hf_name] = per_layer[layer_match.group(1)]
    return shapes


def megatron_full_shape(mapping: ParamMapping, arch: DecoderArch, padded_vocab_size: int) -> tuple[int, ...]:
    """Shape of the unsplit Megatron parameter (vocabulary rows padded to `padded_vocab_size`)."""
    if mapping.layout == VOCAB:
        return (padded_vocab_size, arch.hidden_size)
    hf = hf_param_shapes(arch)
    parts = [hf[name] for name in mapping.hf_names]
    return (sum(p[0] for p in parts), *parts[0][1:])


def tp_shard_shape(full_shape: tuple[int, ...], mapping: ParamMapping, tp_size: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard; ValueError if the split dimension does not divide by tp_size."""
    dim = mapping.tp_dim
    if dim is None:
        return tuple(full_shape)
    if full_shape[dim] % tp_size:
        raise ValueError(f"{mapping.megatron_name}: dim {dim} of {tuple(full_shape)} does not divide by TP={tp_size}")
    shape = list(full_shape)
    shape[dim] //= tp_size
    return tuple(shape)


# --------------------------------------------------------------------------------------------- layouts
def _qkv_split_sizes(arch: DecoderArch) -> tuple[int, int]:
    return arch.num_attention_heads // arch.num_query_groups, arch.kv_channels


def to_hf(mapping: ParamMapping, full: torch.Tensor, arch: DecoderArch) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of one unsplit Megatron parameter (views where the layout allows; vocab padding dropped)."""
    if mapping.layout == REPLICATED or mapping.layout == ROW:
        return [(mapping.hf_names[0], full)]
    if mapping.layout == VOCAB:
        return [(mapping.hf_names[0], full[: arch.vocab_size])]
    if mapping.layout == GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return list(zip(mapping.hf_names, (gate, up)))
    heads_per_group, hd = _qkv_split_sizes(arch)
    grouped = full.reshape(arch.num_query_groups, heads_per_group + 2, hd, *full.shape[1:])
    q = grouped[:, :heads_per_group].reshape(-1, *full.shape[1:])
    k = grouped[:, heads_per_group].reshape(-1, *full.shape[1:])
    v = grouped[:, heads_per_group + 1].reshape(-1, *full.shape[1:])
    return list(zip(mapping.hf_names, (q, k, v)))


def from_hf(
    mapping: ParamMapping,
    get_hf: Callable[[str], torch.Tensor],
    arch: DecoderArch,
    padded_vocab_size: int,
) -> torch.Tensor:
    """The unsplit Megatron parameter built from HF tensors (`get_hf(name)`); padded vocab rows are zero."""
    tensors = [get_hf(name) for name in mapping.hf_names]
    if mapping.layout in (REPLICATED, ROW):
        return tensors[0]
    if mapping.layout == VOCAB:
        (table,) = tensors
        padded = table.new_zeros((padded_vocab_size, *table.shape[1:]))
        padded[: table.shape[0]] = table
        return padded
    if mapping.layout == GATE_UP:
        return torch.cat(tensors, dim=0)
    heads_per_group, hd = _qkv_split_sizes(arch)
    q, k, v = tensors
    rest = q.shape[1:]
    groups = arch.num_query_groups
    return torch.cat(
        [q.reshape(groups, heads_per_group, hd, *rest), k.reshape(groups, 1, hd, *rest),
         v.reshape(groups, 1, hd, *rest)],
        dim=1,
    ).reshape(-1, *rest)


def tp_shard(mapping: ParamMapping, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of an unsplit Megatron parameter (a view unless the layout is gate_up)."""
    if mapping.tp_dim is None:
        return full
    tp_shard_shape(tuple(full.shape), mapping, tp_size)  # divisibility check
    if mapping.layout == GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]], dim=0)
    return torch.chunk(full, tp_size, dim=mapping.tp_dim)[tp_rank]


def merge_tp_shards(mapping: ParamMapping, shards: list[torch.Tensor]) -> torch.Tensor:
    """The unsplit Megatron parameter from every TP rank's shard, in TP rank order."""
    if mapping.tp_dim is None:
        return shards[0]
    if mapping.layout == GATE_UP:
        halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=mapping.tp_dim)
