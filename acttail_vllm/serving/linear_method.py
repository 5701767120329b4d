"""``ActTailLinearMethod``: the linear method vLLM gives every decoder projection under ``acttail``.

Shaped like vLLM's own methods (``fp8.py``, ``awq_triton.py``): weights are loaded as vLLM loads
them, re-laid out once for the kernels (CUDA) or the CPU paths, and ``apply`` calls the
``acttail::sparse_linear`` op (compiled on a CPU, behind a branch on the step size:
``SparseLinearState.branch_on_step_size``). On a CPU a module also keeps vLLM's own dense layer (vLLM's
prepacked copy of the weight for its CPU GEMM) for the steps it leaves dense, as memory allows
(``SecondCopies``), and a module the policy never sparsifies keeps only that one and runs as in
dense vLLM.
Everything ActTail keeps for one module lives in one ``SparseLinearState``, registered on vLLM's
layer as ``layer.acttail``; ``SparseModules`` (one per worker) collects them and applies the budgets
the ``BudgetResolver`` returns once the last module is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, UnquantizedLinearMethod
from vllm.platforms import current_platform
from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

from acttail_kernels import cpu
from acttail_vllm.errors import ActTailError, logs_startup_errors
from acttail_vllm.serving.budgets import DecoderProjection, ModuleBudget
from acttail_vllm.serving.cpu_crossover import TimedModule, largest_faster_steps
from acttail_vllm.serving.dense_range import DenseRangePass
from acttail_vllm.serving.op import CallSite, cpu_increment, dense_linear, largest_sparsified_step, register_call_site
from acttail_vllm.serving.resolver import BudgetResolver, LoadedModule
from acttail_vllm.serving.settings import ActTailSettings, SettingsError, SparsityPolicy
from acttail_vllm.serving.stats import TokenPath, new_stats

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it
#: Step sizes the warm-up runs: up to one past the sparse GEMV's largest batch (16 tokens), after
#: which every larger step launches the same kernel variants.
WARM_UP_MAX_ROWS = 17
#: The entry of vLLM's ``additional_config`` that carries ActTail's part of the compile-cache key.
COMPILE_KEY = "acttail_traced_choices"


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
        #: whether compiled calls pass the counters where the module does not count (set with the
        #: budget): not where ``DenseRangePass`` tells the one call that counts by its counters
        self.compiled_counters = True
        self.budget: ModuleBudget | None = None
        self.call_site: CallSite | None = None  # what the op's calls take besides tensors, once budgeted
        #: CPU: the module as vLLM's unquantized method made it (``add_dense_layer``), for dense steps
        self.dense_layer: torch.nn.Module | None = None
        self._dense_method: UnquantizedLinearMethod | None = None
        num_segments = len(out_sizes)
        self.register_buffer("keep", torch.zeros(num_segments, dtype=torch.int32), persistent=False)
        self.register_buffer("thr_guess", torch.zeros(num_segments, dtype=torch.int32), persistent=False)
        self.stats_host = new_stats(num_segments, pin_memory=on_gpu)
        stats = get_accelerator_view_from_cpu_tensor(self.stats_host) if on_gpu else self.stats_host
        self.register_buffer("stats", stats, persistent=False)
        #: CPU, compiled (``branch_on_step_size``): what one token of a step over the module's token
        #: limit adds to the counters (zeros where the module does not count; set with the budget)
        unsparsified_counts = None if on_gpu else new_stats(num_segments)
        self.register_buffer("unsparsified_counts", unsparsified_counts, persistent=False)

    def add_dense_layer(self, method: UnquantizedLinearMethod, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """CPU: keep ``weight`` [N, K] as vLLM's unquantized ``method`` keeps a dense layer's (its CPU
        GEMM on a prepacked copy), and run the steps left dense through it."""
        dense = torch.nn.Module()
        dense.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:  # vLLM may convert it in place for its kernel: the layer's own stays
            dense.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        method.process_weights_after_loading(dense)
        self.dense_layer, self._dense_method = dense, method

    def dense(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The module unsparsified, as dense vLLM runs it (CPU, after ``add_dense_layer``)."""
        return self._dense_method.apply(self.dense_layer, x, None if bias is None else self.dense_layer.bias)

    @property
    def traced_choices(self) -> tuple[Any, ...]:
        """What compiled code takes from this module besides its tensors, fixed when it is traced
        (``ActTailLinearMethod.apply``, ``sparse_linear``): whether it runs the dense layer alone,
        whether it passes its counters, and its token limit (the CPU's branch)."""
        return self.dense_only, self.compiled_counters, self.call_site.max_sparse_tokens

    @property
    def dense_only(self) -> bool:
        """Whether every call runs the dense layer alone: a CPU module never sparsified and not counting."""
        return self.dense_layer is not None and not self.ever_sparsified and not self.counts_stats

    def largest_sparsified_step(
        self, budget: ModuleBudget, settings: ActTailSettings, max_sparse_tokens: int | None
    ) -> int | None:
        """The most tokens of a step the server's policy sparsifies this module of ``budget`` at, with
        steps of more than ``max_sparse_tokens`` dense (0: none; None: steps of any size)."""
        return largest_sparsified_step(
            self.seg_bounds,
            list(budget.seg_keep),
            budget.in_features,
            self.keep.device,
            settings.policy.value,
            max_sparse_tokens,
        )

    def set_budget(
        self,
        budget: ModuleBudget,
        settings: ActTailSettings,
        max_sparse_tokens: int | None,
        counts_stats: bool,
        ever_sparsified: bool,
        compiled_counters: bool = True,
    ) -> None:
        """Once the module is on its device: the budget, in ``keep`` and with the server's policy and
        ``max_sparse_tokens`` (the settings' limit, or under auto on a CPU the measured one) as the
        op's call site, which counts tokens and kept channels if ``counts_stats``;
        ``ever_sparsified``: whether ``largest_sparsified_step`` of the same is not 0;
        ``compiled_counters``: whether compiled calls pass the counters even if it does not count."""
        self.budget = budget
        self.counts_stats = counts_stats
        self.ever_sparsified = ever_sparsified
        self.compiled_counters = compiled_counters or counts_stats
        self.keep.copy_(torch.tensor(budget.seg_keep, dtype=torch.int32))
        if self.unsparsified_counts is not None:  # CPU
            self.unsparsified_counts.zero_()
            if counts_stats:
                no_keep = (0,) * len(self.out_sizes)
                dense_token = cpu_increment(no_keep, 0, 1, budget.in_features, TokenPath.UNSPARSIFIED)
                self.unsparsified_counts.copy_(torch.tensor(dense_token))
        self.call_site = CallSite(
            self.seg_bounds,
            list(budget.seg_keep),
            self.counts_stats,
            settings.policy.value,
            max_sparse_tokens,
            None if self.dense_layer is None else self.dense,
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
            if not x.is_cuda and self.call_site.max_sparse_tokens is not None:
                return self.branch_on_step_size(x, weight, bias)
            counters = self.stats if self.compiled_counters else None
            return torch.ops.acttail.sparse_linear(x, weight, bias, self.keep, self.thr_guess, counters)
        counters = self.stats if stats is None else stats
        return self.call_site.run(x, weight, bias, self.keep, self.thr_guess, counters, count_stats=stats is None)

    def branch_on_step_size(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """CPU, compiled: a step of more tokens than the call site's limit runs the unsparsified layer
        inside the compiled graph, a smaller one calls the op. vLLM compiles one graph for every step
        size on a CPU, and an op call from compiled code costs the Python of its frames and of vLLM's GEMM
        wrapper, several times what the branch costs (benchmarks/experiments/step_branch_cost.py).
        The limit is traced into the graph, so it is part of vLLM's compile-cache key
        (``traced_choices``)."""
        x2 = x.reshape(-1, self.budget.in_features)  # a static width: the op's output width is traced from it

        def sparsified(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ops.acttail.sparse_linear_counted(rows, weight, bias, self.keep, self.thr_guess)

        def unsparsified(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dense = dense_linear(rows, weight, bias, self.seg_bounds, self.call_site.dense)
            return dense, self.unsparsified_counts * rows.shape[0]

        y, counts = torch.cond(x2.shape[0] <= self.call_site.max_sparse_tokens, sparsified, unsparsified, (x2,))
        self.stats.add_(counts)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def projection_weights(self, weight: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each projection's [out, in] view of the module's re-laid-out weight, in order."""
        if weight.is_cuda:
            yield from torch.split(weight.t(), self.out_sizes)  # the kernel layout [in, out]
        else:
            in_features = weight.numel() // self.seg_bounds[-1]
            yield from (block.t() for block in cpu.segment_blocks(weight, in_features, self.seg_bounds))


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system: a CPU load frees the loaded weights and the
    copies of modules left dense, and glibc keeps such pages resident until trimmed. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def spare_cpu_memory() -> int:
    """Bytes a CPU load can add to the weights without failing: with an explicit KV cache size
    (``--kv-cache-memory-bytes``, ``VLLM_CPU_KVCACHE_SPACE``) the available memory beyond it, else the
    KV cache dense vLLM would get, which such bytes then take from: its CPU worker's
    ``--gpu-memory-utilization`` of the memory node less what the process holds, at most what is
    available (vllm/v1/worker/cpu_worker.py)."""
    import psutil
    from vllm.config import CacheConfig, get_current_vllm_config_or_none
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    config = get_current_vllm_config_or_none()
    cache = CacheConfig() if config is None else config.cache_config  # outside vLLM: its defaults
    node = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
    if cache.kv_cache_memory_bytes is not None:
        return max(0, node.available_memory - cache.kv_cache_memory_bytes)
    requested = int(node.total_memory * cache.gpu_memory_utilization)
    return max(0, min(requested - psutil.Process().memory_info().rss, node.available_memory))


class SecondCopies:
    """CPU: the room for second weight copies, vLLM's dense layer beside the GEMV's rows: half of
    ``spare_cpu_memory`` when the first module asks (every weight is loaded by then), so that the
    copies never fail a load dense vLLM passes and leave its KV cache at least half its size. A
    module that does not fit keeps one copy: under policy auto vLLM's (``SparseModules.loaded``),
    under the others the GEMV's rows."""

    def __init__(self, spare: Callable[[], int] = spare_cpu_memory):
        self._spare = spare
        self.allowed: int | None = None
        self.used = 0
        self.refused = 0  # modules

    def take(self, nbytes: int) -> bool:
        """Reserve a copy of ``nbytes``; False if it does not fit."""
        if self.allowed is None:
            self.allowed = self._spare() // 2
        if self.used + nbytes > self.allowed:
            self.refused += 1
            return False
        self.used += nbytes
        return True


def counting_modules(sparsified: list[bool], on_gpu: bool) -> list[bool]:
    """Which modules count tokens and kept channels: on CPU each one the policy sparsifies (the
    others keep every channel); on a GPU one counts for all, the first the policy sparsifies (so its
    token paths are a sparsified module's). With none sparsified, the first counts the tokens."""
    if not on_gpu and any(sparsified):
        return list(sparsified)
    counter = sparsified.index(True) if True in sparsified else 0
    return [i == counter for i in range(len(sparsified))]


class SparseModules:
    """This worker's ActTail modules; once the last one is loaded, their budgets."""

    def __init__(self, resolver: BudgetResolver, dense_range: DenseRangePass | None = None):
        self.resolver = resolver
        self.dense_range = dense_range  # vLLM's pass for steps no module sparsifies, where it compiles
        self.layers: list[torch.nn.Module] = []
        self._loaded: set[int] = set()
        self.second_copies = SecondCopies()

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
        limits = self.token_limits(budgets, settings, on_gpu)
        largest_steps = [
            layer.acttail.largest_sparsified_step(budget, settings, limit)
            for layer, budget, limit in zip(self.layers, budgets, limits)
        ]
        sparsified = [step != 0 for step in largest_steps]
        counting = counting_modules(sparsified, on_gpu)
        if self.dense_range is not None:
            self.dense_range.bound(None if None in largest_steps else max(largest_steps), counting.index(True))
        auto_on_cpu = not on_gpu and settings.policy is SparsityPolicy.AUTO
        for layer, budget, limit, counts, ever_sparsified in zip(self.layers, budgets, limits, counting, sparsified):
            if auto_on_cpu and layer.acttail.dense_layer is None:  # no room for both copies: dense vLLM's alone
                weight = torch.cat(list(layer.acttail.projection_weights(layer.weight)))
                layer.acttail.add_dense_layer(UnquantizedLinearMethod(), weight, getattr(layer, "bias", None))
            layer.acttail.set_budget(
                budget,
                settings,
                limit,
                counts_stats=counts,
                ever_sparsified=ever_sparsified,
                compiled_counters=self.dense_range is None,
            )
            if layer.acttail.dense_only:  # the GEMV's rows are never read: only vLLM's copy stays
                layer.weight = torch.nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
        self.key_compiled_graphs()
        if on_gpu:
            self.warm_up()
        else:
            self._log_second_copies(settings.policy)
            return_freed_memory()
        return True

    def key_compiled_graphs(self) -> None:
        """Make the modules' ``traced_choices`` part of vLLM's compile-cache key, through
        ``additional_config``, which vLLM hashes. vLLM keys its compiled graphs (and the artifact a
        later start reloads) on its own config, which leaves out ActTail's settings
        (``--hf-overrides``, environment) and the CPU's race. A graph traced for other choices takes
        other inputs: a CPU start whose race came out otherwise, in the same cache folder as the
        last start, failed at its first step (an IndexError in AOTAutograd's runtime wrapper)."""
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        if config is None:
            return
        if not isinstance(config.additional_config, dict):
            logger.warning(
                "ActTail: --additional-config is not a dict, so ActTail cannot key vLLM's compile cache on "
                "its modules' choices; set VLLM_DISABLE_COMPILE_CACHE=1 if ActTail's settings change between starts"
            )
            return
        choices = repr([state.traced_choices for state in self.states]).encode()
        config.additional_config[COMPILE_KEY] = hashlib.sha256(choices).hexdigest()[:16]

    def _log_second_copies(self, policy: SparsityPolicy) -> None:
        copies = self.second_copies
        if copies.refused:
            logger.warning(
                "ActTail: %d of %d modules had no room for vLLM's dense copy of their weight beside the "
                "GEMV's (%.0f MiB allowed: half of the memory dense vLLM would give its KV cache); %s",
                copies.refused,
                len(self.layers),
                copies.allowed / 2**20,
                "they run as in dense vLLM"
                if policy is SparsityPolicy.AUTO
                else "their dense steps run PyTorch's GEMM on the GEMV's copy, slower than vLLM's",
            )

    def token_limits(self, budgets: list[ModuleBudget], settings: ActTailSettings, on_gpu: bool) -> list[int | None]:
        """Each module's largest sparsified step: the settings' ``max_sparse_tokens``, and under
        policy auto on a CPU no more than the largest step its sparse GEMV beats vLLM's dense layer
        at on this machine (measured now, ``cpu_crossover``; 0: never)."""
        if on_gpu or settings.policy is not SparsityPolicy.AUTO:
            return [settings.max_sparse_tokens] * len(budgets)
        start = time.perf_counter()
        raced = [i for i, layer in enumerate(self.layers) if layer.acttail.dense_layer is not None]
        timed = [self._timed(self.layers[i], budgets[i]) for i in raced]
        faster = dict(zip(raced, largest_faster_steps(timed, self.layers[0].weight.dtype)))
        cap = settings.max_sparse_tokens
        steps = [faster.get(i, 0) for i in range(len(self.layers))]  # modules without vLLM's copy: never
        limits = [n if cap is None else min(n, cap) for n in steps]
        won: dict[str, list[int]] = {}
        for layer, limit in zip(self.layers, limits):
            won.setdefault(layer.acttail.proj.module, []).append(limit)
        kept_bytes = sum(
            layer.weight.numel() * layer.weight.element_size() for layer, limit in zip(self.layers, limits) if limit
        )
        logger.info(
            "ActTail: the sparse GEMV beat vLLM's dense layer on this CPU at one token in %s modules "
            "(largest step %d tokens; raced in %.1f s): these keep the GEMV's copy of their weight "
            "beside vLLM's (%.0f MiB; room for %.0f MiB, half of the memory dense vLLM would give its "
            "KV cache), the others run as in dense vLLM",
            ", ".join(f"{module} {sum(v > 0 for v in values)}/{len(values)}" for module, values in won.items()),
            max(limits),
            time.perf_counter() - start,
            kept_bytes / 2**20,
            (self.second_copies.allowed or 0) / 2**20,
        )
        return limits

    @staticmethod
    def _timed(layer: torch.nn.Module, budget: ModuleBudget) -> TimedModule:
        """A module's calls as serving would make them: a sparsified step through the op (the
        selection, the GEMV, the counters), against the dense layer alone (a module never sparsified)."""
        state, bias = layer.acttail, getattr(layer, "bias", None)
        site = CallSite(state.seg_bounds, list(budget.seg_keep), True, SparsityPolicy.AUTO.value, None, state.dense)
        keep = torch.tensor(budget.seg_keep, dtype=torch.int32)
        scratch = torch.zeros_like(state.stats)
        return TimedModule(
            in_features=budget.in_features,
            sparse=lambda x: site.run(x, layer.weight, bias, keep, state.thr_guess, scratch),
            dense=lambda x: state.dense(x, bias),
        )

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
            loaded = layer.weight.data
            layer.weight = torch.nn.Parameter(cpu.prepare_weight(loaded, layer.acttail.seg_bounds), requires_grad=False)
            settings = self.modules.resolver.source.settings
            if (
                settings.policy is not SparsityPolicy.ALL or settings.max_sparse_tokens is not None
            ) and self.modules.second_copies.take(loaded.numel() * loaded.element_size()):
                layer.acttail.add_dense_layer(self.dense, loaded, getattr(layer, "bias", None))
        if self.modules.loaded(layer):
            from vllm.distributed import get_tensor_model_parallel_rank

            from acttail_vllm.serving.metrics import start_snapshot_writer

            if get_tensor_model_parallel_rank() == 0:
                start_snapshot_writer(self.modules)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.acttail.dense_only:
            return layer.acttail.dense(x, bias)
        return layer.acttail.sparse_linear(x, layer.weight, bias)
