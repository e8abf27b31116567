"""--sequence-parallel: the same SCOPE step with and without Megatron's sequence parallelism, at TP = 2 and
TP = 2 x PP = 2 (gloo; token-budget microbatches of three widths): a tiny student and a co-located tiny teacher
(`teacher_pass` keeps each TP rank's share of the teacher's hidden states at the response rows, half of them, in a
reused `HostBuffer`; the step all-gathers them), both through the fused KL from hidden states and through materialised
logits. Same loss, same gradients on every rank after `finalize_model_grads` (whose TP sum of the norms' gradients
is what makes sequence parallelism correct: the test also shows that without that sum the norms' gradients
differ), same exported weights."""

import pytest
import torch

from megatron_scope.megatron.arch import DecoderArch
from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.rollout.batch import split_by_token_budget
from megatron_scope.testing.tiny import TINY_ARCH, split_microbatches, tiny_rollout_batch

pytestmark = pytest.mark.slow
TEACHER_ARCH = DecoderArch(num_layers=2, hidden_size=64, num_attention_heads=2, num_query_groups=2,
                           ffn_hidden_size=128, vocab_size=TINY_ARCH.vocab_size, max_position_embeddings=256,
                           qk_layernorm=True)  # query/key norms: summed over TP, never sequence-split


def _step(rank, world_size, tp, pp, sequence_parallel, fused):
    from megatron.core import parallel_state

    from megatron_scope.config import LossConfig
    from megatron_scope.megatron.loss_func import add_group_inputs, reduce_reports, row_share
    from megatron_scope.megatron.model import build_gpt_model, output_layer_weight, unwrap_model, wrap_with_ddp
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.schedule import forward_backward
    from megatron_scope.megatron.weight_export import iter_hf_weights
    from megatron_scope.teacher.colocated import HostBuffer, teacher_pass

    initialize_model_parallel(tp, pp, seed=3)
    # with PP: token-budget microbatches of different widths (the stages exchange each tensor's shape)
    options = dict(sequence_parallel=sequence_parallel, variable_seq_lengths=pp > 1)
    student = wrap_with_ddp(build_gpt_model(TINY_ARCH, calculate_per_token_loss=True, **options))
    teacher = build_gpt_model(TEACHER_ARCH, **options).eval().requires_grad_(False)
    config = LossConfig(fused_kl=fused)
    batch = tiny_rollout_batch(seed=4)
    microbatches = split_by_token_budget(batch, 48, 4) if pp > 1 else split_microbatches(batch, 2)
    for batch in microbatches:  # the teacher's view replaces the stand-in's hidden states and logits
        del batch["teacher_logits"], batch["teacher_log_probs"]
    scored = teacher_pass(teacher, microbatches, config, TINY_ARCH.vocab_size, HostBuffer(pinned=False))
    last = parallel_state.is_pipeline_last_stage()
    hidden_rows = []  # (rows kept, one TP share of the response rows)
    if last:
        for batch, extras in zip(microbatches, scored):
            batch.update(extras)
            response_rows = max(int((batch["loss_mask"] > 0).sum()), 1)  # an empty microbatch keeps one row
            hidden_rows.append((batch["teacher_hidden"].shape[0], row_share(response_rows, tp)))
        add_group_inputs(microbatches, config)
    student.zero_grad_buffer()
    unfinished = {}  # the gradients as the schedule hands them to finalize_model_grads
    finalize = unwrap_model(student).config.finalize_model_grads_func

    def recording_finalize(*args, **kwargs):
        unfinished.update({name: p.main_grad.clone() for name, p in unwrap_model(student).named_parameters()})
        return finalize(*args, **kwargs)

    unwrap_model(student).config.finalize_model_grads_func = recording_finalize
    reports = forward_backward(student, microbatches, config, TINY_ARCH.vocab_size,
                               teacher_weight=output_layer_weight(teacher) if last else None)
    grads = {name: p.main_grad.clone() for name, p in unwrap_model(student).named_parameters()}
    marked = sorted(name for name, p in unwrap_model(student).named_parameters() if getattr(p, "sequence_parallel",
                                                                                            False))
    exported = {name: tensor.clone() for name, tensor in iter_hf_weights(student, TINY_ARCH)}  # rank 0 only
    return {"loss": reduce_reports(reports)["loss"] if last else None, "grads": grads, "unfinished": unfinished,
            "hidden_rows": hidden_rows, "marked": marked, "widths": [b["labels"].shape[1] for b in microbatches],
            "exported": exported}


@pytest.mark.parametrize("tp,pp,fused", [(2, 2, True), (2, 1, False)], ids=["tp2pp2-fused", "tp2-logits"])
def test_sequence_parallel_gives_the_same_step(tp, pp, fused):
    world = tp * pp
    plain = run_on_ranks(_step, world, args=(tp, pp, False, fused), timeout=300)
    split = run_on_ranks(_step, world, args=(tp, pp, True, fused), timeout=300)
    for rank, (ours, theirs) in enumerate(zip(split, plain)):
        if theirs["loss"] is not None:
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5), rank
            # each TP rank keeps its share of the teacher's hidden states at the response rows, with or without it
            assert theirs["hidden_rows"] == ours["hidden_rows"] and all(kept == share for kept, share in ours["hidden_rows"])
            assert len(set(ours["widths"])) == (1 if pp == 1 else 3), ours["widths"]
        assert ours["grads"].keys() == theirs["grads"].keys()
        for name, grad in ours["grads"].items():
            torch.testing.assert_close(grad, theirs["grads"][name], rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
        norms = [name for name in ours["grads"] if "layernorm" in name and "q_layernorm" not in name]
        assert norms and ours["marked"] == sorted(norms) and not theirs["marked"], rank
        # each rank's share of a norm's gradient before finalize_model_grads' TP sum: not yet the gradient
        assert ours["unfinished"] and any(not torch.allclose(ours["unfinished"][name], theirs["grads"][name],
                                                             rtol=1e-3) for name in norms)
        assert ours["exported"].keys() == theirs["exported"].keys()
        assert all(torch.equal(ours["exported"][k], theirs["exported"][k]) for k in theirs["exported"])
