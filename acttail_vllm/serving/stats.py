"""Counters a sparse module keeps, and how to read them.

A module's stats (int64) hold, per output segment, the input channels its TopK kept, then three
token counts: sparsified tokens that went through the sparse kernel, sparsified tokens that went
through the dense fallback (cuBLAS or, off CUDA, the reference on the masked input), and tokens
policy=decode or max_sparse_tokens left unsparsified (prefill rows of a mixed step, steps over the
token limit).
The op adds to them in place, so CUDA-graph replays count too. On CUDA they live in pinned host
memory that the GPU writes through a mapped view, so reading them never touches the GPU (a
metrics thread must not call into CUDA while vLLM captures graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_SPARSE_TOKENS = 0
STAT_DENSE_TOKENS = 1
STAT_UNSPARSIFIED_TOKENS = 2
TOKEN_COUNTS = 3


def new_stats(num_segments: int, pin_memory: bool = False) -> torch.Tensor:
    """Host tensor for one module's counters (pinned when a GPU writes it through a mapped view)."""
    return torch.zeros(num_segments + TOKEN_COUNTS, dtype=torch.int64, device="cpu", pin_memory=pin_memory)


@dataclass(frozen=True)
class ModuleStats:
    kept_channels: tuple[int, ...]
    sparse_tokens: int
    dense_tokens: int
    unsparsified_tokens: int

    @classmethod
    def read(cls, stats: torch.Tensor) -> "ModuleStats":
        values = stats.tolist()
        n_seg = len(values) - TOKEN_COUNTS
        return cls(
            tuple(values[:n_seg]),
            values[n_seg + STAT_SPARSE_TOKENS],
            values[n_seg + STAT_DENSE_TOKENS],
            values[n_seg + STAT_UNSPARSIFIED_TOKENS],
        )

    @property
    def tokens(self) -> int:
        return self.sparse_tokens + self.dense_tokens + self.unsparsified_tokens

    def kept_fractions(self, in_features: int) -> tuple[float, ...]:
        """Mean fraction of input channels kept per token, per segment (NaN before any token)."""
        if self.tokens == 0:
            return tuple(float("nan") for _ in self.kept_channels)
        return tuple(k / (self.tokens * in_features) for k in self.kept_channels)
