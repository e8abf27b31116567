"""Partial rollouts: responses drawn in segments, the weights possibly changing between two, are exact samples of each
token's version given its prefix, stamped with that version, and seeded so no segment replays another's noise."""

import math
import random

import pytest
import torch

from megatron_scope.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_scope.rollout.partial import generate_in_segments, token_versions
from megatron_scope.rollout.props import PropsSampling
from megatron_scope.rollout.seeds import StepSeeds

# version -> next-token distribution given the last token (the prompt's last for the first); token 3 is the stop token
CHAINS = {
    0: torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
                    dtype=torch.float64),
    1: torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.6, 0.1, 0.2, 0.1], [0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]],
                    dtype=torch.float64),
}
STOP = 3


class ChainEngine(RolloutEngine):
    """A Markov chain sampled as vLLM samples: each request draws from its own generator seeded with its seed;
    the chain is `CHAINS[self.version]`; `stop_token_ids` end a response (kept). Records each call."""

    def __init__(self):
        self.version, self.calls = 0, []

    def generate(self, prompts, params, seeds=None, max_new_tokens=None):
        caps = max_new_tokens or [params.max_new_tokens] * len(prompts)
        self.calls.append((self.version, [list(p) for p in prompts], params.n, seeds, list(caps)))
        chain, out = CHAINS[self.version], []
        for prompt, group, cap in zip(prompts, seeds, caps, strict=True):
            completions = []
            for seed in group:
                generator, tokens, log_probs, reason = random.Random(seed), [], [], "length"
                while len(tokens) < cap:
                    probs = chain[(list(prompt) + tokens)[-1]].tolist()
                    tokens.append(generator.choices(range(4), probs)[0])
                    log_probs.append(math.log(probs[tokens[-1]]))
                    if tokens[-1] in params.stop_token_ids:
                        reason = "stop"
                        break
                completions.append(Completion(tokens, log_probs, reason))
            out.append(completions)
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError


def test_segments_join_into_whole_responses_each_token_stamped_with_its_version():
    """Segments of 3 tokens, responses of at most 8: the first segment draws every response with its "rollout" seed,
    each later one only the open responses, each as its own request (prompt + tokens so far, at most 3 more) on the
    resubmission stream; a refit between the first and second segments (version 0 -> 1) shows in each token's
    log-prob and in the responses' version runs."""
    engine, seeds, indices = ChainEngine(), StepSeeds(11, 4), [5, 6, 7]
    params = SamplingParams(n=4, max_new_tokens=8, stop_token_ids=(STOP,))
    boundaries = []

    def between_segments():
        boundaries.append(len(engine.calls))
        engine.version = 1  # the first boundary refits; later ones find it done
        return engine.version

    prompts = [[0], [1, 2], [2]]
    groups = generate_in_segments(engine, prompts, params, seeds, indices, 3, 0, between_segments)
    first = engine.calls[0]
    assert first == (0, prompts, 4, seeds.groups(indices, 4, "rollout"), [3, 3, 3])
    assert boundaries == list(range(1, len(engine.calls)))  # one boundary before every later segment
    open_after = {(i, j) for i, group in enumerate(groups) for j, c in enumerate(group) if len(c.token_ids) > 3}
    assert open_after and len(open_after) < 12  # some continue, some stopped inside the first segment
    version, continued, n, call_seeds, caps = engine.calls[1]
    assert version == 1 and n == 1 and len(continued) == len(open_after)
    for k, (version, requests, _, call_seeds, caps) in enumerate(engine.calls[1:], start=1):
        for request, (seed,), cap in zip(requests, call_seeds, caps):
            i, j = next((i, j) for i, j in open_after if seed == seeds.seed(indices[i], j, "resubmission", k))
            assert request == prompts[i] + groups[i][j].token_ids[:3 * k]  # prompt + tokens so far
            assert cap == min(3, 8 - 3 * k)
    for i, group in enumerate(groups):
        for j, c in enumerate(group):
            assert 1 <= len(c.token_ids) <= 8 and STOP not in c.token_ids[:-1]
            assert c.finish_reason == ("stop" if c.token_ids[-1] == STOP else "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == 8
            assert c.versions == (((0, 0), (3, 1)) if (i, j) in open_after else ((0, 0),))
            context = prompts[i] + c.token_ids
            for t, (token, log_prob) in enumerate(zip(c.token_ids, c.log_probs)):
                chain = CHAINS[0 if t < 3 else 1]
                assert log_prob == pytest.approx(math.log(chain[context[len(prompts[i]) + t - 1], token]))
            assert token_versions(c, 0) == ([(3, 0), (len(c.token_ids) - 3, 1)] if (i, j) in open_after
                                            else [(len(c.token_ids), 0)])
    assert token_versions(Completion([1, 2], [0.0, 0.0], "length"), 4) == [(2, 4)]


def _chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_segments_of_one_token_sample_the_chain_exactly():
    """Every token its own segment (each a new request with its own seed): the joint law of a response's first three
    tokens is the chain's, by Pearson's χ² over 64 cells (63 degrees of freedom, 99.9% quantile 103.4). A continuation
    that replayed the first segment's noise (same seed) would draw each token with the same uniform: χ² in the
    thousands."""
    engine, count = ChainEngine(), 6000
    params = SamplingParams(n=2, max_new_tokens=3)
    groups = generate_in_segments(engine, [[0]] * (count // 2), params, StepSeeds(3, 1), range(count // 2), 1, 0,
                                  lambda: 0)
    observed = torch.zeros(4, 4, 4, dtype=torch.float64)
    for group in groups:
        for c in group:
            observed[tuple(c.token_ids)] += 1
    chain = CHAINS[0]
    expected = count * chain[0][:, None, None] * chain[:, :, None] * chain[None, :, :]
    assert _chi_square(observed, expected) < 103.4
    assert len(engine.calls) == 3  # one call per segment, all open responses together


def test_bad_segment_lengths_and_props_are_refused():
    engine = ChainEngine()
    with pytest.raises(ValueError, match="segment_tokens must be >= 1"):
        generate_in_segments(engine, [[0]], SamplingParams(max_new_tokens=4), StepSeeds(0, 1), [0], 0, 0, lambda: 0)
    props = SamplingParams(n=2, max_new_tokens=4, props=PropsSampling())
    with pytest.raises(ValueError, match="PROPS"):
        generate_in_segments(engine, [[0]], props, StepSeeds(0, 1), [0], 2, 0, lambda: 0)
    assert not engine.calls
