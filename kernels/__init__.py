"""Triton kernels for TopK activation-sparse linear layers.

This is the repository's top-level ``kernels/`` folder, installed as the package ``acttail_kernels``
(pyproject.toml's package-dir mapping): every ``import acttail_kernels`` imports this folder.

Public API:

* ``reference.topk_mask`` / ``reference.sparse_linear_ref``: the exact PyTorch semantics;
* ``prepare_weight(weight [N, K]) -> [K, N]``: the kernel layout, made once at load time;
* ``sparse_linear(x, weight_t, bias, seg_bounds, seg_keep, keep=None, path=None, thr_guess=None,
  options=SHIPPED_OPTIONS)``: the Triton path (``keep``: the budgets as a persistent int32 device
  tensor, read by the kernels; ``thr_guess``: a persistent int32 tensor, one per segment, where the
  selection leaves its threshold and starts the next call's search, as fast as the guess is good,
  never less exact; ``options``: a ``SelectOptions``, how the selection splits its work and
  launches, for benchmarks to compare against the shipped one);
* ``gemv_path(m, n, k, seg_bounds, seg_keep, device) -> GemvPath``: what that call runs after the
  selection (the channel-list or walking sparse GEMV, or dense cuBLAS), from the crossover table
  measured on that GPU model; ``largest_faster_step(n, k, seg_bounds, seg_keep, device) -> int``:
  the most tokens that call beats the dense layer at there (policy auto sparsifies only those steps);
* ``threshold_linear(x, weight_t, bias, seg_bounds, thresholds, path=None)``: threshold mode (TEAL's
  rule, ``reference.threshold_linear_ref``): a segment keeps the channels with |x| >= its threshold
  (``thresholds``: a persistent float32 device tensor, one per segment); one launch, no selection;
  ``threshold_path(m, n, k, device)`` says which loop it runs (for one token, a channel list each
  GEMV program compacts itself) or whether it runs dense cuBLAS;
* ``kernels_available(device) -> (ok, reason)``;
* ``cpu``: the CPU paths in PyTorch (no Triton): exact TopK, a GEMV over the kept weight rows and
  the masked GEMM, on weights in ``cpu.prepare_weight``'s layout.

Only ``reference``, ``cpu`` and ``prepare_weight`` work without Triton: the Triton modules load on first use,
so set TRITON_INTERPRET=1 before that to run the kernels (slowly) on CPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from . import cpu, reference

if TYPE_CHECKING:
    from .crossover import GemvPath
    from .dispatch import gemv_path, largest_faster_step, sparse_linear, threshold_linear, threshold_path
    from .topk_select import SelectOptions

__all__ = [
    "GemvPath",
    "SelectOptions",
    "cpu",
    "gemv_path",
    "kernels_available",
    "largest_faster_step",
    "prepare_weight",
    "reference",
    "sparse_linear",
    "threshold_linear",
    "threshold_path",
]

# Loaded on first use: the Triton modules, and pydantic for the crossover table.
_LAZY_API = {
    "sparse_linear": ".dispatch",
    "gemv_path": ".dispatch",
    "largest_faster_step": ".dispatch",
    "threshold_linear": ".dispatch",
    "threshold_path": ".dispatch",
    "GemvPath": ".crossover",
    "SelectOptions": ".topk_select",
}


def __getattr__(name: str):
    if name in _LAZY_API:
        return getattr(importlib.import_module(_LAZY_API[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] nn.Linear weight -> contiguous [K, N]: one input channel's weights are one contiguous
    row, so skipping a channel skips a whole row of memory."""
    if weight.dim() != 2:
        raise ValueError(f"prepare_weight expects a 2-D [out_features, in_features] weight, got {tuple(weight.shape)}")
    return weight.t().contiguous()


def kernels_available(device: torch.device | str) -> tuple[bool, str]:
    """(True, what runs) if ``sparse_linear`` can run on ``device``, else (False, why not)."""
    device = torch.device(device)
    try:
        import triton
    except ImportError as err:
        return False, f"no Triton/CUDA on this platform: triton is not installed ({err}); pip install 'triton>=3.4'"
    from .topk_select import triton_interpreted

    if triton_interpreted():
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): exact but slow, for tests"
    if device.type != "cuda":
        return False, (
            f"no Triton/CUDA on this platform: device {device} is not a CUDA GPU (set TRITON_INTERPRET=1 "
            "before the kernels load to run them slowly on CPU, or use reference.sparse_linear_ref)"
        )
    if not torch.cuda.is_available():
        return False, "no Triton/CUDA on this platform: torch.cuda.is_available() is False"
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if capability < (8, 0):
        return False, f"{name} has compute capability {capability}; the bf16 kernels need 8.0 or newer"
    return True, f"Triton {triton.__version__} on {name}"
