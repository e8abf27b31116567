"""Convert a Megatron checkpoint written by convert_hf_to_megatron.py back to Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py --megatron-dir MEG_DIR --output-dir HF_OUT [--dtype bfloat16]

Reads MEG_DIR/megatron_scope_checkpoint.json (arch, HF model type, dtypes) and the dist_checkpointing
directory it names; dist_checkpointing reshards whatever TP/PP the checkpoint was saved at to the TP=1, PP=1
model this script builds in one process. Writes HF_OUT/model.safetensors (or shards + index), config.json
(the copied original if MEG_DIR/hf_files has one, else generated from the arch) and the copied tokenizer
files. Tensors stream out through `weight_export.iter_hf_weights` (the same path that feeds vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.convert_hf_to_megatron import (  # noqa: E402
    DTYPES, FORMAT_VERSION, HF_FILES_SUBDIR, METADATA_FILE, _require_empty_output, copy_non_weight_files)


def read_metadata(megatron_dir: str) -> dict:
    """The checkpoint's metadata; ValueError if missing or of another format version."""
    path = os.path.join(megatron_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{megatron_dir} has no {METADATA_FILE} (write it with tools/convert_hf_to_megatron.py)")
    with open(path) as f:
        metadata = json.load(f)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    return metadata


def convert(megatron_dir: str, output_dir: str, dtype: str | None = None,
            max_shard_bytes: int = 4 << 30) -> list[str]:
    """Convert `megatron_dir` to HF files in `output_dir`; returns the safetensors file names written.

    dtype: HF tensor dtype; None keeps the dtype the HF source had (metadata `hf_dtype`).
    """
    from megatron.core import dist_checkpointing

    from megatron_scope.megatron import hf_mapping
    from megatron_scope.megatron.model import DecoderArch, build_gpt_model
    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel
    from megatron_scope.megatron.weight_export import iter_hf_weights, save_safetensors_checkpoint

    metadata = read_metadata(megatron_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    hf_dtype = DTYPES[dtype or metadata["hf_dtype"]]
    arch = DecoderArch(**metadata["arch"])
    dist_dir = os.path.join(megatron_dir, metadata["dist_checkpoint"])
    if not os.path.isdir(dist_dir):
        raise ValueError(f"dist checkpoint directory {dist_dir} (named in {METADATA_FILE}) does not exist")
    _require_empty_output(output_dir)
    hf_files = os.path.join(megatron_dir, HF_FILES_SUBDIR)
    if os.path.isfile(os.path.join(hf_files, "config.json")):
        with open(os.path.join(hf_files, "config.json")) as f:
            config = json.load(f)
        if hf_mapping.arch_from_hf_config(config) != arch:
            raise ValueError(f"{hf_files}/config.json does not describe the checkpoint's arch {arch}")
    else:
        config = hf_mapping.hf_config_from_arch(arch, metadata["hf_model_type"], hf_dtype)

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise ValueError(f"run the conversion in one process (world size is {torch.distributed.get_world_size()})")
    initialize_model_parallel(1, 1)
    model = build_gpt_model(arch, params_dtype=DTYPES[metadata["params_dtype"]])
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), dist_dir))

    os.makedirs(output_dir, exist_ok=True)
    if os.path.isdir(hf_files):
        copy_non_weight_files(hf_files, output_dir)
    config_path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(config_path) or dtype is not None:
        if dtype is not None:  # the copied config names the source dtype: say the new one
            config.update({key: dtype for key in ("dtype", "torch_dtype") if key in config})
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, default=lambda value: str(value).removeprefix("torch."))
    return save_safetensors_checkpoint(iter_hf_weights(model, arch), output_dir, max_shard_bytes, dtype=hf_dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-dir", required=True, help="directory written by convert_hf_to_megatron.py")
    parser.add_argument("--output-dir", required=True, help="new or empty directory for the HF checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="HF tensor dtype (default: the dtype of the original HF checkpoint)")
    parser.add_argument("--max-shard-bytes", type=int, default=4 << 30, help="split safetensors above this size")
    args = parser.parse_args(argv)
    files = convert(args.megatron_dir, args.output_dir, args.dtype, args.max_shard_bytes)
    print(f"wrote {args.output_dir}: {', '.join(files)}")


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts a multiprocessing Manager
    main()
