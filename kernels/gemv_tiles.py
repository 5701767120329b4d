"""Tiles of the sparse GEMV: measured per weight shape for one token's loops, a rule otherwise.

Decode at batch 1 runs the GEMV once per projection per token, and the best tiling differs by shape
(13B on H100: 64-column tiles beat 32 on every shape, while how many programs share a tile's
channels depends on how many tiles the shape has). ``tools/tune_gemv_tiles.py`` times a grid of
tilings per shape and loop on one GPU model and writes ``measured/<GPU>/gemv_tiles.json``;
``sparse_gemv.plan_gemv`` reads it, and falls back to its rule for shapes never measured.
"""

from __future__ import annotations

import enum
import functools

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .measured import read_measured_table

TILES_FILE = "gemv_tiles.json"


class GemvLoop(str, enum.Enum):
    """How the sparse GEMV walks the channels (``sparse_gemv`` module docstring)."""

    CHANNEL_LIST = "list"  # one token: its list of kept channels
    TOKEN_WALK = "walk"  # one token: all channels, loading the rows it kept
    BATCH_WALK = "batch walk"  # up to 16 tokens: all channels, loading the rows any of them kept


class GemvTiles(BaseModel):
    model_config = ConfigDict(frozen=True)  # hashable: the tile sweep keys its timings by tiles

    block_n: int = Field(gt=0, description="output columns per program (a power of 2)")
    block_k: int = Field(gt=0, description="weight rows per loop step (a power of 2)")
    programs_per_sm: int = Field(gt=0, description="splits of the channel range bring the grid to this")

    @field_validator("block_n", "block_k")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"Triton tiles are powers of 2, got {value}")
        return value


class ShapeTiles(BaseModel):
    name: str
    seg_widths: list[int] = Field(min_length=1, description="output segments (one for a plain projection)")
    k: int = Field(gt=0, description="input features")
    channel_list: GemvTiles = Field(description="one token's loop over its list of kept channels")
    walk: GemvTiles = Field(description="one token's loop over all channels, loading the rows it kept")


class TileTable(BaseModel):
    device: str = Field(description="GPU the tiles were measured on")
    shapes: list[ShapeTiles]

    def tiles(self, seg_widths: tuple[int, ...], k: int, loop: GemvLoop) -> GemvTiles | None:
        """The measured tiles of this shape's one-token loop; None for a batch or a shape never measured."""
        for shape in self.shapes:
            if (tuple(shape.seg_widths), shape.k) == (seg_widths, k):
                return {GemvLoop.CHANNEL_LIST: shape.channel_list, GemvLoop.TOKEN_WALK: shape.walk}.get(loop)
        return None


@functools.cache
def load_tiles(device: str) -> TileTable:
    """The tiles measured on the GPU named ``device``, or an empty table (the rule everywhere) if that
    GPU was never measured."""
    return read_measured_table(
        TileTable, TILES_FILE, device, "measure it with `python3 -m tools.tune_gemv_tiles --write`"
    )
