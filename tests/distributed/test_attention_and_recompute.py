"""Memory-saving model options against megatron-core's local spec without recompute (one process, TP=1):
torch SDPA attention (`--attention-backend sdpa`, no stored s^2 scores) and activation recompute
(`--recompute-granularity full/selective`; selective recomputes the local spec's core attention, whose causal
mask is then built inside backward) give the same loss and gradients, at TP=1 and at TP=2 x PP=2,
on a grouped-query-attention model. Weights and reference gradients travel through dist_checkpointing, so
Megatron reshards them into each rank's shard (as in test_megatron_smoke.py)."""

import pytest
import torch

from megatron_scope.megatron.arch import DecoderArch
from megatron_scope.megatron.sft import lm_forward_backward
from megatron_scope.testing.checkpoint_compare import current_grads, load_weights, relative_errors, save_grads, save_weights
from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.tiny import tiny_batches

pytestmark = pytest.mark.slow
GQA_ARCH = DecoderArch(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                       vocab_size=500, max_position_embeddings=256, add_qkv_bias=True)  # tiny_batches' vocabulary
NUM_MICROBATCHES = 2
RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}


def _reference(rank, world_size, ckpt_dir):
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=7)
    model = build_gpt_model(GQA_ARCH, attention_backend="local")
    save_weights(model, f"{ckpt_dir}/weights")
    losses = lm_forward_backward(model, tiny_batches(NUM_MICROBATCHES))
    save_grads(model, current_grads(model), f"{ckpt_dir}/grads")
    return losses


def _variant(rank, world_size, ckpt_dir, tp, pp, backend, recompute):
    from megatron.core import parallel_state

    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=1000 + rank)
    model = build_gpt_model(GQA_ARCH, attention_backend=backend, **RECOMPUTE[recompute])
    load_weights(model, f"{ckpt_dir}/weights")
    losses = lm_forward_backward(model, tiny_batches(NUM_MICROBATCHES))
    return {"losses": losses if parallel_state.is_pipeline_last_stage() else None,
            "grad_errors": relative_errors(model, current_grads(model), f"{ckpt_dir}/grads")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("attention_reference"))
    (losses,) = run_on_ranks(_reference, 1, args=(ckpt_dir,))
    return ckpt_dir, losses


@pytest.mark.parametrize("tp,pp,backend,recompute", [
    (1, 1, "sdpa", "none"), (2, 2, "sdpa", "full"), (2, 2, "local", "selective"),
], ids=["sdpa", "sdpa-tp2pp2-full", "local-tp2pp2-selective"])
def test_same_loss_and_gradients_as_the_local_spec(reference, tp, pp, backend, recompute):
    ckpt_dir, reference_losses = reference
    results = run_on_ranks(_variant, tp * pp, args=(ckpt_dir, tp, pp, backend, recompute))
    for result in results:
        if result["losses"] is not None:
            torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference_losses), rtol=1e-5,
                                       atol=0)
    checked = 0
    for rank, result in enumerate(results):
        for name, rel_err in result["grad_errors"].items():
            assert rel_err < 1e-5, f"rank {rank}: gradient of {name} differs (max rel err {rel_err:.2e})"
            checked += 1
    assert checked >= 2 * GQA_ARCH.num_layers


def test_bad_attention_settings_are_named():
    from megatron_scope.megatron.attention import gpt_layer_spec, transformer_engine_available

    with pytest.raises(ValueError, match="--attention-backend must be one of"):
        gpt_layer_spec(False, "local", "flash")
    if not transformer_engine_available():
        with pytest.raises(ValueError, match="--transformer-impl transformer_engine needs the transformer_engine"):
            gpt_layer_spec(False, "transformer_engine")
