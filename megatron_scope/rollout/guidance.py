"""TrOPD's off-policy guidance (Xing et al. 2026, arXiv 2606.01249): some responses start with a teacher's prefix.

Prompt i of a step (its index in the whole step's batch) is guided when floor((i + 1) f) > floor(i f), f the
--tropd-prefix-fraction: a share f of every step's prompts, spread evenly over the batch (and so over the
data-parallel engines). For a guided prompt the teacher's engine samples G responses at temperature 1 and top-p 1
(its tokens are draws from π_T, so imitating them is an unbiased forward-KL gradient, `objectives.tropd_objective`);
response j keeps the first

    k_j = min(floor(α_t L_j), max_new_tokens - 1),    α_t = (1 + cos(π (t - 1) / T)) / 2

tokens of the teacher's j-th (L_j: its length without the stop token; t the iteration, T --train-iters: α
anneals from 1 at the first step toward 0), and the student's engine continues from prompt + prefix with at
most max_new_tokens - k_j new tokens. Three random streams (`rollout.seeds`): the teacher's samples
("teacher_prefix"), the continuations ("continuation") and the unguided prompts' samples ("rollout"), so a
continuation never reuses the noise that picked its prefix's tokens and (prefix, continuation) is a draw of
π_T(prefix) π_S(· | prefix). The response is prefix + continuation: verified, scored and trained whole; its first k_j
tokens carry the teacher's sampling log-probs (`Completion.log_probs` holds the log-prob of each token under
whichever model sampled it) and are imitated with forward KL, the rest get the on-policy loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from megatron_scope.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_scope.rollout.seeds import StepSeeds


def guidance_alpha(iteration: int, train_iters: int) -> float:
    """α_t = (1 + cos(π (t - 1) / T)) / 2: the share of a teacher response kept as the prefix at iteration t >= 1."""
    return (1 + math.cos(math.pi * (iteration - 1) / train_iters)) / 2


def is_guided(index: int, fraction: float) -> bool:
    """Whether the step's prompt `index` is guided: floor((i + 1) f) > floor(i f) (a share f, spread evenly)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def teacher_prefix(response: Completion, alpha: float, max_new_tokens: int, stop_token_ids: Sequence[int]) -> Completion:
    """The first min(floor(α L), max_new_tokens - 1) tokens of a teacher response (L: its length without a final
    stop token) and their log-probs, so the student always writes at least one token."""
    length = len(response.token_ids)
    if length and response.finish_reason == "stop" and response.token_ids[-1] in stop_token_ids:
        length -= 1
    keep = min(math.floor(alpha * length), max_new_tokens - 1)
    return Completion(list(response.token_ids[:keep]), list(response.log_probs[:keep]), "prefix")


def guided_generate(engine: RolloutEngine, teacher_engines: Sequence[RolloutEngine], prompts: Sequence[Sequence[int]],
                    indices: Sequence[int], params: SamplingParams, seeds: StepSeeds, fraction: float,
                    alpha: float) -> tuple[list[list[Completion]], list[list[int]]]:
    """`engine.generate` of the step's prompts `indices` (their places in the whole step's batch) with the guided
    prompts' responses continuing their teachers' prefixes (module docstring); `teacher_engines[i]` writes prompt i's
    (several teachers: each prompt's routed one). One engine is awake at a time (vLLM sleep mode on GPUs they share):
    each teacher's while it writes its prompts' prefixes, then `engine`, left awake, which draws every sample of the
    step in one call (one request per sample: the unguided ones and the continuations). Returns (samples, prefix
    lengths: result[i][j] tokens of samples[i][j] are the teacher's, 0 for unguided prompts)."""
    n = params.n
    guided = [i for i, index in enumerate(indices) if is_guided(index, fraction)]
    prefix_of = {}
    if guided:
        engine.sleep()
    writers = list({id(teacher_engines[i]): teacher_engines[i] for i in guided}.values())  # in prompt order, once
    for teacher_engine in writers:
        mine = [i for i in guided if teacher_engines[i] is teacher_engine]
        teacher_engine.wake()
        try:
            written = teacher_engine.generate([prompts[i] for i in mine],
                                              dataclasses.replace(params, temperature=1.0, top_p=1.0),
                                              seeds=seeds.groups([indices[i] for i in mine], n, "teacher_prefix"))
        finally:
            teacher_engine.sleep()
        for i, group in zip(mine, written):
            for j, response in enumerate(group):
                prefix_of[i, j] = teacher_prefix(response, alpha, params.max_new_tokens, params.stop_token_ids)
    engine.wake()
    # One call for the whole step: every unguided sample and every guided sample's continuation is one request with
    # its own seed and cap, so the step waits for one tail of long responses, not two in series.
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    requests, row_seeds, caps = [], [], []
    for i, j in rows:
        prefix = prefix_of.get((i, j))
        if prefix is None:
            requests.append(list(prompts[i]))
            row_seeds.append([seeds.seed(indices[i], j, "rollout")])
            caps.append(params.max_new_tokens)
        else:  # its own "continuation" seed, never the teacher's sample's
            requests.append(list(prompts[i]) + prefix.token_ids)
            row_seeds.append([seeds.seed(indices[i], j, "continuation")])
            caps.append(params.max_new_tokens - len(prefix.token_ids))
    outputs = engine.generate(requests, dataclasses.replace(params, n=1), seeds=row_seeds, max_new_tokens=caps)
    samples = [[None] * n for _ in prompts]
    prefix_lengths = [[0] * n for _ in prompts]
    for (i, j), (completion,) in zip(rows, outputs):
        prefix = prefix_of.get((i, j))
        if prefix is None:
            samples[i][j] = completion
        else:
            samples[i][j] = Completion(prefix.token_ids + completion.token_ids,
                                       prefix.log_probs + completion.log_probs, completion.finish_reason)
            prefix_lengths[i][j] = len(prefix.token_ids)
    return samples, prefix_lengths
