"""Steps no module sparsifies, compiled as dense vLLM compiles them: without the ActTail op.

Under policy auto (and with ``max_sparse_tokens``) a step of more tokens than any module sparsifies
runs every module's dense GEMM through the op. Inside a CUDA graph that costs nothing, but a prefill
is usually larger than the largest captured size and runs the compiled graph without one, where each
op call pays the dispatcher and its Python: several microseconds, seven calls a layer. vLLM compiles
each range of step sizes apart (``compile_ranges_endpoints``) and asks each post-grad pass whether it
applies to the range (vLLM's fusion passes, ``vllm/compilation/passes``). ``DenseRangePass``
applies above the largest step any module sparsifies and replaces each op call there with the GEMM
the op would run (``op.dense_linear`` on CUDA: ``x @ weight`` on the kernel layout [K, N]). The one
call that counts (a GPU's other modules pass no counters) stays, so every step is still counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from vllm.compilation.passes.inductor_pass import InductorPass

if TYPE_CHECKING:
    from vllm.config import CompilationConfig, VllmConfig
    from vllm.config.utils import Range

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it
aten = torch.ops.aten


def replace_uncounted_calls(graph: fx.Graph) -> int:
    """Replace every ``acttail::sparse_linear`` call in a post-grad ``graph`` that counts nothing (no
    ``stats``) with its dense GEMM, and drop the write-backs of the buffers it would have updated.
    Only for graphs of steps no module sparsifies, where the op itself would run that GEMM. Takes
    both forms of a functionalized call (vLLM compiles with the first). Returns how many calls it
    replaced."""
    sparse_linear = torch.ops.acttail.sparse_linear.default
    written = [arg.name for arg in sparse_linear._schema.arguments if arg.is_write]  # v1's buffer order
    replaced, freed = 0, set()
    for node in list(graph.nodes):
        if node.target not in (auto_functionalized, auto_functionalized_v2) or node.args[0] is not sparse_linear:
            continue
        kwargs = node.kwargs
        x, weight, bias = kwargs["x"], kwargs["weight"], kwargs["bias"]
        if node.target is auto_functionalized:
            counts = kwargs["stats"] is not None
            updated = [kwargs[name] for name in written]
        else:
            counts = kwargs["_stats_base_index"] is not None
            updated = kwargs["_all_bases"]
        if counts or x.meta["val"].dim() != 2:
            continue
        with graph.inserting_before(node):
            if bias is None:
                gemm = graph.call_function(aten.mm.default, (x, weight))
            else:
                gemm = graph.call_function(aten.addmm.default, (bias, x, weight))
        gemm.meta["val"] = node.meta["val"][0]
        for user in list(node.users):  # getitem [0]: the op's result; [i]: the i-th buffer it updates
            index = user.args[1]
            user.replace_all_uses_with(gemm if index == 0 else updated[index - 1])
            graph.erase_node(user)
        graph.erase_node(node)
        freed.update(updated)
        replaced += 1
    for node in list(graph.nodes):  # the freed buffers' write-backs are now copies onto themselves
        if node.target is aten.copy_.default and node.args[0] is node.args[1] and node.args[0] in freed:
            graph.erase_node(node)
    return replaced


class DenseRangePass(InductorPass):
    """vLLM post-grad pass: ``replace_uncounted_calls`` in every compile range of steps larger than
    any module sparsifies. vLLM takes it when it builds its compile backend; its bound comes with the
    budgets (``bound``), before vLLM compiles."""

    def __init__(self, compilation_config: CompilationConfig) -> None:
        self.compilation_config = compilation_config
        #: the most tokens of a step some module sparsifies; None: no bound (or not known yet)
        self.largest_sparsified_step: int | None = None
        self.counting_module: int | None = None

    def __deepcopy__(self, memo: dict) -> DenseRangePass:
        # vLLM deep-copies its Inductor config, this pass in it, when it builds the backend: the
        # copy must be this object, which gets the bound later and holds the live config.
        return self

    def bound(self, largest_sparsified_step: int | None, counting_module: int) -> None:
        """Apply above ``largest_sparsified_step``: vLLM compiles those steps apart (a compile-range
        endpoint; vLLM takes none below 2)."""
        self.largest_sparsified_step, self.counting_module = largest_sparsified_step, counting_module
        endpoints = self.compilation_config.compile_ranges_endpoints
        if not largest_sparsified_step or not endpoints:  # none: every range applies; no bound: none
            return
        split = max(largest_sparsified_step, 2)
        if split < max(endpoints):  # the last endpoint: vLLM's largest step
            self.compilation_config.compile_ranges_endpoints = sorted({*endpoints, split})
            logger.info("ActTail: steps of more than %d tokens compile without ActTail's op (dense GEMMs)", split)

    def is_applicable_for_range(self, compile_range: Range) -> bool:
        return self.largest_sparsified_step is not None and compile_range.start > self.largest_sparsified_step

    def __call__(self, graph: fx.Graph) -> None:
        replaced = replace_uncounted_calls(graph)
        logger.debug("ActTail: %d op calls of a dense compile range replaced by GEMMs", replaced)

    def uuid(self) -> Any:
        # Part of vLLM's compile-cache key: a graph compiled for another bound, or in which another
        # module counts, is compiled again rather than loaded.
        return self.hash_dict(
            {
                "source": self.hash_source(self, replace_uncounted_calls),
                "largest_sparsified_step": self.largest_sparsified_step,
                "counting_module": self.counting_module,
            }
        )


def install_dense_range_pass(vllm_config: VllmConfig) -> DenseRangePass | None:
    """Give vLLM the pass where it compiles the model on a GPU, before it builds its compile backend;
    None where it does not (eager, CPU) or where the user's own post-grad pass takes the slot."""
    from vllm.config import CompilationMode
    from vllm.platforms import current_platform

    compilation = vllm_config.compilation_config
    if not current_platform.is_cuda_alike() or compilation.mode != CompilationMode.VLLM_COMPILE:
        return None
    key = current_platform.pass_key
    if key in compilation.inductor_compile_config:
        logger.warning(
            "ActTail: --compilation-config sets inductor %s, the one slot ActTail's dense-range pass needs: "
            "steps larger than ActTail sparsifies run through its op (microseconds of host time a call "
            "outside CUDA graphs) instead of plain GEMMs; leave the slot free to compile them as dense vLLM",
            key,
        )
        return None
    dense_range = compilation.inductor_compile_config[key] = DenseRangePass(compilation)
    return dense_range
