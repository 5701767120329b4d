"""Column-sparse GEMV: y[m, n] = sum over kept k of x[m, k] * Wt[k, n], for 1..16 tokens.

Only the weight rows (input channels) that some token of the batch keeps are read. One launch covers
every output segment of a merged projection: a tile of BLOCK_N output columns never straddles a
segment boundary (each segment is tiled on its own, its last tile masked), so it knows its segment
and with it the thresholds of ``topk_select``.

Work split: a grid of (output tiles, K chunks). Small decode batches read few bytes per column tile,
so splitting K is what fills 132 SMs. Each program writes its fp32 partial sums; the last program of
a column tile to finish (an atomic ticket per tile) adds the partials in chunk order, adds the bias
and writes the output, then resets its ticket. Fixed-order sums keep results deterministic (fp32
atomics into the output would not be), and the final cast needs no third launch.

Inside a chunk a program compacts the indices of the channels any token keeps (a cumulative count
over the chunk, written to a per-program scratch row), then walks that list BLOCK_K rows at a time:
every weight row loaded is one that is needed, and the loop length follows the sparsity.

Everything is sized on the host from shapes alone (no .item(), no data-dependent grid), so the
launches can be captured in a CUDA graph; the tickets live in a buffer made once per device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .topk_select import MAX_SEGMENTS, num_sms

BLOCK_M = 16  # tokens a sparse launch handles: tl.dot's smallest M; larger batches go dense
_TICKETS = 1 << 16  # column tiles one launch may have (N / BLOCK_N); 256 KiB of int32 per device


@dataclass(frozen=True)
class GemvPlan:
    """Tile sizes of one sparse GEMV launch."""

    block_n: int  # output columns per program
    block_k: int  # weight rows per loop step
    chunk_k: int  # input channels per program (power of 2)
    compact: bool  # list the kept channels first (else: walk all, loading kept rows only)
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=256)
def plan_gemv(seg_widths: tuple[int, ...], k: int, sms: int) -> GemvPlan:
    """Tiles for output segments of these widths over k channels: about 4 programs per SM."""
    block_n = min(128, max(16, triton.next_power_of_2(max(seg_widths))))
    tiles = sum(triton.cdiv(w, block_n) for w in seg_widths)
    chunks = max(1, triton.cdiv(4 * sms, tiles))
    chunk_k = max(32, triton.next_power_of_2(triton.cdiv(k, chunks)))
    block_k = min(64, chunk_k)
    return GemvPlan(block_n=block_n, block_k=block_k, chunk_k=chunk_k, compact=True, num_warps=4, num_stages=3)


@triton.jit
def _next_segment(pid_n, state, lo_bound, hi_bound, BLOCK_N: tl.constexpr):
    """Move (segment, its column range, its first tile) on by one if pid_n lies past it."""
    seg, seg_lo, seg_hi, first_tile, end_tile = state
    past = pid_n >= end_tile
    seg = tl.where(past, seg + 1, seg)
    seg_lo = tl.where(past, lo_bound, seg_lo)
    seg_hi = tl.where(past, hi_bound, seg_hi)
    first_tile = tl.where(past, end_tile, first_tile)
    end_tile = end_tile + tl.cdiv(hi_bound - lo_bound, BLOCK_N)
    return seg, seg_lo, seg_hi, first_tile, end_tile


@triton.jit
def _tile_columns(pid_n, B1, B2, B3, B4, NUM_SEGS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Segment of column tile pid_n, the tile's first column and its segment's end column."""
    zero = pid_n * 0
    state = (zero, zero, zero + B1, zero, zero + tl.cdiv(B1, BLOCK_N))
    if NUM_SEGS > 1:
        state = _next_segment(pid_n, state, B1, B2, BLOCK_N)
    if NUM_SEGS > 2:
        state = _next_segment(pid_n, state, B2, B3, BLOCK_N)
    if NUM_SEGS > 3:
        state = _next_segment(pid_n, state, B3, B4, BLOCK_N)
    seg, seg_lo, seg_hi, first_tile, _ = state
    return seg, seg_lo + (pid_n - first_tile) * BLOCK_N, seg_hi


@triton.jit
def _accumulate(acc, xk, rows, row_ok, wt_ptr, N, offs_n, n_ok, DOT_PRECISION: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += xk[BLOCK_M, BLOCK_K] @ Wt[rows, offs_n]; rows not row_ok are not read."""
    w = tl.load(wt_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.dot(xk.to(w.dtype), w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _sparse_gemv_kernel(
    xs_ptr,
    wt_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    ticket_ptr,
    scratch_rows_ptr,
    scratch_x_ptr,
    M,
    N,
    K,
    B1,
    B2,
    B3,
    B4,
    NUM_SEGS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COMPACT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    seg, n_start, seg_end = _tile_columns(pid_n, B1, B2, B3, B4, NUM_SEGS, BLOCK_N)

    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seg_end
    x_rows = xs_ptr + (seg * M + offs_m[:, None]).to(tl.int64) * K
    k_lo = pid_k * CHUNK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COMPACT:
        # List this chunk's channels that any token keeps (with their x) in scratch rows.
        offs_c = k_lo + tl.arange(0, CHUNK_K)
        xc = tl.load(x_rows + offs_c[None, :], mask=m_ok[:, None] & (offs_c < K)[None, :], other=0.0)
        used = tl.max((xc != 0).to(tl.int32), axis=0) > 0
        slot = tl.cumsum(used.to(tl.int32), axis=0) - 1
        count = tl.sum(used.to(tl.int32), axis=0)
        program = (pid_n * num_chunks + pid_k).to(tl.int64) * CHUNK_K
        tl.store(scratch_rows_ptr + program + slot, offs_c, mask=used)
        tl.store(scratch_x_ptr + (program + slot[None, :]) * BLOCK_M + offs_m[:, None], xc, mask=used[None, :])
        tl.debug_barrier()  # the scratch rows are read back by other threads of this program
        for j in range(0, count, BLOCK_K):
            offs_j = j + tl.arange(0, BLOCK_K)
            j_ok = offs_j < count
            rows = tl.load(scratch_rows_ptr + program + offs_j, mask=j_ok, other=0)
            xk = tl.load(scratch_x_ptr + (program + offs_j[None, :]) * BLOCK_M + offs_m[:, None],
                         mask=j_ok[None, :], other=0.0)
            acc = _accumulate(acc, xk, rows, j_ok, wt_ptr, N, offs_n, n_ok, DOT_PRECISION)
    else:
        # Walk the chunk densely; a weight row is loaded only if some token keeps its channel.
        for j in range(k_lo, tl.minimum(k_lo + CHUNK_K, K), BLOCK_K):
            rows = j + tl.arange(0, BLOCK_K)
            xk = tl.load(x_rows + rows[None, :], mask=m_ok[:, None] & (rows < K)[None, :], other=0.0)
            used = tl.max((xk != 0).to(tl.int32), axis=0) > 0
            acc = _accumulate(acc, xk, rows, used, wt_ptr, N, offs_n, n_ok, DOT_PRECISION)

    out_ok = m_ok[:, None] & n_ok[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if num_chunks == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=out_ok)
        tl.debug_barrier()  # all partial stores of this program precede its ticket
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == num_chunks - 1:  # the last chunk of this column tile: reduce in chunk order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c in range(num_chunks):
                total += tl.load(partial_ptr + c * M * N + tile, mask=out_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)  # ready for the next launch or graph replay


@functools.cache
def _tickets(device: torch.device) -> torch.Tensor:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "acttail_kernels.sparse_linear must run once on this device before CUDA graph capture "
            "(it allocates its zeroed ticket buffer then)"
        )
    return torch.zeros(_TICKETS, dtype=torch.int32, device=device)


def sparse_gemv(
    xs: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    plan: GemvPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, N] = per segment i, xs[i] @ weight_t[:, segment i] (+ bias), reading only the weight rows
    where some token's xs is nonzero. xs [S, M <= 16, K] comes from ``topk_sparsify``; writes into
    ``out`` (contiguous [M, N]) if given. Shapes are validated by the caller (``sparse_linear``)."""
    num_segs, m, k = xs.shape
    n = weight_t.shape[1]
    if m > BLOCK_M:
        raise ValueError(f"the sparse GEMV takes at most {BLOCK_M} tokens, got {m}")
    widths = tuple(hi - lo for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:]))
    plan = plan or plan_gemv(widths, k, num_sms(xs.device))
    tiles = sum(triton.cdiv(w, plan.block_n) for w in widths)
    if tiles > _TICKETS:
        raise ValueError(f"output width {n} needs {tiles} column tiles, more than the {_TICKETS} supported")
    chunks = triton.cdiv(k, plan.chunk_k)
    out = torch.empty(m, n, dtype=xs.dtype, device=xs.device) if out is None else out
    partial = torch.empty(chunks * m * n if chunks > 1 else 1, dtype=torch.float32, device=xs.device)
    scratch_len = tiles * chunks * plan.chunk_k if plan.compact else 1
    scratch_rows = torch.empty(scratch_len, dtype=torch.int32, device=xs.device)
    scratch_x = torch.empty(scratch_len * BLOCK_M, dtype=xs.dtype, device=xs.device)
    _sparse_gemv_kernel[(tiles, chunks)](
        xs,
        weight_t,
        out if bias is None else bias,
        out,
        partial,
        _tickets(xs.device),
        scratch_rows,
        scratch_x,
        m,
        n,
        k,
        *(list(seg_bounds[1:]) + [n] * (MAX_SEGMENTS - num_segs)),
        NUM_SEGS=num_segs,
        BLOCK_M=BLOCK_M,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        CHUNK_K=plan.chunk_k,
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if xs.dtype == torch.float32 else "tf32",
        COMPACT=plan.compact,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return out
