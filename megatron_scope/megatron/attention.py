"""The local layer spec's modules without Transformer Engine: torch's scaled_dot_product_attention as core attention,
torch's RMSNorm as a norm that also runs under sequence parallelism.

megatron-core's local spec computes attention with `DotProductAttention`: a baddbmm of Q K^T into a global
[b·n/t, s, s] buffer, a softmax that keeps its [b, n/t, s, s] output for backward, and a bmm with V. At the
paper's sequence length (14k tokens) those s² tensors are most of a GPU's memory. `SDPADotProductAttention`
is the same module (same constructor, same [s, b, n/t, d] -> [s, b, n/t·d] contract, same softmax scale) whose
forward is `torch.nn.functional.scaled_dot_product_attention`: flash or memory-efficient kernels on CUDA
(O(s) memory, nothing s² saved for backward), a fused kernel on CPU; grouped-query attention without
repeating K and V (`enable_gqa`).

`gpt_layer_spec` picks the spec by Megatron-LM's flags: `--transformer-impl transformer_engine` (TE's spec; TE
must be importable) or `local` with `--attention-backend sdpa` (this module) or `local` (DotProductAttention,
which stores the scores). Every norm of the local spec (the layers', the query/key norms and the final one) is
`RMSNorm`: megatron-core's `WrappedTorchNorm` builds the same torch module but refuses `--sequence-parallel`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_scope.config import ATTENTION_BACKENDS, TRANSFORMER_IMPLS


class SDPADotProductAttention(DotProductAttention):
    """megatron-core's DotProductAttention with torch's fused scaled_dot_product_attention as its forward.

    softmax(Q K^T · scale + causal mask) V per head, scale = 1/√d (or the config's softmax_scale); Megatron's
    boolean `attention_mask` (True = masked out) becomes SDPA's (True = attend). No attention dropout (it would
    draw from torch's generator instead of Megatron's TP-aware RNG tracker), no query-key layer scaling, only
    vanilla softmax and full (not windowed) attention: each is refused at construction.
    """

    def __init__(self, config, *args, **kwargs):
        if config.attention_dropout:
            raise ValueError(f"SDPADotProductAttention needs attention_dropout 0, got {config.attention_dropout}")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla" or config.window_size:
            raise ValueError("SDPADotProductAttention supports plain softmax attention only (no query-key layer "
                             "scaling, softmax offsets or sliding windows)")
        super().__init__(config, *args, **kwargs)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """[sq, b, n/t, d] query, [sk, b, g/t, d] key and value -> [sq, b, n/t·d] context."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPADotProductAttention takes no packed sequences and no attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask
        grouped = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),  # [b, heads, s, d]
            attn_mask=mask, is_causal=causal, scale=self.softmax_scale, enable_gqa=grouped)
        seq, batch = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as a megatron-core norm module: y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

    Under sequence parallelism (`config.sequence_parallel`) each TP rank normalises its own slice of the sequence, so
    its weight gradient is that slice's share: the weight is marked `sequence_parallel` and megatron-core's
    `finalize_model_grads` sums it over the TP group, as Transformer Engine's norm marks its own. `sequence_split`
    False: a norm whose input is never sequence-split (the per-head query/key norms, after the QKV projection's
    all-gather; `finalize_model_grads` already sums their gradients over TP, whose ranks hold different heads).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, sequence_split: bool = True, **_unused):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(f"RMSNorm is the norm of RMSNorm models without zero-centred gamma, got "
                             f"normalization={config.normalization!r}, zero_centered_gamma="
                             f"{config.layernorm_zero_centered_gamma}")
        super().__init__(hidden_size, eps=eps)  # as WrappedTorchNorm builds it
        if config.sequence_parallel and sequence_split:
            self.weight.sequence_parallel = True


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def gpt_layer_spec(qk_layernorm: bool, transformer_impl: str = "local", attention_backend: str = "sdpa"):
    """The decoder layer spec for `--transformer-impl` / `--attention-backend` (see the module docstring)."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {transformer_impl!r}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise ValueError("--transformer-impl transformer_engine needs the transformer_engine package; use "
                             "--transformer-impl local (with --attention-backend sdpa: no stored s^2 scores)")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm))
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    attention = spec.submodules.self_attention.submodules
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = ModuleSpec(module=RMSNorm, params={"sequence_split": False})
    if attention_backend == "sdpa":
        attention.core_attention = SDPADotProductAttention
    return spec


def gpt_block_spec(config, qk_layernorm: bool, transformer_impl: str = "local", attention_backend: str = "sdpa"):
    """`gpt_layer_spec` for this pipeline stage's layers; the local spec's as a block spec whose final norm is
    `RMSNorm` (megatron-core's block otherwise picks apex's or torch's by what is installed)."""
    spec = gpt_layer_spec(qk_layernorm, transformer_impl, attention_backend)
    if transformer_impl == "transformer_engine":
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)
