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


@pytest.mark.parametrize(
    "prefix",
    [
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.mlp.experts",  # MoE experts
        "model.layers.0.mlp.gate",  # Qwen3-MoE's router
        "model.layers.0.mlp.shared_expert.gate_up_proj",  # Qwen2-MoE's shared expert
        "vision_tower.vision_model.encoder.layers.3.self_attn.qkv_proj",  # Gemma 3's SigLIP
        "visual.model.layers.3.self_attn.qkv_proj",
    ],
)
def test_not_a_decoder_projection(prefix):
    assert decoder_projection(prefix) is None


def test_row_parallel():
    assert decoder_projection("model.layers.0.mlp.down_proj").row_parallel
    assert not decoder_projection("model.layers.0.mlp.gate_up_proj").row_parallel


def test_rank_shards_follow_kv_head_replication():
    qkv = decoder_projection("model.layers.0.self_attn.qkv_proj")
    assert qkv.rank_shards(1, 1) == (1, 1, 1)
    assert qkv.rank_shards(4, 1) == (4, 4, 4)  # 8 KV heads on 4 ranks: 2 each
    assert qkv.rank_shards(4, 2) == (4, 2, 2)  # 2 KV heads on 4 ranks: each on 2 ranks
    assert qkv.rank_shards(2, 2) == (2, 1, 1)  # Gemma 3 270M's one KV head on 2 ranks: whole on each
    assert decoder_projection("model.layers.0.mlp.down_proj").rank_shards(2, 1) == (2,)


def test_kept_count_rounds():
    assert kept_count(0.5, 576) == 288
    assert kept_count(0.0, 576) == 576
    assert kept_count(0.8, 1536) == round(0.2 * 1536)


def test_module_budget_segments():
    budget = ModuleBudget.from_sparsities((0.5, 0.25, 0.0), 576)
    assert budget.seg_keep == (288, 432, 576)
    assert budget.kept_fractions == (0.5, 0.75, 1.0)
