"""Partial rollouts (--partial-rollout-tokens L): a step's responses are generated in segments of at most L tokens, and
the engines' weights may change between two segments, so a refit waits for the segment in progress instead of the
step's slowest response (in-flight weight updates at segment granularity; slime's --partial-rollout, NeMo-RL's
in-flight weight updates).

A response that is not done after a segment continues as a request of its own: its prompt plus its tokens so far,
at most L more tokens, seeded from the "resubmission" stream with the segment's number (`rollout.seeds`), so a
continuation never replays an earlier segment's noise. The engine reads the whole prefix again with the weights it
holds now (no KV cache computed by older weights is reused), so every token is an exact sample of the version that drew
it given its prefix, and its sampler log-prob μ is that version's: the off-policy corrections (`--rollout-is*`,
`--rollout-rs*`) see the true sampler of every token. Each response records its versions as runs
(`Completion.versions`); the group's `weight_version` is its first segment's, the oldest, which the staleness bound
(`rollout.producer`) holds to.

The engines' `generate` blocks until its last response ends, so the segment is the unit a refit can interrupt; with
vLLM's incremental engine (AsyncLLM's `pause_generation(mode="keep")`) a refit could instead interrupt any decoding
step, at the price of continuing on KV cache entries that older weights computed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from megatron_scope.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_scope.rollout.seeds import StepSeeds


def generate_in_segments(engine: RolloutEngine, prompts: Sequence[Sequence[int]], params: SamplingParams,
                         seeds: StepSeeds, indices: Sequence[int], segment_tokens: int, version: int,
                         between_segments: Callable[[], int]) -> list[list[Completion]]:
    """`params.n` responses per prompt drawn in segments of at most `segment_tokens` (module docstring): sample j of
    prompt i (the step's prompt `indices[i]`) starts as `engine.generate` draws it with its "rollout" seed, and its
    segment k >= 1 has the "resubmission" seed of segment k. The engines hold weights of `version` for the first
    segment; `between_segments()` runs before each later one (a refit may happen inside it) and returns the version
    they hold then. Each response's `versions` lists its runs."""
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
    if params.props is not None:
        raise ValueError("generate_in_segments: PROPS draws a group in rounds of whole responses; it does not combine "
                         "with segments")
    prompts = [list(p) for p in prompts]
    cap = params.max_new_tokens
    first = engine.generate(prompts, params, seeds.groups(indices, params.n, "rollout"),
                            [min(segment_tokens, cap)] * len(prompts))
    drawn = [[_Drawn(c.token_ids, c.log_probs, c.finish_reason, [(0, version)]) for c in group] for group in first]
    single = dataclasses.replace(params, n=1)
    segment = 1
    while unfinished := [(i, j) for i, group in enumerate(drawn) for j, d in enumerate(group) if d.open(cap)]:
        version = between_segments()
        continued = engine.generate(
            [prompts[i] + drawn[i][j].token_ids for i, j in unfinished], single,
            [[seeds.seed(indices[i], j, "resubmission", segment)] for i, j in unfinished],
            [min(segment_tokens, cap - len(drawn[i][j].token_ids)) for i, j in unfinished])
        for (i, j), (completion,) in zip(unfinished, continued, strict=True):
            drawn[i][j].extend(completion, version)
        segment += 1
    return [[d.completion() for d in group] for group in drawn]


@dataclasses.dataclass
class _Drawn:
    """A response's segments so far."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str
    versions: list[tuple[int, int]]

    def open(self, cap: int) -> bool:
        """Not done: its last segment ended at the segment's length, below the response's cap."""
        return self.finish_reason == "length" and len(self.token_ids) < cap

    def extend(self, completion: Completion, version: int) -> None:
        if version != self.versions[-1][1]:
            self.versions.append((len(self.token_ids), version))
        self.token_ids += completion.token_ids
        self.log_probs += completion.log_probs
        self.finish_reason = completion.finish_reason

    def completion(self) -> Completion:
        return Completion(self.token_ids, self.log_probs, self.finish_reason, tuple(self.versions))


def token_versions(completion: Completion, weight_version: int) -> list[tuple[int, int]]:
    """(tokens, version) of each run of `completion`'s tokens sampled by one version (`weight_version`, its group's,
    when it records none)."""
    runs = completion.versions or ((0, weight_version),)
    ends = [start for start, _ in runs[1:]] + [len(completion.token_ids)]
    return [(end - start, version) for (start, version), end in zip(runs, ends)]
