"""The ``acttail::sparse_linear`` custom op: the one dispatch seam between vLLM and the kernels.

Registered the way vLLM registers its own quantization kernels (``direct_register_custom_op`` with a
fake implementation), so torch.compile treats it as opaque and CUDA graphs capture what it launches.
CUDA runs the Triton kernels of ``acttail_kernels``; a CPU its PyTorch paths (``acttail_kernels.cpu``:
the exact TopK mask, then a GEMV over the kept weight rows or a GEMM of the masked input).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy
import torch
from torch.library import Library

from acttail_kernels import cpu
from acttail_vllm.serving.settings import SparsityPolicy
from acttail_vllm.serving.stats import TOKEN_PATHS, TokenPath, new_stats, token_stat

if TYPE_CHECKING:
    from acttail_kernels import GemvPath

_LIB = Library("acttail", "FRAGMENT")  # noqa: TID251 -- the op's lifetime is this module's


def decode_token_mask(num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """policy=decode: True for tokens of requests that process one token this step (decode), from
    vLLM's attention metadata. None where every token is sparsified: a decode-only batch (so its
    CUDA graph holds neither a mask nor a dense GEMM) and steps without metadata (profiling and
    dummy runs)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # dual-batch overlap: not supported with policy=decode
        raise RuntimeError("ActTail policy=decode does not support dual-batch overlap")
    if not metadata:
        return None
    layer_metadata = next(iter(metadata.values()))
    if getattr(layer_metadata, "max_query_len", None) == 1:  # a host int: no sync
        return None
    query_start_loc = layer_metadata.query_start_loc.to(device)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    per_token_len = torch.repeat_interleave(query_lens, query_lens)
    mask = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    n = min(num_tokens, per_token_len.numel())
    mask[:n] = per_token_len[:n] == 1
    return mask


#: A CPU module's dense layer as vLLM runs it: (x [M, K], bias) -> [M, N].
DenseLayer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def dense_linear(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg_bounds: list[int], dense: DenseLayer | None
) -> torch.Tensor:
    """The unsparsified layer: ``weight`` in the kernel layout [K, N] on CUDA; on a CPU ``dense``
    where the module has it, else PyTorch's GEMM on the CPU layout."""
    if x2.is_cuda:
        return x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
    if dense is not None:
        return dense(x2, bias)
    return cpu.dense_linear(x2, weight, bias, seg_bounds)


def largest_sparsified_step(
    seg_bounds: list[int], keep: list[int], k: int, device: torch.device, policy: str, max_sparse_tokens: int | None
) -> int | None:
    """The most tokens of a step this module is sparsified at (0: none), the bound ``call_path``
    keeps; None where steps of any size may be (policies all and decode without a token limit).
    Under auto on CUDA the GPU's crossover table sets it, elsewhere the token limit alone."""
    if policy != SparsityPolicy.AUTO.value or device.type != "cuda":
        return max_sparse_tokens
    import acttail_kernels

    faster = acttail_kernels.largest_faster_step(seg_bounds[-1], k, seg_bounds, keep, device)
    return faster if max_sparse_tokens is None else min(faster, max_sparse_tokens)


@functools.lru_cache(maxsize=4096)
def call_path(
    rows: int,
    n: int,
    k: int,
    seg_bounds: tuple[int, ...],
    keep: tuple[int, ...],
    device: torch.device,
    policy: str,
    max_sparse_tokens: int | None,
) -> tuple[TokenPath, GemvPath | cpu.CpuPath | None]:
    """The one place that decides what a call runs, from shapes alone (so a captured CUDA graph of
    a batch size always replays the same choice): a step over the token limit runs dense; on CUDA
    the GPU's crossover table picks the sparse GEMV's loop or the dense fallback, and under policy
    auto a step the selection and sparse GEMV would not run faster than the dense layer is not
    sparsified; on a CPU the weight rows a step would read pick the GEMV over the kept rows or the
    masked GEMM (``acttail_kernels.cpu.sparse_path``), except under auto, where the token limit is
    the module's own, measured at startup against the dense layer (``cpu_crossover``), and every
    step within it takes the GEMV it was measured with. Returns the token path and, for a
    sparsified step, the kernel path: the GEMV's loop or dense cuBLAS on CUDA, the ``CpuPath`` on a
    CPU."""
    largest = largest_sparsified_step(list(seg_bounds), list(keep), k, device, policy, max_sparse_tokens)
    if largest is not None and rows > largest:
        return TokenPath.UNSPARSIFIED, None
    if device.type != "cuda":
        if policy == SparsityPolicy.AUTO.value:
            return TokenPath.SPARSE_GEMV, cpu.CpuPath.SPARSE_GEMV
        cpu_path = cpu.sparse_path(rows, keep, seg_bounds, k)
        token_path = TokenPath.SPARSE_GEMV if cpu_path is cpu.CpuPath.SPARSE_GEMV else TokenPath.SELECTION_DENSE_GEMM
        return token_path, cpu_path
    import acttail_kernels

    gemv = acttail_kernels.gemv_path(rows, n, k, list(seg_bounds), list(keep), device)
    if gemv is not acttail_kernels.GemvPath.DENSE:
        return TokenPath.SPARSE_GEMV, gemv
    return TokenPath.SELECTION_DENSE_GEMM, gemv


class EagerReplay:
    """A call site's sparse-kernel call at one step size, captured once as a CUDA graph and replayed
    when vLLM calls the op outside its own graphs (``--enforce-eager``, shapes it did not capture):
    a replay costs the host a copy in, one launch and a copy out, where the two Triton launches and
    their Python cost about 100 us more than the dense layer (benchmarks/host_overhead.py)."""

    _pool = None  # one memory pool for every replay: they run one after the other on one stream

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        if EagerReplay._pool is None:
            EagerReplay._pool = torch.cuda.graph_pool_handle()
        self.run = run  # keeps the tensors the graph reads alive, so their addresses stay theirs
        self.x = x.clone()
        run(self.x)  # compiled and allocated (the kernels' ticket buffer) before the capture
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=EagerReplay._pool):
            self.y = run(self.x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.graph.replay()
        return self.y.clone()  # the next replay overwrites self.y


#: (weight, thr_guess, input shape) -> its replay: a weight and a guess buffer are one call site.
_EAGER_REPLAYS: dict[tuple[int, int, tuple[int, ...]], EagerReplay] = {}


def _sparse_kernel(x2, weight, bias, seg_bounds, keep_hint, seg_keep, thr_guess, gemv) -> torch.Tensor:
    """The selection and the sparse GEMV on CUDA; outside a graph capture, as a replay."""
    import acttail_kernels

    def run(x: torch.Tensor) -> torch.Tensor:
        return acttail_kernels.sparse_linear(
            x, weight, bias, seg_bounds, keep_hint, keep=seg_keep, path=gemv, thr_guess=thr_guess
        )

    if torch.cuda.is_current_stream_capturing():
        return run(x2)
    key = (weight.data_ptr(), thr_guess.data_ptr(), tuple(x2.shape))
    replay = _EAGER_REPLAYS.get(key)
    if replay is None:
        replay = _EAGER_REPLAYS[key] = EagerReplay(run, x2)
    return replay(x2)


def sparse_linear_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    keep_hint: list[int],
    seg_keep: torch.Tensor,
    thr_guess: torch.Tensor,
    stats: torch.Tensor | None,
    count_stats: bool,
    policy: str,
    max_sparse_tokens: int | None,
    dense: DenseLayer | None = None,
) -> torch.Tensor:
    """``weight`` is the kernel layout [K, N] (``acttail_kernels.prepare_weight``) on CUDA and the
    CPU layout (``acttail_kernels.cpu.prepare_weight``) elsewhere.

    ``seg_keep`` (int32, one per output segment) is what the masks and kernels read: a tensor, so
    CUDA graphs never bake a budget in. ``keep_hint`` holds the same values as ints and only picks
    the path (``call_path``). Compiled code passes neither: it calls the registered op, which takes
    the tensors and finds the rest by ``seg_keep`` (``register_call_site``).
    ``thr_guess`` (int32, one per segment) is where the CUDA selection leaves each threshold and
    starts the next step's search (speed only, never the result). ``policy`` is a
    ``SparsityPolicy`` value; under ``decode`` the prefill rows of a mixed step stay dense.
    ``dense``: on a CPU, the module's dense layer as vLLM runs it, for the rows left dense.
    With ``count_stats``, ``stats`` (int64, see ``stats.py``) accumulates, per output segment, the
    input channels kept, then the tokens of each ``TokenPath`` (the call's path for its sparsified
    rows; under policy=decode a mixed step's prefill rows count as unsparsified).
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # vLLM passes [tokens, K]: no reshape to pay for
    rows, n = x2.shape[0], seg_bounds[-1]
    path, kernel_path = call_path(
        rows, n, x2.shape[1], tuple(seg_bounds), tuple(keep_hint), x2.device, policy, max_sparse_tokens
    )
    decode_only = policy == SparsityPolicy.DECODE.value
    sparse_rows = decode_token_mask(rows, x2.device) if decode_only and path is not TokenPath.UNSPARSIFIED else None
    if path is TokenPath.UNSPARSIFIED:
        y = dense_linear(x2, weight, bias, seg_bounds, dense)
    else:
        if not x2.is_cuda:
            cpu_keep = seg_keep.tolist()
            y = cpu.sparse_linear(x2, weight, bias, seg_bounds, cpu_keep, kernel_path)
        elif path is TokenPath.SPARSE_GEMV and sparse_rows is None:
            y = _sparse_kernel(x2, weight, bias, seg_bounds, keep_hint, seg_keep, thr_guess, kernel_path)
        else:
            import acttail_kernels

            y = acttail_kernels.sparse_linear(
                x2, weight, bias, seg_bounds, keep_hint, keep=seg_keep, path=kernel_path, thr_guess=thr_guess
            )
        if sparse_rows is not None:  # prefill rows of a mixed batch stay dense
            y = torch.where(sparse_rows[:, None], y, dense_linear(x2, weight, bias, seg_bounds, dense))
    if count_stats:  # only then: each op here is one more kernel per module and step on a GPU
        sparsified = 0 if path is TokenPath.UNSPARSIFIED else rows if sparse_rows is None else sparse_rows.sum()
        if stats.is_cuda:
            _add_counts(stats, seg_keep.to(torch.int64), sparsified, rows, x2.shape[1], path)
        else:  # one numpy add into a view of the same memory (cpu_increment says why)
            keep = (0,) * (len(seg_bounds) - 1) if path is TokenPath.UNSPARSIFIED else tuple(cpu_keep)
            counters = stats.numpy()
            numpy.add(counters, cpu_increment(keep, int(sparsified), rows, x2.shape[1], path), out=counters)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _add_counts(counters, seg_keep, sparsified, rows: int, in_features: int, path: TokenPath) -> None:
    """Add one call to a module's counters (torch tensors, or numpy arrays on a CPU): a sparsified
    row keeps exactly seg_keep channels (tests/test_kernels.py checks the kernels' sets,
    tests/test_cpu_kernels.py the CPU's), a row left dense keeps all of them."""
    num_segs = len(seg_keep)
    counters[:num_segs] += seg_keep * sparsified + in_features * (rows - sparsified)
    if path is not TokenPath.UNSPARSIFIED:
        counters[token_stat(path, num_segs)] += sparsified
    counters[token_stat(TokenPath.UNSPARSIFIED, num_segs)] += rows - sparsified


@functools.lru_cache(maxsize=4096)
def cpu_increment(
    keep: tuple[int, ...], sparsified: int, rows: int, in_features: int, path: TokenPath
) -> numpy.ndarray:
    """What one CPU call adds to its module's counters (``_add_counts`` into zeros; ``keep`` only
    matters for sparsified rows), read-only. The op adds it in one numpy operation: right after the
    layer's GEMM each numpy or torch operation costs a CPU several times what it costs in a tight loop
    (its code and data no longer in cache), more than a small layer's whole sparse call."""
    increment = numpy.zeros(len(keep) + len(TOKEN_PATHS), dtype=numpy.int64)
    _add_counts(increment, numpy.array(keep, dtype=numpy.int64), sparsified, rows, in_features, path)
    increment.flags.writeable = False
    return increment


@dataclass(frozen=True)
class CallSite:
    """What a module's op calls take besides tensors (``sparse_linear_impl``'s other arguments)."""

    seg_bounds: list[int]
    keep_hint: list[int]
    count_stats: bool
    policy: str
    max_sparse_tokens: int | None
    dense: DenseLayer | None = None  # on a CPU: the module's dense layer as vLLM runs it

    def run(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        seg_keep: torch.Tensor,
        thr_guess: torch.Tensor,
        stats: torch.Tensor | None,
        count_stats: bool = True,
    ) -> torch.Tensor:
        """``sparse_linear_impl`` with this site's arguments; ``count_stats=False`` or no ``stats``
        counts nothing even where the site counts."""
        return sparse_linear_impl(
            x,
            weight,
            bias,
            self.seg_bounds,
            self.keep_hint,
            seg_keep,
            thr_guess,
            stats,
            self.count_stats and count_stats and stats is not None,
            self.policy,
            self.max_sparse_tokens,
            self.dense,
        )


#: Each module's call site, by the address of its budget tensor (``seg_keep``). The registered op
#: takes tensors only and looks the rest up here when it runs: vLLM's compile cache keys on the model
#: and vLLM's settings, not on budgets, so a graph compiled for another budget (another
#: ACTTAIL_SPARSITY, another profile) is loaded as it was traced, and every non-tensor argument
#: would be that budget's. Entries go with their modules.
_CALL_SITES: weakref.WeakValueDictionary[int, CallSite] = weakref.WeakValueDictionary()


def register_call_site(seg_keep: torch.Tensor, site: CallSite) -> None:
    """Make ``site`` what compiled calls with ``seg_keep`` (a module's budget buffer, in place) run."""
    _CALL_SITES[seg_keep.data_ptr()] = site


def _call_site(seg_keep: torch.Tensor) -> CallSite:
    site = _CALL_SITES.get(seg_keep.data_ptr())
    if site is None:
        raise RuntimeError(
            "acttail::sparse_linear got a budget tensor no ActTail module registered (moved or copied "
            "after its budget was set?): call SparseLinearState.set_budget once the module is on its device"
        )
    return site


def _registered_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_keep: torch.Tensor,
    thr_guess: torch.Tensor,
    stats: torch.Tensor | None,
) -> torch.Tensor:
    return _call_site(seg_keep).run(x, weight, bias, seg_keep, thr_guess, stats)


def _registered_sparse_linear_counted(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg_keep: torch.Tensor, thr_guess: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = new_stats(seg_keep.numel())
    return _call_site(seg_keep).run(x, weight, bias, seg_keep, thr_guess, counts), counts


# torch.library's fake (meta) implementation must take the op's exact signature: a deliberate copy.
def _sparse_linear_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_keep: torch.Tensor,
    thr_guess: torch.Tensor,
    stats: torch.Tensor | None,
) -> torch.Tensor:
    out_features = weight.numel() // x.shape[-1]  # [K, N] on CUDA, N x K in blocks on CPU
    return x.new_empty((*x.shape[:-1], out_features))


def _sparse_linear_counted_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg_keep: torch.Tensor, thr_guess: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = seg_keep.new_empty(seg_keep.shape[0] + len(TOKEN_PATHS), dtype=torch.int64)
    return _sparse_linear_fake(x, weight, bias, seg_keep, thr_guess, None), counts


def register_sparse_linear_op() -> None:
    """Define ``torch.ops.acttail.sparse_linear(x, weight, bias, seg_keep, thr_guess, stats)`` once
    per process: what compiled code calls (the eager forward calls ``sparse_linear_impl``). A call
    without ``stats`` counts nothing: what a GPU's modules that do not count pass, so that the one
    that does is the call ``dense_range`` keeps. Also ``sparse_linear_counted(x, weight, bias,
    seg_keep, thr_guess) -> (y, counts)``, the same call returning what it would add to the counters
    and updating nothing: a branch of ``torch.cond`` may not update its inputs, and a CPU's selection
    keeps no threshold (``SparseLinearState.branch_on_step_size``)."""
    if hasattr(torch.ops.acttail, "sparse_linear"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="sparse_linear",
        op_func=_registered_sparse_linear,
        mutates_args=["thr_guess", "stats"],
        fake_impl=_sparse_linear_fake,
        target_lib=_LIB,
    )
    direct_register_custom_op(
        op_name="sparse_linear_counted",
        op_func=_registered_sparse_linear_counted,
        mutates_args=[],
        fake_impl=_sparse_linear_counted_fake,
        target_lib=_LIB,
    )
