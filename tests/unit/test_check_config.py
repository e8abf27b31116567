"""tools/check_config.py and megatron_scope/memory_estimate.py: parameter counts of real configs, every memory
term of a tiny run by hand, the parallel/sequence/KV/vocabulary errors, the CLI, and the launch scripts."""

from __future__ import annotations

import importlib.util
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest

from megatron_scope import memory_estimate as me
from megatron_scope.arguments import parse_run_config
from megatron_scope.testing.tiny import tiny_run_config
from megatron_scope.megatron.hf_mapping import (
    arch_from_hf_config, hf_param_shapes, megatron_full_shape, megatron_param_names, param_mapping, tp_shard_shape)
from megatron_scope.megatron.arch import DecoderArch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("check_config", os.path.join(ROOT, "tools", "check_config.py"))
check_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_config)

GIB = 1 << 30

# config.json of Qwen2.5-1.5B (Hugging Face Qwen/Qwen2.5-1.5B), the fields the mapping reads.
QWEN25_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 1536,
    "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2, "num_hidden_layers": 28,
    "vocab_size": 151936, "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 21,
    "torch_dtype": "bfloat16",
}
# DeepSeek-R1-Distill-Qwen-1.5B: the same shapes with an untied lm_head (its model card: 1.78B parameters).
R1_DISTILL_1_5B = {**QWEN25_1_5B, "tie_word_embeddings": False, "rope_theta": 10000, "sliding_window": 4096}
# Qwen2.5-7B (Qwen/Qwen2.5-7B); Skywork-OR1-Math-7B / DeepSeek-R1-Distill-Qwen-7B have the same shapes.
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
    "vocab_size": 152064, "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
    "torch_dtype": "bfloat16",
}
# Qwen3-1.7B (Qwen/Qwen3-1.7B): head_dim 128 with 16 heads of a 2048 width, q/k norms, tied.
QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "num_hidden_layers": 28, "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False, "max_window_layers": 28,
    "torch_dtype": "bfloat16",
}


def _shapes_total(arch: DecoderArch) -> int:
    """Parameters from hf_mapping's per-tensor HF shapes: an independent count."""
    return sum(math.prod(shape) for shape in hf_param_shapes(arch).values())


# ---------------------------------------------------------------------------------------------- counts
def test_qwen25_1_5b_parameter_count():
    arch = arch_from_hf_config(QWEN25_1_5B)
    # 151936 x 1536 embedding (tied) = 233,373,696
    # + 28 x [q 1536^2 + k, v 2 x 256 x 1536 + bias 1536 + 2 x 256 + o 1536^2 + SwiGLU 3 x 8960 x 1536 + norms 2 x 1536]
    #   = 28 x 46,797,824 = 1,310,339,072
    # + final norm 1536  ->  1,543,714,304 (Qwen2.5-1.5B's known total; its card says 1.54B)
    assert me.layer_param_count(arch) == 46_797_824
    assert me.hf_param_count(arch) == 1_543_714_304 == _shapes_total(arch)


def test_r1_distill_1_5b_untied_parameter_count():
    arch = arch_from_hf_config(R1_DISTILL_1_5B)
    # + a separate lm_head of 151936 x 1536 = 233,373,696 -> 1,777,088,000 (model card: 1.78B)
    assert me.hf_param_count(arch) == 1_777_088_000 == _shapes_total(arch)


def test_qwen25_7b_parameter_count():
    arch = arch_from_hf_config(QWEN25_7B)
    # 2 x 152064 x 3584 (untied) = 1,089,994,752
    # + 28 x [q 3584^2 + k, v 2 x 512 x 3584 + bias 3584 + 2 x 512 + o 3584^2 + 3 x 18944 x 3584 + 2 x 3584]
    #   = 28 x 233,057,792 = 6,525,618,176
    # + 3584  ->  7,615,616,512 (Qwen2.5-7B's known total; its card says 7.61B)
    assert me.layer_param_count(arch) == 233_057_792
    assert me.hf_param_count(arch) == 7_615_616_512 == _shapes_total(arch)


def test_qwen3_1_7b_parameter_count():
    arch = arch_from_hf_config(QWEN3_1_7B)
    # per layer: qkv (2048 + 2 x 1024) x 2048 + o 2048^2 + 3 x 6144 x 2048 + norms 2 x 2048 + q/k norms 2 x 128
    #   = 50,336,000; non-embedding 28 x 50,336,000 + 2048 = 1,409,410,048 (card: 1.4B);
    # + tied 151936 x 2048 = 311,164,928 -> 1,720,574,976 (card: 1.7B)
    assert me.layer_param_count(arch) == 50_336_000
    assert me.hf_param_count(arch) == 1_720_574_976 == _shapes_total(arch)


@pytest.mark.parametrize("config, tp, pp", [(R1_DISTILL_1_5B, 2, 1), (QWEN25_1_5B, 4, 1), (QWEN25_1_5B, 2, 2),
                                            (QWEN3_1_7B, 2, 1)])
def test_stage_counts_match_the_megatron_shard_shapes(config, tp, pp):
    """Sum of hf_mapping's TP-shard shapes over each stage's parameters (an independent path)."""
    arch = arch_from_hf_config(config)
    padded = me.common_padded_vocab([arch], tp)
    per_stage = arch.num_layers // pp
    for stage in range(pp):
        in_stage = range(stage * per_stage, (stage + 1) * per_stage)
        names = [n for n in megatron_param_names(arch)
                 if not n.startswith("decoder.layers.") or int(n.split(".")[2]) in in_stage]
        names = [n for n in names if (n != "embedding.word_embeddings.weight" or stage == 0)
                 and (n not in ("decoder.final_layernorm.weight", "output_layer.weight") or stage == pp - 1)]
        if stage == pp - 1 and pp > 1 and arch.tie_word_embeddings:
            names.append("output_layer.weight")  # the tied embedding's copy on the last stage
        expected = sum(math.prod(tp_shard_shape(megatron_full_shape(param_mapping(n, arch), arch, padded),
                                                param_mapping(n, arch), tp)) for n in names)
        assert me.stage_param_count(arch, tp, pp, stage, padded) == expected


def test_common_padded_vocab_of_the_paper_pair():
    student, teacher = arch_from_hf_config(R1_DISTILL_1_5B), arch_from_hf_config(QWEN25_7B)
    assert me.common_padded_vocab([student, teacher], 1) == 152064  # 1188 x 128
    assert me.common_padded_vocab([student, teacher], 2) == 152064  # 594 x 256
    assert me.common_padded_vocab([student], 8) == 152576           # 149 x 1024


# ---------------------------------------------------------------------------------------------- memory by hand
TINY = DecoderArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                   vocab_size=1000, max_position_embeddings=64)
TINY_TEACHER = DecoderArch(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=128, vocab_size=1000, max_position_embeddings=64)


#: Where each of the tiny plan's settings lives in the run configuration: (section, field).
_CONFIG_FIELDS = {
    "tensor_parallel": ("parallel", "tensor_model_parallel_size"),
    "pipeline_parallel": ("parallel", "pipeline_model_parallel_size"),
    "prompts_per_step": ("rollout", "prompts_per_step"), "group_size": ("rollout", "group_size"),
    "max_new_tokens": ("rollout", "max_new_tokens"), "rollout_kv_cache_gib": ("rollout", "kv_cache_gib"),
    "rollout_tensor_parallel": ("rollout", "tensor_parallel_size"), "micro_batch_size": ("loop", "micro_batch_size"),
    "bf16": ("models", "bf16"), "teacher_backend": ("models", "teacher_backend"),
    "distributed_optimizer": ("optimizer", "use_distributed_optimizer"), "algorithm": ("loss", "algorithm"),
    "kl": ("loss", "kl"), "topk": ("loss", "topk"), "attention_backend": ("models", "attention_backend"),
    "recompute_granularity": ("models", "recompute_granularity"), "recompute_method": ("models", "recompute_method"),
    "recompute_num_layers": ("models", "recompute_num_layers"), "fused_kl": ("loss", "fused_kl"),
    "max_tokens_per_microbatch": ("loop", "max_tokens_per_microbatch"), "placement": ("rollout", "placement"),
    "engines": ("rollout", "engines"), "baselines": ("loss", "baselines"),
    "reference_backend": ("models", "reference_backend"),
    "offload_optimizer": ("rollout", "offload_optimizer"), "offload_teacher": ("rollout", "offload_teacher"),
    "rollout_gpu_memory_utilization": ("rollout", "gpu_memory_utilization"),
    "sequence_parallel": ("parallel", "sequence_parallel"),
    "teacher_residency": ("models", "teacher_residency"),
}


def _tiny_plan(**overrides) -> me.RunPlan:
    values = dict(tensor_parallel=1, pipeline_parallel=1, prompts_per_step=4, group_size=2, micro_batch_size=2,
                  max_new_tokens=15, bf16=True, distributed_optimizer=True, rollout_kv_cache_gib=1.0,
                  attention_backend="local")  # megatron-core's DotProductAttention: the s^2 terms by hand below
    values.update(overrides)
    sections = {"parallel": {}, "rollout": {}, "loop": {}, "optimizer": {}, "loss": {}, "models": {}}
    for name in list(values):
        if name in _CONFIG_FIELDS:
            section, field = _CONFIG_FIELDS[name]
            sections[section][field] = values.pop(name)
    config = tiny_run_config(**sections)
    plan = dict(nnodes=1, nproc_per_node=2, max_prompt_tokens=10, rollout_element_bytes=2, gpu_memory_gib=80.0,
                overhead_gib=0.0)
    plan.update(values)
    return me.RunPlan(config=config, **plan)


def test_every_memory_term_of_a_tiny_run_by_hand():
    """One engine inside global rank 0, every term added (as on CPU, where vLLM cannot sleep)."""
    plan = _tiny_plan(placement="rank0", device_type="cpu")
    # DP = 2 / (1 x 1) = 2; n = 4 / 2 x 2 = 4 sequences; 2 microbatches of b = 2;
    # s = 10 + 15 - 1 = 24 (a multiple of 8); V = 1000 padded to 1024; e = 2 (bf16)
    assert (plan.data_parallel, plan.local_sequences, plan.num_microbatches, plan.seq_length) == (2, 4, 2, 24)
    gpus = me.estimate_memory(plan, TINY, TINY_TEACHER)
    assert [g.role for g in gpus] == ["rank 0 (first stage + rollout engine)", "other ranks (no engine)"]
    terms = {c.name: c.bytes for c in gpus[0].components}
    # P: layer = qkv (64 + 2 x 32) x 64 = 8192 + o 4096 + SwiGLU 3 x 128 x 64 = 24576 + norms 128 = 36,992;
    #    2 layers 73,984 + embedding 1024 x 64 = 65,536 + output layer 65,536 + final norm 64 = 205,120
    assert me.stage_param_count(TINY, 1, 1, 0, 1024) == 205_120
    assert terms["student parameters"] == 410_240          # 2 B x 205,120
    assert terms["gradients (fp32 main_grad)"] == 820_480  # 4 B x 205,120
    assert terms["optimizer state (Adam)"] == 1_230_720    # 12 B x 205,120 / DP 2
    # teacher: 4 x 36,992 + 65,536 x 2 + 64 = 279,104 params x 2 B
    assert terms["teacher parameters"] == 558_208
    # A = 2 x 24 x 2 x [6 x 64 + (4 x 4 x 16 + 4 x 128)] + 6 x 4 x 24^2 x 2 = 36,864 + 73,728 + 27,648 = 138,240;
    # x 2 layers x 1 microbatch + last stage 2 x 2 x 24 x 2 x 64 = 12,288  ->  288,768
    assert me.activation_bytes_per_layer(TINY, 24, 2, 1, 2) == 138_240
    assert terms["student activations"] == 288_768
    assert terms["attention score buffer"] == 9_216        # 2 B x 4 heads x 24^2 x 2
    # the fused KL (the default for SCOPE's reverse KL): no logits; one chunk of r = min(2^26 / 1024, 48 / 16) = 3
    # tokens x 1024 x (2 x 2 + 40) B, and the hidden-state gradient 2 x 24 x 64 x 2 B; the output layer's weight
    # gradient 1024 x 64 x 2 B
    assert "logits + gradient" not in terms
    assert terms["fused KL (chunk + hidden gradient)"] == 3 * 1024 * 44 + 6_144
    assert terms["output-layer weight gradient"] == 131_072
    # the teacher's hidden states at the response rows, at most 15 (--max-new-tokens) a sequence
    assert terms["teacher hidden states (microbatch)"] == 3_840  # 2 x 15 x 64 x 2 B (4 sequences in host memory)
    # 2 microbatches of 2 x 15 x 64 x 2 B = 3,840, each rounded up to a 512-byte offset
    assert me.teacher_hidden_host_bytes(plan, TINY, TINY_TEACHER) == 2 * 4_096
    # two teachers share the buffer: each row has one; the second teacher's microbatches add at most one partial
    # microbatch, one more row (64 x 2 B) and one more 512-byte rounding
    assert me.teacher_hidden_host_bytes(plan, TINY, (TINY_TEACHER, TINY)) == 2 * 4_096 + 1_024
    assert terms["batch tensors"] == 3_840                 # 40 B x 4 x 24
    assert terms["runtime overhead (trainer)"] == 0
    # engine: HF params 73,984 + 2 x 1000 x 64 + 64 = 202,048 x 2 B; KV 1 GiB; sampler 8 x 256 x 1000
    assert terms["vLLM weights"] == 404_096
    assert terms["vLLM KV cache"] == GIB
    assert terms["vLLM runtime"] == 2_048_000
    assert gpus[0].total_bytes == 410_240 + 820_480 + 1_230_720 + 558_208 + 288_768 + 9_216 + 3_840 \
        + 3 * 1024 * 44 + 6_144 + 131_072 + 3_840 + 404_096 + GIB + 2_048_000
    assert gpus[1].total_bytes == gpus[0].total_bytes - 404_096 - GIB - 2_048_000
    assert me.kv_bytes_per_token(TINY, 2) == 256           # 2 x 2 layers x 2 kv heads x 16 x 2 B


def test_engines_on_training_gpus_sleep_through_the_step():
    """Co-located (the default) on CUDA: every replica's first rank runs an engine, which sleeps while the step's
    transient terms exist, so only its weights + KV cache beyond them add; its runtime stays."""
    additive = me.estimate_memory(_tiny_plan(placement="rank0", device_type="cpu"), TINY, TINY_TEACHER)
    gpus = me.estimate_memory(_tiny_plan(), TINY, TINY_TEACHER)
    assert [g.role for g in gpus] == ["each replica's first rank (first stage + rollout engine)"]  # DP 2, TP 1
    terms = {c.name: c.bytes for c in gpus[0].components}
    # transient: activations 288,768 + score buffer 9,216 + fused KL 141,312 + weight gradient 131,072 + teacher
    # hidden states 2 x 3,840 (this microbatch's and the next one's, prefetched) = 578,048; awake: weights 404,096 +
    # KV cache 1 GiB
    assert terms["vLLM weights + KV cache beyond the step"] == 404_096 + GIB - 578_048
    assert terms["vLLM runtime"] == 2_048_000 and "vLLM weights" not in terms
    assert gpus[0].total_bytes == additive[0].total_bytes - 574_208
    # a vLLM teacher's engine is awake only while the rollout engine sleeps: the larger of the two counts
    vllm = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(kl="k3", teacher_backend="vllm"), TINY,
                                                         TINY_TEACHER)[0].components}
    assert vllm["vLLM teacher weights + KV cache beyond the step"] > 0 and vllm["vLLM teacher runtime"] == 2_048_000
    assert "vLLM weights + KV cache beyond the step" not in vllm and vllm["vLLM runtime"] == 2_048_000
    # --rl-offload-*-during-inference: gradients 820,480 + Adam state (distributed, DP 2) 1,230,720 + the teacher's
    # 558,208 B wait in host memory while the engine generates: its KV cache reuses them too
    offloaded = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(offload_optimizer=True, offload_teacher=True),
                                                              TINY, TINY_TEACHER)[0].components}
    assert offloaded["vLLM weights + KV cache beyond the step"] == 404_096 + GIB - 578_048 - 820_480 - 1_230_720 \
        - 558_208
    # TP 2 > rollout TP 1: the replica's second first-stage rank runs no engine
    tp2 = me.estimate_memory(_tiny_plan(tensor_parallel=2, prompts_per_step=2), TINY, TINY_TEACHER)
    assert [g.role for g in tp2] == ["each replica's first rank (first stage + rollout engine)",
                                     "other ranks (no engine)"]


def test_host_memory_per_node_by_hand():
    """The tiny run's node (2 ranks): the teacher's hidden states of each rank's local batch (12,288 B), and with
    the offload flags the Adam state (1,230,720 B) and the teacher's parameters (558,208 B) per rank; a vLLM
    teacher's engine (one per replica: 2 on the node) keeps its weights there while it sleeps at level 1."""
    names = lambda plan, teacher=TINY_TEACHER: {c.name: c.bytes for c in me.host_memory_per_node(plan, TINY, teacher)}
    assert names(_tiny_plan()) == {"teacher hidden states (local batch)": 2 * 8_192}
    assert names(_tiny_plan(offload_optimizer=True, offload_teacher=True)) == {
        "teacher hidden states (local batch)": 2 * 8_192, "optimizer state (Adam) (offloaded)": 2 * 1_230_720,
        "teacher parameters (offloaded)": 2 * 558_208}
    vllm_teacher = names(_tiny_plan(kl="k3", teacher_backend="vllm"))
    # the teacher's HF parameters: 4 x 36,992 + 2 x 1000 x 64 + 64 = 276,032 x 2 B per engine
    assert vllm_teacher == {"vLLM teacher weights (asleep, level 1)": 2 * 276_032 * 2}


def test_teachers_taking_turns_by_hand():
    """--teacher-residency scoring with two teachers (the tiny teacher and one of the student's shape): each one's
    output layer (1024 x 64 params) stays on the GPU, the larger body (the tiny teacher's 279,104 - 65,536 params)
    is counted once, for its scoring pass; both bodies wait in pinned host memory on each of the node's 2 ranks,
    and with --rl-offload-teacher-during-inference the output layers join them while the engines generate."""
    two = (TINY_TEACHER, TINY)
    terms = lambda plan: {c.name: c.bytes for c in me.estimate_memory(plan, TINY, two)[0].components}  # noqa: E731
    assert terms(_tiny_plan())["teacher parameters"] == 2 * (279_104 + 205_120)  # all resident
    turns = terms(_tiny_plan(teacher_residency="scoring"))
    assert "teacher parameters" not in turns
    assert turns["teacher output layers"] == 2 * 2 * 65_536
    assert turns["teacher parameters (scoring pass)"] == 2 * (279_104 - 65_536)
    host = {c.name: c.bytes for c in me.host_memory_per_node(_tiny_plan(teacher_residency="scoring",
                                                                        offload_teacher=True), TINY, two)}
    assert host["teacher weights between scoring passes"] == 2 * 2 * ((279_104 - 65_536) + (205_120 - 65_536))
    assert host["teacher output layers (offloaded)"] == 2 * 2 * 2 * 65_536
    assert "teacher parameters (offloaded)" not in host
    # while the engines generate the scoring teacher's body is in host memory anyway (and the heads with the flag)
    free = me.rollout_free_terms(_tiny_plan(teacher_residency="scoring", offload_teacher=True))
    assert {"teacher parameters (scoring pass)", "teacher output layers"} <= set(free)


def test_the_engines_start_up_check():
    """With --rollout-gpu-memory-utilization, the last engine to start must find GPU x utilization free: the
    GPU less the trainer's and the earlier engines' runtimes; unset, the trainer asks for what is free."""
    plan = lambda utilization: _tiny_plan(overhead_gib=2.0, rollout_gpu_memory_utilization=utilization)
    assert me.check_engine_start(plan(None), engines=3) == []
    assert me.check_engine_start(plan(0.9), engines=3) == []  # 72 GiB of the 74 left
    (error,) = me.check_engine_start(plan(0.95), engines=3)
    assert error.startswith("--rollout-gpu-memory-utilization 0.95 asks vLLM to find 76.0 GiB free at start-up, but "
                            "the last of 3 engine(s) starting on a training GPU finds about 74.0 GiB")


def test_memory_terms_follow_the_flags():
    base = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(), TINY, TINY_TEACHER)[0].components}
    fp32 = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(bf16=False, distributed_optimizer=False),
                                                          TINY, TINY_TEACHER)[0].components}
    assert fp32["student parameters"] == 820_480            # 4 B x 205,120
    assert fp32["optimizer state (Adam)"] == 1_640_960      # 8 B x 205,120, no master copy, not sharded
    # fp32 activations: 4 x 24 x 2 x (384 + 768) + 4 x 4 x 576 x 2 = 221,184 + 18,432 = 239,616 per layer
    assert fp32["student activations"] == 2 * 239_616 + 2 * 4 * 24 * 2 * 64
    budget = _tiny_plan(max_tokens_per_microbatch=47)  # s = 24: one full-length sequence per microbatch at worst
    assert (budget.micro_batch_rows, budget.num_microbatches) == (1, 4)
    budget_terms = {c.name: c.bytes for c in me.estimate_memory(budget, TINY, TINY_TEACHER)[0].components}
    assert budget_terms["teacher hidden states (microbatch)"] == base["teacher hidden states (microbatch)"] // 2
    assert _tiny_plan(max_tokens_per_microbatch=480).micro_batch_rows == 2  # at most --micro-batch-size
    unfused = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(fused_kl=False), TINY, TINY_TEACHER)[0].components}
    assert unfused["logits + gradient"] == 196_608             # 2 x 2 x 24 x 1024 x 2 B
    assert unfused["teacher logits (one microbatch)"] == 98_304  # 2 x 24 x 1024 x 2 B
    assert unfused["teacher hidden states (microbatch)"] == base["teacher hidden states (microbatch)"]
    k1 = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(kl="k1"), TINY, TINY_TEACHER)[0].components}
    assert "teacher hidden states (microbatch)" not in k1 and k1["logits + gradient"] == 196_608
    topk = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(kl="topk", topk=8), TINY, TINY_TEACHER)[0].components}
    assert "teacher hidden states (microbatch)" not in topk
    assert topk["teacher top-k (local batch)"] == 9_600      # 4 sequences x 24 x (k 8 x (8 + 4) + 4) B
    assert topk["top-k tail temporaries"] == 638_976         # 13 B x [2, 24, 1024]
    flash_gpus = me.estimate_memory(_tiny_plan(attention_backend="sdpa"), TINY, TINY_TEACHER)
    flash = {c.name: c.bytes for c in flash_gpus[0].components}
    assert "attention score buffer" not in flash
    # sdpa: no s^2 scores; attention keeps 4ad + 3gd = 352 per token: 96 x (384 + 352 + 512) = 119,808 per layer
    assert flash["student activations"] == 2 * 119_808 + 12_288
    # recompute: selective drops the s^2 scores (27,648 per layer); full keeps one layer input (2 x 24 x 2 x 64 =
    # 6,144 B) per unit and recomputes a unit at a time, after the loss's backward freed its vocabulary terms
    # (fused KL 96,256 + weight gradient 131,072 = 227,328 > one layer's 119,808: the recomputation adds nothing)
    selective = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(recompute_granularity="selective"), TINY,
                                                               TINY_TEACHER)[0].components}
    assert selective["student activations"] == 2 * (138_240 - 27_648) + 12_288
    assert "attention score buffer" in selective  # the local spec still allocates its buffer
    full = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(
        attention_backend="sdpa", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        TINY, TINY_TEACHER)[0].components}
    assert full["student activations"] == 2 * 6_144 + 0 + 12_288
    unfused_full = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(
        attention_backend="sdpa", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
        kl="k1", micro_batch_size=1), TINY, TINY_TEACHER)[0].components}
    # b = 1: a layer is 59,904 B, the loss phase 2 x 24 x 1024 x 2 (logits + gradient) + 131,072 = 229,376
    assert unfused_full["student activations"] == 2 * 3_072 + 0 + 6_144
    block = {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(
        attention_backend="sdpa", recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
        TINY, TINY_TEACHER)[0].components}
    assert block["student activations"] == 6_144 + 119_808 + 0 + 12_288
    # PP = 2 on 2 ranks (DP 1): the first stage keeps 2 microbatches of its 1 layer, the last stage 1 + its logits
    pp = me.estimate_memory(_tiny_plan(pipeline_parallel=2), TINY, TINY_TEACHER)
    assert [g.role for g in pp] == ["each replica's first rank (first stage + rollout engine)", "last pipeline stage"]
    first, last = ({c.name: c.bytes for c in g.components} for g in pp)
    assert first["student activations"] == 138_240 * 1 * 2 and "fused KL (chunk + hidden gradient)" not in first
    assert last["student activations"] == 138_240 + 12_288
    assert last["teacher hidden states (microbatch)"] == 2 * (2 * 15 * 64 * 2)  # this microbatch and the next (CUDA)
    separate = me.estimate_memory(_tiny_plan(rollout_gpus=1, placement="ray", engines=1), TINY, TINY_TEACHER)
    assert [g.role for g in separate] == ["rank 0 (first stage)", "rollout GPU"]
    assert {c.name for c in separate[1].components} == {"vLLM weights", "vLLM KV cache", "vLLM runtime"}


def test_a_vllm_teacher_moves_the_teacher_from_the_training_gpus_to_an_engine():
    base = me.estimate_memory(_tiny_plan(kl="k3", placement="rank0", device_type="cpu"), TINY, TINY_TEACHER)
    vllm = me.estimate_memory(_tiny_plan(kl="k3", teacher_backend="vllm", placement="rank0", device_type="cpu"), TINY,
                              TINY_TEACHER)
    rank0, other = ({c.name: c.bytes for c in g.components} for g in vllm)
    assert "teacher parameters" not in rank0 and "teacher parameters" not in other
    # teacher engine: HF params 4 x 36,992 + 2 x 1000 x 64 + 64 = 276,032 x 2 B; KV 1 GiB; sampler 8 x 256 x 1000
    assert rank0["vLLM teacher weights"] == 552_064
    assert rank0["vLLM teacher KV cache"] == GIB and rank0["vLLM teacher runtime"] == 2_048_000
    assert vllm[0].total_bytes == base[0].total_bytes - 558_208 + 552_064 + GIB + 2_048_000
    assert vllm[1].total_bytes == base[1].total_bytes - 558_208
    topk = me.estimate_memory(_tiny_plan(kl="topk", topk=8, teacher_backend="vllm"), TINY, TINY_TEACHER)
    for gpu in topk:  # the vLLM teacher's top-k arrives with the batch on every rank
        assert {c.name: c.bytes for c in gpu.components}["teacher top-k (local batch)"] == 9_600
    separate = me.estimate_memory(_tiny_plan(kl="k3", teacher_backend="vllm", rollout_gpus=2, placement="ray",
                                             engines=1), TINY, TINY_TEACHER)
    assert [g.role for g in separate] == ["rank 0 (first stage)", "rollout GPU", "teacher engine GPU"]
    assert {c.name for c in separate[2].components} == {"vLLM teacher weights", "vLLM teacher KV cache",
                                                         "vLLM teacher runtime"}
    # two vLLM teachers (several --teacher): an engine each; on the rank-0 GPU one is awake at a time (the larger
    # counts), on Ray each has its GPU; in host memory both sleep at level 1
    two = (TINY_TEACHER, TINY)
    plan = _tiny_plan(kl="k3", teacher_backend="vllm", placement="rank0")
    one, shared = me.estimate_memory(plan, TINY, TINY_TEACHER), me.estimate_memory(plan, TINY, two)
    # TINY's engine is the smaller: the same awake peak, and the second engine's runtime (it stays while asleep)
    assert shared[0].total_bytes == one[0].total_bytes + 2_048_000
    apart = me.estimate_memory(_tiny_plan(kl="k3", teacher_backend="vllm", rollout_gpus=3, placement="ray",
                                          engines=1), TINY, two)
    assert [g.role for g in apart] == ["rank 0 (first stage)", "rollout GPU", "teacher engine 1 GPU",
                                       "teacher engine 2 GPU"]
    host = {c.name: c.bytes for c in me.host_memory_per_node(_tiny_plan(kl="k3", teacher_backend="vllm"), TINY, two)}
    assert host == {"vLLM teacher weights (asleep, level 1)": 2 * (276_032 + me.hf_param_count(TINY)) * 2}


def test_tropd_guidance_adds_a_teacher_engine_beside_the_colocated_teacher():
    """The guidance prefixes' writer: the vLLM teacher's three terms on the engine's GPU, the co-located teacher
    staying on every training GPU."""
    from megatron_scope.config import BaselineConfig

    plain = me.estimate_memory(_tiny_plan(algorithm="tropd", kl="k1", topk=8, placement="rank0", device_type="cpu"), TINY,
                               TINY_TEACHER)
    guided = me.estimate_memory(_tiny_plan(algorithm="tropd", kl="k1", topk=8, placement="rank0", device_type="cpu",
                                           baselines=BaselineConfig(tropd_prefix_fraction=0.5)), TINY, TINY_TEACHER)
    rank0, other = ({c.name: c.bytes for c in g.components} for g in guided)
    assert rank0["teacher parameters"] == other["teacher parameters"] == 558_208
    assert rank0["vLLM teacher weights"] == 552_064 and rank0["vLLM teacher KV cache"] == GIB
    assert guided[0].total_bytes == plain[0].total_bytes + 552_064 + GIB + 2_048_000
    assert guided[1].total_bytes == plain[1].total_bytes


def test_a_vllm_reference_moves_exopds_reference_from_the_training_gpus_to_an_engine():
    local = me.estimate_memory(_tiny_plan(algorithm="exopd", placement="rank0", device_type="cpu"), TINY,
                               TINY_TEACHER, TINY_TEACHER)
    remote = me.estimate_memory(_tiny_plan(algorithm="exopd", placement="rank0", device_type="cpu",
                                           reference_backend="vllm"), TINY, TINY_TEACHER, TINY_TEACHER)
    local0, remote0, remote1 = ({c.name: c.bytes for c in g.components} for g in (local[0], *remote))
    assert local0["reference parameters (ExOPD)"] == 558_208  # the 4-layer reference, like the teacher
    assert "reference parameters (ExOPD)" not in remote0 and "reference parameters (ExOPD)" not in remote1
    assert remote0["vLLM reference weights"] == 552_064 and remote0["vLLM reference KV cache"] == GIB
    assert remote[0].total_bytes == local[0].total_bytes - 558_208 + 552_064 + GIB + 2_048_000
    separate = me.estimate_memory(_tiny_plan(algorithm="exopd", reference_backend="vllm", rollout_gpus=2,
                                             placement="ray", engines=1), TINY, TINY_TEACHER, TINY_TEACHER)
    assert [g.role for g in separate] == ["rank 0 (first stage)", "rollout GPU", "reference engine GPU"]


def test_fit_error_names_the_largest_term():
    plan = _tiny_plan(gpu_memory_gib=0.5)  # the 1 GiB KV cache alone exceeds it
    errors = me.fit_errors(plan, me.estimate_memory(plan, TINY, TINY_TEACHER))
    assert len(errors) == 1
    assert "each replica's first rank (first stage + rollout engine)" in errors[0] and "--gpu-memory-gib 0.5" in errors[0]
    assert "largest term: vLLM weights + KV cache beyond the step" in errors[0] and "--rollout-kv-cache-gib" in errors[0]


# ---------------------------------------------------------------------------------------------- checks
def _errors(**overrides):
    return me.check_parallel_sizes(_tiny_plan(**overrides), {"student": TINY, "teacher": TINY_TEACHER})


def test_valid_layout_has_no_errors():
    assert _errors() == []
    assert _errors(nproc_per_node=8, tensor_parallel=2, pipeline_parallel=2, prompts_per_step=2) == []


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    (error,) = _errors(nproc_per_node=6, tensor_parallel=4)
    assert "world size 6 (--nnodes 1 x --nproc-per-node 6)" in error
    assert "--tensor-model-parallel-size 4 x --pipeline-model-parallel-size 1 = 4" in error


def test_prompts_per_step_must_divide_by_data_parallel_size():
    (error,) = _errors(nproc_per_node=8, prompts_per_step=12)
    assert "--prompts-per-step 12 is not divisible by the data-parallel size 8" in error


def test_local_sequences_must_split_into_microbatches():
    (error,) = _errors(group_size=3, micro_batch_size=4)
    assert "6 sequences per data-parallel rank" in error and "--micro-batch-size 4" in error


def test_model_shapes_must_split_over_tp_and_pp():
    odd = DecoderArch(num_layers=3, hidden_size=96, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=102,
                      vocab_size=1000)
    errors = me.check_parallel_sizes(_tiny_plan(nproc_per_node=8, tensor_parallel=4, pipeline_parallel=2,
                                                prompts_per_step=1),
                                     {"student": odd})
    text = "\n".join(errors)
    assert len(errors) == 4, text
    assert "the student (--student-hf) has 6 attention heads, not divisible by --tensor-model-parallel-size 4" in text
    assert "3 key/value heads (num_query_groups), neither a multiple nor a divisor of --tensor-model-parallel-size 4" in text
    assert "3 layers, not divisible by --pipeline-model-parallel-size 2" in text
    assert "ffn (intermediate) size 102, not divisible by --tensor-model-parallel-size 4" in text
    # fewer key/value heads than TP is fine when TP is a multiple of them (megatron-core all-gathers QKV)
    assert _errors(nproc_per_node=4, tensor_parallel=4, prompts_per_step=1, group_size=2) == []


def test_rollout_tensor_parallel_checks():
    errors = _errors(rollout_tensor_parallel=3, placement="rank0")
    assert any("--rollout-tensor-parallel-size 3" in e and "4 attention heads" in e for e in errors)
    assert any("--rollout-tensor-parallel-size 3 exceeds --nproc-per-node 2" in e for e in errors)
    assert any("--rollout-gpus 3 is not a multiple of --rollout-tensor-parallel-size 2" in e
               for e in _errors(rollout_gpus=3, rollout_tensor_parallel=2, placement="ray", engines=1))


def test_sequence_length_must_fit_both_models():
    (error,) = me.check_sequence_length(_tiny_plan(max_prompt_tokens=30, max_new_tokens=40),
                                        {"student": TINY, "teacher": DecoderArch(**{**TINY.__dict__,
                                                                                   "max_position_embeddings": 128})})
    assert "prompt (30 tokens, --max-prompt-tokens) + --max-new-tokens 40 = 70" in error
    assert "the student's max_position_embeddings 64 (--student-hf config.json)" in error
    assert me.check_sequence_length(_tiny_plan(max_prompt_tokens=24, max_new_tokens=40), {"student": TINY}) == []


def test_kv_cache_must_hold_one_full_length_sequence():
    # 256 B/token x max_model_len 64 = 16,384 B: 1e-5 GiB (10,737 B) is too little
    errors, _ = me.check_rollout_kv_cache(_tiny_plan(rollout_kv_cache_gib=1e-5), TINY)
    assert len(errors) == 1 and "--rollout-kv-cache-gib 1e-05 cannot hold one sequence of max_model_len 64" in errors[0]
    errors, notes = me.check_rollout_kv_cache(_tiny_plan(rollout_kv_cache_gib=2e-5), TINY)
    # 21,474 B hold 21,474 // (256 x 25) = 3 full sequences; 8 sampled per step would decode together
    assert errors == [] and "holds 3 full sequences (25 tokens) at once; 8 would decode together" in notes[0]


def test_vocabulary_must_cover_the_tokenizer():
    errors, _ = me.check_vocabulary(1001, {"student": TINY, "teacher": TINY_TEACHER})
    assert len(errors) == 2
    assert "the student's vocabulary (1000 rows, --student-hf config.json) does not cover the tokenizer's 1001" in errors[0]
    assert me.check_vocabulary(1000, {"student": TINY}) == ([], [])
    _, notes = me.check_vocabulary(None, {"student": TINY, "teacher": DecoderArch(**{**TINY.__dict__,
                                                                                  "vocab_size": 1024})})
    assert "config vocab sizes differ (student 1000, teacher 1024)" in notes[0]


# ---------------------------------------------------------------------------------------------- the CLI
TINY_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 128,
    "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "vocab_size": 512, "max_position_embeddings": 16384, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
TINY_QWEN3 = {**TINY_QWEN2, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 64}


def _model_dir(root, name, config):
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def tiny_models(tmp_path):
    student = _model_dir(tmp_path, "student", TINY_QWEN2)
    teacher = _model_dir(tmp_path, "teacher", {**TINY_QWEN2, "num_hidden_layers": 4, "tie_word_embeddings": False})
    return tmp_path, student, teacher


def _argv(student, teacher, data, *extra):
    return ["--student-hf", student, "--teacher-hf", teacher, "--tokenizer", os.path.join(student, "absent.model"),
            "--train-data", data, "--nnodes", "1", "--nproc-per-node", "2", "--tensor-model-parallel-size", "2",
            "--prompts-per-step", "4", "--scope-group-size", "4", "--micro-batch-size", "2",
            "--max-new-tokens", "100", "--max-prompt-tokens", "28", "--bf16", "--rollout-kv-cache-gib", "0.5", *extra]


def test_cli_run_that_fits(tiny_models, capsys):
    root, student, teacher = tiny_models
    assert check_config.main(_argv(student, teacher, str(root / "x.jsonl"))) == 0
    out = capsys.readouterr().out
    assert "launch: 1 node(s) x 2 = 2 ranks; TP 2 x PP 1 x DP 1" in out
    assert "teacher hidden states (microbatch)" in out and "host memory: the (self-)teacher" in out
    assert "rollout: vLLM engines of TP 2 on training GPUs (one per data-parallel replica, 1 in all), asleep" in out
    assert out.rstrip().endswith("OK")
    assert check_config.main(_argv(student, teacher, str(root / "x.jsonl"), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["facts"]["seq_length"] == 128  # 28 + 100 - 1 rounded up to 8
    assert result["facts"]["padded_vocab"] == 512 and result["facts"]["local_sequences"] == 16
    rank0 = result["memory"]["gpus"][0]
    assert rank0["fits"] and rank0["total_bytes"] == sum(c["bytes"] for c in rank0["components"])


def test_cli_models_ray_engines_and_the_async_schedule(tiny_models, capsys):
    """Ray engines have GPUs of their own: by default one per engine (x its TP), the rollout's and --teacher-engines
    for a vLLM teacher; the training GPUs hold no engine; the notes name the schedule's overlap and the rollouts the
    leader holds ahead (η + 1 steps' responses at most), and PROPS's rounds in series."""
    root, student, teacher = tiny_models
    argv = _argv(student, teacher, str(root / "x.jsonl"), "--rollout-engines", "2", "--teacher-backend", "vllm",
                 "--scope-kl", "k3", "--teacher-engines", "3", "--rollout-schedule", "async", "--max-staleness", "2",
                 "--rollout-sampler", "props", "--props-rounds", "4", "--json")
    assert check_config.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["facts"]["rollout_gpus"] == 5 and result["facts"]["rollout_placement"] == "ray"
    roles = [gpu["role"] for gpu in result["memory"]["gpus"]]
    assert roles[-2:] == ["rollout GPU", "teacher engine GPU"]
    assert not [c for c in result["memory"]["gpus"][0]["components"] if "engine" in c["name"] or "KV" in c["name"]]
    note = next(n for n in result["notes"] if n.startswith("rollout: 5 Ray engine(s)"))
    assert "on 5 GPUs of their own" in note and "2 GPUs train" in note and "max(rollout, training) + refit" in note
    assert "up to 2 step(s) ahead of training" in note
    held = next(n for n in result["notes"] if n.startswith("host memory: the rollout leader"))
    assert "holds up to 3 step(s)' rollouts produced ahead, at most 3 x 1,600 response tokens" in held  # 4 x 4 x 100
    assert any(n.startswith("rollout: --rollout-sampler props draws each group in 4 rounds") for n in result["notes"])


def test_cli_notes_partial_rollouts(tiny_models, capsys):
    root, student, teacher = tiny_models
    argv = _argv(student, teacher, str(root / "x.jsonl"), "--rollout-engines", "1", "--rollout-schedule", "async",
                 "--max-staleness", "1", "--partial-rollout-tokens", "30", "--json")
    assert check_config.main(argv) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    note = next(n for n in notes if n.startswith("rollout: --partial-rollout-tokens 30"))
    assert "a refit waits for one segment of the rollout in progress, not the whole rollout; a response takes up to " \
           "4 requests" in note  # 100 tokens in segments of 30


def test_cli_run_that_does_not_fit(tiny_models, capsys):
    root, student, teacher = tiny_models
    argv = _argv(student, teacher, str(root / "x.jsonl"), "--gpu-memory-gib", "2", "--max-new-tokens", "12000",
                 "--overhead-gib", "0", "--attention-backend", "local")
    assert check_config.main(argv) == 1
    out = capsys.readouterr().out
    error = next(line for line in out.splitlines() if line.startswith("ERROR: each replica's first 2 ranks"))
    # megatron-core's local attention keeps the s^2 scores of every layer: they dominate
    assert "more than --gpu-memory-gib 2; largest term: student activations" in error
    assert check_config.main(argv + ["--allow-overcommit"]) == 0
    assert "WARNING: each replica's first 2 ranks" in capsys.readouterr().out


def test_cli_reports_config_errors(tiny_models, capsys):
    root, student, teacher = tiny_models
    argv = _argv(student, teacher, str(root / "x.jsonl"), "--tensor-model-parallel-size", "3",
                 "--max-new-tokens", "20000")
    assert check_config.main(argv) == 1
    out = capsys.readouterr().out
    assert "world size 2 (--nnodes 1 x --nproc-per-node 2) is not a multiple of --tensor-model-parallel-size 3" in out
    assert "--max-new-tokens 20000 = 20028 exceeds the student's max_position_embeddings 16384" in out
    assert check_config.main(["--student-hf", str(root), "--tokenizer", "t", "--train-data", "d",
                              "--scope-algorithm", "grpo"]) == 1
    assert f"--student-hf {root}: no config.json there" in capsys.readouterr().out
    no_teacher = _argv(student, teacher, "d")
    del no_teacher[no_teacher.index("--teacher-hf"):no_teacher.index("--teacher-hf") + 2]
    assert check_config.main(no_teacher) == 1
    assert "--scope-algorithm scope reads the teacher: give --teacher-hf" in capsys.readouterr().out


def test_cli_refuses_a_vllm_teacher_for_a_full_vocabulary_kl(tiny_models, capsys):
    root, student, teacher = tiny_models
    argv = _argv(student, teacher, str(root / "x.jsonl"), "--teacher-backend", "vllm")
    assert check_config.main(argv) == 1
    assert "--scope-kl reverse needs the teacher's logits over the vocabulary; a vLLM teacher" in capsys.readouterr().out
    assert check_config.main(argv + ["--scope-kl", "k3"]) == 0
    out = capsys.readouterr().out
    assert "vLLM teacher weights" in out and "teacher parameters" not in out


def test_cli_measures_prompts_and_checks_the_tokenizer_vocabulary(tiny_models, capsys):
    from megatron_scope.data.tokenizer import train_tokenizer

    root, student, teacher = tiny_models
    corpus = root / "corpus.txt"
    corpus.write_text("what is 12 plus 30 ?\nthe answer is 42\n" * 20)
    with capsys.disabled():  # sentencepiece's trainer needs the real stderr's file descriptor
        tokenizer = train_tokenizer(corpus, root / "tok.model", vocab_size=40)
    data = root / "train.jsonl"
    prompts = ["what is 12 plus 30 ?", "what is 1 plus 2 plus 3 plus 4 ?"]
    data.write_text("".join(json.dumps({"id": str(i), "prompt": p, "answer": "1"}) + "\n" for i, p in enumerate(prompts)))
    argv = _argv(student, teacher, str(data), "--json")
    argv[argv.index("--tokenizer") + 1] = str(root / "tok.model")
    del argv[argv.index("--max-prompt-tokens"):argv.index("--max-prompt-tokens") + 2]
    assert check_config.main(argv) == 0
    facts = json.loads(capsys.readouterr().out)["facts"]
    assert facts["max_prompt_tokens"] == max(len(tokenizer.encode(p)) + 1 for p in prompts)  # + BOS
    assert facts["tokenizer_vocab"] == tokenizer.vocab_size
    small = _model_dir(root, "small", {**TINY_QWEN2, "vocab_size": tokenizer.vocab_size - 1})
    argv[argv.index("--student-hf") + 1] = small
    assert check_config.main(argv) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert any(f"the student's vocabulary ({tokenizer.vocab_size - 1} rows" in e for e in errors)

    # two experts, each its own tokenizer: the one that differs from --tokenizer is named
    corpus.write_text("an expert whose words differ: 7 times 6 is 42\n" * 20)
    with capsys.disabled():
        train_tokenizer(corpus, root / "other.model", vocab_size=40)
    argv[argv.index("--student-hf") + 1] = student
    del argv[argv.index("--teacher-hf"):argv.index("--teacher-hf") + 2]
    argv += ["--teacher", f"a={teacher}", "--teacher", f"b={teacher}", "--teacher-route-key", "domain",
             "--teacher-tokenizer", f"a={root / 'tok.model'}", "--teacher-tokenizer", f"b={root / 'other.model'}"]
    assert check_config.main(argv) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert [e.split(":")[0] for e in errors if "--teacher-tokenizer" in e] == [
        f"--teacher-tokenizer of the teacher b ({root / 'other.model'})"]


# ---------------------------------------------------------------------------------------------- launch scripts
SCRIPTS = {"launch_paper.sh": TINY_QWEN2, "launch_qwen3_scaling.sh": TINY_QWEN3}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_launch_script_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", "scope", script)], check=True)


def _script_env(tmp_path, config, **extra):
    student = _model_dir(tmp_path, "student", config)
    teacher = _model_dir(tmp_path, "teacher", {**config, "num_hidden_layers": 4})
    recorder = tmp_path / "torchrun"  # stands in for torchrun: records the command line it was given
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "json.dump(sys.argv[1:], open(os.environ['RECORD_ARGV'], 'w'))\n")
    recorder.chmod(0o755)
    env = {**os.environ, "NNODES": "1", "NPROC_PER_NODE": "2", "STUDENT_HF": student, "TEACHER_HF": teacher,
           "MODEL_ROOT": str(tmp_path), "TRAIN_DATA": str(tmp_path / "train.jsonl"), "SAVE_DIR": str(tmp_path / "save"),
           "PYTHON": sys.executable, "TORCHRUN": str(recorder), "RECORD_ARGV": str(tmp_path / "argv.json"), **extra}
    return env


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_launch_script_dry_run_passes_the_check(tmp_path, script):
    """DRY_RUN=1 runs tools/check_config.py with exactly the script's flags on tiny configs, and stops."""
    env = _script_env(tmp_path, SCRIPTS[script], DRY_RUN="1")
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\nOK\n" in done.stdout and "DRY_RUN=1, would run:" in done.stdout
    assert not (tmp_path / "argv.json").exists()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_launch_script_flags_parse_in_the_trainer(tmp_path, script):
    """The command line the script hands torchrun is accepted by the trainer's parser as it stands (EVAL_DATA's sets
    validated every EVAL_INTERVAL iterations)."""
    env = _script_env(tmp_path, SCRIPTS[script], SKIP_CHECK="1", EVAL_DATA="aime24=/d/aime24.jsonl math500=/d/m.parquet")
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    entry = argv.index("megatron_scope.train")
    assert argv[:entry] == ["--nnodes", "1", "--nproc-per-node", "2", "--node-rank", "0", "--master-addr",
                            "127.0.0.1", "--master-port", "29500", "-m"]
    config = parse_run_config(argv[entry + 1:])
    assert (config.rollout.group_size, config.rollout.prompts_per_step, config.rollout.max_new_tokens,
            config.optimizer.lr, config.loss.tau) == (8, 256, 12288, 5e-5, 1.0)
    assert config.models.bf16 and config.optimizer.use_distributed_optimizer and config.loss.algorithm == "scope"
    assert config.models.student_hf == env["STUDENT_HF"] and config.models.tokenizer == env["STUDENT_HF"]
    assert config.data.prompt_template == ("{prompt}\nPlease reason step by step, and put your final answer within "
                                           "\\boxed{}.")
    assert config.data.apply_chat_template
    assert config.validation.data == (("aime24", "/d/aime24.jsonl"), ("math500", "/d/m.parquet"))
    assert (config.validation.interval, config.validation.samples_per_prompt) == (10, 16)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_launch_script_stops_when_the_check_fails(tmp_path, script):
    """set -e: a failing check (here a PYTHON that exits 1) stops the script before torchrun."""
    env = _script_env(tmp_path, SCRIPTS[script], PYTHON="false")
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert not (tmp_path / "argv.json").exists()  # torchrun never started


def test_launch_paper_selects_the_released_recipe_with_one_variable(tmp_path):
    """RECIPE=released hands torchrun the authors' released recipe; the trainer's parser accepts it."""
    env = _script_env(tmp_path, TINY_QWEN2, SKIP_CHECK="1", RECIPE="released")
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", "launch_paper.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    config = parse_run_config(argv[argv.index("megatron_scope.train") + 1:])
    loss = config.loss
    assert (loss.kl, loss.teacher_path_loss, loss.student_path_exponent, loss.loss_agg_mode) == \
        ("k1", "ppo", -1, "scope-released")
    assert config.rollout.temperature == loss.logprob_temperature == 0.6
    assert (config.optimizer.lr_decay_style, config.optimizer.weight_decay) == ("constant", 0.01)
    bad = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", "launch_paper.sh")],
                         env={**env, "RECIPE": "neither"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "RECIPE must be paper or released" in bad.stderr


# Qwen3-8B / Qwen3-32B (Qwen/Qwen3-8B, Qwen/Qwen3-32B config.json): the scaling script's largest pair (issue #16).
QWEN3_8B = {**QWEN3_1_7B, "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
            "num_hidden_layers": 36, "tie_word_embeddings": False}
QWEN3_32B = {**QWEN3_8B, "hidden_size": 5120, "intermediate_size": 25600, "num_attention_heads": 64,
             "num_hidden_layers": 64}


QWEN3_14B = {**QWEN3_8B, "hidden_size": 5120, "intermediate_size": 17408, "num_attention_heads": 40,
             "num_hidden_layers": 40}


@pytest.mark.parametrize("script, student, teacher, names, decoding, recompute", [
    ("launch_paper.sh", R1_DISTILL_1_5B, QWEN25_7B, ("Qwen3-8B", "Qwen3-32B"), 83, ""),
    ("launch_qwen3_scaling.sh", QWEN3_8B, QWEN3_32B, ("Qwen3-8B", "Qwen3-32B"), 96, ""),
    ("launch_qwen3_scaling.sh", QWEN3_14B, QWEN3_32B, ("Qwen3-14B", "Qwen3-32B"), None,
     "--recompute-granularity full --recompute-method block --recompute-num-layers 3"),
], ids=["paper-1.5B-from-7B", "qwen3-8B-from-32B", "qwen3-14B-from-32B"])
def test_the_launch_scripts_full_kl_runs_fit_80_gib_gpus(tmp_path, script, student, teacher, names, decoding,
                                                         recompute):
    """The paper's run (4 x 8 GPUs, TP 2, full reverse KL, 2048-token prompts + 12288 new) and the scaling script's
    Qwen3-8B and Qwen3-14B from Qwen3-32B (TP 4) with the memory settings the scripts pass (sequence parallelism, the
    least recompute that fits: none, none, and 3 of 14B's 40 layers): the dry run says they fit, and each node's
    pinned host memory, the teacher's hidden states included, stays within 256 GiB."""
    env = {**os.environ, "DRY_RUN": "1", "STUDENT_HF": _model_dir(tmp_path, "student", student),
           "TEACHER_HF": _model_dir(tmp_path, "teacher", teacher), "TOKENIZER": str(tmp_path / "absent.model"),
           "TEACHER_TOKENIZER": "", "TRAIN_DATA": str(tmp_path / "absent.jsonl"), "PYTHON": sys.executable,
           "CHECK_ARGS": "--max-prompt-tokens 2048 --json", "STUDENT": names[0], "TEACHER": names[1]}  # names set TP
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout[:done.stdout.index("DRY_RUN=1, would run:")])
    gpus = result["memory"]["gpus"]
    assert result["ok"] and all(gpu["fits"] and gpu["total_bytes"] < 80 * GIB for gpu in gpus), gpus
    names = {c["name"] for c in gpus[0]["components"]}
    assert "fused KL (chunk + hidden gradient)" in names and "logits + gradient" not in names
    # one engine per data-parallel replica on its first stage's TP GPUs, asleep while they train; none on rank 0 alone
    tp = result["facts"]["tensor_parallel"]
    assert result["facts"]["rollout_placement"] == "colocated" and result["facts"]["rollout_tensor_parallel"] == tp
    assert [gpu["role"] for gpu in gpus] == [f"each replica's first {tp} ranks (first stage + rollout engine)"]
    assert {"vLLM weights + KV cache beyond the step", "vLLM runtime"} <= names and "vLLM weights" not in names
    # with the training state offloaded while the engines generate, 8B <- 32B's KV cache decodes >= 96 full-length
    # sequences together (the paper's run: 83 in its 16 GiB)
    if decoding is not None:
        (note,) = [note for note in result["notes"] if "would decode together" in note]
        assert int(re.search(r"holds (\d+) full sequences", note).group(1)) >= decoding
    launch = done.stdout[done.stdout.index("DRY_RUN=1, would run:"):]
    assert "--rl-offload-optimizer-during-inference" in launch and "--rl-offload-teacher-during-inference" in launch
    assert "--sequence-parallel" in launch
    # RECOMPUTE=auto: the least recompute that fits, passed to the run and reported
    assert result["least_recompute"]["flags"] == recompute.split()
    assert (recompute in launch) if recompute else "--recompute" not in launch
    # the pinned host memory of a node: 111, 215 and 233 GiB (the teacher's states: each TP rank's slices)
    assert 0 < result["host_memory_per_node"]["total_bytes"] <= 256 * GIB


def test_the_paper_run_merging_two_7b_experts_fits_80_gib_gpus(tmp_path):
    """G-OPD's merge setting at the paper's scale: launch_paper.sh with TEACHERS (two 7B experts, --teacher each, routed
    by TEACHER_ROUTE_KEY) instead of TEACHER_HF: both experts co-located at TP 2 (twice one teacher's parameters,
    offloaded while the engines generate), the widest one's hidden states; it fits 80 GiB and a node's 256 GiB of
    pinned host memory. With TEACHER_RESIDENCY=scoring the experts take turns: one body and two output layers."""
    experts = " ".join(f"{name}={_model_dir(tmp_path, name, QWEN25_7B)}" for name in ("math", "code"))
    env = {**os.environ, "DRY_RUN": "1", "STUDENT_HF": _model_dir(tmp_path, "student", R1_DISTILL_1_5B),
           "TEACHERS": experts, "TEACHER_ROUTE_KEY": "domain", "TOKENIZER": str(tmp_path / "absent.model"),
           "TRAIN_DATA": str(tmp_path / "absent.jsonl"), "PYTHON": sys.executable,
           "CHECK_ARGS": "--max-prompt-tokens 2048 --json"}

    def dry_run(**extra):
        done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", "launch_paper.sh")],
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout[:done.stdout.index("DRY_RUN=1, would run:")]), done.stdout

    result, stdout = dry_run()
    (gpu,) = result["memory"]["gpus"]
    assert result["ok"] and gpu["fits"] and gpu["total_bytes"] < 80 * GIB
    teachers = {c["name"]: c for c in gpu["components"]}["teacher parameters"]
    one_teacher = me.stage_param_count(arch_from_hf_config(QWEN25_7B), 2, 1, 0, 152064)
    assert teachers["bytes"] == 2 * 2 * one_teacher and "2 teachers" in teachers["detail"]
    turns, turns_stdout = dry_run(TEACHER_RESIDENCY="scoring")
    (turns_gpu,) = turns["memory"]["gpus"]
    terms = {c["name"]: c["bytes"] for c in turns_gpu["components"]}
    head = 152064 // 2 * 3584
    assert terms["teacher parameters (scoring pass)"] == 2 * (one_teacher - head)
    assert terms["teacher output layers"] == 2 * 2 * head
    assert turns_gpu["total_bytes"] == gpu["total_bytes"] - 2 * (one_teacher - head)  # one expert's body less
    assert "--teacher-residency scoring" in turns_stdout
    assert result["facts"]["teachers"] == 2 and result["facts"]["teacher_params"] == 2 * me.hf_param_count(
        arch_from_hf_config(QWEN25_7B))
    assert 0 < result["host_memory_per_node"]["total_bytes"] <= 256 * GIB
    launch = stdout[stdout.index("DRY_RUN=1, would run:"):]
    assert "--teacher-route-key domain" in launch and "--teacher-hf" not in launch
    # each expert's own tokenizer (its HF directory) is compared with --tokenizer's (not here: a note says so)
    assert [f"--teacher-tokenizer {expert}" in launch for expert in experts.split()] == [True, True]
    assert any("--teacher-tokenizer of the teacher math" in note for note in result["notes"])


# Qwen3-4B (Qwen/Qwen3-4B): 36 layers of width 2560, 32 query and 8 key/value heads of 128, tied.
QWEN3_4B = {**QWEN3_1_7B, "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
            "num_hidden_layers": 36}


def test_the_merge_launch_script_distills_two_experts_by_exopd(tmp_path):
    """launch_merge_experts.sh (G-OPD's merge setting on Qwen3-4B, 4 x 8 GPUs): ExOPD at λ 1.25 from two routed
    experts of the student's shape, taking turns on the GPUs (one expert's body, both output layers), the initial
    student as the co-located reference; it fits 80 GiB GPUs, and each expert's tokenizer is checked."""
    experts = " ".join(f"{name}={_model_dir(tmp_path, name, QWEN3_4B)}" for name in ("math", "code"))
    env = {**os.environ, "DRY_RUN": "1", "STUDENT_HF": _model_dir(tmp_path, "student", QWEN3_4B), "TEACHERS": experts,
           "TOKENIZER": str(tmp_path / "absent.model"), "TRAIN_DATA": str(tmp_path / "absent.jsonl"),
           "PYTHON": sys.executable, "CHECK_ARGS": "--max-prompt-tokens 2048 --json"}
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "scope", "launch_merge_experts.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout[:done.stdout.index("DRY_RUN=1, would run:")])
    gpus = result["memory"]["gpus"]
    assert result["ok"] and all(gpu["fits"] and gpu["total_bytes"] < 80 * GIB for gpu in gpus), gpus
    terms = {c["name"]: c["bytes"] for c in gpus[0]["components"]}
    arch = arch_from_hf_config(QWEN3_4B)
    head = 152064 // 2 * 2560  # the vocabulary padded to a multiple of 128 x TP
    assert terms["teacher parameters (scoring pass)"] == 2 * (me.stage_param_count(arch, 2, 1, 0, 152064) - head)
    assert terms["teacher output layers"] == 2 * 2 * head and "reference parameters (ExOPD)" in terms
    launch = done.stdout[done.stdout.index("DRY_RUN=1, would run:"):]
    for flags in ("--scope-algorithm exopd", "--exopd-lambda 1.25", "--teacher-route-key domain",
                  "--teacher-residency scoring", *(f"--teacher {e}" for e in experts.split()),
                  *(f"--teacher-tokenizer {e}" for e in experts.split())):
        assert flags in launch, flags


def test_sequence_parallelism_divides_the_replicated_activations_by_tp():
    """TP = 2 with and without --sequence-parallel: each layer's 6h term (norm inputs and outputs, the QKV and fc1
    inputs) is / t, and on the last stage the final norm's input; the fused KL still keeps the all-gathered hidden
    states; a recomputed layer keeps its sequence shard of the input."""
    def activations(**flags):
        return {c.name: c.bytes for c in me.estimate_memory(_tiny_plan(tensor_parallel=2, **flags), TINY,
                                                            TINY_TEACHER)[0].components}["student activations"]

    # e s b = 2 x 24 x 2 = 96 per hidden unit; h = 64: 6h = 36,864 B per layer, half of it saved on 2 layers;
    # last stage: the final norm's input 6,144 B, half saved (the fused KL's gathered input is not)
    assert activations() - activations(sequence_parallel=True) == 2 * 36_864 // 2 + 6_144 // 2
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    # 2 kept layer inputs of 6,144 B each, halved, and the final norm's input (the recomputed layer's activations
    # fit in the room the loss's backward freed: not in the peak either way)
    assert activations(**full) - activations(sequence_parallel=True, **full) == 2 * 6_144 // 2 + 6_144 // 2


def test_least_recompute_is_the_cheapest_setting_that_fits():
    """none, then selective (only where attention stores s^2 scores), then full recompute of 1 .. L/p layers
    (block): the first whose every GPU fits, and what each costs in step FLOPs."""
    plan = _tiny_plan(device_type="cpu", placement="rank0")
    assert [c["recompute_granularity"] for c in me.recompute_candidates(plan, TINY)] == [None, "selective", "full",
                                                                                        "full"]
    assert [c["recompute_granularity"] for c in me.recompute_candidates(_tiny_plan(attention_backend="sdpa"),
                                                                       TINY)] == [None, "full", "full"]
    totals = {}
    for options in me.recompute_candidates(plan, TINY):
        candidate = me.with_recompute(plan, options)
        totals[tuple(me.recompute_flags(candidate.config.models))] = \
            max(g.total_bytes for g in me.estimate_memory(candidate, TINY, TINY_TEACHER))
    block1 = ("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1")
    assert totals[()] > totals[("--recompute-granularity", "selective")] > totals[block1]
    between = (totals[block1] + totals[("--recompute-granularity", "selective")]) / 2 / GIB  # selective misses
    chosen, gpus = me.least_recompute(dataclasses.replace(plan, gpu_memory_gib=between), TINY, TINY_TEACHER)
    assert me.recompute_flags(chosen.config.models) == list(block1)
    assert max(g.total_bytes for g in gpus) <= between * GIB
    assert me.least_recompute(dataclasses.replace(plan, gpu_memory_gib=1e-3), TINY, TINY_TEACHER) is None
    # step FLOPs on one GPU: n s = 4 x 24 = 96 tokens; per layer 2 P + 2 a d s; output layer 2 V h; x 3; recompute
    # adds the forward of its layers (selective: the attention's 2 a d s)
    layer = 2 * me.layer_param_count(TINY) + 2 * 4 * 16 * 24
    forward = 96 * (2 * layer + 2 * 1024 * 64)
    assert me.step_flops(plan, TINY) == (3 * forward, 0)
    assert me.step_flops(chosen, TINY) == (3 * forward, 96 * layer)
    selective = me.with_recompute(plan, dict(recompute_granularity="selective", recompute_method=None,
                                             recompute_num_layers=None))
    assert me.step_flops(selective, TINY) == (3 * forward, 96 * 2 * 2 * 4 * 16 * 24)


def test_exopds_reference_counts_its_own_parameters():
    """ExOPD's frozen π_ref is the initial student unless --exopd-reference-hf names another model (G-OPD's reward
    correction), whose parameters are then the ones counted."""
    plan = _tiny_plan(algorithm="exopd", kl="reverse")
    terms = lambda *archs: {c.name: c.bytes for c in me.estimate_memory(plan, *archs)[0].components}  # noqa: E731
    student_ref, teacher_ref = terms(TINY, TINY_TEACHER), terms(TINY, TINY_TEACHER, TINY_TEACHER)
    assert student_ref["reference parameters (ExOPD)"] == student_ref["student parameters"]
    assert teacher_ref["reference parameters (ExOPD)"] == teacher_ref["teacher parameters"]


@pytest.mark.parametrize("teacher,bytes_per_element", [("ema", 4), ("current", 2)])
def test_srpo_self_teacher_memory_terms_by_hand(teacher, bytes_per_element):
    """SRPO's self-teacher: no teacher parameters; the EMA teacher is a float32 copy of the student's stage; the
    distribution the loss reads comes from hidden states of the student's width, float32 for the EMA teacher."""
    from megatron_scope.config import BaselineConfig

    config = tiny_run_config(models=dict(teacher_hf=None, bf16=True), rollout=dict(prompts_per_step=4, group_size=2,
                                                                               max_new_tokens=15, kv_cache_gib=1.0),
                             loop=dict(micro_batch_size=2), optimizer=dict(use_distributed_optimizer=True),
                             loss=dict(algorithm="srpo", baselines=BaselineConfig(srpo_teacher=teacher)))
    plan = me.RunPlan(config=config, nnodes=1, nproc_per_node=2, max_prompt_tokens=10, rollout_element_bytes=2,
                      gpu_memory_gib=80.0, overhead_gib=0.0, device_type="cpu")
    terms = {c.name: c.bytes for c in me.estimate_memory(plan, TINY)[0].components}
    assert "teacher parameters" not in terms
    assert terms.get("SRPO EMA teacher parameters") == (4 * 205_120 if teacher == "ema" else None)
    # b = 2, s = 24, h = 64 (the student's); hidden states at the response rows, at most 15 a sequence
    assert terms["teacher hidden states (microbatch)"] == 2 * 15 * 64 * bytes_per_element
    assert terms["teacher logits (one microbatch)"] == 2 * 24 * 1024 * bytes_per_element
    assert me.teacher_hidden_host_bytes(plan, TINY, None) == 2 * (-(-2 * 15 * 64 * bytes_per_element // 512) * 512)
