"""Batch-size crossover between the sparse GEMV and dense cuBLAS, measured per weight shape.

Each token keeps its own channels, so the rows a batch must read are the union of its tokens' sets:
above some batch size M the sparse kernel reads nearly everything and dense cuBLAS wins. Two
contests, two Ms: against cuBLAS on the sparsified input (the selection paid either way: every
token sparsified, policy ``all``), and against cuBLAS alone (the layer left dense: policy ``auto``
sparsifies only where that is faster). ``tools/tune_crossover.py`` measures both per (shape,
sparsity) on one GPU model and writes ``measured/<GPU>/crossover.json``; the dispatch reads the
table of the GPU it runs on.
"""

from __future__ import annotations

import enum
import functools

from pydantic import BaseModel, Field

from .measured import read_measured_table

CROSSOVER_FILE = "crossover.json"
DEFAULT_MAX_SPARSE_M = 1  # shapes never measured: single-token decode, where the measured tables mostly end


class GemvPath(str, enum.Enum):
    """What ``sparse_linear`` runs after the selection."""

    LIST = "list"  # the sparse GEMV over one token's list of kept channels
    WALK = "walk"  # the sparse GEMV over all channels, loading only rows some token kept
    DENSE = "dense"  # cuBLAS on the sparsified input


class CrossoverPoint(BaseModel):
    sparsity: float = Field(ge=0.0, le=1.0, description="fraction of weight rows a token drops")
    max_sparse_m: int = Field(
        ge=0,
        description="largest batch up to which selection + sparse GEMV beat selection + cuBLAS on the sparsified "
        "input at every measured batch (0: none)",
    )
    max_faster_m: int = Field(
        ge=0,
        description="largest batch up to which selection + sparse GEMV beat cuBLAS alone, the layer left dense, "
        "at every measured batch (0: not even one token)",
    )
    one_token_walk: bool = Field(
        default=False, description="for one token, walking all channels beat walking the list of kept ones"
    )


class ShapeCrossover(BaseModel):
    name: str
    n: int = Field(gt=0, description="output features (all segments)")
    k: int = Field(gt=0, description="input features")
    points: list[CrossoverPoint]


class CrossoverTable(BaseModel):
    device: str = Field(description="GPU the table was measured on")
    shapes: list[ShapeCrossover]

    def points(self, n: int, k: int) -> list[CrossoverPoint]:
        """The points measured for this shape (none for unmeasured shapes)."""
        return next((shape.points for shape in self.shapes if (shape.n, shape.k) == (n, k)), [])

    def point(self, n: int, k: int, sparsity: float) -> CrossoverPoint | None:
        """The measured point for this shape of nearest sparsity (the lower one on a tie; a
        profile's budgets scatter around the measured targets); None for unmeasured shapes."""
        points = self.points(n, k)
        return min(points, key=lambda p: (abs(p.sparsity - sparsity), p.sparsity)) if points else None

    def path(self, m: int, n: int, k: int, sparsity: float) -> GemvPath:
        """The path for a batch of m tokens: sparse up to the measured largest batch (the default for
        unmeasured shapes), and for one token its measured faster loop (unmeasured: the list)."""
        point = self.point(n, k, sparsity)
        if m > (DEFAULT_MAX_SPARSE_M if point is None else point.max_sparse_m):
            return GemvPath.DENSE
        return GemvPath.LIST if m == 1 and not (point and point.one_token_walk) else GemvPath.WALK

    def faster_up_to(self, n: int, k: int, sparsity: float) -> int:
        """The largest batch at which selection + sparse GEMV beat leaving the layer dense (unmeasured
        shapes: the default batch)."""
        point = self.point(n, k, sparsity)
        return DEFAULT_MAX_SPARSE_M if point is None else min(point.max_faster_m, point.max_sparse_m)


@functools.cache
def load_crossover(device: str) -> CrossoverTable:
    """The table measured on the GPU named ``device``, or an empty one (defaults everywhere) if that
    GPU was never measured."""
    return read_measured_table(
        CrossoverTable, CROSSOVER_FILE, device, "measure it with `python3 -m tools.tune_crossover --write`"
    )
