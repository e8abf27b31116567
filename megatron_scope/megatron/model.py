"""Build Megatron GPTModels of Llama/Qwen2/Qwen3-style decoders (the students and teachers of SCOPE)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_scope.megatron.arch import DecoderArch, padded_vocab_size
from megatron_scope.megatron.attention import gpt_block_spec


def transformer_config(arch: DecoderArch, params_dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """Megatron TransformerConfig for `arch` under the current parallel state (dropout off: RL/distillation)."""
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(overrides)
    if kwargs.get("variable_seq_lengths"):  # token-budget microbatches: megatron-core refuses them with its default
        kwargs.setdefault("moe_token_dispatcher_type", "alltoall")  # MoE dispatcher (these models have no MoE)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    arch: DecoderArch,
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
    padded_vocab: int | None = None,
    transformer_impl: str = "local",
    attention_backend: str = "sdpa",
    **config_overrides,
) -> GPTModel:
    """This rank's GPTModel stage (its TP shard of its PP stage's layers), rotary positions, the layer spec of
    `attention.gpt_layer_spec(transformer_impl, attention_backend)` (default: megatron-core's local modules with
    torch SDPA attention, no stored s^2 scores); on the current CUDA device when there is one.
    `config_overrides` go to TransformerConfig (e.g. recompute_granularity, recompute_method,
    recompute_num_layers, sequence_parallel: each TP rank then keeps [s/TP, b, hidden] activations between the
    layers' tensor-parallel regions, and sequence lengths must be multiples of TP).

    padded_vocab: rows of the word embeddings and output layer; default `padded_vocab_size(arch.vocab_size,
    TP, make_vocab_size_divisible_by)`. Models whose logits meet in one vocab-parallel op (a student and its
    teacher) need the same value, so that their vocabulary shards line up on every TP rank: pad the larger
    of their row counts. ValueError if it is below arch.vocab_size or not divisible by TP.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    elif padded_vocab < arch.vocab_size or padded_vocab % tp:
        raise ValueError(f"padded_vocab {padded_vocab} must be >= the model's {arch.vocab_size} embedding rows "
                         f"and divisible by the tensor-parallel size {tp}")
    config = transformer_config(arch, params_dtype, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, arch.qk_layernorm, transformer_impl, attention_backend),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
    )
    if torch.cuda.is_available():  # as Megatron-LM's get_model: some modules are built on the host
        model.cuda(torch.cuda.current_device())
    return model


def wrap_with_ddp(model: GPTModel, use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                  bucket_size: int | None = None) -> DistributedDataParallel:
    """Megatron's DistributedDataParallel (fp32 `main_grad` buffers), with `finalize_model_grads` hooked
    into the pipeline schedules: data-parallel and embedding gradient all-reduces, and the division by
    the all-reduced loss count when `config.calculate_per_token_loss` is set. With `overlap_grad_reduce`, each
    gradient bucket's reduction starts as soon as the last microbatch's backward has filled it (the schedules'
    `grad_sync_func`, as Megatron-LM sets it) and `finalize_model_grads` waits for them; `bucket_size`: parameters
    per bucket (None: megatron-core's default, max(40M, 1M x DP) with overlap, one bucket without)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce, bucket_size=bucket_size,
    )
    wrapped = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = wrapped.no_sync
    if overlap_grad_reduce:
        model.config.grad_sync_func = wrapped.start_grad_sync
    return wrapped


def unwrap_model(model) -> torch.nn.Module:
    """The GPTModel inside Megatron wrappers (DistributedDataParallel, Float16Module) or a one-chunk list."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"virtual pipeline chunks are not supported: got a list of {len(model)} model chunks")
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def output_layer_weight(model) -> torch.Tensor | None:
    """This rank's output-layer shard [V/TP, hidden] (the word embeddings when tied); None off the last stage."""
    gpt = unwrap_model(model)
    if not gpt.post_process:
        return None
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def returning_hidden_states(model):
    """Inside, the model's last stage returns its last hidden states [b, s, hidden] (after the final norm: the
    output layer's input) instead of logits, for a loss that applies the output layer itself (ops.linear_kl).
    Under sequence parallelism they are all-gathered over the TP group as the output layer's input is (the loss
    returns the gradient summed over TP, as `ops.linear_kl` does: the backward keeps this rank's slice of it)."""
    gpt = unwrap_model(model)
    if not gpt.post_process:
        yield
        return
    if gpt.config.sequence_parallel:
        gpt.output_layer.forward = lambda hidden_states, *args, **kwargs: (
            gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False), None)
    else:
        gpt.output_layer.forward = lambda hidden_states, *args, **kwargs: (hidden_states, None)
    try:
        yield
    finally:
        del gpt.output_layer.forward  # the class's forward again
