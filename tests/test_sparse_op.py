"""The op behind every ActTail linear layer, called directly on CPU (no server): its output and the
counters the metrics read, with every row sparsified and under policy=decode."""

from __future__ import annotations

import pytest
import torch

from acttail_kernels import reference
from acttail_vllm import sparse_op
from acttail_vllm.stats import ModuleStats, new_stats

K, BOUNDS, KEEPS = 16, [0, 8, 12], [4, 10]


def run_op(x: torch.Tensor, weight: torch.Tensor, decode_only: bool) -> tuple[torch.Tensor, ModuleStats]:
    stats = new_stats(len(KEEPS))
    keep = torch.tensor(KEEPS, dtype=torch.int32)
    thr_guess = torch.zeros(len(KEEPS), dtype=torch.int32)
    y = sparse_op._sparse_linear(x, weight, None, BOUNDS, KEEPS, keep, thr_guess, stats, True, decode_only)
    return y, ModuleStats.read(stats)


def test_every_row_keeps_its_budget():
    x, weight = torch.randn(5, K), torch.randn(BOUNDS[-1], K)
    y, stats = run_op(x, weight, decode_only=False)
    torch.testing.assert_close(y, reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS))
    assert stats.kept_channels == (4 * 5, 10 * 5)
    assert (stats.sparse_tokens, stats.dense_tokens, stats.unsparsified_tokens) == (0, 5, 0)


def test_decode_policy_leaves_prefill_rows_dense_and_counts_them_whole(monkeypatch):
    decode_rows = torch.tensor([True, False, True, True, False])
    monkeypatch.setattr(sparse_op, "decode_token_mask", lambda rows, device: decode_rows)
    x, weight = torch.randn(5, K), torch.randn(BOUNDS[-1], K)
    y, stats = run_op(x, weight, decode_only=True)
    sparse = reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS)
    torch.testing.assert_close(y[decode_rows], sparse[decode_rows])
    torch.testing.assert_close(y[~decode_rows], x[~decode_rows] @ weight.T)
    assert stats.kept_channels == (4 * 3 + K * 2, 10 * 3 + K * 2)
    assert stats.kept_fractions(K) == pytest.approx(((12 + 32) / 80, (30 + 32) / 80))
    assert (stats.sparse_tokens, stats.dense_tokens, stats.unsparsified_tokens) == (0, 3, 2)
