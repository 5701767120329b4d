"""From a profile's per-projection sparsities to what one vLLM linear module applies.

vLLM merges projections that share an input: ``qkv_proj`` holds q, k, v and ``gate_up_proj`` holds
gate, up. They share one input but keep their own budgets, so a module's budget is a list of output
segments, each with its own count of kept input channels. Pure Python, no vLLM import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: vLLM module name -> the Hugging Face projections stacked along its output dimension, in order.
MERGED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "o_proj": ("o_proj",),
    "down_proj": ("down_proj",),
    # models that vLLM does not merge
    "q_proj": ("q_proj",),
    "k_proj": ("k_proj",),
    "v_proj": ("v_proj",),
    "gate_proj": ("gate_proj",),
    "up_proj": ("up_proj",),
}
#: A text decoder layer's attention or MLP module: ``model.layers.N.`` (``language_model.`` before it
#: in multimodal wrappers), never a vision tower's layers, a router (``mlp.gate``) or an expert.
_LAYER_PREFIX = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def kept_count(sparsity: float, in_features: int) -> int:
    """Input channels a token keeps: k = round((1 - s) * in_features)."""
    return round((1.0 - sparsity) * in_features)


@dataclass(frozen=True)
class DecoderProjection:
    """A vLLM linear module of a decoder layer and the projections it carries."""

    layer: int
    module: str
    projections: tuple[str, ...]

    @property
    def row_parallel(self) -> bool:
        """vLLM shards these along the input dimension under tensor parallelism."""
        return self.module in ("o_proj", "down_proj")

    def rank_shards(self, tp_size: int, kv_head_replicas: int) -> tuple[int, ...]:
        """Over how many tensor-parallel ranks each projection is split: its input in row-parallel
        modules, its output rows in the others. With fewer KV heads than ranks, vLLM replicates
        each KV head on ``kv_head_replicas`` ranks, so k and v rows are split over fewer ranks."""
        kv_shards = tp_size // kv_head_replicas
        return tuple(kv_shards if name in ("k_proj", "v_proj") else tp_size for name in self.projections)


def decoder_projection(prefix: str) -> DecoderProjection | None:
    """Parse a vLLM module prefix like ``model.layers.3.self_attn.qkv_proj``; None if not ours."""
    match = _LAYER_PREFIX.search(prefix)
    if match is None or match.group(2) not in MERGED_PROJECTIONS:
        return None
    module = match.group(2)
    return DecoderProjection(int(match.group(1)), module, MERGED_PROJECTIONS[module])


@dataclass(frozen=True)
class ModuleBudget:
    """Kept input channels of each output segment of one module (q, k, v of qkv_proj, ...)."""

    seg_keep: tuple[int, ...]
    in_features: int

    @classmethod
    def from_sparsities(cls, sparsities: tuple[float, ...], in_features: int) -> ModuleBudget:
        return cls(tuple(kept_count(s, in_features) for s in sparsities), in_features)

    @property
    def kept_fractions(self) -> tuple[float, ...]:
        return tuple(k / self.in_features for k in self.seg_keep)
