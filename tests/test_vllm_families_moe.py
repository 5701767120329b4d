"""`vllm serve --quantization acttail` of Gemma 3, Phi-3 and the mixtures of experts (Mixtral,
Qwen2-MoE, Qwen3-MoE): tests/served_families.py."""

import pytest

from tests.served_families import (  # noqa: F401 -- the tests this file runs
    served_fixture,
    sparsity_zero_equals_dense,
    test_completion_answers,
    test_metrics_list_the_profiled_projections,
    test_prompt_logprobs_match_reference,
    unsupported_architecture_stops_startup,
)

pytestmark = pytest.mark.slow
served = served_fixture(["gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"])


def test_sparsity_zero_equals_dense(tiny_model):
    sparsity_zero_equals_dense("phi3", tiny_model)


def test_unsupported_architecture_stops_startup(tmp_path):
    unsupported_architecture_stops_startup(tmp_path)
