"""Reference forward: a Hugging Face model with the profile's TopK budgets applied by hooks.

The plain-PyTorch twin of what the vLLM plugin serves; tests and ``acttail eval`` compare the two.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from acttail_kernels.reference import sparse_linear_ref, topk_mask
from acttail_vllm.profiling.profile import Profile
from acttail_vllm.serving.budgets import MERGED_PROJECTIONS, DecoderProjection, kept_count


def sparse_modules(model: torch.nn.Module) -> Iterator[tuple[DecoderProjection, torch.nn.Linear]]:
    """Every decoder linear ActTail sparsifies, with what it is (its layer, name, and projections
    stacked in its output: one each, or three and two in Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj``). A mixture-of-experts block has none of these modules: its experts stay dense."""
    for index, layer in enumerate(decoder_layers(model)):
        for parent in (layer.self_attn, getattr(layer, "mlp", None)):
            for name, projections in MERGED_PROJECTIONS.items():
                module = getattr(parent, name, None)
                if isinstance(module, torch.nn.Linear):
                    yield DecoderProjection(index, name, projections), module


def kept_counts(proj: DecoderProjection, module: torch.nn.Linear, profile: Profile, shards: int = 1) -> list[int]:
    """Input channels each projection of ``module`` keeps per token (of each of ``shards`` input slices)."""
    return [kept_count(profile.sparsity(proj.layer, name), module.in_features // shards) for name in proj.projections]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    return getattr(model, "model", model).layers


def _topk_hook(keep: int, shards: int):
    """Keep the ``keep`` largest entries of each of ``shards`` equal slices of the input."""

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        mask = torch.cat([topk_mask(part, keep) for part in flat.chunk(shards, dim=1)], dim=1)
        return (x * mask.reshape(x.shape), *args[1:])

    return hook


def _segments_hook(seg_bounds: list[int], keeps: list[int]):
    """A fused module's output recomputed with one TopK per output segment on the same input, as
    vLLM's merged modules compute it (a pre-hook could sparsify the input only once)."""

    def hook(module: torch.nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        return sparse_linear_ref(flat, module.weight, module.bias, seg_bounds, keeps).reshape(output.shape)

    return hook


@contextmanager
def sparsified(model: torch.nn.Module, profile: Profile, tp_size: int = 1) -> Iterator[torch.nn.Module]:
    """Within the block, every projection of ``model`` sees its inputs TopK-sparsified. With
    ``tp_size``, the row-parallel ones (o_proj, down_proj) keep the TopK of each of ``tp_size``
    input shards, as vLLM's tensor-parallel ranks do."""
    handles, hooked = [], 0
    try:
        for proj, module in sparse_modules(model):
            layer, projections = proj.layer, proj.projections
            shards = tp_size if proj.row_parallel else 1
            keeps = kept_counts(proj, module, profile, shards)
            hooked += len(projections)
            if len(projections) == 1:
                handles.append(module.register_forward_pre_hook(_topk_hook(keeps[0], shards)))
                continue
            rows = [profile.layers[layer].projections[name].out_features for name in projections]
            if sum(rows) != module.out_features:
                raise ValueError(
                    f"the profile of {profile.model.name} gives layer {layer} {', '.join(projections)} "
                    f"{sum(rows)} output rows, the model has {module.out_features}: it was made for another model"
                )
            handles.append(module.register_forward_hook(_segments_hook([0, *itertools.accumulate(rows)], keeps)))
        profiled = sum(len(layer.projections) for layer in profile.layers)
        if hooked != profiled:
            raise ValueError(
                f"the profile of {profile.model.name} has {profiled} projections, the model {hooked}: "
                "it was made for another model"
            )
        yield model
    finally:
        for handle in handles:
            handle.remove()
