"""Test doubles for the evaluation plumbing: a RolloutEngine that returns predetermined responses.

`ScriptedEngine` is NOT a model and does not sample: it finds which scripted problem statement occurs in
each decoded prompt and returns that problem's fixed response texts (encoded with the same tokenizer).
It exists only to test the runner's plumbing (batching, shapes, decoding, verification, scoring,
reports); the real engine is megatron_scope.rollout.vllm_engine.
"""

from __future__ import annotations

from megatron_scope.rollout.engine import Completion, RolloutEngine


class CharTokenizer:
    """encode/decode by Unicode code point: the minimal tokenizer interface the runner needs."""

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return [ord(char) for char in text]  # no BOS: the prompt is exactly the templated text

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(token) for token in token_ids)


class ScriptedEngine(RolloutEngine):
    """Returns `script[problem][j]` as sample j of any prompt containing `problem` (see module docstring)."""

    def __init__(self, tokenizer, script: dict[str, list[str]], eos_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.script = script
        self.eos_token_id = eos_token_id
        self.calls = []  # (decoded prompts, SamplingParams, seeds) per generate call
        self.closed = False

    def generate(self, prompts, params, seeds=None, max_new_tokens=None):
        decoded = [self.tokenizer.decode(list(prompt)) for prompt in prompts]
        self.calls.append((decoded, params, seeds))
        outputs = []
        for text in decoded:
            matches = [problem for problem in self.script if problem in text]
            if len(matches) != 1:
                raise KeyError(f"prompt matches {len(matches)} scripted problems: {text[:80]!r}")
            responses = self.script[matches[0]]
            if len(responses) < params.n:
                raise ValueError(f"{len(responses)} scripted responses, {params.n} requested")
            completions = []
            for response in responses[: params.n]:
                token_ids = list(self.tokenizer.encode(response))
                if self.eos_token_id is not None:
                    token_ids.append(self.eos_token_id)
                completions.append(Completion(token_ids, [0.0] * len(token_ids), "stop"))
            outputs.append(completions)
        return outputs

    def update_weights(self, named_tensors):
        raise NotImplementedError("ScriptedEngine has no weights")

    def close(self):
        self.closed = True
