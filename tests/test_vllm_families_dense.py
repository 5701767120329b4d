"""`vllm serve --quantization acttail` of Llama 3, Mistral, Qwen2, Qwen3 and Gemma 2: tests/served_families.py."""

import pytest

from tests.served_families import (  # noqa: F401 -- the tests this file runs
    served_fixture,
    sparsity_zero_equals_dense,
    tensor_parallel_keeps_topk_within_each_shard,
    test_completion_answers,
    test_metrics_list_the_profiled_projections,
    test_prompt_logprobs_match_reference,
)

pytestmark = pytest.mark.slow
served = served_fixture(["llama", "mistral", "qwen2", "qwen3", "gemma2"])


def test_sparsity_zero_equals_dense(tiny_model):
    sparsity_zero_equals_dense("qwen2", tiny_model)


def test_tensor_parallel_keeps_topk_within_each_shard(tiny_model, tmp_path):
    tensor_parallel_keeps_topk_within_each_shard("gemma3", tiny_model, tmp_path)
