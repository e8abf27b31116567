"""vLLM rollout engines placed as Ray actors (on any node of a Ray cluster), behind `RolloutEngine`.

    ray.init(address="auto")                               # or ray.init(num_cpus=...) locally
    engine = RayRolloutEngine(config, num_engines=4, actor_options={"num_gpus": 1})
    groups = engine.generate(prompts, params)              # each engine gets its whole share of prompt groups
    engine.update_weights(iter_hf_weights(model, arch))    # each bucket sent once to Ray, read by every engine

Each actor runs a `VLLMRolloutEngine` (see vllm_engine.py for the contracts, which carry over unchanged:
seeds, log-probs, bad-input errors). `config.model_path` must exist on the actor's node. Placement is
Ray's: pass `actor_options` (num_gpus, resources, scheduling_strategy such as a placement group or
NodeAffinitySchedulingStrategy) to put engines on other nodes. Weights travel in buckets of
`config.weight_bucket_bytes`, by `config.weight_transfer`:
- "nccl" (what `train.start_engine` picks for Ray engines on CUDA): GPU to GPU. This process (the rollout leader,
  on its CUDA device) opens vLLM's NCCL weight-transfer group with every engine's workers at the first refit and
  broadcasts each bucket while every engine receives it (`vllm_weight_transfer.NCCLBroadcast`); names and shapes
  are checked here before anything is broadcast (`WeightChecklist`: a worker that refused would leave the
  broadcast waiting; an engine that dies mid-broadcast does too, as in vLLM's own trainer engine);
- otherwise through host memory: one `ray.put` per bucket, then every actor loads it into its engine (CUDA IPC or
  shared memory there); one bucket is in flight while the next is packed.
Errors raised in an actor reach the caller as Ray errors that are also instances of the original exception class
(ValueError, ...).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import ray
import torch

from megatron_scope.rollout.buckets import drain, iter_buckets
from megatron_scope.rollout.engine import Completion, RolloutEngine, SamplingParams, SequenceScores, per_prompt_plan
from megatron_scope.rollout.vllm_engine import (
    VLLM_LOG_LEVEL_ENV,
    VLLMEngineConfig,
    WeightChecklist,
    set_vllm_log_level,
)


class RolloutEngineActor:
    """The Ray actor: one `VLLMRolloutEngine` and at most one weight update in progress."""

    def __init__(self):
        self._engine = None
        self._update = None

    def start(self, config: VLLMEngineConfig, vllm_log_level: str | None = None) -> dict[str, Any]:
        """Start vLLM (errors here are the engine's own construction errors); return facts the driver needs.
        `vllm_log_level`: the driver's VLLM_LOGGING_LEVEL (Ray workers, on other nodes or started before the
        driver set it, do not see the driver's os.environ; None: the actor's own, else WARNING)."""
        from megatron_scope.rollout.vllm_engine import VLLMRolloutEngine

        set_vllm_log_level(vllm_log_level)
        self._engine = VLLMRolloutEngine(config)
        return {"dtype": self._engine.facts.dtype, "node_id": ray.get_runtime_context().get_node_id(),
                "weight_shapes": self._engine.facts.weight_shapes, "gpu_ids": ray.get_gpu_ids()}

    def generate(self, prompts, params: SamplingParams, seeds, max_new_tokens=None) -> list[list[Completion]]:
        return self._engine.generate(prompts, params, seeds, max_new_tokens)

    def score(self, sequences, first=None) -> list[list[float]]:
        return self._engine.score(sequences, first)

    def score_topk(self, sequences, k: int, first=None) -> list[SequenceScores]:
        return self._engine.score_topk(sequences, k, first)

    def begin_weight_update(self) -> None:
        if self._update is not None:
            self._update.abort()
        self._update = self._engine.begin_weight_update()

    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self._update.load(named_tensors)

    def join_weight_broadcast(self, init_info: dict) -> None:
        self._engine.join_weight_broadcast(init_info)

    def receive_weights(self, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> None:
        self._update.receive(names, dtype_names, shapes)

    def finish_weight_update(self) -> None:
        update, self._update = self._update, None
        update.finish()

    def abort_weight_update(self) -> None:
        if self._update is not None:
            update, self._update = self._update, None
            update.abort()

    def sleep(self, level: int = 1) -> None:
        self._engine.sleep(level)

    def wake(self, tags=None) -> None:
        self._engine.wake(tags)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


class RayRolloutEngine(RolloutEngine):
    """`num_engines` vLLM engines as Ray actors; `generate` gives each engine its whole share of prompt groups.

    Results equal one engine's: sample j of prompt i keeps its seed `seeds[i][j]` whichever engine draws it.
    """

    def __init__(self, config: VLLMEngineConfig, num_engines: int = 1, actor_options: dict | None = None):
        if not ray.is_initialized():
            raise RuntimeError("RayRolloutEngine: call ray.init(...) first")
        if num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {num_engines}")
        self.config = config
        options = {"num_cpus": 1, **(actor_options or {})}
        actor_class = ray.remote(RolloutEngineActor)
        self._actors = [actor_class.options(**options).remote() for _ in range(num_engines)]
        try:
            log_level = os.environ.get(VLLM_LOG_LEVEL_ENV)  # set_vllm_log_level's choice, when made here
            infos = ray.get([actor.start.remote(config, log_level) for actor in self._actors])
        except BaseException:
            self.close()
            raise
        self._dtype = infos[0]["dtype"]
        self._weight_shapes = infos[0]["weight_shapes"]
        self._broadcast = None  # vllm_weight_transfer.NCCLBroadcast, opened at the first "nccl" refit
        self.node_ids = [info["node_id"] for info in infos]
        """The Ray node each engine runs on."""
        self.gpu_ids = [info["gpu_ids"] for info in infos]
        """The GPUs Ray gave each engine (ids on its node)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[Sequence[int]] | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        """Every engine gets its whole share of the prompts in one call (`engine_shares`), so each one's vLLM batch holds
        all its requests at once and a step waits for one tail of long responses per engine, not one per chunk in
        series; shares are dealt longest prompt first, so their prompt tokens balance."""
        results: list = [None] * len(prompts)
        for share, groups in self.generate_shares(prompts, params, seeds, max_new_tokens):
            for i, group in zip(share, groups):
                results[i] = group
        return results

    def generate_shares(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        seeds: Sequence[Sequence[int]] | None = None,
                        max_new_tokens: Sequence[int] | None = None) -> Iterator[tuple[list[int], list]]:
        """`generate`'s engine shares, each (its prompts' indices, their groups) as soon as its engine ends it."""
        prompts = [list(p) for p in prompts]
        seeds, caps = per_prompt_plan(prompts, params, seeds, max_new_tokens)
        shares = engine_shares([len(p) for p in prompts], len(self._actors))
        share_of = {actor.generate.remote([prompts[i] for i in share], params, [seeds[i] for i in share],
                                          [caps[i] for i in share]): share
                    for actor, share in zip(self._actors, shares)}
        pending = list(share_of)
        while pending:
            (done,), pending = ray.wait(pending, num_returns=1)
            yield share_of[done], ray.get(done)

    def score(self, sequences: Sequence[Sequence[int]], first: Sequence[int] | None = None) -> list[list[float]]:
        """Temperature-1 log-probs of each sequence's tokens from position `first[i]` on (default 1), every engine
        scoring one contiguous shard of about equal tokens (`token_shards`) at once."""
        return self._sharded("score", sequences, first)

    def score_topk(self, sequences: Sequence[Sequence[int]], k: int,
                   first: Sequence[int] | None = None) -> list[SequenceScores]:
        """`score` plus each position's top-k next tokens."""
        return self._sharded("score_topk", sequences, first, k)

    def _sharded(self, method: str, sequences: Sequence[Sequence[int]], first: Sequence[int] | None, *args) -> list:
        """The actors' `method` on their shards of `sequences` (with their `first`), results in the input's order."""
        sequences = [list(s) for s in sequences]
        shards = token_shards([len(s) for s in sequences], len(self._actors))
        calls = [getattr(actor, method).remote([sequences[i] for i in shard], *args,
                                               None if first is None else [first[i] for i in shard])
                 for actor, shard in zip(self._actors, shards)]
        return [result for part in ray.get(calls) for result in part]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Bucket, `ray.put` once, load on every engine; validated in each engine before it sends to vLLM.

        On an error the rest of the stream is consumed before raising (see `VLLMRolloutEngine.update_weights`).
        """
        if self.config.weight_transfer == "nccl":
            self._broadcast_weights(iter(named_tensors))
            return
        source = iter(named_tensors)
        in_flight: list = []
        try:
            ray.get([actor.begin_weight_update.remote() for actor in self._actors])
            for bucket in iter_buckets(_for_transfer(source, self._dtype), self.config.weight_bucket_bytes):
                bucket_ref = ray.put(bucket)
                del bucket
                ray.get(in_flight)  # at most one bucket travelling while this one was packed
                in_flight = [actor.load_weights.remote(bucket_ref) for actor in self._actors]
            ray.get(in_flight)
        except Exception:
            ray.get([actor.abort_weight_update.remote() for actor in self._actors])
            drain(source)
            raise
        ray.get([actor.finish_weight_update.remote() for actor in self._actors])

    def _broadcast_weights(self, source) -> None:
        """The "nccl" refit (module docstring), from this process's CUDA device."""
        dtype_name = str(self._dtype).removeprefix("torch.")
        checklist = WeightChecklist(self._weight_shapes, self.config.model_path)
        try:
            self._open_broadcast()
            ray.get([actor.begin_weight_update.remote() for actor in self._actors])
            on_device = _on_device(source, self._dtype, self._broadcast.device)
            for bucket in iter_buckets(on_device, self.config.weight_bucket_bytes):
                for name, tensor in bucket:
                    checklist.check(name, tuple(tensor.shape), tensor.is_floating_point(), tensor.dtype)
                names = [name for name, _ in bucket]
                shapes = [list(tensor.shape) for _, tensor in bucket]
                receiving = [actor.receive_weights.remote(names, [dtype_name] * len(names), shapes)
                             for actor in self._actors]
                refused, _ = ray.wait(receiving, num_returns=len(receiving), timeout=0)
                ray.get(refused)  # an engine that already answered refused: raise before the broadcast waits for it
                self._broadcast.send(bucket)
                ray.get(receiving)
            checklist.check_complete()
        except Exception:
            ray.get([actor.abort_weight_update.remote() for actor in self._actors])
            drain(source)
            raise
        ray.get([actor.finish_weight_update.remote() for actor in self._actors])

    def _open_broadcast(self) -> None:
        """vLLM's NCCL weight-transfer group of this process (rank 0) and every engine's workers, once."""
        if self._broadcast is not None:
            return
        from megatron_scope.rollout.vllm_weight_transfer import NCCLBroadcast

        broadcast = NCCLBroadcast([self.config.tensor_parallel_size] * len(self._actors),
                                  self.config.weight_bucket_bytes, master_address=ray.util.get_node_ip_address())
        joining = [actor.join_weight_broadcast.remote(info)
                   for actor, info in zip(self._actors, broadcast.worker_init_infos())]
        broadcast.open()  # both sides rendezvous together
        ray.get(joining)
        self._broadcast = broadcast

    def sleep(self, level: int = 1) -> None:
        ray.get([actor.sleep.remote(level) for actor in self._actors])

    def wake(self, tags: Sequence[str] | None = None) -> None:
        ray.get([actor.wake.remote(tags) for actor in self._actors])

    def close(self) -> None:
        """Shut every engine down and end its actor."""
        if getattr(self, "_broadcast", None) is not None:
            self._broadcast.close()
            self._broadcast = None
        actors, self._actors = self._actors, []
        for actor in actors:
            try:
                ray.get(actor.close.remote())
            except ray.exceptions.RayError:
                pass  # the actor already died (e.g. its start failed); killing it below is all that is left
            ray.kill(actor)


def engine_shares(prompt_lengths: Sequence[int], num_engines: int) -> list[list[int]]:
    """Each engine's prompt indices: sorted by prompt length, longest first, dealt round-robin (engine e takes
    places e, e + N, ...), so every share has about 1/N of the prompts and of their tokens, longest first within
    it; at most `num_engines` non-empty shares."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    return [order[e::num_engines] for e in range(min(num_engines, len(order)))]


def token_shards(lengths: Sequence[int], num_engines: int) -> list[range]:
    """Contiguous index ranges, at most `num_engines` non-empty ones, of about equal total length: shard k ends
    where the running token count first reaches k/num_engines of the total (a prompt group's sequences, adjacent,
    mostly share an engine and its prefix cache)."""
    total, bounds, running = sum(lengths), [0], 0
    for i, length in enumerate(lengths):
        running += length
        while len(bounds) < num_engines and running * num_engines >= total * len(bounds):
            bounds.append(i + 1)
    bounds.append(len(lengths))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _on_device(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, device: torch.device):
    """Floating-point tensors on `device` in the engines' dtype (what the NCCL broadcast sends)."""
    for name, tensor in named_tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            tensor = tensor.detach().to(device, dtype)
        yield name, tensor


def _for_transfer(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype):
    """On host in the engine's dtype, owning exactly its bytes: pickling a view would ship its whole storage
    (weight_export yields views into received buckets)."""
    for name, tensor in named_tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            tensor = tensor.detach().to("cpu", dtype)
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
                tensor = tensor.clone(memory_format=torch.contiguous_format)
        yield name, tensor
