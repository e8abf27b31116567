"""PROPS for LLM rollouts (`--rollout-sampler props`): a prompt group's G samples drawn in rounds, each round from a
behaviour policy that favours the tokens the earlier rounds under-sampled at their shared prefixes.

PROPS (Corrado & Hanna, arXiv 2311.08290) observes that on-policy learning needs on-policy *data*: the empirical
action distribution of a finite i.i.d. sample misses the policy (sampling error), and a behaviour policy that raises
the probability of under-sampled actions, within a clip band on ρ = π_b / π, brings the aggregate closer to it. In an
LLM a state is a prefix; the states that repeat are the prefixes a prompt's G samples share (all G share the
first token's). Here the G samples are drawn in r rounds (`round_slices`); at a prefix s where the earlier rounds
drew N_s tokens with empirical distribution p̂_s, round k samples from the mixture

    π_b(a | s) = (1 + β) π(a | s) - β p̂_s(a),    ρ(a) = π_b / π = 1 + β (1 - p̂_s(a) / π(a | s)),

which sums to 1, lowers the over-sampled tokens (p̂ > π) and raises all others. With β = (earlier samples) / (this
round's samples) the expected empirical distribution of all draws at s after the round is exactly π (at the root;
deeper, when the round reaches s in proportion to the earlier rounds); β is then cut so that ρ stays in PROPS's band
[1 - ε, 1 + ε]:

    β = min(step, ε, ε / (max_a p̂_s(a) / π(a | s) - 1)).

π is the final sampling distribution (after temperature), so the band holds on what is sampled, and vLLM's processed
log-probs record μ = π_b (the engine runs with logprobs_mode="processed_logprobs"). ε = 0 gives β = 0: π_b = π.

`rollout.props_logits_processor` applies that step inside vLLM's sampler; `prefix_statistics` measures the sampling
error PROPS reduces: KL(p̂_s || π(. | s)) at the shared prefixes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

EXTRA_ARGS_KEY = "megatron_scope_props"
"""The key of a request's PROPS state in vLLM's `SamplingParams.extra_args`: {"earlier": the token ids of the group's
samples drawn by earlier rounds, "clip": ε, "step": the largest β}."""


@dataclasses.dataclass(frozen=True)
class PropsSampling:
    """--rollout-sampler props's parameters."""

    rounds: int = 2
    """--props-rounds r: the rounds a group's G samples are drawn in (sizes differ by at most one)."""
    clip: float = 0.3
    """--props-clip ε: the behaviour policy keeps π_b / π within [1 - ε, 1 + ε] (PROPS's clip, its default 0.3)."""

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"--props-rounds must be >= 1, got {self.rounds}")
        if not 0 <= self.clip < 1:
            raise ValueError(f"--props-clip must lie in [0, 1) (π_b / π >= 1 - ε > 0), got {self.clip}")


def round_slices(n: int, rounds: int) -> list[range]:
    """The sample indices 0 .. n - 1 cut into `rounds` consecutive slices whose sizes differ by at most one."""
    if not 1 <= rounds <= n:
        raise ValueError(f"{rounds} PROPS rounds for groups of {n} samples: need 1 <= rounds <= n")
    bounds = [k * n // rounds for k in range(rounds + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(rounds)]


class PrefixTree:
    """The samples drawn so far at each prefix of a group's responses: node = {token: [count, child node]}."""

    def __init__(self, responses: Sequence[Sequence[int]] = ()):
        self.root: dict = {}
        for response in responses:
            node = self.root
            for token in response:
                entry = node.setdefault(int(token), [0, {}])
                entry[0] += 1
                node = entry[1]

    @staticmethod
    def counts(node: dict) -> tuple[list[int], list[int]]:
        """The tokens drawn at `node` and how often each was."""
        return list(node), [entry[0] for entry in node.values()]


def behaviour_log_probs(log_probs: torch.Tensor, tokens: Sequence[int], counts: Sequence[int], clip: float,
                        step: float) -> tuple[torch.Tensor, float]:
    """(log π_b, β) at one prefix (module docstring): `log_probs` [V] is log π, `tokens`/`counts` the earlier rounds'
    draws there. Exact in the dtype given (the processor passes float64)."""
    index = torch.tensor(list(tokens), dtype=torch.long, device=log_probs.device)
    empirical = torch.tensor(list(counts), dtype=log_probs.dtype, device=log_probs.device)
    empirical = empirical / empirical.sum()
    policy = log_probs[index].exp()
    over = float((empirical / policy).max()) - 1.0  # >= 0: some drawn token has p̂ >= π
    beta = min(step, clip, clip / over if over > 0 else math.inf)
    if beta <= 0:
        return log_probs, 0.0
    out = log_probs + math.log1p(beta)
    out[index] = ((1.0 + beta) * policy - beta * empirical).log()  # >= (1 - ε) π > 0
    return out, beta


def prefix_statistics(responses: Sequence[Sequence[int]]) -> list[list[float]]:
    """For each response of one group, log p̂_s(token) at each of its shared prefixes s: the prefixes at least two of
    the group's responses draw a token at (N_s >= 2), p̂_s the empirical distribution of those N_s draws. A response's
    shared prefixes are its first ones (a prefix drawn at once is drawn at no longer one), so result[i] holds response
    i's first len(result[i]) tokens. Work is proportional to the shared tokens, not to the responses' length.

    PROPS's sampling error at the shared prefixes, token-weighted, is then a mean over those tokens t:

        Σ_s N_s KL(p̂_s || π_s) / Σ_s N_s = mean_t (log p̂_s(t)(a_t) - log π(a_t | s(t))),

    since Σ_a N_s p̂_s(a) f(a) sums f over the N_s draws at s."""
    result: list[list[float]] = [[] for _ in responses]
    pending = [(list(range(len(responses))), 0)]  # responses that share a prefix of `depth` tokens
    while pending:
        members, depth = pending.pop()
        drawing = [i for i in members if len(responses[i]) > depth]
        if len(drawing) < 2:
            continue
        by_token: dict[int, list[int]] = {}
        for i in drawing:
            by_token.setdefault(int(responses[i][depth]), []).append(i)
        for followers in by_token.values():
            share = math.log(len(followers) / len(drawing))
            for i in followers:
                result[i].append(share)
            pending.append((followers, depth + 1))
    return result
