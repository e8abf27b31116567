"""A remote teacher's view of the rollouts: its log-prob of every sampled response token, from a vLLM engine.

For prompt p and response r the engine scores the sequence x = p + r (`RolloutEngine.score`: one
temperature-1 log-prob log π_T(x_t | x_<t) per token after the first), and the last |r| values are the
teacher's log-probs of the response tokens, log π_T(r_t | p, r_<t): the inputs of the sampled-token KL
estimators (k1/k2/k3) and of SCOPE's teacher-path perplexity weights. A teacher that returns too few,
too many or non-finite values for a sequence is an error naming the prompt and the sample, never a zero.
"""

from __future__ import annotations

import math
from typing import Sequence

from megatron_scope.rollout.engine import Completion


def score_responses(engine, prompt_ids: Sequence[str], prompts: Sequence[Sequence[int]],
                    samples: Sequence[Sequence[Completion]]) -> list[list[list[float]]]:
    """result[i][j]: the teacher's log-probs of samples[i][j]'s tokens given prompts[i] ([] for an empty response)."""
    sequences, where = [], []
    for i, (prompt, group) in enumerate(zip(prompts, samples)):
        for j, completion in enumerate(group):
            if completion.token_ids:
                sequences.append(list(prompt) + list(completion.token_ids))
                where.append((i, j))
    scores = engine.score(sequences) if sequences else []
    if len(scores) != len(sequences):
        raise RuntimeError(f"the teacher engine returned {len(scores)} scored sequences for {len(sequences)}")
    result = [[[] for _ in group] for group in samples]
    for (i, j), sequence, values in zip(where, sequences, scores):
        values = list(values)
        if len(values) != len(sequence) - 1:
            raise RuntimeError(f"prompt {prompt_ids[i]!r}, response {j}: the teacher engine returned {len(values)} "
                               f"log-probs for a sequence of {len(sequence)} tokens (expected {len(sequence) - 1})")
        response = values[len(prompts[i]) - 1 :]
        if not all(math.isfinite(v) for v in response):
            raise RuntimeError(f"prompt {prompt_ids[i]!r}, response {j}: the teacher engine returned a non-finite "
                               f"log-prob: {[v for v in response if not math.isfinite(v)][:3]}")
        result[i][j] = response
    return result
