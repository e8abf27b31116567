"""`PropsLogitsProcessor`: `rollout.props`'s behaviour policy inside vLLM 0.32's sampler, one `apply` per decode step
over the batch, touching only the rows of requests whose output so far is a prefix an earlier round drew at. It
implements both of vLLM 0.32's processor interfaces: the V1 model runner's (used on CPU) and Model Runner V2's (the GPU
default); the engine starts with it only under --rollout-sampler props (`VLLMEngineConfig.props`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from megatron_scope.rollout.props import EXTRA_ARGS_KEY, PrefixTree, behaviour_log_probs


@dataclasses.dataclass
class _Request:
    """A PROPS request in the engine's batch: where its output so far stands in the group's prefix tree."""

    node: dict | None
    """The tree node of its output so far; None once it left every earlier sample's prefix (nothing more to do)."""
    consumed: int
    """How many of its output tokens `node` accounts for."""
    clip: float
    step: float
    temperature: float
    output_token_ids: list[int] | None = None
    """The engine's running output list (V1 model runner); Model Runner V2 reads the device's token history."""

    def advance(self, new_tokens: Sequence[int]) -> None:
        for token in new_tokens:
            if self.node is None:
                break
            entry = self.node.get(int(token))
            self.node = (entry[1] or None) if entry is not None else None  # {}: no earlier draw goes on from here
        self.consumed += len(new_tokens)


def _request_from(params) -> _Request | None:
    """The PROPS state of a request from its vLLM SamplingParams, None when it carries none."""
    props = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
    if props is None:
        return None
    tree = PrefixTree(props["earlier"])
    return _Request(tree.root or None, 0, float(props["clip"]), float(props["step"]), float(params.temperature))


class PropsLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """The PROPS behaviour policy (module docstring) as a vLLM logits processor, for both model runners of vLLM 0.32:
    the V1 runner calls `__init__(vllm_config, device, is_pin_memory)`, `update_state(batch_update)` and
    `apply(logits)`; Model Runner V2 calls `__init__(vllm_config, req_states)`, `add_request(slot, params)` and
    `apply(logits, ctx)`. Either way it runs before temperature, min-p and top-k/top-p, and writes T log π_b into the
    rows it changes so that the sampler's division by the temperature T leaves log π_b."""

    def __init__(self, vllm_config, *runner_args):
        self._v2_states = runner_args[0] if len(runner_args) == 1 else None  # V2: LogitsProcRequestState
        self._requests: dict[int, _Request] = {}  # V1: batch index -> request; V2: request slot -> request

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        props = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if props is None:
            return
        if sampling_params.temperature <= 0 or sampling_params.top_p < 1 or sampling_params.top_k not in (None, 0, -1):
            raise ValueError("PROPS sampling needs temperature > 0 and no top-p/top-k truncation (its band is "
                             "enforced on the sampling distribution)")
        if not 0 <= float(props["clip"]) < 1 or float(props["step"]) < 0:
            raise ValueError(f"PROPS: clip {props['clip']} must lie in [0, 1) and step {props['step']} be >= 0")

    def is_argmax_invariant(self) -> bool:
        return False

    # ---- the V1 model runner ----

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params, _prompt_token_ids, output_token_ids):
            request = _request_from(params)
            if request is not None:
                request.output_token_ids = output_token_ids
            return request

        process_dict_updates(self._requests, batch_update, new_state)

    # ---- Model Runner V2 ----

    def add_request(self, req_idx: int, sampling_params) -> bool:
        request = _request_from(sampling_params)
        if request is None:
            self._requests.pop(req_idx, None)
            return False
        self._requests[req_idx] = request
        return True

    # ---- both ----

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        rows = self._rows_v1() if ctx is None else self._rows_v2(ctx)
        if not rows:
            return logits
        index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=logits.device)
        selected, changed = logits[index].double(), []
        for i, (_, request) in enumerate(rows):
            tokens, counts = PrefixTree.counts(request.node)
            log_probs = torch.log_softmax(selected[i] / request.temperature, dim=-1)
            behaviour, beta = behaviour_log_probs(log_probs, tokens, counts, request.clip, request.step)
            if beta > 0:  # else π_b = π: the row stays as it is, bit for bit
                selected[i] = behaviour * request.temperature
                changed.append(i)
        if changed:
            changed = torch.tensor(changed, dtype=torch.long, device=logits.device)
            logits[index[changed]] = selected[changed].to(logits.dtype)
        return logits

    def _rows_v1(self) -> list[tuple[int, _Request]]:
        """(batch row, request) of the V1 requests at a prefix an earlier round drew at, after catching up on their
        output; a request that left the tree is forgotten."""
        rows = []
        for row, request in list(self._requests.items()):
            request.advance(request.output_token_ids[request.consumed:])
            if request.node is None:
                del self._requests[row]
            else:
                rows.append((row, request))
        return rows

    def _rows_v2(self, ctx) -> list[tuple[int, _Request]]:
        """The same for Model Runner V2: without speculative decoding (vLLM refuses custom processors with it) row b
        is batch position b, whose slot is ctx.idx_mapping_np[b]; its committed output is req_states.all_token_ids
        [slot, prompt_len : pos + 1], pos being the position of the token the row feeds."""
        slots = ctx.idx_mapping_np.tolist()
        batch = [b for b, slot in enumerate(slots) if self._requests.get(slot) is not None
                 and self._requests[slot].node is not None]
        if not batch:
            return []
        positions = ctx.pos[torch.tensor(batch, device=ctx.pos.device)].tolist()
        states, rows = self._v2_states, []
        for b, position in zip(batch, positions):
            request = self._requests[slots[b]]
            start = int(states.prompt_len.np[slots[b]]) + request.consumed
            request.advance(states.all_token_ids.gpu[slots[b], start : position + 1].tolist())
            if request.node is not None:
                rows.append((b, request))
        return rows
