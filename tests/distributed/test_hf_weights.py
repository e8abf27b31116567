"""Real Megatron GPTModels from Hugging Face weights, on gloo ranks: for tiny random Qwen2 (QKV bias, tied),
Qwen3 (q/k norm, head_dim != hidden/heads) and Llama (untied, one KV head) models,

- at TP x PP in {1,2} x {1,2}, the Megatron model loaded with `load_hf_weights` gives the transformers
  model's logits (fp32, max abs diff <= 1e-4), and `iter_hf_weights` gives back the HF tensors bitwise;
- the on-disk converters round-trip HF -> Megatron dist checkpoint -> HF bitwise (config and tokenizer files
  copied), and the converted TP=1 dist checkpoint loads at TP=2, PP=2 with the same logits (Llama's
  vocabulary pads to 384 rows at TP=1 and 512 at TP=2, so this also crosses a padding change).

All layouts run inside one 4-rank job (DP fills the rest of the world), so process start-up is paid once.
"""

import importlib.util
import json
import os
from functools import partial

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from tests.unit.megatron.test_hf_mapping import TINY_HF_CONFIGS, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
LOGITS_TOLERANCE = 1e-4
TOKENIZER_FILE = "tokenizer_config.json"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Per family: a saved random HF model directory, fixed tokens and the transformers model's logits."""
    models = {}
    generator = torch.Generator().manual_seed(0)
    for family in TINY_HF_CONFIGS:
        model = tiny_hf_model(family)
        directory = tmp_path_factory.mktemp(f"hf_{family}")
        model.save_pretrained(directory)
        (directory / TOKENIZER_FILE).write_text(json.dumps({"model_max_length": 128, "family": family}))
        tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=generator)
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        models[family] = {"dir": str(directory), "tokens": tokens, "logits": logits}
    return models


def _convert_all(rank, world_size, jobs):
    """One process: every family HF -> Megatron -> HF through the converters' command lines."""
    to_megatron, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    for hf_dir, megatron_dir, hf_out, max_shard_bytes in jobs:
        to_megatron.main(["--hf-dir", hf_dir, "--output-dir", megatron_dir])
        to_hf.main(["--megatron-dir", megatron_dir, "--output-dir", hf_out, "--max-shard-bytes", str(max_shard_bytes)])


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """Per family: (Megatron checkpoint dir, HF dir converted back)."""
    out = tmp_path_factory.mktemp("converted")
    dirs = {f: (str(out / f"megatron_{f}"), str(out / f"hf_{f}")) for f in hf_models}
    # llama with small shards: exercises the sharded writer and index through the converter
    jobs = [(hf_models[f]["dir"], *dirs[f], 200_000 if f == "llama" else 4 << 30) for f in hf_models]
    run_on_ranks(_convert_all, 1, args=(jobs,))
    return dirs


def _logits(model, tokens, vocab_size):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere): 1F1B schedule, forward only,
    then an all-gather of the vocab shards over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, torch.arange(batch.shape[1]).expand_as(batch), None)
        return output, lambda output_tensor, non_loss_data=True: output_tensor.detach()

    store = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
        collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    shard = store[0].contiguous()
    shards = [torch.empty_like(shard) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, shard, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)[..., :vocab_size]


def _export_mismatches(model, arch, reference, dst_rank, bucket_bytes):
    """On dst_rank: names whose exported tensor differs from `reference` (bitwise), missing or extra names."""
    import torch.distributed as dist

    from megatron_scope.megatron.weight_export import iter_hf_weights

    exported = {}
    for name, tensor in iter_hf_weights(model, arch, bucket_bytes=bucket_bytes, dst_rank=dst_rank):
        assert name not in exported, f"{name} yielded twice"
        exported[name] = tensor.clone()
    if dist.get_rank() != dst_rank:
        assert not exported, f"rank {dist.get_rank()} yielded {sorted(exported)[:3]} but is not dst_rank"
        return None
    wrong = [n for n in reference if n not in exported or not torch.equal(exported[n], reference[n])]
    return {"wrong": wrong, "extra": sorted(set(exported) - set(reference)), "count": len(exported)}


def _check_all_layouts(rank, world_size, hf_models, converted):
    from megatron.core import dist_checkpointing

    from megatron_scope.megatron import hf_mapping
    from megatron_scope.megatron.model import build_gpt_model
    from megatron_scope.megatron.parallel import initialize_model_parallel
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint, load_hf_weights

    results = {}
    archs, checkpoints, references = {}, {}, {}
    for family, data in hf_models.items():
        checkpoints[family] = SafetensorsCheckpoint(data["dir"])
        with open(os.path.join(data["dir"], "config.json")) as f:
            archs[family] = hf_mapping.arch_from_hf_config(json.load(f))
        references[family] = {name: checkpoints[family][name] for name in checkpoints[family]}
    for tp, pp in LAYOUTS:  # outer: Megatron's process groups are built once per layout
        initialize_model_parallel(tp, pp, seed=100 + rank)
        for family, data in hf_models.items():
            arch, reference = archs[family], references[family]
            logits_diff = partial(_max_diff, data["logits"])
            model = build_gpt_model(arch)
            load_hf_weights(model, arch, checkpoints[family])
            results[(family, tp, pp, "load_hf_weights")] = logits_diff(_logits(model, data["tokens"], arch.vocab_size))
            # small buckets: several per stage; dst 0 and the last rank (another stage and TP rank)
            for dst_rank, bucket_bytes in ((0, 100_000), (world_size - 1, 1 << 30)):
                results[(family, tp, pp, "export", dst_rank)] = _export_mismatches(
                    model, arch, reference, dst_rank, bucket_bytes)
            if (tp, pp) == (2, 2):
                results[(family, "bad_checkpoint")] = _bad_checkpoint_leaves_model_unchanged(model, arch, reference)
                converted_model = build_gpt_model(arch)
                dist_dir = os.path.join(converted[family][0], "dist_ckpt")
                converted_model.load_state_dict(dist_checkpointing.load(converted_model.sharded_state_dict(), dist_dir))
                results[(family, tp, pp, "converted")] = logits_diff(
                    _logits(converted_model, data["tokens"], arch.vocab_size))
                results[(family, tp, pp, "converted_export", 0)] = _export_mismatches(
                    converted_model, arch, reference, 0, 1 << 20)
    return results


def _bad_checkpoint_leaves_model_unchanged(model, arch, reference):
    """load_hf_weights with one mis-shaped tensor among otherwise new values: ValueError naming it, and no
    parameter changed. Returns the error message."""
    from megatron_scope.megatron.weight_export import load_hf_weights

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bad = {name: tensor * 2 for name, tensor in reference.items()}
    bad["model.layers.3.mlp.down_proj.weight"] = torch.zeros(3, 3)
    try:
        load_hf_weights(model, arch, bad)
    except ValueError as error:
        unchanged = all(torch.equal(before[name], p) for name, p in model.named_parameters())
        assert unchanged, "load_hf_weights changed parameters before raising"
        return str(error)
    raise AssertionError("load_hf_weights accepted a mis-shaped tensor")


def _max_diff(reference, logits):
    return None if logits is None else float((logits - reference).abs().max())


@pytest.fixture(scope="module")
def layout_results(hf_models, converted):
    """Every rank's results of `_check_all_layouts`, merged: key -> list of the values ranks reported."""
    merged = {}
    for rank_results in run_on_ranks(_check_all_layouts, 4, args=(hf_models, converted), timeout=600):
        for key, value in rank_results.items():
            if value is not None:
                merged.setdefault(key, []).append(value)
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_converters_round_trip_on_disk_bitwise(hf_models, converted, family):
    from safetensors.torch import load_file

    data = hf_models[family]
    megatron_dir, hf_out = converted[family]
    for name in ("config.json", TOKENIZER_FILE):
        with open(os.path.join(data["dir"], name)) as a, open(os.path.join(hf_out, name)) as b:
            assert json.load(a) == json.load(b), name
    original = load_file(os.path.join(data["dir"], "model.safetensors"))
    files = sorted(f for f in os.listdir(hf_out) if f.endswith(".safetensors"))
    assert (len(files) > 1) == (family == "llama"), files
    round_trip = {k: v for f in files for k, v in load_file(os.path.join(hf_out, f)).items()}
    assert set(round_trip) == set(original)
    for name, tensor in original.items():
        assert round_trip[name].dtype == tensor.dtype and torch.equal(round_trip[name], tensor), name
    with open(os.path.join(megatron_dir, "megatron_scope_checkpoint.json")) as f:
        assert json.load(f)["hf_model_type"] == family


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_megatron_logits_equal_transformers_at_every_layout(layout_results, family):
    for tp, pp in LAYOUTS:
        for source in ("load_hf_weights",) + (("converted",) if (tp, pp) == (2, 2) else ()):
            diffs = layout_results.get((family, tp, pp, source))
            # every last-stage rank reports: the TP ranks of every DP replica
            assert diffs and len(diffs) == 4 // pp, (tp, pp, source, diffs)
            assert max(diffs) <= LOGITS_TOLERANCE, f"TP={tp} PP={pp} {source}: logits differ by {max(diffs):.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_iter_hf_weights_gives_back_the_hf_tensors_bitwise(hf_models, layout_results, family):
    from megatron_scope.megatron.weight_export import SafetensorsCheckpoint

    expected_count = len(SafetensorsCheckpoint(hf_models[family]["dir"]))
    for tp, pp in LAYOUTS:
        kinds = [("export", 0), ("export", 3)] + ([("converted_export", 0)] if (tp, pp) == (2, 2) else [])
        for kind, dst in kinds:
            (export,) = layout_results[(family, tp, pp, kind, dst)]  # exactly one rank (dst) yields
            assert export["wrong"] == [] and export["extra"] == [], (tp, pp, kind, dst, export)
            assert export["count"] == expected_count


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TINY_HF_CONFIGS))
def test_load_hf_weights_rejects_a_bad_checkpoint_before_changing_anything(layout_results, family):
    messages = layout_results[(family, "bad_checkpoint")]
    assert len(messages) == 4  # every rank raised
    assert all("model.layers.3.mlp.down_proj.weight" in m and "(3, 3)" in m for m in messages), messages[0]
