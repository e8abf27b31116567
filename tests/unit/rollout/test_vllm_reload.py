"""The "scope_shm" backend's use of vLLM's layerwise reload on a toy model (no engine starts): layers that
no update fills themselves (a RoPE cache, a tied head) come back without vLLM's false "Failed to load
weights" warning, and a weight that is really missing still gets it."""

import contextlib
import logging

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.model_loader.reload import (  # noqa: E402
    finalize_layerwise_reload,
    initialize_layerwise_reload,
    record_metadata_for_reloading,
)

from megatron_scope.rollout.vllm_weight_transfer import restore_layers_without_own_weights  # noqa: E402

LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryEmbedding(torch.nn.Module):
    """Like vLLM's: only a cache computed at start, a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cos_sin_cache", torch.arange(8.0).reshape(4, 2), persistent=False)


class Weighted(torch.nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, 2), requires_grad=False)


class VocabParallelEmbedding(Weighted):
    pass


class RMSNorm(Weighted):
    pass


class ParallelLMHead(Weighted):
    pass


class ToyModel(torch.nn.Module):
    """embed_tokens and lm_head share one parameter (tied), as after vLLM's `ParallelLMHead.tie_weights`."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(5)
        self.rotary_emb = RotaryEmbedding()
        self.norm = RMSNorm(1)
        self.lm_head = ParallelLMHead(5)
        self.lm_head.weight = self.embed_tokens.weight


def load(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """What a model's `load_weights` does with each checkpoint tensor (the tied head is never sent)."""
    for name, tensor in weights.items():
        param = model.get_parameter(name)
        param.weight_loader(param, tensor)  # the reload's wrapper around vLLM's default_weight_loader


@contextlib.contextmanager
def layerwise_warnings():
    """The messages vLLM's layerwise reload logs at WARNING inside (whatever VLLM_LOGGING_LEVEL says)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    vllm_logger = logging.getLogger(LAYERWISE_LOGGER)
    old_level = vllm_logger.level
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        vllm_logger.removeHandler(handler)
        vllm_logger.setLevel(old_level)


def update(model: torch.nn.Module, weights: dict[str, torch.Tensor], restore: bool = True):
    """One update as the backend runs it; returns (restored layers, vLLM's warnings)."""
    restored = []
    with layerwise_warnings() as warnings:
        initialize_layerwise_reload(model)
        load(model, weights)
        if restore:
            restored = restore_layers_without_own_weights(model)
        finalize_layerwise_reload(model, None)
    return restored, warnings


@pytest.fixture
def model():
    model = ToyModel()
    record_metadata_for_reloading(model)
    return model


def test_layers_without_own_weights_come_back_without_a_warning(model):
    cache, table = model.rotary_emb.cos_sin_cache, model.embed_tokens.weight
    new_table = torch.randn(5, 2)
    restored, warnings = update(model, {"embed_tokens.weight": new_table, "norm.weight": torch.full((1, 2), 3.0)})
    assert warnings == []
    assert sorted(restored) == ["ParallelLMHead", "RotaryEmbedding"]
    assert model.rotary_emb.cos_sin_cache is cache and not cache.is_meta
    assert torch.equal(cache, torch.arange(8.0).reshape(4, 2))
    assert model.embed_tokens.weight is table and model.lm_head.weight is table  # still tied, updated in place
    assert torch.equal(table, new_table)
    assert torch.equal(model.norm.weight, torch.full((1, 2), 3.0))
    assert "cos_sin_cache" in model.rotary_emb._non_persistent_buffers_set
    # and again: a second update starts from the restored state
    restored, warnings = update(model, {"embed_tokens.weight": new_table + 1, "norm.weight": torch.ones(1, 2)})
    assert warnings == [] and torch.equal(model.lm_head.weight, new_table + 1)


def test_a_missing_weight_still_warns(model):
    """Only layers that cannot get weights are restored quietly: a parameter of its own that got nothing is
    vLLM's "Failed to load weights", as before."""
    restored, warnings = update(model, {"embed_tokens.weight": torch.randn(5, 2)})
    assert sorted(restored) == ["ParallelLMHead", "RotaryEmbedding"]
    assert warnings == ["RMSNorm: Failed to load weights"]
    # no embedding: the tied head got nothing either
    restored, warnings = update(model, {"norm.weight": torch.ones(1, 2)})
    assert restored == ["RotaryEmbedding"]
    assert sorted(warnings) == ["ParallelLMHead: Failed to load weights",
                                "VocabParallelEmbedding: Failed to load weights"]


def test_without_the_restore_vllm_warns_about_the_rotary_cache_and_the_tied_head(model):
    """What `restore_layers_without_own_weights` prevents (vLLM 0.32's layerwise reload counts buffers)."""
    _, warnings = update(model, {"embed_tokens.weight": torch.randn(5, 2), "norm.weight": torch.ones(1, 2)},
                         restore=False)
    assert sorted(warnings) == ["ParallelLMHead: Failed to load weights", "RotaryEmbedding: Failed to load weights"]
    assert not model.rotary_emb.cos_sin_cache.is_meta  # vLLM's own fallback restores them too
    assert model.lm_head.weight is model.embed_tokens.weight
