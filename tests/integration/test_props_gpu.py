"""PROPS's logits processor on a GPU (`pytest -m gpu tests/integration/test_props_gpu.py`): vLLM 0.32 runs Model
Runner V2 there by default, whose processor interface (`add_request`, `apply(logits, ctx)` reading the device's token
history) CI covers only with stand-ins (tests/unit/rollout/test_props.py). If this fails while the CPU twin
(test_vllm_engine.py::test_props_samples_from_the_behaviour_policy_within_its_band) passes, the V2 path of
`rollout/props_logits_processor.py` is wrong; VLLM_USE_V2_MODEL_RUNNER=0 runs the V1 path on the GPU."""

from __future__ import annotations

import pytest
import torch

from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine
from tests.integration.hf_models import random_qwen2, tiny_qwen2_config
from tests.integration.test_vllm_engine import PROMPTS, check_props_sampling, seeded


@pytest.mark.gpu
def test_props_samples_from_the_behaviour_policy_on_a_gpu(tmp_path):
    model = random_qwen2(tiny_qwen2_config(num_kv_heads=2, num_layers=2), seed=0)
    model.save_pretrained(tmp_path)
    engine = VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path), kv_cache_bytes=64 << 20, gpu_memory_utilization=0.3,
                                                max_model_len=256, max_num_seqs=32, props=True))
    try:
        check_props_sampling(engine, model.to("cuda"), PROMPTS[:2], seeded(PROMPTS[:2], 8, 11))
    finally:
        engine.close()
