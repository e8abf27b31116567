"""Convert a Hugging Face checkpoint (Qwen2/Qwen2.5, Qwen3, Llama) to a megatron.core.dist_checkpointing one.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --output-dir OUT [--params-dtype bfloat16]

Input: config.json and *.safetensors (single file or sharded with an index), read lazily tensor by tensor.
Output directory:
    OUT/megatron_scope_checkpoint.json   format version, DecoderArch, HF model_type, dtypes, padded vocabulary
    OUT/dist_ckpt/                       GPTModel.sharded_state_dict() saved by dist_checkpointing
    OUT/hf_files/                        config.json, tokenizer files and other non-weight files, copied

The conversion runs in one process at TP=1, PP=1; the result loads at ANY tensor/pipeline parallel size,
because dist_checkpointing reshards on load: build the model at the target TP/PP and call
`model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), OUT/dist_ckpt))`. The word
embeddings and output layer are saved with `allow_shape_mismatch`, so a target TP whose padded vocabulary
(a multiple of 128 x TP) differs also loads (extra padding rows are zero). There are therefore no
--target-*-parallel-size flags: they would change nothing.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_scope.hf_config import dtype_name
from megatron_scope.megatron.checkpointing import (
    DTYPES, HF_FILES_SUBDIR, METADATA_FILE, copy_non_weight_files, model_metadata, require_empty_output_dir)

DIST_CKPT_SUBDIR = "dist_ckpt"


def convert(hf_dir: str, output_dir: str, params_dtype: str | None = None) -> dict:
    """Convert `hf_dir` to `output_dir` (see the module docstring); returns the metadata written.

    params_dtype: dtype of the Megatron parameters; None keeps the checkpoint's (that of embed_tokens).
    Everything is validated (config, tensor names and shapes, empty output) before anything is written.
    Needs torch.distributed initialised with a world of one, or not initialised (then it initialises it).
    """
    from megatron.core import dist_checkpointing

    from megatron_scope.megatron import hf_mapping
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, load_hf_weights, validate_hf_tensors

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{hf_dir} has no config.json")
    if params_dtype is not None and params_dtype not in DTYPES:
        raise ValueError(f"params_dtype {params_dtype!r} is not one of {sorted(DTYPES)}")
    require_empty_output_dir(output_dir)
    with open(config_path) as f:
        hf_config = json.load(f)
    arch = hf_mapping.arch_from_hf_config(hf_config)
    hf_tensors = SafetensorsCheckpoint(hf_dir)
    validate_hf_tensors(hf_tensors, arch)
    source_dtype = hf_tensors["model.embed_tokens.weight"].dtype
    dtype = DTYPES[params_dtype] if params_dtype else source_dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"checkpoint dtype {source_dtype} is not supported; pass params_dtype")

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise ValueError(f"run the conversion in one process (world size is {torch.distributed.get_world_size()})")
    initialize_model_parallel(1, 1)
    model = build_gpt_model(arch, params_dtype=dtype)
    load_hf_weights(model, arch, hf_tensors)

    dist_dir = os.path.join(output_dir, DIST_CKPT_SUBDIR)
    os.makedirs(dist_dir)
    dist_checkpointing.save(model.sharded_state_dict(), dist_dir)
    copy_non_weight_files(hf_dir, os.path.join(output_dir, HF_FILES_SUBDIR))
    metadata = model_metadata(model, arch, DIST_CKPT_SUBDIR, dtype_name(source_dtype))
    with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--output-dir", required=True, help="new or empty directory for the Megatron checkpoint")
    parser.add_argument("--params-dtype", choices=sorted(DTYPES), default=None,
                        help="Megatron parameter dtype (default: the checkpoint's own)")
    args = parser.parse_args(argv)
    metadata = convert(args.hf_dir, args.output_dir, args.params_dtype)
    print(f"wrote {args.output_dir}: {metadata['hf_model_type']} {metadata['arch']}")


if __name__ == "__main__":  # the guard matters: dist_checkpointing.save starts a multiprocessing Manager
    main()
