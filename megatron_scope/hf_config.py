"""Facts of a Hugging Face model directory, read in one place: its config.json, its dtype, its KV-cache cost.

The trainer, the vLLM engine and the dry run (tools/check_config.py) all read models through these functions,
so they accept and refuse the same directories with the same messages.
"""

from __future__ import annotations

import json
import os

import torch

#: config.json / command-line dtype names (HF's and vLLM's spellings) -> torch dtypes.
DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16}


def read_hf_config(model_dir: str) -> dict:
    """config.json of a Hugging Face model directory (a multimodal wrapper's `text_config`).

    FileNotFoundError when the directory or its config.json is missing, ValueError when it is not JSON; each
    message starts with the path.
    """
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a directory (a Hugging Face model directory is expected)")
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{model_dir}: no config.json there (a Hugging Face model directory is expected)")
    try:
        with open(config_file) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None
    return config.get("text_config", config)


def config_dtype(config: dict, where: str = "config.json") -> torch.dtype:
    """The checkpoint's dtype (`dtype`, or the older `torch_dtype`; float32 when absent)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{where}: dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """K and V of one token over all layers: 2 L g d e."""
    return 2 * num_layers * num_kv_heads * head_dim * element_bytes
