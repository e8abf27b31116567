"""Checkpoints for exact resume, in Megatron-LM's layout:

    <root>/latest_checkpointed_iteration.txt      the last COMPLETE iteration (Megatron-LM's tracker file)
    <root>/hf_files/                              the student's HF config and tokenizer files (`stage_hf_files`)
    <root>/iter_0000010/                          dist_checkpointing of {"model", "optimizer"} (any TP/PP on load)
                       scope_state.pt             step, scheduler, data position, rollout seed (rank 0)
                       rng_rank00003.pt           each rank's torch / Megatron-tracker RNG states
                       megatron_scope_checkpoint.json, hf_files/   with `arch`: what converts it to HF
                       hf_model/                  with `save_hf`: the student as a Hugging Face model
                                                  (safetensors, config.json, tokenizer), for transformers or vLLM

A checkpoint is written under `iter_XXXXXXX.tmp`, renamed once every rank has finished, and only then
named in the tracker (replaced atomically), so a run killed mid-save never resumes from a partial one.

`megatron_scope_checkpoint.json` (also written by tools/convert_hf_to_megatron.py) describes the model:
DecoderArch, HF model_type, parameter and HF dtypes, padded vocabulary, and where the dist checkpoint
lies; tools/convert_megatron_to_hf.py reads it (`read_model_metadata`) from a converted checkpoint, a
training iteration directory, or a training root (its latest iteration).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_scope import hf_config
from megatron_scope.hf_config import dtype_name
from megatron_scope.megatron import hf_mapping
from megatron_scope.megatron.arch import DecoderArch
from megatron_scope.megatron.model import unwrap_model
from megatron_scope.megatron.weight_export import checked_local_params, iter_hf_weights, save_safetensors_checkpoint

TRACKER_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "scope_state.pt"
MODEL_STATE_KEY = "model"
METADATA_FILE = "megatron_scope_checkpoint.json"
HF_FILES_SUBDIR = "hf_files"
HF_MODEL_SUBDIR = "hf_model"
FORMAT_VERSION = 1
#: The parameter dtypes a checkpoint may hold (canonical names).
DTYPES = {name: hf_config.DTYPES[name] for name in ("float32", "bfloat16", "float16")}
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def require_empty_output_dir(output_dir: str) -> None:
    """ValueError unless `output_dir` is absent or an empty directory (a converter never overwrites)."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ValueError(f"output directory {output_dir} exists and is not empty")


def check_writable(root: str) -> None:
    """Raise before training starts if `root` cannot hold checkpoints."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_probe_{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"checkpoint directory {root!r} is not writable: {error}") from error


def latest_iteration(root: str) -> int | None:
    """The iteration named in the tracker file, or None when there is no complete checkpoint."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} should hold an iteration number, found {text!r}")
    iteration = int(text)
    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise FileNotFoundError(f"{tracker} names iteration {iteration} but {checkpoint_dir(root, iteration)} is missing")
    return iteration


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sharded_state(model, optimizer, is_loading: bool, extra_models: dict | None = None) -> dict:
    # The GPTModel itself: DDP's sharded keys gain a "module." prefix that its load_state_dict lacks.
    model_state = unwrap_model(model).sharded_state_dict()
    sharded = {MODEL_STATE_KEY: model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}
    for name, extra in (extra_models or {}).items():  # e.g. SRPO's EMA teacher: its own key prefix in the checkpoint
        sharded[name] = unwrap_model(extra).sharded_state_dict(prefix=f"{name}.")
    return sharded


def save_checkpoint(root: str, iteration: int, model, optimizer, state: dict, arch: DecoderArch | None = None,
                    extra_models: dict | None = None, save_hf: bool = False) -> str:
    """Save model, optimizer, `extra_models` ({name: model stage}, trained state beside the student's, e.g. SRPO's
    EMA teacher), every rank's RNG and `state` (rank 0's: step, scheduler, data position, ...).

    With `arch` (the model's DecoderArch; checked against the model first), the iteration directory also
    gets megatron_scope_checkpoint.json and a copy of the files `stage_hf_files` put under `root`, so it
    converts to a Hugging Face model with tools/convert_megatron_to_hf.py; with `save_hf` too, it holds that
    model already, in hf_model/ (what the converter would write, streamed from the live model: every rank
    takes part, rank 0 writes), inside the same atomic rename.
    """
    if save_hf and arch is None:
        raise ValueError("save_hf writes the model as a Hugging Face model: give its arch")
    if arch is not None:
        checked_local_params(model, arch)
    final = checkpoint_dir(root, iteration)
    partial = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False, extra_models=extra_models), partial)
    torch.save(_rng_state(), os.path.join(partial, f"rng_rank{rank:05d}.pt"))
    if rank == 0:
        torch.save(dict(state, iteration=iteration, world_size=dist.get_world_size(),
                        extra_models=sorted(extra_models or ())), os.path.join(partial, STATE_FILE))
        if arch is not None:
            _describe_model(partial, os.path.join(root, HF_FILES_SUBDIR), model, arch)
    if save_hf:
        _save_hf_model(partial, model, arch)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
        with open(tracker_tmp, "w") as handle:
            handle.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
    dist.barrier()
    return final


def load_checkpoint(root: str, model, optimizer, extra_models: dict | None = None) -> dict | None:
    """Load the latest complete checkpoint under `root` into `model`, `optimizer` and `extra_models` (at any TP/PP;
    ValueError when the checkpoint lacks one of those) and return its saved state, or None when there is none. RNG
    states are restored when the world size matches."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    directory = checkpoint_dir(root, iteration)
    state = torch.load(os.path.join(directory, STATE_FILE), weights_only=False)
    missing = sorted(set(extra_models or ()) - set(state.get("extra_models", ())))
    if missing:
        raise ValueError(f"checkpoint {directory} holds no {missing} (saved by a run without them): this run cannot "
                         "resume from it")
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True, extra_models=extra_models),
                                     directory)
    unwrap_model(model).load_state_dict(loaded[MODEL_STATE_KEY])
    optimizer.load_state_dict(loaded["optimizer"])
    for name, extra in (extra_models or {}).items():
        unwrap_model(extra).load_state_dict({key.removeprefix(f"{name}."): value for key, value in loaded[name].items()})
    rng_file = os.path.join(directory, f"rng_rank{dist.get_rank():05d}.pt")
    state["rng_restored"] = state["world_size"] == dist.get_world_size() and os.path.isfile(rng_file)
    if state["rng_restored"]:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


# --------------------------------------------------------------------------------------------- HF export metadata
def copy_non_weight_files(src: str, dst: str) -> list[str]:
    """Copy every regular file of `src` that is not a weight file (config, tokenizer, generation config)."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES) and not name.startswith("."):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def stage_hf_files(root: str, hf_dir: str) -> list[str]:
    """Copy the non-weight files of the HF model directory `hf_dir` (config.json, tokenizer, generation
    config) to <root>/hf_files, replacing what was there; `save_checkpoint(..., arch=...)` copies them into
    each checkpoint. Returns the file names."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    staged = os.path.join(root, HF_FILES_SUBDIR)
    temporary = staged + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    copied = copy_non_weight_files(hf_dir, temporary)
    shutil.rmtree(staged, ignore_errors=True)
    os.rename(temporary, staged)
    return copied


def model_metadata(model, arch: DecoderArch, dist_checkpoint: str, hf_dtype: str | None = None,
                   model_state_key: str | None = None) -> dict:
    """The contents of megatron_scope_checkpoint.json for `model` (a GPTModel stage, possibly wrapped).
    dist_checkpoint: its directory, relative to the metadata's; hf_dtype: the dtype name an export writes by
    default (None: the parameters'); model_state_key: the key the dist checkpoint holds the model's sharded
    state under (None: at the top level)."""
    gpt = unwrap_model(model)
    params_dtype = dtype_name(next(gpt.parameters()).dtype)
    return {
        "format_version": FORMAT_VERSION,
        "arch": dataclasses.asdict(arch),
        "hf_model_type": hf_mapping.model_type_of(arch),
        "params_dtype": params_dtype,
        "hf_dtype": hf_dtype or params_dtype,
        "padded_vocab_size": gpt.vocab_size,
        "dist_checkpoint": dist_checkpoint,
        "model_state_key": model_state_key,
    }


def _describe_model(directory: str, staged_hf_files: str, model, arch: DecoderArch) -> None:
    """Write `directory`'s metadata (the dist checkpoint is the directory itself) and copy the staged HF
    files; the HF dtype is the staged config.json's, else the parameters'."""
    config_dtype = None
    if os.path.isdir(staged_hf_files):
        copy_non_weight_files(staged_hf_files, os.path.join(directory, HF_FILES_SUBDIR))
        config_path = os.path.join(staged_hf_files, "config.json")
        if os.path.isfile(config_path):
            with open(config_path) as handle:
                config = json.load(handle)
            config_dtype = config.get("dtype") or config.get("torch_dtype")
    hf_dtype = config_dtype if config_dtype in DTYPES else None
    with open(os.path.join(directory, METADATA_FILE), "w") as handle:
        json.dump(model_metadata(model, arch, ".", hf_dtype, model_state_key=MODEL_STATE_KEY), handle, indent=2)


def hf_model_config(hf_files: str, arch: DecoderArch, dtype: torch.dtype) -> dict | None:
    """The config.json of an HF export of `arch`: None where `hf_files` holds the original's (checked against
    `arch`; it is copied as it is), else one generated from `arch` for `dtype`."""
    path = os.path.join(hf_files, "config.json")
    if not os.path.isfile(path):
        return hf_mapping.hf_config_from_arch(arch, hf_mapping.model_type_of(arch), dtype)
    with open(path) as handle:
        config = json.load(handle)
    if hf_mapping.arch_from_hf_config(config) != arch:
        raise ValueError(f"{path} does not describe the checkpoint's arch {arch}")
    return None


def write_hf_model(output_dir: str, named_tensors, hf_files: str, config: dict | None, dtype: torch.dtype,
                   max_shard_bytes: int = 4 << 30) -> list[str]:
    """A Hugging Face model directory: the non-weight files of `hf_files` (config, tokenizer, generation config),
    `config` as config.json where given (replacing the copied one), and `named_tensors` (HF names) as safetensors
    of `dtype`; returns the safetensors file names."""
    os.makedirs(output_dir, exist_ok=True)
    if os.path.isdir(hf_files):
        copy_non_weight_files(hf_files, output_dir)
    if config is not None:
        with open(os.path.join(output_dir, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, default=lambda value: str(value).removeprefix("torch."))
    return save_safetensors_checkpoint(named_tensors, output_dir, max_shard_bytes, dtype=dtype)


def _save_hf_model(directory: str, model, arch: DecoderArch) -> None:
    """`directory`/hf_model from the live `model` (every rank; rank 0 writes), in the dtype and with the files its
    metadata and hf_files/ name (`_describe_model` wrote them)."""
    stream = iter_hf_weights(model, arch)
    if dist.get_rank() != 0:
        for _ in stream:
            pass
        return
    with open(os.path.join(directory, METADATA_FILE)) as handle:
        dtype = DTYPES[json.load(handle)["hf_dtype"]]
    hf_files = os.path.join(directory, HF_FILES_SUBDIR)
    write_hf_model(os.path.join(directory, HF_MODEL_SUBDIR), stream, hf_files, hf_model_config(hf_files, arch, dtype),
                   dtype)


def read_model_metadata(path: str) -> tuple[str, dict]:
    """(directory, metadata) of a Megatron checkpoint that describes its model: a directory holding
    megatron_scope_checkpoint.json (tools/convert_hf_to_megatron.py's output, or a training iteration saved
    with `arch`), or a training root, taken at its latest complete iteration. ValueError naming the path
    for anything else or another format version."""
    if not os.path.isdir(path):
        raise ValueError(f"Megatron checkpoint {path!r} is not a directory")
    directory = path
    if not os.path.isfile(os.path.join(path, METADATA_FILE)) and os.path.isfile(os.path.join(path, TRACKER_FILE)):
        directory = checkpoint_dir(path, latest_iteration(path))
    metadata_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(metadata_path):
        raise ValueError(
            f"{directory} has no {METADATA_FILE}: convert HF checkpoints with tools/convert_hf_to_megatron.py; "
            "training checkpoints carry it when saved with save_checkpoint(..., arch=...)")
    with open(metadata_path) as handle:
        metadata = json.load(handle)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{metadata_path}: format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    return directory, metadata
