"""Reference forward: a Hugging Face model with the profile's TopK budgets applied by hooks.

The plain-PyTorch twin of what the vLLM plugin serves; tests and ``acttail eval`` compare the two.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from acttail_kernels.reference import topk_mask
from acttail_vllm.serving.budgets import kept_count
from acttail_vllm.profiling.profile import PROJECTION_NAMES, Profile


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama-family transformers model (``model.model.layers``)."""
    return getattr(model, "model", model).layers


def _projection_modules(model: torch.nn.Module) -> Iterator[tuple[int, str, torch.nn.Linear]]:
    for index, layer in enumerate(decoder_layers(model)):
        for name in PROJECTION_NAMES:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            yield index, name, getattr(parent, name)


def _topk_hook(keep: int):
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        return (x * topk_mask(flat, keep).reshape(x.shape), *args[1:])

    return hook


@contextmanager
def sparsified(model: torch.nn.Module, profile: Profile) -> Iterator[torch.nn.Module]:
    """Within the block, every projection of ``model`` sees its inputs TopK-sparsified."""
    handles = [
        module.register_forward_pre_hook(
            _topk_hook(kept_count(profile.sparsity(layer, name), module.in_features))
        )
        for layer, name, module in _projection_modules(model)
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
