"""A remote teacher's view of the rollouts, from a vLLM engine: its log-prob of every sampled response token
and, for --scope-kl topk, its top-k next tokens at every response position.

For prompt p and response r the engine scores the sequence x = p + r (`RolloutEngine.score` /
`score_topk`: one temperature-1 value per token after the first), and the last |r| positions are the
teacher's view of the response: log π_T(r_t | p, r_<t), the input of the sampled-token KL estimators
(k1/k2/k3) and of SCOPE's teacher-path perplexity weights, and the top-k (ids, log π_T) of the top-k KL.
A teacher that returns too few, too many or non-finite values for a sequence is an error naming the prompt
and the sample, never a zero.
"""

from __future__ import annotations

import math
from typing import Sequence

from megatron_scope.rollout.engine import Completion, SequenceScores


def score_responses(engine, prompt_ids: Sequence[str], prompts: Sequence[Sequence[int]],
                    samples: Sequence[Sequence[Completion]], topk: int = 0,
                    vocab_size: int | None = None) -> list[list[SequenceScores]]:
    """result[i][j]: the teacher's scores of samples[i][j]'s tokens given prompts[i] (empty for an empty
    response); with `topk` > 0 also its top-k at each response position, every id below `vocab_size`."""
    sequences, where = [], []
    for i, (prompt, group) in enumerate(zip(prompts, samples)):
        for j, completion in enumerate(group):
            if completion.token_ids:
                sequences.append(list(prompt) + list(completion.token_ids))
                where.append((i, j))
    if not sequences:
        scores = []
    elif topk:
        scores = engine.score_topk(sequences, topk)
    else:
        scores = [SequenceScores(list(values), [], []) for values in engine.score(sequences)]
    if len(scores) != len(sequences):
        raise RuntimeError(f"the teacher engine returned {len(scores)} scored sequences for {len(sequences)}")
    result = [[SequenceScores([], [], []) for _ in group] for group in samples]
    for (i, j), sequence, scored in zip(where, sequences, scores):
        where_text = f"prompt {prompt_ids[i]!r}, response {j}"
        expected = len(sequence) - 1
        lengths = [len(scored.log_probs)] + ([len(scored.topk_ids), len(scored.topk_log_probs)] if topk else [])
        if any(length != expected for length in lengths):
            raise RuntimeError(f"{where_text}: the teacher engine returned {lengths[0]} log-probs"
                               f"{f' and {lengths[1]}/{lengths[2]} top-k lists' if topk else ''} for a sequence of "
                               f"{len(sequence)} tokens (expected {expected})")
        start = len(prompts[i]) - 1
        response = SequenceScores(list(scored.log_probs[start:]), [list(ids) for ids in scored.topk_ids[start:]],
                                  [list(lps) for lps in scored.topk_log_probs[start:]])
        values = response.log_probs + [v for lps in response.topk_log_probs for v in lps]
        if not all(math.isfinite(v) for v in values):
            raise RuntimeError(f"{where_text}: the teacher engine returned a non-finite log-prob: "
                               f"{[v for v in values if not math.isfinite(v)][:3]}")
        for t, (ids, lps) in enumerate(zip(response.topk_ids, response.topk_log_probs)):
            if len(ids) != topk or len(lps) != topk or len(set(ids)) != topk:
                raise RuntimeError(f"{where_text}, token {t}: the teacher engine returned {len(set(ids))} distinct "
                                   f"top-k ids and {len(lps)} log-probs, expected {topk}")
            if vocab_size is not None and max(ids) >= vocab_size:
                raise RuntimeError(f"{where_text}, token {t}: the teacher's top-{topk} holds id {max(ids)}, an "
                                   f"embedding row past the tokenizer's {vocab_size} tokens (the checkpoint's "
                                   "padding); a co-located teacher (--teacher-backend megatron) masks those rows")
        result[i][j] = response
    return result
