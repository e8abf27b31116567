"""PROPS for prompt groups (`rollout.props`, `rollout.props_logits_processor`): the behaviour policy against a float64
transcription of its formula and at the extremes, the per-token statistics against a brute-force prefix tree, the
sampling error it is there to lower (a toy policy over many seeds), and the logits processor's protocol under both of
vLLM 0.32's model runners (the real vLLM classes for the V1 batch updates and SamplingParams; stand-ins with Model
Runner V2's attribute names for its request state and batch context). The engine's end of it (the processed
log-probs of a real engine are the behaviour policy's) is in tests/integration/test_vllm_engine.py."""

from __future__ import annotations

import hashlib
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams as VLLMSamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from megatron_scope.rollout.props import (
    EXTRA_ARGS_KEY,
    PrefixTree,
    PropsSampling,
    behaviour_log_probs,
    prefix_statistics,
    round_slices,
)
from megatron_scope.rollout.props_logits_processor import PropsLogitsProcessor


def reference_behaviour(log_probs, tokens, counts, clip, step):
    """The module docstring's formula, transcribed element by element in float64."""
    pi = [math.exp(x) for x in log_probs.tolist()]
    total = sum(counts)
    p_hat = {t: c / total for t, c in zip(tokens, counts)}
    over = max(p_hat[t] / pi[t] for t in tokens) - 1
    beta = min(step, clip, clip / over if over > 0 else math.inf)
    return [(1 + beta) * p - beta * p_hat.get(a, 0.0) for a, p in enumerate(pi)], beta


@pytest.mark.parametrize("clip,step", [(0.3, 1.0), (0.3, 0.1), (0.9, 3.0), (0.0, 1.0)])
def test_behaviour_policy_is_the_clipped_mixture(clip, step):
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.randn(7, generator=generator, dtype=torch.float64).log_softmax(-1)
    tokens, counts = [2, 5, 0], [3, 1, 1]
    behaviour, beta = behaviour_log_probs(log_probs.clone(), tokens, counts, clip, step)
    expected, expected_beta = reference_behaviour(log_probs, tokens, counts, clip, step)
    assert beta == pytest.approx(expected_beta, abs=1e-15)
    torch.testing.assert_close(behaviour.exp(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert behaviour.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    ratio = (behaviour - log_probs).exp()
    assert ratio.min() >= 1 - clip - 1e-12 and ratio.max() <= 1 + clip + 1e-12
    if clip == 0:
        assert beta == 0 and torch.equal(behaviour, log_probs)  # π_b = π, bit for bit
    # the over-sampled token loses mass, the never-drawn ones gain it
    if beta > 0:
        assert ratio[2] < 1 and all(ratio[a] > 1 for a in (1, 3, 4, 6))


def test_the_unclipped_step_makes_the_expected_aggregate_the_policy():
    """β = N / m when the band allows it (N < m: here one earlier draw, three to come): after m more draws from π_b
    the expected empirical distribution of all N + m draws is π. (From the second of equal rounds on N >= m > ε, so
    there the band sets β.)"""
    log_probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()
    n, m = 1, 3
    behaviour, beta = behaviour_log_probs(log_probs, [0], [n], clip=0.5, step=n / m)
    p_hat = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    aggregate = (n * p_hat + m * behaviour.exp()) / (n + m)
    assert beta == pytest.approx(1 / 3)
    torch.testing.assert_close(aggregate, log_probs.exp(), rtol=0, atol=1e-15)


def test_extremes_a_confident_policy_and_impossible_tokens():
    # a confident policy (1 - 1e-7 on token 0) drawn twice at token 0 and once at a rare token
    probs = torch.tensor([1 - 1e-7, 5e-8, 5e-8, 0.0], dtype=torch.float64)
    log_probs = probs.log()  # token 3: -inf (a masked row)
    behaviour, beta = behaviour_log_probs(log_probs, [0, 1], [2, 1], clip=0.3, step=1.0)
    assert behaviour[3] == -math.inf and torch.isfinite(behaviour[:3]).all()
    ratio = (behaviour[:3] - log_probs[:3]).exp()
    assert ratio.min() >= 0.7 - 1e-9 and ratio.max() <= 1.3 + 1e-9 and beta > 0
    assert behaviour.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # in float32 (the engine's logits) the rows stay finite and normalised too
    behaviour32, _ = behaviour_log_probs(probs.float().log(), [0, 1], [2, 1], clip=0.3, step=1.0)
    assert behaviour32[3] == -math.inf and behaviour32.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_round_slices_and_bad_parameters():
    assert round_slices(8, 3) == [range(0, 2), range(2, 5), range(5, 8)]
    assert round_slices(4, 1) == [range(0, 4)] and round_slices(4, 4) == [range(k, k + 1) for k in range(4)]
    with pytest.raises(ValueError, match="1 <= rounds <= n"):
        round_slices(4, 5)
    with pytest.raises(ValueError, match="--props-clip must lie in"):
        PropsSampling(2, 1.0)
    with pytest.raises(ValueError, match="--props-rounds must be >= 1"):
        PropsSampling(0, 0.3)


def brute_force_statistics(responses):
    """log p̂ of each token drawn where >= 2 of the responses draw (every prefix, counted directly)."""
    out = []
    for response in responses:
        shares = []
        for t, token in enumerate(response):
            drawing = [r for r in responses if len(r) > t and list(r[:t]) == list(response[:t])]
            if len(drawing) < 2:
                break
            shares.append(math.log(sum(r[t] == token for r in drawing) / len(drawing)))
        out.append(shares)
    return out


def test_prefix_statistics_match_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        responses = [[rng.randrange(3) for _ in range(rng.randrange(0, 6))] for _ in range(rng.randrange(1, 9))]
        got = prefix_statistics(responses)
        expected = brute_force_statistics(responses)
        assert [len(g) for g in got] == [len(e) for e in expected], responses
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=1e-12)


# ---------------------------------------------------------------- the sampling error on a toy policy

VOCAB, DEPTH = 4, 3


def toy_log_probs(prefix) -> torch.Tensor:
    """A fixed policy: the next-token log-probs at each prefix, from a hash of the prefix."""
    seed = int.from_bytes(hashlib.blake2b(str(list(prefix)).encode(), digest_size=4).digest(), "little")
    generator = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(VOCAB, generator=generator, dtype=torch.float64)).log_softmax(-1)


def draw_group(group_size, props: PropsSampling | None, generator):
    responses = []
    slices = round_slices(group_size, props.rounds) if props else [range(group_size)]
    for samples in slices:
        tree = PrefixTree(responses)
        drawn = []
        for _ in samples:
            prefix, node = [], tree.root
            for _ in range(DEPTH):
                log_probs = toy_log_probs(prefix)
                if props and node:
                    log_probs, _ = behaviour_log_probs(log_probs, *PrefixTree.counts(node), props.clip,
                                                       len(responses) / len(samples))
                token = int(torch.multinomial(log_probs.exp(), 1, generator=generator))
                prefix.append(token)
                node = node[token][1] if node and token in node else None
            drawn.append(prefix)
        responses += drawn
    return responses


def sampling_error(responses) -> tuple[float, int]:
    """Σ_s N_s KL(p̂_s || π_s) and Σ_s N_s over the shared prefixes (`prefix_statistics`' token mean, summed)."""
    total, count = 0.0, 0
    for response, shares in zip(responses, prefix_statistics(responses)):
        for t, share in enumerate(shares):
            total += share - toy_log_probs(response[:t])[response[t]].item()
            count += 1
    return total, count


def test_the_token_mean_is_the_weighted_kl_of_the_empirical_distributions():
    responses = draw_group(8, None, torch.Generator().manual_seed(3))
    total, count = sampling_error(responses)
    tree, direct, draws = PrefixTree(responses), 0.0, 0
    stack = [([], tree.root)]
    while stack:  # Σ_s N_s Σ_a p̂ log(p̂ / π) over the nodes with N_s >= 2, directly
        prefix, node = stack.pop()
        tokens, counts = PrefixTree.counts(node)
        n = sum(counts)
        if n >= 2:
            pi = toy_log_probs(prefix).exp()
            direct += n * sum(c / n * math.log(c / n / pi[t].item()) for t, c in zip(tokens, counts))
            draws += n
        stack += [(prefix + [t], node[t][1]) for t in tokens]
    assert count == draws and total == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("group_size,rounds,clip,at_most", [(8, 4, 0.3, 0.95), (8, 8, 0.9, 0.8)])
def test_props_lowers_the_sampling_error_over_many_groups(group_size, rounds, clip, at_most):
    """The same toy policy, 300 groups each way (seeded, so round 1 draws alike): PROPS's groups are closer to the
    policy at their shared prefixes (token-weighted KL of the empirical distribution) than i.i.d. groups (measured:
    0.343 i.i.d.; 0.315 at ε = 0.3 in 4 rounds, 0.248 at ε = 0.9 in 8), and ε = 0 draws the i.i.d. ones."""
    errors = {}
    for name, props in (("iid", None), ("props", PropsSampling(rounds, clip)), ("zero", PropsSampling(rounds, 0.0))):
        total = count = 0
        for seed in range(300):
            group = draw_group(group_size, props, torch.Generator().manual_seed(seed))
            t, c = sampling_error(group)
            total, count = total + t, count + c
        errors[name] = total / count
    assert errors["zero"] == errors["iid"]
    assert errors["props"] < at_most * errors["iid"], errors


# ---------------------------------------------------------------- the logits processor's protocol

def props_params(earlier, clip=0.3, step=1.0, temperature=0.8):
    return VLLMSamplingParams(temperature=temperature, seed=1, extra_args={
        EXTRA_ARGS_KEY: {"earlier": earlier, "clip": clip, "step": step}})


def expected_row(logits_row, earlier_node_counts, temperature, clip=0.3, step=1.0):
    log_probs = torch.log_softmax(logits_row.double() / temperature, -1)
    behaviour, _ = behaviour_log_probs(log_probs, *earlier_node_counts, clip, step)
    return (behaviour * temperature).float()


def test_v1_processor_changes_only_requests_at_an_earlier_rounds_prefix():
    processor = PropsLogitsProcessor(None, torch.device("cpu"), False)
    assert not processor.is_argmax_invariant()
    earlier = [[3, 1], [3, 2], [0]]
    out_a, out_b, out_c = [], [], []
    processor.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, props_params(earlier), [9], out_a), (1, VLLMSamplingParams(temperature=1.0), [9], out_b),
        (2, props_params(earlier, temperature=1.0), [9], out_c)]))
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    after = processor.apply(logits.clone())
    torch.testing.assert_close(after[0], expected_row(before[0], ([3, 0], [2, 1]), 0.8), rtol=0, atol=1e-6)
    assert torch.equal(after[1], before[1])  # an iid request is untouched
    torch.testing.assert_close(after[2], expected_row(before[2], ([3, 0], [2, 1]), 1.0), rtol=0, atol=1e-6)
    # request 0 drew token 3 (the tree's shared node), request 2 token 4 (a prefix no earlier sample has)
    out_a.append(3)
    out_c.append(4)
    after = processor.apply(before.clone())
    torch.testing.assert_close(after[0], expected_row(before[0], ([1, 2], [1, 1]), 0.8), rtol=0, atol=1e-6)
    assert torch.equal(after[2], before[2]) and set(processor._requests) == {0}  # request 2 left the tree
    # a swap moves request 0's state to row 1; then it leaves the batch
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=[],
                                       moved=[(0, 1, MoveDirectionality.SWAP)]))
    after = processor.apply(before.clone())
    torch.testing.assert_close(after[1], expected_row(before[1], ([1, 2], [1, 1]), 0.8), rtol=0, atol=1e-6)
    assert torch.equal(after[0], before[0])
    processor.update_state(BatchUpdate(batch_size=2, removed=[1], added=[], moved=[]))
    assert torch.equal(processor.apply(before.clone()), before)
    # a request reaching the end of an earlier sample (no draw went on from there) is left alone
    out_d = []
    processor.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, props_params([[5]]), [9], out_d)]))
    out_d.append(5)
    assert torch.equal(processor.apply(before.clone()), before) and not processor._requests


def test_v2_processor_reads_the_committed_tokens_of_its_slots():
    """Model Runner V2: rows are batch positions, each mapped to a request slot; a slot's committed output is
    all_token_ids[slot, prompt_len : pos + 1]."""
    all_token_ids = torch.zeros(4, 16, dtype=torch.int32)
    prompt_len = np.zeros(4, dtype=np.int32)
    states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=all_token_ids),
                             prompt_len=SimpleNamespace(np=prompt_len))
    processor = PropsLogitsProcessor(None, states)
    earlier = [[3, 1], [3, 2], [0]]
    assert processor.add_request(2, props_params(earlier)) and not processor.add_request(0, VLLMSamplingParams())
    prompt_len[2], prompt_len[0] = 3, 2
    all_token_ids[2, :3] = torch.tensor([7, 7, 7])
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))

    def ctx(slots, positions):
        return SimpleNamespace(idx_mapping_np=np.array(slots), pos=torch.tensor(positions))

    # batch position 1 is slot 2 at its first sample (pos = prompt_len - 1); position 0 is the iid slot 0
    after = processor.apply(logits.clone(), ctx([0, 2], [1, 2]))
    assert torch.equal(after[0], logits[0])
    torch.testing.assert_close(after[1], expected_row(logits[1], ([3, 0], [2, 1]), 0.8), rtol=0, atol=1e-6)
    all_token_ids[2, 3] = 3  # it drew token 3; now batch position 0
    after = processor.apply(logits.clone(), ctx([2, 0], [3, 2]))
    torch.testing.assert_close(after[0], expected_row(logits[0], ([1, 2], [1, 1]), 0.8), rtol=0, atol=1e-6)
    all_token_ids[2, 4] = 4  # a prefix no earlier sample drew at: untouched from now on
    assert torch.equal(processor.apply(logits.clone(), ctx([2, 0], [4, 3])), logits)
    assert not processor.add_request(2, VLLMSamplingParams())  # the slot's next occupant: an iid request
    assert torch.equal(processor.apply(logits.clone(), ctx([2, 0], [1, 1])), logits)


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(top_p=0.9), dict(top_k=5)])
def test_processor_refuses_truncated_or_greedy_sampling(params):
    with pytest.raises(ValueError, match="PROPS sampling needs temperature > 0"):
        PropsLogitsProcessor.validate_params(VLLMSamplingParams(
            **params, extra_args={EXTRA_ARGS_KEY: {"earlier": [], "clip": 0.3, "step": 1.0}}))
    PropsLogitsProcessor.validate_params(VLLMSamplingParams(**params))  # without PROPS: not its business
