"""TopK-sparse linear layers on CPU, in PyTorch (no Triton).

The weight is kept as one contiguous [K, n] block per output segment, the blocks one after the
other in a 1-D tensor (``prepare_weight``), so that a segment's kept input channels are whole,
contiguous rows of its block. A call selects each token's TopK channels exactly (``topk_channels``,
the set ``reference.topk_mask`` gives, by one ``topk`` over tie-free integer keys) and then either

* reads only the kept rows: ``embedding_bag`` with the kept inputs as per-sample weights sums
  x[k] * W[k, :] over the kept k of each token (``sparse_gemv``; PyTorch sums each bag on one
  thread, so a step of fewer tokens than threads splits each token's rows into as many bags where
  they are large enough to pay for it), or
* multiplies the masked input by the whole block, a oneDNN GEMM (``masked_gemm``).

The first reads a fraction of the weight and wins for few tokens; a GEMM reuses each weight row
for every token and wins for many (``sparse_path``).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: The sparse GEMV's work grows with the weight rows it reads, rows x kept channels; a GEMM reads
#: the weight once for all rows. Measured on a 2-core AMD EPYC (benchmarks/bench_cpu_kernels.py,
#: docs/performance.md#cpu): the GEMV beats the masked GEMM up to about 3 kept rows per step
#: (80%: 15 tokens). Against the dense layer vLLM runs, the crossover depends on the machine's
#: memory and the layer's width, so serving measures it at startup instead (policy auto).
GEMV_OVER_MASKED_GEMM_MAX_KEPT_ROWS = 3.0


class CpuPath(enum.Enum):
    SPARSE_GEMV = "sparse_gemv"
    MASKED_GEMM = "masked_gemm"


def sparse_path(rows: int, seg_keep: Sequence[int], seg_bounds: Sequence[int], in_features: int) -> CpuPath:
    """The faster CPU path for a sparsified step of ``rows`` tokens."""
    widths = [hi - lo for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:])]
    weights = in_features * seg_bounds[-1]
    kept_rows = rows * sum(keep * width for keep, width in zip(seg_keep, widths)) / weights
    return CpuPath.MASKED_GEMM if kept_rows > GEMV_OVER_MASKED_GEMM_MAX_KEPT_ROWS else CpuPath.SPARSE_GEMV


#: Up to this many rows a GEMM runs at its own row count (decode steps, one row per request).
GEMM_EXACT_ROWS = 16


def gemm_rows(rows: int) -> int:
    """The row count a CPU GEMM of ``rows`` rows runs at: ``rows`` up to ``GEMM_EXACT_ROWS``, above
    that rounded up to a quarter of its power-of-two octave (17 -> 20, 33 -> 40, 65 -> 80: under 25%
    padding), so a step of any size issues one of about four shapes per octave.

    PyTorch runs a bf16/fp16 GEMM on CPU through oneDNN, which JIT-compiles a kernel for each shape
    and keeps it in two caches of 1024 entries (ideep's ``LRU_CACHE_CAPACITY`` and oneDNN's
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), a few hundred KiB each: at exact row counts every new step
    size is a new kernel, and a server's memory grows by hundreds of MiB until both caches are full."""
    if rows <= GEMM_EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 3)
    return -(-rows // step) * step


def padded_linear(x2: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ block + bias`` on [M, K] rows and a [K, n] block, run at ``gemm_rows(M)`` rows (zero
    rows added, their outputs dropped)."""
    rows = x2.shape[0]
    padding = gemm_rows(rows) - rows
    x_run = F.pad(x2, (0, 0, 0, padding)) if padding else x2
    y = F.linear(x_run, block.t(), bias)
    return y[:rows] if padding else y


def prepare_weight(weight: torch.Tensor, seg_bounds: Sequence[int]) -> torch.Tensor:
    """[N, K] (vLLM's layout) -> the CPU layout: each output segment's [K, n] block, contiguous, one
    after the other (1-D, N x K elements)."""
    return torch.cat([weight[lo:hi].t().reshape(-1) for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:])])


def segment_blocks(weight: torch.Tensor, in_features: int, seg_bounds: Sequence[int]) -> list[torch.Tensor]:
    """The [K, n] block of each segment: views into ``prepare_weight``'s tensor."""
    return [
        weight[in_features * lo : in_features * hi].view(in_features, hi - lo)
        for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:])
    ]


#: The integer with |x|'s bits, per dtype: for non-negative floats, integer order is magnitude order.
_MAGNITUDE_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
#: The channel index takes the low bits of a selection key.
INDEX_BITS = 16


@functools.lru_cache(maxsize=64)
def _reversed_index(in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(in_features - 1, -1, -1, dtype=dtype, device=device)


def topk_channels(x: torch.Tensor, keep: int, ordered: bool = False) -> torch.Tensor:
    """Int64 [M, keep]: each row's ``keep`` largest |x|, among equal |x| the lower index first: the
    set ``reference.topk_mask`` keeps. One integer key per entry, |x|'s bits above the reversed
    channel index, makes every key distinct, so one ``topk`` finds the set. ``ordered``: largest
    first, so that the first k columns are the set of any smaller budget k."""
    rows, in_features = x.shape
    if x.dtype not in _MAGNITUDE_BITS or in_features > 1 << INDEX_BITS:
        raise ValueError(
            f"topk_channels takes float32, float16 or bfloat16 rows of at most {1 << INDEX_BITS} channels, "
            f"got {x.dtype} x {in_features}"
        )
    bits = _MAGNITUDE_BITS[x.dtype]
    key_dtype = torch.int32 if bits is torch.int16 else torch.int64
    key = (x.abs().view(bits).to(key_dtype) << INDEX_BITS) | _reversed_index(in_features, key_dtype, x.device)
    return torch.topk(key, keep, dim=1, sorted=ordered).indices


#: A token's kept rows are split into a bag per thread from this many bytes: below it the extra
#: bags' launch and sum cost more than the threads save (bench_cpu_kernels, docs/performance.md#cpu).
GEMV_SPLIT_MIN_BYTES = 1 << 20


def bags_per_token(rows: int, kept_bytes: int) -> int:
    """Bags each token's kept rows (``kept_bytes`` of weight) are split into: one below
    ``GEMV_SPLIT_MIN_BYTES``, else enough for every thread to have one (a bag is summed by one
    thread), and no more, since each bag's sum is rounded to the weights' dtype."""
    if kept_bytes < GEMV_SPLIT_MIN_BYTES:
        return 1
    return max(1, -(-torch.get_num_threads() // rows))


@functools.lru_cache(maxsize=1024)
def _bag_offsets(rows: int, keep: int, bags: int, device: torch.device) -> torch.Tensor:
    """Start of each bag in the [rows * keep] channel list: ``bags`` nearly equal parts per token."""
    starts = [m * keep + part * keep // bags for m in range(rows) for part in range(bags)]
    return torch.tensor(starts, device=device)


def channel_mask(channels: torch.Tensor, in_features: int) -> torch.Tensor:
    """Bool [M, K], True at ``channels``."""
    mask = torch.zeros(channels.shape[0], in_features, dtype=torch.bool, device=channels.device)
    return mask.scatter_(1, channels, True)


def sparse_gemv(
    x2: torch.Tensor, channels: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """sum over each row's ``channels`` k of x[m, k] * block[k, :] (+ bias), reading only those rows
    of ``block``: ``embedding_bag`` with the inputs as per-sample weights, ``bags_per_token`` bags
    per token, whose sums are added in float32."""
    rows, keep = channels.shape
    bags = min(bags_per_token(rows, keep * block.shape[1] * block.element_size()), max(1, keep))
    y = F.embedding_bag(
        channels.reshape(-1),
        block,
        _bag_offsets(rows, keep, bags, x2.device),
        mode="sum",
        per_sample_weights=x2.gather(1, channels).reshape(-1),
    )
    if bags > 1:
        y = y.view(rows, bags, -1).sum(1, dtype=torch.float32).to(block.dtype)
    return y if bias is None else y + bias


def masked_gemm(x2: torch.Tensor, mask: torch.Tensor, block: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The masked input times the whole block: a GEMM that reads every row."""
    return padded_linear(x2 * mask, block, bias)


def _segments(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, seg_bounds: Sequence[int]):
    """(block, its bias or None) per segment."""
    for block, lo, hi in zip(segment_blocks(weight, in_features, seg_bounds), seg_bounds[:-1], seg_bounds[1:]):
        yield block, None if bias is None else bias[lo:hi]


def _joined(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The segments' outputs side by side, [M, N] (no copy for a single segment)."""
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def dense_linear(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seg_bounds: Sequence[int]
) -> torch.Tensor:
    """The unsparsified layer on the CPU layout."""
    return _joined([padded_linear(x2, block, b) for block, b in _segments(weight, bias, x2.shape[1], seg_bounds)])


def sparse_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: Sequence[int],
    seg_keep: Sequence[int],
    path: CpuPath,
) -> torch.Tensor:
    """Each segment on its ``seg_keep`` largest |x| per row, through ``path``."""
    in_features = x2.shape[1]
    channels = topk_channels(x2, max(seg_keep), ordered=len(set(seg_keep)) > 1)
    masks: dict[int, torch.Tensor] = {}
    outputs = []
    for keep, (block, b) in zip(seg_keep, _segments(weight, bias, in_features, seg_bounds)):
        if path is CpuPath.SPARSE_GEMV:
            outputs.append(sparse_gemv(x2, channels[:, :keep], block, b))
            continue
        if keep not in masks:
            masks[keep] = channel_mask(channels[:, :keep], in_features)
        outputs.append(masked_gemm(x2, masks[keep], block, b))
    return _joined(outputs)
