"""The pure comparisons behind benchmarks/served_ppl.py and benchmarks/reproducibility.py."""

import pytest
import torch

from benchmarks.reproducibility import bf16_step, near_threshold_counts
from benchmarks.served_agreement import Tolerance, first_divergence, mean_abs_diff, mean_nll


def test_mean_abs_diff_pools_every_token():
    a = [torch.tensor([0.0, -1.0]), torch.tensor([-2.0])]
    b = [torch.tensor([0.5, -1.0]), torch.tensor([-1.0])]
    assert mean_abs_diff(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_abs_diff(a, b[:1])


def test_mean_nll_is_per_token():
    assert mean_nll([torch.tensor([-1.0, -3.0]), torch.tensor([-2.0])]) == pytest.approx(2.0)


def test_tolerance_is_the_larger_gap():
    tolerance = Tolerance(dense_engine_gap=0.01, dtype_gap=0.03)
    assert tolerance.value == 0.03 and tolerance.source == "reference bf16-vs-fp32"
    assert tolerance.admits(-0.02) and not tolerance.admits(0.031)
    alone = Tolerance(dense_engine_gap=0.01, dtype_gap=None)
    assert alone.value == 0.01 and alone.source == "dense served-vs-reference"


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_near_threshold_counts_bf16_neighbours():
    assert bf16_step(torch.tensor([1.0, 3.0])).tolist() == [2**-7, 2**-6]
    # keep 3: the threshold (3rd largest |x|) is 1.0; 1.005 and 0.996 lie within 2**-7 of it, 0.9 does not
    x = torch.tensor([[4.0, -1.005, 1.0, 0.996, 0.9]])
    assert near_threshold_counts(x, 3).tolist() == [2]
