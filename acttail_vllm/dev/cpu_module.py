"""One CPU decoder projection with its ActTail state, as the linear method leaves it after loading
(kernel layout for the CPU GEMV, vLLM's dense layer beside it), for tests and benchmarks that run a
module without a model."""

from __future__ import annotations

import torch

from acttail_vllm.serving.budgets import DecoderProjection


def cpu_sparse_module(
    proj: DecoderProjection, out_sizes: list[int], k: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.nn.Module, torch.Tensor]:
    """Module ``proj`` of ``out_sizes`` outputs over ``k`` inputs (weights from ``gen``), its state as
    ``layer.acttail``, no budget set yet; returns it and its [N, K] weight."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from acttail_kernels import cpu
    from acttail_vllm.serving.linear_method import SparseLinearState

    weight = (torch.randn(sum(out_sizes), k, generator=gen) / k**0.5).to(dtype)
    layer = torch.nn.Module()
    layer.acttail = SparseLinearState(proj, out_sizes, (1, 1), on_gpu=False)
    layer.weight = torch.nn.Parameter(cpu.prepare_weight(weight, layer.acttail.seg_bounds), requires_grad=False)
    layer.acttail.add_dense_layer(UnquantizedLinearMethod(), weight.clone(), None)
    return layer, weight
