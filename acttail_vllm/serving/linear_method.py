"""``ActTailLinearMethod``: the linear method vLLM gives every decoder projection under ``acttail``.

Shaped like vLLM's own methods (``fp8.py``, ``awq_triton.py``): weights are loaded as vLLM loads
them, re-laid out once for the kernels (CUDA) or the CPU paths, and ``apply`` calls the
``acttail::sparse_linear`` op.
Everything ActTail keeps for one module lives in one ``SparseLinearState``, registered on vLLM's
layer as ``layer.acttail``; ``SparseModules`` (one per worker) collects them and applies the budgets
the ``BudgetResolver`` returns once the last module is loaded.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, UnquantizedLinearMethod
from vllm.platforms import current_platform
from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

from acttail_kernels import cpu
from acttail_vllm.errors import ActTailError, logs_startup_errors
from acttail_vllm.serving.budgets import DecoderProjection, ModuleBudget
from acttail_vllm.serving.op import CallSite, register_call_site, sparsifies_some_step
from acttail_vllm.serving.resolver import BudgetResolver, LoadedModule
from acttail_vllm.serving.settings import ActTailSettings, SettingsError
from acttail_vllm.serving.stats import new_stats

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it
#: Step sizes the warm-up runs: up to one past the sparse GEMV's largest batch (16 tokens), after
#: which every larger step launches the same kernel variants.
WARM_UP_MAX_ROWS = 17


class SparseLinearState(torch.nn.Module):
    """One module's ActTail state: its output segments, budget, kernel layout and counters.

    The tensors the op reads and updates are buffers, so they follow the layer's device and
    torch.compile sees them as module state: ``keep`` (int32, kept channels per segment; read on
    the device, so a captured graph follows the budget), ``thr_guess`` (int32, where the selection
    starts the next search) and ``stats`` (int64 counters, see ``stats.py``; on a GPU a mapped view
    of pinned host memory ``stats_host``, read by the metrics thread without touching the GPU).
    """

    def __init__(
        self,
        proj: DecoderProjection,
        out_sizes: list[int],
        rank_shards: tuple[int, ...],
        on_gpu: bool,
    ):
        super().__init__()
        self.proj = proj
        self.out_sizes = tuple(out_sizes)
        self.rank_shards = rank_shards
        self.seg_bounds = [0, *itertools.accumulate(out_sizes)]
        #: Whether this module counts (set with the budget). On CPU every module counts its kept
        #: channels from the masks it applies. On a GPU every counter update is one more tiny kernel
        #: per step, so only one module counts (tokens per path; ``counting_modules``); the kernels
        #: keep exactly ``keep`` channels per row by construction.
        self.counts_stats = False
        #: whether the server's policy sparsifies this module at any step size (set with the budget)
        self.ever_sparsified = True
        self.budget: ModuleBudget | None = None
        self.call_site: CallSite | None = None  # what the op's calls take besides tensors, once budgeted
        num_segments = len(out_sizes)
        self.register_buffer("keep", torch.zeros(num_segments, dtype=torch.int32), persistent=False)
        self.register_buffer("thr_guess", torch.zeros(num_segments, dtype=torch.int32), persistent=False)
        self.stats_host = new_stats(num_segments, pin_memory=on_gpu)
        stats = get_accelerator_view_from_cpu_tensor(self.stats_host) if on_gpu else self.stats_host
        self.register_buffer("stats", stats, persistent=False)

    def sparsified_with(self, budget: ModuleBudget, settings: ActTailSettings) -> bool:
        """Whether the server's policy sparsifies this module of ``budget`` at any step size."""
        return sparsifies_some_step(
            self.seg_bounds,
            list(budget.seg_keep),
            budget.in_features,
            self.keep.device,
            settings.policy.value,
            settings.max_sparse_tokens,
        )

    def set_budget(
        self, budget: ModuleBudget, settings: ActTailSettings, counts_stats: bool, ever_sparsified: bool
    ) -> None:
        """Once the module is on its device: the budget, in ``keep`` and with the server's policy and
        token limit as the op's call site, which counts tokens and kept channels if ``counts_stats``;
        ``ever_sparsified``: ``sparsified_with`` this budget and settings."""
        self.budget = budget
        self.counts_stats = counts_stats
        self.ever_sparsified = ever_sparsified
        self.keep.copy_(torch.tensor(budget.seg_keep, dtype=torch.int32))
        self.call_site = CallSite(
            self.seg_bounds, list(budget.seg_keep), self.counts_stats, settings.policy.value, settings.max_sparse_tokens
        )
        register_call_site(self.keep, self.call_site)

    def sparse_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stats: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ActTail op on this module's state; ``stats`` replaces its counters and counts nothing
        (the warm-up's calls are not served tokens; eager only). torch.compile traces the registered
        op, which takes tensors only; run eagerly (``--enforce-eager``), the op's function is called
        without the dispatcher, whose custom-op call costs about as much host time as the op's own
        Python."""
        if torch.compiler.is_compiling():
            return torch.ops.acttail.sparse_linear(x, weight, bias, self.keep, self.thr_guess, self.stats)
        counters = self.stats if stats is None else stats
        return self.call_site.run(x, weight, bias, self.keep, self.thr_guess, counters, count_stats=stats is None)

    def projection_weights(self, weight: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each projection's [out, in] view of the module's re-laid-out weight, in order."""
        if weight.is_cuda:
            yield from torch.split(weight.t(), self.out_sizes)  # the kernel layout [in, out]
        else:
            in_features = weight.numel() // self.seg_bounds[-1]
            yield from (block.t() for block in cpu.segment_blocks(weight, in_features, self.seg_bounds))


def counting_modules(sparsified: list[bool], on_gpu: bool) -> list[bool]:
    """Which modules count tokens and kept channels: on CPU all; on a GPU one counts for all, the
    first the policy sparsifies (so its token paths are a sparsified module's), else the first."""
    if not on_gpu:
        return [True] * len(sparsified)
    counter = sparsified.index(True) if True in sparsified else 0
    return [i == counter for i in range(len(sparsified))]


class SparseModules:
    """This worker's ActTail modules; once the last one is loaded, their budgets."""

    def __init__(self, resolver: BudgetResolver):
        self.resolver = resolver
        self.layers: list[torch.nn.Module] = []
        self._loaded: set[int] = set()

    @property
    def states(self) -> list[SparseLinearState]:
        return [layer.acttail for layer in self.layers]

    def register(self, layer: torch.nn.Module) -> None:
        self.layers.append(layer)

    def loaded(self, layer: torch.nn.Module) -> bool:
        """Mark ``layer`` processed; True when it was the last one and every budget is set."""
        self._loaded.add(id(layer))
        if self.resolver.profile is not None or len(self._loaded) < len(self.layers):
            return False
        modules = [
            LoadedModule(
                layer.acttail.proj, tuple(layer.acttail.projection_weights(layer.weight)), layer.acttail.rank_shards
            )
            for layer in self.layers
        ]
        settings = self.resolver.source.settings
        budgets = self.resolver.resolve(modules)
        on_gpu = self.layers[0].weight.is_cuda
        sparsified = [layer.acttail.sparsified_with(b, settings) for layer, b in zip(self.layers, budgets)]
        counting = counting_modules(sparsified, on_gpu)
        for layer, budget, counts, ever_sparsified in zip(self.layers, budgets, counting, sparsified):
            layer.acttail.set_budget(budget, settings, counts_stats=counts, ever_sparsified=ever_sparsified)
        if on_gpu:
            self.warm_up()
        return True

    def warm_up(self, max_rows: int = WARM_UP_MAX_ROWS) -> None:
        """Run every distinct module once per step size up to ``max_rows`` tokens, so that each
        Triton variant serving can launch is compiled now, not inside a request (variants depend on
        the shape, the budget and the step size only up to the sparse GEMV's largest batch)."""
        start, calls = time.perf_counter(), 0
        seen = set()
        for layer in self.layers:
            state = layer.acttail
            bias = getattr(layer, "bias", None)
            key = (
                tuple(layer.weight.shape),
                layer.weight.dtype,
                tuple(state.seg_bounds),
                state.budget.seg_keep,
                bias is None,
            )
            if key in seen:
                continue
            seen.add(key)
            scratch = torch.zeros_like(state.stats)
            for rows in range(1, max_rows + 1):
                x = torch.randn(rows, state.budget.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
                state.sparse_linear(x, layer.weight, bias, stats=scratch)
                calls += 1
        torch.cuda.synchronize()
        logger.info(
            "ActTail: kernel warm-up: %d module shapes x %d step sizes in %.1f s",
            len(seen),
            max_rows,
            time.perf_counter() - start,
        )


class ActTailLinearMethod(LinearMethodBase):
    """TopK-sparse inputs for one decoder module (merged qkv / gate_up keep one budget each)."""

    def __init__(self, modules: SparseModules, proj: DecoderProjection) -> None:
        self.modules = modules
        self.proj = proj
        self.dense = UnquantizedLinearMethod()

    @logs_startup_errors
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        self.dense.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        if len(output_partition_sizes) != len(self.proj.projections):
            raise SettingsError(
                f"ActTail: {self.proj.module} of layer {self.proj.layer} has "
                f"{len(output_partition_sizes)} output segments, expected {self.proj.projections}"
            )
        on_gpu = current_platform.is_cuda_alike()
        # vLLM sets both before create_weights; k/v heads are replicated when tp > KV heads
        shards = self.proj.rank_shards(layer.tp_size, getattr(layer, "num_kv_head_replicas", 1))
        layer.acttail = SparseLinearState(self.proj, output_partition_sizes, shards, on_gpu)
        self.modules.register(layer)

    @logs_startup_errors
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.is_cuda:
            import acttail_kernels

            available, reason = acttail_kernels.kernels_available(layer.weight.device)
            if not available:
                raise ActTailError(
                    f"ActTail needs its Triton kernels on {layer.weight.device}: {reason}. "
                    "Install triton>=3.4 for this CUDA device, or serve on CPU"
                )
            layer.weight = torch.nn.Parameter(acttail_kernels.prepare_weight(layer.weight.data), requires_grad=False)
        else:
            weight = cpu.prepare_weight(layer.weight.data, layer.acttail.seg_bounds)
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        if self.modules.loaded(layer):
            from vllm.distributed import get_tensor_model_parallel_rank

            from acttail_vllm.serving.metrics import start_snapshot_writer

            if get_tensor_model_parallel_rank() == 0:
                start_snapshot_writer(self.modules)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.acttail.sparse_linear(x, layer.weight, bias)
