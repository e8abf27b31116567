"""A remote teacher's view of the rollouts, from a vLLM engine: its log-prob of every sampled response token
and, for --scope-kl topk, its top-k next tokens at every response position.

For prompt p and response r the engine scores the sequence x = p + r from position |p| on (`RolloutEngine.score`
/ `score_topk` with `first`: one temperature-1 value per response token, nothing kept for the prompt), the
teacher's view of the response: log π_T(r_t | p, r_<t), the input of the sampled-token KL estimators
(k1/k2/k3) and of SCOPE's teacher-path perplexity weights, and the top-k (ids, log π_T) of the top-k KL.
A teacher that returns too few, too many or non-finite values for a sequence is an error naming the prompt
and the sample, never a zero.
"""

from __future__ import annotations

from typing import Sequence

import torch

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
    else:
        first = [len(prompts[i]) for i, _ in where]  # the response's positions only
        if topk:
            scores = engine.score_topk(sequences, topk, first)
        else:
            scores = [SequenceScores.from_lists(values) for values in engine.score(sequences, first)]
    if len(scores) != len(sequences):
        raise RuntimeError(f"the teacher engine returned {len(scores)} scored sequences for {len(sequences)}")
    empty = SequenceScores(torch.zeros(0), torch.zeros(0, topk, dtype=torch.int32), torch.zeros(0, topk))
    result = [[empty for _ in group] for group in samples]
    for (i, j), sequence, response in zip(where, sequences, scores):
        where_text = f"prompt {prompt_ids[i]!r}, response {j}"
        expected = len(sequence) - len(prompts[i])
        lengths = [len(response.log_probs)] + ([len(response.topk_ids), len(response.topk_log_probs)] if topk else [])
        if any(length != expected for length in lengths):
            raise RuntimeError(f"{where_text}: the teacher engine returned {lengths[0]} log-probs"
                               f"{f' and {lengths[1]}/{lengths[2]} top-k lists' if topk else ''} for a response of "
                               f"{expected} tokens")
        values = torch.cat([response.log_probs, response.topk_log_probs.flatten()])
        if not torch.isfinite(values).all():
            raise RuntimeError(f"{where_text}: the teacher engine returned a non-finite log-prob: "
                               f"{values[~torch.isfinite(values)][:3].tolist()}")
        if topk:
            ids, width = response.topk_ids, response.topk_log_probs.shape[-1]
            sorted_ids = ids.sort(dim=-1).values
            distinct = 1 + (sorted_ids[:, 1:] != sorted_ids[:, :-1]).sum(-1)
            bad = ((distinct != topk) | (ids.shape[-1] != topk) | (width != topk)).nonzero()
            if len(bad):
                t = int(bad[0, 0])
                raise RuntimeError(f"{where_text}, token {t}: the teacher engine returned {int(distinct[t])} distinct "
                                   f"top-k ids and {width} log-probs, expected {topk}")
            if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
                t = int((ids >= vocab_size).any(-1).nonzero()[0, 0])
                raise RuntimeError(f"{where_text}, token {t}: the teacher's top-{topk} holds id {int(ids[t].max())}, "
                                   f"an embedding row past the tokenizer's {vocab_size} tokens (the checkpoint's "
                                   "padding); a co-located teacher (--teacher-backend megatron) masks those rows")
        result[i][j] = response
    return result
