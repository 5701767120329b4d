"""Exact per-token TopK on chip: x with all but each row's ``keep`` largest |x| zeroed, per segment.

Non-negative floats order like their bit patterns, so the threshold ``thr`` (the bits of the keep-th
largest |x|) is the largest t with count(bits >= t) >= keep, decided one bit at a time from the top,
each step one count over the row held in registers. Entries above ``thr`` are kept; among entries
equal to it the lowest indices are (a cumulative count), like a stable descending sort.

A step costs mostly the latency of one block-wide sum, so the search starts in parallel instead: a
row's programs each own one slice of the threshold range and test it with a single two-count step;
the one whose slice holds ``thr`` finishes it by bisection, the others exit. Without a guess the
slices split the range evenly (2**b programs decide the top b bits). With ``thr_guess``, each
segment's threshold of its last call, the slices are narrow and tile a window of a few binades
(``SelectOptions.threshold_window``) around the guess, with one open slice below it and one above:
a token whose threshold is near its predecessor's (the usual case,
benchmarks/experiments/threshold_drift.py) then takes a few steps instead of a dozen, and one
outside the window takes the whole range, never a wrong answer.

Which entries equal to ``thr`` are kept takes a scan, and a scan costs in proportion to the row
it covers. So a row of a small batch is written in chunks (``SelectOptions.row_chunk``), each by
its own group of range-test programs: every group finds thr over the whole row, ranks its chunk by
counts of the entries before it, and scans only its chunk.

For a single token (decode) the kept channels are also listed in order, ``idx[seg, :count[seg]]``
with their values in ``xv[seg, :]``: all the GEMV then reads. The same scan ranks them.

On Hopper and newer both kernels use programmatic dependent launch (PDL), so the GEMV's programs
are on their SMs, waiting on the selection's writes, while the selection still runs. Without a
channel list the selection lets the GEMV launch as soon as it starts; with one, once its finishing
programs know the thresholds (a release at the start measured slower for lists).

``SelectOptions`` holds these choices (chunks, window, programs, PDL): the defaults ship, and the
benchmarks pass others to compare them. The measurements behind them: docs/performance.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SEGMENTS = 4  # QKV needs 3, gate_up 2; the GEMV takes segment bounds as scalar arguments
MAX_CHANNELS = 32767  # two counts share one int32 in the range test sum and the list scan


@dataclass(frozen=True)
class SelectOptions:
    """How ``topk_select`` splits its work and launches: speed only, the outputs never depend on it.
    The defaults ship; benchmarks pass others to compare."""

    # Range-test programs to spread over the GPU, per SM. A program holds its row in registers (at
    # K = 5120, over half an SM's register file), so more than one per SM runs in waves.
    range_programs_per_sm: int = 1
    # Programmatic dependent launch where the GPU has it (compute capability 9.0+).
    use_pdl: bool = True
    # Channels one program writes and lists (a power of 2; a shorter row is one chunk): more chunks
    # scan less each but leave fewer programs to test threshold bits in parallel.
    row_chunk: int = 2048
    # Larger batches write each row whole: there the range test already runs short of programs.
    row_chunk_max_tokens: int = 4
    # Width of the window of thresholds tested in narrow slices, in binades (factors of 2 of |x|)
    # centred on the guess; 0 turns the window off.
    threshold_window: int = 2

    def __post_init__(self) -> None:
        if self.row_chunk < 1 or self.row_chunk & (self.row_chunk - 1):
            raise ValueError(f"row_chunk must be a power of 2 (a Triton block), got {self.row_chunk}")
        if self.range_programs_per_sm < 1 or self.threshold_window < 0 or self.row_chunk_max_tokens < 0:
            raise ValueError(f"range_programs_per_sm >= 1, threshold_window >= 0, row_chunk_max_tokens >= 0: {self}")


SHIPPED_OPTIONS = SelectOptions()


def triton_interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_topk_select_kernel, triton.runtime.JITFunction)


def pdl_launch(device: torch.device, options: SelectOptions = SHIPPED_OPTIONS) -> bool:
    """Whether the selection and GEMV of a call launch with PDL (compute capability 9.0+, compiled
    kernels)."""
    return (
        options.use_pdl
        and device.type == "cuda"
        and not triton_interpreted()
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (4 under the CPU interpreter: small grids, cheap to run)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def mantissa_bits(dtype: torch.dtype) -> int:
    """Stored mantissa bits: a binade of |x| spans 2**mantissa_bits bit patterns."""
    return {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]


def value_bits(dtype: torch.dtype) -> int:
    """Bits of |x| below the sign bit: the bits of a threshold."""
    if dtype in (torch.float16, torch.bfloat16):
        return 15
    if dtype == torch.float32:
        return 31
    raise TypeError(f"sparse kernels take float16, bfloat16 or float32 activations, got {dtype}")


@triton.jit
def _magnitude_bits(v, VALUE_BITS: tl.constexpr):
    """|v| as a non-negative int32 that orders like |v| (sign bit cleared)."""
    if VALUE_BITS == 15:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return bits


@triton.jit
def pdl_wait_and_release(PDL: tl.constexpr, RELEASE: tl.constexpr):
    """Under PDL: wait for the previous kernel's writes, then (RELEASE) let the next kernel launch;
    a kernel that releases later calls gdc_launch_dependents itself."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if RELEASE:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _count(flags):
    return tl.sum(flags.to(tl.int32), axis=0)


@triton.jit
def _threshold_slice(part, guess_ptr, seg, SLICES, LOG_W, VALUE_BITS: tl.constexpr, WINDOW: tl.constexpr):
    """Slice [lo, hi) of thresholds that program ``part`` tests (int64: 2**31 bounds fp32), and the
    bisection steps that finish it."""
    top = tl.full((), 1, tl.int64) << VALUE_BITS
    if WINDOW:  # SLICES - 2 slices of 2**LOG_W around the guess, open slices below and above
        span = (SLICES - 2).to(tl.int64) << LOG_W
        start = tl.minimum(tl.maximum(tl.load(guess_ptr + seg).to(tl.int64) - span // 2, 0), top - span)
        lo = tl.where(part == 0, 0, start + ((part - 1).to(tl.int64) << LOG_W))
        hi = tl.where(part == SLICES - 1, top, start + (part.to(tl.int64) << LOG_W))
        steps = tl.where((part == 0) | (part == SLICES - 1), VALUE_BITS, LOG_W)
    else:  # SLICES == 2**(VALUE_BITS - LOG_W) even slices
        lo = part.to(tl.int64) << LOG_W
        hi = lo + (tl.full((), 1, tl.int64) << LOG_W)
        steps = part * 0 + LOG_W
    return lo, hi, steps


@triton.jit
def _pattern(t, VALUE_BITS: tl.constexpr):
    """An int64 threshold in [0, 2**VALUE_BITS) as the int32 the bits compare with (2**VALUE_BITS,
    above every value, does not fit fp32's int32: callers count nothing there)."""
    return tl.minimum(t, (1 << VALUE_BITS) - 1).to(tl.int32)


@triton.jit
def _topk_select_kernel(
    x_ptr,
    stride_xm,
    K,
    keep_ptr,
    guess_ptr,
    xs_ptr,
    idx_ptr,
    xv_ptr,
    count_ptr,
    SLICES,
    LOG_W,
    NUM_SEGS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    WINDOW: tl.constexpr,
    LIST: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (token m, segment, group * SLICES + part): if thr lies in part's slice, write the
    group's chunk of xs[segment, m, :] (and, with a list, the chunk's list entries)."""
    pdl_wait_and_release(PDL, not LIST)  # a channel list's GEMV launches once the thresholds are known
    m = tl.program_id(0)
    seg = tl.program_id(1)
    part = tl.program_id(2) % SLICES
    group = tl.program_id(2) // SLICES
    keep = tl.load(keep_ptr + seg)  # read on the device: a captured graph follows budget changes
    offs = tl.arange(0, BLOCK_K)
    in_row = offs < K
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    v = tl.load(x_row + offs, mask=in_row, other=0.0)
    bits = tl.where(in_row, _magnitude_bits(v, VALUE_BITS), -1)  # -1: padding never counts

    # thr is in this part's slice [lo, hi) iff count(>= lo) >= keep and count(>= hi) < keep; the
    # last slice ends above every value (keep == 0 lands there).
    lo, hi, steps = _threshold_slice(part, guess_ptr, seg, SLICES, LOG_W, VALUE_BITS, WINDOW)
    from_lo = (bits >= _pattern(lo, VALUE_BITS)).to(tl.int32)
    counts = tl.sum(from_lo + ((bits >= _pattern(hi, VALUE_BITS)).to(tl.int32) << 16), axis=0)
    top = 1 << VALUE_BITS
    count_lo = tl.where(lo < top, counts & 0xFFFF, 0)
    count_hi = tl.where(hi < top, counts >> 16, 0)
    if (count_lo >= keep) & ((count_hi < keep) | (part == SLICES - 1)):
        thr = lo
        for step in range(steps):
            candidate = thr + (tl.full((), 1, tl.int64) << (steps - 1 - step))
            # An open slice takes more steps than its width needs: counts refuse candidates past
            # hi, except past the top, where keep == 0 climbs (the clamp below keeps nothing).
            thr = tl.where(_count(bits >= _pattern(candidate, VALUE_BITS)) >= keep, candidate, thr)
        thr = _pattern(thr, VALUE_BITS)
        if PDL and LIST:  # the other programs let it launch as they exit
            tl.extra.cuda.gdc_launch_dependents()
        if WINDOW:
            # The next call's guess: token 0's threshold (a real token: CUDA graphs pad the end).
            if (m == 0) & (group == 0):
                tl.store(guess_ptr + seg, thr)
        # Keep all entries above thr and the first `ties` entries equal to it. This group writes
        # its chunk [start, start + CHUNK) of the row, ranked by three counts over the whole row in
        # one sum: entries above thr, and entries above and equal to it before the chunk.
        above = bits > thr
        equal = bits == thr
        start = group * CHUNK
        before = offs < start
        row_counts = tl.sum(
            (above.to(tl.int64) << 32) | ((above & before).to(tl.int64) << 16) | (equal & before).to(tl.int64), axis=0
        )
        ties = keep - (row_counts >> 32).to(tl.int32)
        if CHUNK == BLOCK_K:  # one chunk, the row already held (batches above row_chunk_max_tokens)
            offs_c, in_chunk, v_c, above_c, equal_c = offs, in_row, v, above, equal
        else:
            offs_c = start + tl.arange(0, CHUNK)
            in_chunk = offs_c < K
            v_c = tl.load(x_row + offs_c, mask=in_chunk, other=0.0)
            bits_c = tl.where(in_chunk, _magnitude_bits(v_c, VALUE_BITS), -1)
            above_c = bits_c > thr
            equal_c = bits_c == thr
        # One scan ranks both within the chunk: entries above thr (high half), equal to it (low).
        ranks = tl.cumsum((above_c.to(tl.int32) << 16) | equal_c.to(tl.int32), axis=0)
        equal_rank = (row_counts & 0xFFFF).to(tl.int32) + (ranks & 0xFFFF)
        kept = above_c | (equal_c & (equal_rank <= ties))
        xs_row = xs_ptr + (seg.to(tl.int64) * tl.num_programs(0) + m) * K
        tl.store(xs_row + offs_c, tl.where(kept, v_c, 0.0), mask=in_chunk)
        if LIST:  # one token: its nonzero kept entries, in order, are the channel list
            # Zeros are kept only as ties at thr == 0, and never listed.
            listed_ties = tl.where(thr > 0, ties, 0)
            listed = above_c | (equal_c & (equal_rank <= listed_ties))
            above_before = ((row_counts >> 16) & 0xFFFF).to(tl.int32)
            slot = above_before + (ranks >> 16) + tl.minimum(equal_rank, listed_ties) - 1
            tl.store(idx_ptr + seg * K + slot, offs_c, mask=listed)
            tl.store(xv_ptr + seg * K + slot, v_c, mask=listed)
            if group == 0:
                tl.store(count_ptr + seg, keep - ties + listed_ties)


@dataclass(frozen=True)
class Selection:
    """Output of ``topk_select``. ``xs`` [S, M, K]: x with each segment's dropped entries zeroed.
    With a channel list (one token): ``idx`` [S, K] int32, ``xv`` [S, K] and ``count`` [S] int32,
    per segment the nonzero kept channels (first count[s] entries) and their values. ``pdl``: the
    selection was launched with PDL, so the GEMV that reads it must be too."""

    xs: torch.Tensor
    idx: torch.Tensor | None = None
    xv: torch.Tensor | None = None
    count: torch.Tensor | None = None
    pdl: bool = False


@functools.cache
def tickets(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters, made once per device; every kernel that takes them leaves them zero."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "acttail_kernels.sparse_linear must run once on this device before CUDA graph capture "
            "(it allocates its zeroed ticket buffer then)"
        )
    return torch.zeros(1 << 16, dtype=torch.int32, device=device)


def select_config(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps): the whole row in one program, 32 entries a thread (more spill registers)."""
    block_k = triton.next_power_of_2(k)
    return block_k, min(16, max(4, block_k // 1024))


def row_chunk(m: int, k: int, options: SelectOptions = SHIPPED_OPTIONS) -> int:
    """Channels of a row one group of programs writes: ``options.row_chunk`` up to
    ``options.row_chunk_max_tokens`` tokens, else the whole (padded) row."""
    block_k = triton.next_power_of_2(k)
    return min(options.row_chunk, block_k) if m <= options.row_chunk_max_tokens else block_k


def range_layout(
    m: int,
    num_segs: int,
    k: int,
    dtype: torch.dtype,
    sms: int,
    guessed: bool,
    options: SelectOptions = SHIPPED_OPTIONS,
) -> tuple[int, int, bool]:
    """(SLICES, LOG_W, WINDOW) of a call on m tokens, num_segs segments and k channels: range-test
    programs per row chunk (``row_chunk``), about ``options.range_programs_per_sm`` per SM, and the
    width of their slices. With a guess and 3 programs or more, all but the two open ones tile
    ``options.threshold_window`` binades (WINDOW); else 2**b even slices."""
    rows = m * num_segs * triton.cdiv(k, row_chunk(m, k, options))
    spare = options.range_programs_per_sm * sms // max(1, rows)
    if guessed and options.threshold_window > 0 and spare >= 3:
        span = options.threshold_window << mantissa_bits(dtype)
        return spare, (-(-span // (spare - 2)) - 1).bit_length(), True
    bits = min(value_bits(dtype), spare.bit_length() - 1 if spare >= 1 else 0)
    return 1 << bits, value_bits(dtype) - bits, False


def keep_tensor(seg_keep: list[int], device: torch.device | str) -> torch.Tensor:
    """The per-segment budgets as the int32 device tensor ``topk_select`` reads."""
    return torch.tensor(seg_keep, dtype=torch.int32, device=device)


def guess_tensor(num_segs: int, device: torch.device | str) -> torch.Tensor:
    """A threshold guess per segment for ``topk_select`` to read and update: keep one per call site
    (a layer), so each call starts from that site's last threshold."""
    return torch.zeros(num_segs, dtype=torch.int32, device=device)


def topk_select(
    x: torch.Tensor,
    keep: torch.Tensor,
    with_list: bool,
    thr_guess: torch.Tensor | None = None,
    options: SelectOptions = SHIPPED_OPTIONS,
) -> Selection:
    """Sparsify x [M, K] once per budget in ``keep`` (int32 [S] on x's device, each in [0, K], see
    ``keep_tensor``); ``with_list`` (one token only) also lists the kept channels. One launch, no
    host sync: the budgets are read on the device, so they are checked where they are made.
    ``thr_guess`` (``guess_tensor``) and ``options`` only make the search faster or slower: the
    outputs never depend on them."""
    m, k = x.shape
    if keep.dim() != 1 or not 1 <= keep.numel() <= MAX_SEGMENTS:
        raise ValueError(f"1 to {MAX_SEGMENTS} output segments are supported, got keep of shape {tuple(keep.shape)}")
    if keep.dtype != torch.int32 or keep.device != x.device:
        raise ValueError(f"keep must be int32 on {x.device} (keep_tensor), got {keep.dtype} on {keep.device}")
    if k > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} input channels are supported, got {k}")
    if with_list and m != 1:
        raise ValueError(f"channel lists are made for one token, got {m}")
    if thr_guess is not None and (
        thr_guess.shape != keep.shape or thr_guess.dtype != torch.int32 or thr_guess.device != x.device
    ):
        raise ValueError(
            f"thr_guess must be int32 [{keep.numel()}] on {x.device} (guess_tensor), got "
            f"{thr_guess.dtype} {tuple(thr_guess.shape)} on {thr_guess.device}"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    num_segs = keep.numel()
    xs = torch.empty(num_segs, m, k, dtype=x.dtype, device=x.device)
    pdl = pdl_launch(x.device, options)
    if with_list:
        sel = Selection(
            xs,
            torch.empty(num_segs, k, dtype=torch.int32, device=x.device),
            torch.empty_like(xs[:, 0]),
            torch.empty(num_segs, dtype=torch.int32, device=x.device),
            pdl,
        )
    else:
        sel = Selection(xs, pdl=pdl)
    if m == 0:
        return sel
    block_k, num_warps = select_config(k)
    chunk = row_chunk(m, k, options)
    groups = triton.cdiv(k, chunk)
    slices, log_w, window = range_layout(m, num_segs, k, x.dtype, num_sms(x.device), thr_guess is not None, options)
    _topk_select_kernel[(m, num_segs, groups * slices)](
        x,
        x.stride(0),
        k,
        keep,
        keep if thr_guess is None else thr_guess,
        xs,
        *((sel.idx, sel.xv, sel.count) if with_list else (xs, xs, xs)),
        slices,
        log_w,
        NUM_SEGS=num_segs,
        BLOCK_K=block_k,
        VALUE_BITS=value_bits(x.dtype),
        WINDOW=window,
        LIST=with_list,
        CHUNK=chunk,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return sel
