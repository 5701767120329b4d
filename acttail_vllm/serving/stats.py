"""Counters a sparse module keeps, and how to read them.

A module's stats (int64) hold, per output segment, the input channels its TopK kept, then one token
count per ``TokenPath``. The op adds to them in place, so CUDA-graph replays count too. On CUDA
they live in pinned host memory that the GPU writes through a mapped view, so reading them never
touches the GPU (a metrics thread must not call into CUDA while vLLM captures graphs).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class TokenPath(str, enum.Enum):
    """How a token went through a sparse module; the values are the ``path`` label of
    ``acttail_tokens_total``."""

    #: TopK selection, then the sparse GEMV that reads only the kept weight rows (the CUDA kernels,
    #: or on a CPU ``embedding_bag``)
    SPARSE_GEMV = "sparse_gemv"
    #: TopK selection, then a dense GEMM on the sparsified input: cuBLAS where the GPU's crossover
    #: table says the sparse GEMV would not be faster, oneDNN where a CPU's step is too large for it
    SELECTION_DENSE_GEMM = "selection_dense_gemm"
    #: the dense layer on the whole input: steps over max_sparse_tokens, prefill rows under
    #: policy=decode, steps policy=auto leaves dense
    UNSPARSIFIED = "unsparsified"


TOKEN_PATHS: tuple[TokenPath, ...] = tuple(TokenPath)


def token_stat(path: TokenPath, num_segments: int) -> int:
    """Index of ``path``'s token count in a module's stats."""
    return num_segments + TOKEN_PATHS.index(path)


def new_stats(num_segments: int, pin_memory: bool = False) -> torch.Tensor:
    """Host tensor for one module's counters (pinned when a GPU writes it through a mapped view)."""
    return torch.zeros(num_segments + len(TOKEN_PATHS), dtype=torch.int64, device="cpu", pin_memory=pin_memory)


@dataclass(frozen=True)
class ModuleStats:
    kept_channels: tuple[int, ...]
    tokens: dict[TokenPath, int]

    @classmethod
    def read(cls, stats: torch.Tensor) -> ModuleStats:
        values = stats.tolist()
        num_segments = len(values) - len(TOKEN_PATHS)
        return cls(tuple(values[:num_segments]), dict(zip(TOKEN_PATHS, values[num_segments:])))
