"""vLLM module prefixes to per-segment budgets (no vLLM needed)."""

import pytest

from acttail_vllm.serving.budgets import ModuleBudget, decoder_projection, kept_count


@pytest.mark.parametrize(
    ("prefix", "layer", "projections"),
    [
        ("model.layers.3.self_attn.qkv_proj", 3, ("q_proj", "k_proj", "v_proj")),
        ("model.layers.12.mlp.gate_up_proj", 12, ("gate_proj", "up_proj")),
        ("model.layers.0.self_attn.o_proj", 0, ("o_proj",)),
        ("language_model.model.layers.7.mlp.down_proj", 7, ("down_proj",)),
    ],
)
def test_decoder_projection(prefix, layer, projections):
    proj = decoder_projection(prefix)
    assert (proj.layer, proj.projections) == (layer, projections)


@pytest.mark.parametrize("prefix", ["lm_head", "model.embed_tokens", "model.layers.0.mlp.experts.w13"])
def test_not_a_decoder_projection(prefix):
    assert decoder_projection(prefix) is None


def test_row_parallel():
    assert decoder_projection("model.layers.0.mlp.down_proj").row_parallel
    assert not decoder_projection("model.layers.0.mlp.gate_up_proj").row_parallel


def test_kept_count_rounds():
    assert kept_count(0.5, 576) == 288
    assert kept_count(0.0, 576) == 576
    assert kept_count(0.8, 1536) == round(0.2 * 1536)


def test_module_budget_segments():
    budget = ModuleBudget.from_sparsities((0.5, 0.25, 0.0), 576)
    assert budget.seg_keep == (288, 432, 576)
    assert budget.kept_fractions == (0.5, 0.75, 1.0)
