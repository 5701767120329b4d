"""The CPU paths of ``acttail_kernels.cpu`` against the PyTorch reference: the same TopK sets, ties
included, and the same outputs through the GEMV over the kept rows and the masked GEMM."""

from __future__ import annotations

import pytest
import torch

from acttail_kernels import cpu, reference

DTYPES = [torch.float32, torch.bfloat16]
# (seg_bounds, K): a plain projection, and a merged one with unequal segments (GQA qkv)
SHAPES = [([0, 37], 100), ([0, 24, 32, 40], 63)]


def tied_input(rows: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random rows where many |x| repeat (signs flipped too), so that thresholds fall on ties."""
    x = torch.randn(rows, k, generator=gen)
    x[:, : k // 3] = -x[:, k // 3 : 2 * (k // 3)]
    x[:, -3:] = x[:, :1]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_channels_are_the_references_set_at_every_keep(dtype):
    gen = torch.Generator().manual_seed(0)
    for rows, k in [(1, 100), (7, 63), (33, 17)]:
        x = tied_input(rows, k, dtype, gen)
        x[0, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])  # equal magnitudes of either sign
        ordered = cpu.topk_channels(x, k, ordered=True)
        for keep in range(k + 1):
            expected = reference.topk_mask(x, keep)
            assert torch.equal(cpu.channel_mask(cpu.topk_channels(x, keep), k), expected), (rows, k, keep)
            assert torch.equal(cpu.channel_mask(ordered[:, :keep], k), expected), (rows, k, keep)


def test_topk_channels_refuse_what_their_keys_cannot_order_in_one_line():
    with pytest.raises(
        ValueError, match=r"float32, float16 or bfloat16 rows of at most 65536 channels, got torch.int64"
    ):
        cpu.topk_channels(torch.ones(1, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="got torch.float32 x 65537"):
        cpu.topk_channels(torch.ones(1, 65537), 2)


def test_cpu_layout_holds_each_segment_as_a_contiguous_in_by_out_block():
    weight = torch.randn(40, 63)
    bounds = [0, 24, 32, 40]
    laid_out = cpu.prepare_weight(weight, bounds)
    assert laid_out.shape == (40 * 63,)
    blocks = cpu.segment_blocks(laid_out, 63, bounds)
    for block, lo, hi in zip(blocks, bounds[:-1], bounds[1:]):
        assert block.is_contiguous() and block.data_ptr() >= laid_out.data_ptr()
        assert torch.equal(block, weight[lo:hi].t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bounds", "k"), SHAPES)
@pytest.mark.parametrize("path", list(cpu.CpuPath))
def test_both_paths_compute_the_reference(dtype, bounds, k, path):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(bounds[-1], k, generator=gen).to(dtype)
    bias = torch.randn(bounds[-1], generator=gen).to(dtype)
    laid_out = cpu.prepare_weight(weight, bounds)
    tolerance = {"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {}
    segments = len(bounds) - 1
    for rows in (1, 3, 20):
        x = tied_input(rows, k, dtype, gen)
        for keeps in ([0] * segments, [k] * segments, [k // 2, 5, 1][:segments]):
            out = cpu.sparse_linear(x, laid_out, bias, bounds, keeps, path)
            expected = reference.sparse_linear_ref(x, weight, bias, bounds, keeps)
            torch.testing.assert_close(out, expected, **tolerance)
        torch.testing.assert_close(cpu.dense_linear(x, laid_out, bias, bounds), x @ weight.T + bias, **tolerance)


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_the_gemv_splits_a_small_steps_rows_into_a_bag_per_thread(threads, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    k, n = 100, 37
    weight = torch.randn(n, k, generator=gen)
    block = cpu.prepare_weight(weight, [0, n]).view(k, n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu.bags_per_token(1, cpu.GEMV_SPLIT_MIN_BYTES - 1) == 1  # too few bytes to pay for threads
        monkeypatch.setattr(cpu, "GEMV_SPLIT_MIN_BYTES", 0)  # split this small block too
        for rows, expected_bags in [(1, threads), (2, -(-threads // 2)), (threads, 1), (threads + 1, 1)]:
            assert cpu.bags_per_token(rows, 1) == expected_bags
            x = torch.randn(rows, k, generator=gen)
            for keep in (1, 2, 30):  # fewer kept rows than bags: a bag each
                channels = cpu.topk_channels(x, keep)
                expected = reference.sparse_linear_ref(x, weight, None, [0, n], [keep])
                torch.testing.assert_close(cpu.sparse_gemv(x, channels, block, None), expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_the_step_size_picks_the_path_by_the_weight_rows_it_reads():
    """The GEMV's work grows with rows x kept channels, weighted by the segments' widths."""
    k, gate_up = 5120, [0, 13824, 27648]
    kept_20 = [k // 5, k // 5]  # 80% sparsity: a token reads a fifth of the rows
    assert cpu.sparse_path(1, kept_20, gate_up, k) is cpu.CpuPath.SPARSE_GEMV
    assert cpu.sparse_path(15, kept_20, gate_up, k) is cpu.CpuPath.SPARSE_GEMV
    assert cpu.sparse_path(16, kept_20, gate_up, k) is cpu.CpuPath.MASKED_GEMM
    qkv = [0, 4096, 5120, 6144]  # q keeps half its inputs, k and v a tenth: 0.37 of the module's weights
    assert cpu.sparse_path(8, [2048, 409, 409], qkv, 4096) is cpu.CpuPath.SPARSE_GEMV
    assert cpu.sparse_path(9, [2048, 409, 409], qkv, 4096) is cpu.CpuPath.MASKED_GEMM
