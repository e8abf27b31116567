"""Compare a parallel Megatron model with a single-process reference, shard by shard.

The reference saves its weights and its gradients with `dist_checkpointing` (gradients written in the
parameters' places); a TP x PP model loads both in its own layout, so Megatron itself reshards the
reference and every rank compares only the shard it holds.
"""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing

from megatron_scope.megatron.model import unwrap_model


def save_weights(model, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), path)


def load_weights(model, path: str) -> None:
    module = unwrap_model(model)
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), path))


def current_grads(model) -> dict[str, torch.Tensor]:
    """Each parameter's gradient: Megatron DDP's `main_grad` if present, else `.grad`."""
    return {
        name: (getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
        for name, p in unwrap_model(model).named_parameters()
    }


@torch.no_grad()
def save_grads(model, grads: dict[str, torch.Tensor], path: str) -> None:
    """Save `grads` as if they were the weights (the model's weights are overwritten)."""
    module = unwrap_model(model)
    for name, param in module.named_parameters():
        param.copy_(grads[name])
    save_weights(module, path)


def relative_errors(model, tensors: dict[str, torch.Tensor], path: str) -> dict[str, float]:
    """max|t - ref| / max|ref| per parameter name, `ref` loaded from `path` in this rank's layout."""
    module = unwrap_model(model)
    with torch.no_grad():  # dist_checkpointing.load writes into the parameters themselves: restore them after
        weights = {name: p.detach().clone() for name, p in module.named_parameters()}
        reference = {k: v.clone() for k, v in dist_checkpointing.load(module.sharded_state_dict(), path).items()
                     if isinstance(v, torch.Tensor)}
        for name, param in module.named_parameters():
            param.copy_(weights[name])
    errors = {}
    for name, tensor in tensors.items():
        ref = reference[name]
        if ref.shape != tensor.shape:
            raise AssertionError(f"{name}: reference shard {tuple(ref.shape)} vs local {tuple(tensor.shape)}")
        errors[name] = float((tensor.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
    return errors
