"""Convert a Megatron checkpoint back to Hugging Face safetensors: one written by convert_hf_to_megatron.py,
or a training checkpoint of `python -m megatron_scope.train` (its root, at the latest iteration, or one
iter_XXXXXXX directory).

    python tools/convert_megatron_to_hf.py --megatron-dir MEG_DIR --output-dir HF_OUT [--dtype bfloat16]

Reads the checkpoint's megatron_scope_checkpoint.json (arch, HF model type, dtypes, padded vocabulary) and
the dist_checkpointing directory it names (training checkpoints: the iteration directory itself; only the
model is read, not the optimizer); dist_checkpointing reshards whatever TP/PP the checkpoint was saved at to
the TP=1, PP=1 model this script builds in one process. Writes HF_OUT/model.safetensors (or shards + index)
with exactly the embedding rows the HF config declares, config.json (the copied original if the checkpoint
has hf_files/config.json, else generated from the arch) and the copied tokenizer files. Tensors stream out
through `weight_export.iter_hf_weights` (the same path that feeds vLLM).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_scope.megatron.checkpointing import (
    DTYPES, HF_FILES_SUBDIR, METADATA_FILE, hf_model_config, read_model_metadata, require_empty_output_dir,
    write_hf_model)


def convert(megatron_dir: str, output_dir: str, dtype: str | None = None,
            max_shard_bytes: int = 4 << 30) -> list[str]:
    """Convert `megatron_dir` to HF files in `output_dir`; returns the safetensors file names written.

    dtype: HF tensor dtype; None keeps the dtype the HF source had (metadata `hf_dtype`).
    """
    from megatron.core import dist_checkpointing

    from megatron_scope.megatron.arch import DecoderArch

    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import init_distributed, initialize_model_parallel
    from megatron_scope.megatron.weight_export import iter_hf_weights

    directory, metadata = read_model_metadata(megatron_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    hf_dtype = DTYPES[dtype or metadata["hf_dtype"]]
    arch = DecoderArch(**metadata["arch"])
    dist_dir = os.path.normpath(os.path.join(directory, metadata["dist_checkpoint"]))
    if not os.path.isdir(dist_dir):
        raise ValueError(f"dist checkpoint directory {dist_dir} (named in {METADATA_FILE}) does not exist")
    require_empty_output_dir(output_dir)
    hf_files = os.path.join(directory, HF_FILES_SUBDIR)
    config = hf_model_config(hf_files, arch, hf_dtype)  # None: the staged original is copied
    if config is None and dtype is not None:  # the copied config names the source dtype: say the new one
        with open(os.path.join(hf_files, "config.json")) as f:
            config = json.load(f)
        config.update({key: dtype for key in ("dtype", "torch_dtype") if key in config})

    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise ValueError(f"run the conversion in one process (world size is {torch.distributed.get_world_size()})")
    initialize_model_parallel(1, 1)
    model = build_gpt_model(arch, params_dtype=DTYPES[metadata["params_dtype"]],
                            padded_vocab=metadata.get("padded_vocab_size"))
    key = metadata.get("model_state_key")  # training checkpoints nest the model beside the optimizer
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load({key: sharded} if key else sharded, dist_dir)
    model.load_state_dict(loaded[key] if key else loaded)

    return write_hf_model(output_dir, iter_hf_weights(model, arch), hf_files, config, hf_dtype, max_shard_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-dir", required=True,
                        help="directory written by convert_hf_to_megatron.py, or a training checkpoint root or "
                             "iter_XXXXXXX directory")
    parser.add_argument("--output-dir", required=True, help="new or empty directory for the HF checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="HF tensor dtype (default: the dtype of the original HF checkpoint)")
    parser.add_argument("--max-shard-bytes", type=int, default=4 << 30, help="split safetensors above this size")
    args = parser.parse_args(argv)
    files = convert(args.megatron_dir, args.output_dir, args.dtype, args.max_shard_bytes)
    print(f"wrote {args.output_dir}: {', '.join(files)}")


if __name__ == "__main__":  # the guard matters: dist_checkpointing starts a multiprocessing Manager
    main()
