"""Tensor parallelism without vLLM: each rank's weights cut from a tiny checkpoint as vLLM shards
them, checked by the budget resolver, and the row-parallel op's shard-local TopK against the
reference on split weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from acttail_kernels import cpu
from acttail_kernels.reference import topk_mask
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.builder import profile_model
from acttail_vllm.profiling.profile import ProfileError
from acttail_vllm.serving.budgets import decoder_projection, kept_count
from acttail_vllm.serving.op import sparse_linear_impl
from acttail_vllm.serving.resolver import BudgetResolver, LoadedModule
from acttail_vllm.serving.settings import resolve_budget_source

TP = 2


def rank_modules(directory, rank: int, kv_heads: int, kv_replicas_seen: int | None = None) -> list[LoadedModule]:
    """Rank ``rank``'s ActTail modules at TP=2, weights as vLLM shards them: q, k, v, gate, up
    split by output rows (a KV head replicated where there are fewer KV heads than ranks), o and
    down by input columns. ``kv_replicas_seen`` overrides the replication the budgets are told of."""
    tensors = load_file(directory / "model.safetensors")
    kv_replicas = max(1, TP // kv_heads)
    seen = kv_replicas if kv_replicas_seen is None else kv_replicas_seen

    def rows(weight: torch.Tensor, parts: int, part: int) -> torch.Tensor:
        return weight.chunk(parts)[part]

    modules = []
    for layer in range(2):
        t = {name.split(".")[-2]: w for name, w in tensors.items() if name.startswith(f"model.layers.{layer}.")}
        kv_part = rank // kv_replicas  # vLLM: shard_rank = tp_rank // num_kv_head_replicas
        weights = {
            "qkv_proj": (
                rows(t["q_proj"], TP, rank),
                rows(t["k_proj"], TP // kv_replicas, kv_part),
                rows(t["v_proj"], TP // kv_replicas, kv_part),
            ),
            "o_proj": (t["o_proj"].chunk(TP, dim=1)[rank],),
            "gate_up_proj": (rows(t["gate_proj"], TP, rank), rows(t["up_proj"], TP, rank)),
            "down_proj": (t["down_proj"].chunk(TP, dim=1)[rank],),
        }
        for module, split in weights.items():
            proj = decoder_projection(f"model.layers.{layer}.{'self_attn' if module[0] in 'qo' else 'mlp'}.{module}")
            modules.append(LoadedModule(proj, split, proj.rank_shards(TP, seen)))
    return modules


def resolver_at_tp2(profile_path) -> BudgetResolver:
    source = resolve_budget_source({"profile": str(profile_path)}, None)
    return BudgetResolver(source, "tiny", source.profile.model.architecture, TP)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # 2 KV heads: one per rank; Gemma 3's one: on both
def test_each_rank_gets_the_profile_budgets(family, tiny_model, tmp_path):
    directory = tiny_model(family)
    profile = profile_model(str(directory), AllocationSpec(0.5))
    profile.save(tmp_path / "p.json")
    kv_heads = 1 if family == "gemma3" else 2
    for rank in range(TP):
        modules = rank_modules(directory, rank, kv_heads)
        budgets = resolver_at_tp2(tmp_path / "p.json").resolve(modules)
        for module, budget in zip(modules, budgets):
            layer = profile.layers[module.proj.layer]
            # each rank keeps its share of the input of row-parallel modules, all of it elsewhere
            entries = [layer.projections[name] for name in module.proj.projections]
            in_features = entries[0].in_features // (TP if module.proj.row_parallel else 1)
            expected = tuple(kept_count(entry.sparsity, in_features) for entry in entries)
            assert budget.seg_keep == expected and budget.in_features == in_features
    if family == "gemma3":  # replicated KV rows taken for a 1/tp shard: refused as another model's
        with pytest.raises(ProfileError, match="gives layer 0 k_proj the shape 64x128, the loaded model has"):
            resolver_at_tp2(tmp_path / "p.json").resolve(rank_modules(directory, 0, kv_heads, kv_replicas_seen=1))


def test_row_parallel_ranks_keep_the_topk_of_their_shard():
    """o_proj / down_proj at TP=2: each rank's op keeps round((1 - s) x in / 2) channels of its own
    half of the input, and the all-reduce sums the halves: shard-local TopK, not the TopK of the
    whole row (which the column-parallel modules, seeing the whole input, do keep)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 256, generator=gen), torch.randn(96, 256, generator=gen)
    sparsity = 0.5
    keep_per_rank = kept_count(sparsity, 256 // TP)
    served = sum(
        sparse_linear_impl(
            x_half,
            cpu.prepare_weight(w_half, [0, 96]),  # the CPU layout, as the linear method keeps it
            None,
            [0, 96],
            [keep_per_rank],
            torch.tensor([keep_per_rank], dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(4, dtype=torch.int64),
            False,
            "all",
            None,
        )
        for x_half, w_half in zip(x.chunk(TP, dim=1), weight.chunk(TP, dim=1))
    )
    shard_local = sum(
        (x_half * topk_mask(x_half, keep_per_rank)) @ w_half.T
        for x_half, w_half in zip(x.chunk(TP, dim=1), weight.chunk(TP, dim=1))
    )
    whole_row = (x * topk_mask(x, kept_count(sparsity, 256))) @ weight.T
    torch.testing.assert_close(served, shard_local)
    assert (served - whole_row).abs().max() > 1e-2
