"""Column-sparse GEMV: y = xs @ Wt reading only the weight rows of channels some token keeps.

Wt is [K, N], so an input channel's weights are one contiguous row, and skipping a channel skips a
row of memory. The inputs come from ``topk_select``: ``xs`` [S, M, K] (x with each segment's
dropped entries zeroed) and, for one token, the list of its kept channels. Two loops, one kernel:

* LIST (one token): walk the channel list; every weight row loaded is needed and the loop length
  follows the sparsity. The index and weight loads pipeline like a dense GEMV's.
* WALK (any batch): walk all channels BLOCK_K at a time and load a weight row only where some
  token's xs is nonzero (masked loads move no bytes). Each token keeps its own set, so the union
  a batch needs is dense enough that a list buys little, and building one would need every token.
  For one token at low sparsity the walk also beats the list (building the list costs a scan of
  the row); the measured crossover table says where.

Threshold mode (``threshold_gemv``, TEAL's rule) needs no selection kernel: a program reads the raw
x [M, K], which all segments share, and keeps an entry for a segment where |x| >= that segment's
threshold (float32 [S] read on the device). One launch instead of two, either loop: the walk masks x
as it reads it; for one token, each program first compacts its own share of the channel range into a
list of kept channels and then runs the list loop over it (its loop length follows the sparsity, the
walk's does not).

One launch covers every output segment of a merged projection (QKV, gate_up): a tile of BLOCK_N
output columns never straddles a segment boundary (each segment is tiled on its own, its last tile
masked), so it knows its segment and with it its inputs.

Work split: a grid of (column tiles, splits of the channel range). Decode batches read few bytes
per column tile; splitting fills the SMs where the tiles alone do not. With splits, each program
writes fp32 partial sums and the last program of a tile to finish (an atomic ticket per tile) adds
them in split order, adds the bias and writes the output, then resets its ticket: fixed-order sums
stay deterministic (fp32 atomics into the output would not) and the cast needs no third launch.

Everything is sized on the host from shapes alone (no .item(), no data-dependent grid: a program
reads the list length on the device), so the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gemv_tiles import GemvLoop, GemvTiles, load_tiles
from .measured import device_name
from .topk_select import MAX_SEGMENTS, Selection, num_sms, pdl_wait_and_release, tickets

MAX_TOKENS = 16  # BLOCK_M: tl.dot's smallest M; larger batches go dense
# Channels of x a threshold-list program compacts per step: few steps (each waits on an L2 load
# and a scan before the weight stream starts), 8 entries a thread at 4 warps.
COMPACT_BLOCK = 1024


@dataclass(frozen=True)
class GemvPlan:
    """Tile sizes of one sparse GEMV launch."""

    block_n: int  # output columns per program
    block_k: int  # weight rows per loop step
    splits: int  # programs sharing one column tile's channels
    num_warps: int
    num_stages: int


# Measured best on H100 (bf16, 7B/13B shapes) before the per-shape tables: narrow column tiles and
# long steps for a channel list, longer ones for one token's walk (a step keeps only (1 - s) of its
# rows), wide tiles for a batch's walk.
RULE_TILES = {
    GemvLoop.CHANNEL_LIST: GemvTiles(block_n=32, block_k=128, programs_per_sm=4),
    GemvLoop.TOKEN_WALK: GemvTiles(block_n=32, block_k=512, programs_per_sm=4),
    GemvLoop.BATCH_WALK: GemvTiles(block_n=128, block_k=64, programs_per_sm=4),
}


@functools.lru_cache(maxsize=256)
def plan_gemv(seg_widths: tuple[int, ...], k: int, device: str, sms: int, loop: GemvLoop) -> GemvPlan:
    """The plan of the tiles measured on the GPU named ``device`` for this shape and one-token loop
    (``gemv_tiles.json``), else of the rule."""
    return plan_of(load_tiles(device).tiles(seg_widths, k, loop) or RULE_TILES[loop], seg_widths, sms)


def plan_of(tiles: GemvTiles, seg_widths: tuple[int, ...], sms: int) -> GemvPlan:
    """The launch plan of these tiles: column tiles no wider than the widest segment needs, and
    splits of the channel range that bring the grid to the tiles' programs per SM."""
    block_n = min(tiles.block_n, max(16, triton.next_power_of_2(max(seg_widths))))
    count = sum(triton.cdiv(w, block_n) for w in seg_widths)
    splits = min(16, max(1, tiles.programs_per_sm * sms // count))
    return GemvPlan(block_n=block_n, block_k=tiles.block_k, splits=splits, num_warps=4, num_stages=3)


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
def _compact_kept(x_ptr, list_ptr, thr, start, end, BLOCK: tl.constexpr):
    """Write the channels j in [start, end) with |x[j]| >= thr, in order, to list_ptr[start:], and
    return how many there are."""
    count = start * 0
    for j in range(start, end, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        in_range = offs < end
        xj = tl.load(x_ptr + offs, mask=in_range, other=0.0)
        kept = in_range & (tl.abs(xj.to(tl.float32)) >= thr)
        slots = count + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(list_ptr + start + slots, offs, mask=kept)
        count += tl.sum(kept.to(tl.int32), axis=0)
    return count


@triton.jit
def _sparse_gemv_kernel(
    xs_ptr,
    idx_ptr,
    xv_ptr,
    count_ptr,
    thr_ptr,
    wt_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    ticket_ptr,
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
    LIST: tl.constexpr,
    THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    COMPACT_BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    splits = tl.num_programs(1)
    seg, n_start, seg_end = _tile_columns(pid_n, B1, B2, B3, B4, NUM_SEGS, BLOCK_N)
    pdl_wait_and_release(PDL, True)  # nothing the selection writes is read before it is done
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seg_end

    # This program's share of the segment's channel list (or of all K channels), whole steps.
    length = tl.load(count_ptr + seg) if LIST and not THRESHOLD else K
    share = tl.cdiv(tl.cdiv(length, splits), BLOCK_K) * BLOCK_K
    j_end = tl.minimum(length, (pid_k + 1) * share)
    x_rows = xs_ptr + (offs_m[:, None] if THRESHOLD else seg * M + offs_m[:, None]).to(tl.int64) * K
    thr = tl.load(thr_ptr + seg) if THRESHOLD else 0.0
    if LIST and THRESHOLD:
        # One token: the kept channels of this program's share of K become its list, in the same
        # place of the segment's scratch row. Every program of this (segment, share) writes the
        # same bytes there (same x, same threshold), so sharing is benign and the scratch stays
        # [S, K]; the count is this program's own, so none waits on another.
        j_end = pid_k * share + _compact_kept(xs_ptr, idx_ptr + seg * K, thr, pid_k * share, j_end, COMPACT_BLOCK)
        tl.debug_barrier()  # this program's list stores precede its loads of the list
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(pid_k * share, j_end, BLOCK_K):
        offs_j = j + tl.arange(0, BLOCK_K)
        j_ok = offs_j < j_end
        if LIST:
            rows = tl.load(idx_ptr + seg * K + offs_j, mask=j_ok, other=0)
            # The token's values (threshold mode: the raw x at the listed channels, cache hits)
            # fill row 0 of the [BLOCK_M, BLOCK_K] operand.
            values = xs_ptr + rows if THRESHOLD else xv_ptr + seg * K + offs_j
            xk = tl.load(
                values[None, :] + offs_m[:, None] * 0,
                mask=(offs_m[:, None] == 0) & j_ok[None, :],
                other=0.0,
            )
            needed = j_ok
        else:
            rows = offs_j
            xk = tl.load(x_rows + rows[None, :], mask=m_ok[:, None] & j_ok[None, :], other=0.0)
            if THRESHOLD:  # the segment's entries of the raw x
                xk = tl.where(tl.abs(xk.to(tl.float32)) >= thr, xk, 0.0)
            needed = tl.max((xk != 0).to(tl.int32), axis=0) > 0
        w_rows = wt_ptr + rows[:, None].to(tl.int64) * N
        w = tl.load(w_rows + offs_n[None, :], mask=needed[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_M == 1:  # one token: a multiply and a column sum, no tensor-core padding
            acc += tl.sum(xk.to(tl.float32).reshape(BLOCK_K, 1) * w.to(tl.float32), axis=0)[None, :]
        else:
            acc = tl.dot(xk, w, acc, input_precision=DOT_PRECISION)

    out_ok = m_ok[:, None] & n_ok[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if splits == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=out_ok)
        tl.debug_barrier()  # all partial stores of this program precede its ticket
        if tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == splits - 1:
            # The tile's last split: add the partials in split order, then reset the ticket.
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c in range(splits):
                total += tl.load(partial_ptr + c * M * N + tile, mask=out_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)


def sparse_gemv(
    sel: Selection,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    plan: GemvPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, N] = per segment i, sel.xs[i] @ weight_t[:, segment i] (+ bias), from the channel list if
    ``sel`` has one; into ``out`` (contiguous [M, N]) if given. Shapes are checked by the caller."""
    lists = (sel.idx, sel.xv, sel.count) if sel.idx is not None else None
    return _launch_gemv(sel.xs, lists, None, weight_t, bias, seg_bounds, plan, out, sel.pdl)


def threshold_gemv(
    x: torch.Tensor,
    thresholds: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    plan: GemvPlan | None = None,
    out: torch.Tensor | None = None,
    with_list: bool = False,
) -> torch.Tensor:
    """[M, N] = per segment i, (x where |x| >= thresholds[i], else 0) @ weight_t[:, segment i] (+ bias),
    comparing in float32, in one launch: the walk, or with ``with_list`` (one token) the list loop
    over channels each program compacts itself; into ``out`` (contiguous [M, N]) if given.
    ``thresholds`` is float32 [S] on x's device, read by the kernel (a captured graph takes values
    written into it later). Shapes are checked by the caller."""
    x = x.contiguous()
    lists = None
    if with_list:
        if x.shape[0] != 1:
            raise ValueError(f"threshold mode's channel list is one token's, got {x.shape[0]} tokens")
        # The programs' lists, [S, K]; values are read from x itself, counts kept in registers.
        # Per call from the caching allocator, as ``partial``: graph safe (a captured graph keeps
        # its own), and calls on other streams never share it.
        scratch = torch.empty((len(seg_bounds) - 1) * x.shape[1], dtype=torch.int32, device=x.device)
        lists = (scratch, x, x)
    return _launch_gemv(x[None], lists, thresholds, weight_t, bias, seg_bounds, plan, out, False)


def _launch_gemv(
    xs: torch.Tensor,
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    thresholds: torch.Tensor | None,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    plan: GemvPlan | None,
    out: torch.Tensor | None,
    pdl: bool,
) -> torch.Tensor:
    """The launch of both modes. xs: [S, M, K] sparsified copies, or with ``thresholds`` the raw x
    as [1, M, K]; ``lists``: one token's (idx, xv, count), with ``thresholds`` the [S, K] scratch
    the programs write their lists to (xv and count unused), or None to walk."""
    _, m, k = xs.shape
    n = weight_t.shape[1]
    num_segs = len(seg_bounds) - 1
    if m > MAX_TOKENS:
        raise ValueError(f"the sparse GEMV takes at most {MAX_TOKENS} tokens, got {m}")
    loop = GemvLoop.CHANNEL_LIST if lists is not None else GemvLoop.TOKEN_WALK if m == 1 else GemvLoop.BATCH_WALK
    widths = tuple(hi - lo for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:]))
    plan = plan or plan_gemv(widths, k, device_name(weight_t.device), num_sms(weight_t.device), loop)
    tiles = sum(triton.cdiv(w, plan.block_n) for w in widths)
    ticket_buf = tickets(weight_t.device)
    if tiles > ticket_buf.numel():
        raise ValueError(f"output width {n} needs {tiles} column tiles, more than the {ticket_buf.numel()} supported")
    out = torch.empty(m, n, dtype=weight_t.dtype, device=weight_t.device) if out is None else out
    partial = torch.empty(plan.splits * m * n if plan.splits > 1 else 1, dtype=torch.float32, device=weight_t.device)
    _sparse_gemv_kernel[(tiles, plan.splits)](
        xs,
        *(lists or (xs, xs, xs)),
        xs if thresholds is None else thresholds,
        weight_t,
        out if bias is None else bias,
        out,
        partial,
        ticket_buf,
        m,
        n,
        k,
        *(list(seg_bounds[1:]) + [n] * (MAX_SEGMENTS - num_segs)),
        NUM_SEGS=num_segs,
        BLOCK_M=1 if loop is GemvLoop.TOKEN_WALK else MAX_TOKENS,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        LIST=lists is not None,
        THRESHOLD=thresholds is not None,
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if weight_t.dtype == torch.float32 else "tf32",
        PDL=pdl,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        COMPACT_BLOCK=COMPACT_BLOCK,
        launch_pdl=pdl,
    )
    return out
