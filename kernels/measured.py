"""Reading the tables measured on a GPU and shipped with the kernels: one folder per GPU model under
``measured/`` (``measured/NVIDIA_H200/crossover.json``, ``.../gemv_tiles.json``), since the best
tiles and crossovers differ between GPUs (an H200 reads HBM about 40% faster than an H100)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel, ValidationError

MEASURED_DIR = Path(__file__).with_name("measured")

Table = TypeVar("Table", bound=BaseModel)


@functools.cache  # asked on every call of the op that is not replayed from a CUDA graph
def device_name(device: torch.device) -> str:
    """The name the tables of ``device`` are filed under: the CUDA device name, else its type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def table_path(file_name: str, device: str) -> Path:
    """Where the table ``file_name`` measured on the GPU named ``device`` lives."""
    return MEASURED_DIR / re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") / file_name


def parse_measured_table(model: type[Table], path: Path, remedy: str) -> Table:
    """The table in ``path``; a ValueError naming the file, its first problem and ``remedy`` if it
    does not parse."""
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(
            f"{path} is not a valid {model.__name__} ({err.error_count()} errors, first at "
            f"{'.'.join(map(str, first['loc'])) or 'top level'}: {first['msg']}); {remedy}"
        ) from err


def read_measured_table(model: type[Table], file_name: str, device: str, remedy: str) -> Table:
    """The table ``file_name`` measured on the GPU named ``device``; an empty one (the built-in
    defaults everywhere) if there is none; a ValueError naming the file, its first problem and
    ``remedy`` if it does not parse or was measured on another GPU."""
    path = table_path(file_name, device)
    if not path.exists():
        return model(device=device, shapes=[])
    table = parse_measured_table(model, path, f"{remedy}, or delete it to use the built-in defaults")
    if table.device != device:
        raise ValueError(
            f"{path} was measured on {table.device!r}, not on {device!r} whose folder it is in; move it to "
            f"{table_path(path.name, table.device)}, or {remedy} on {device}"
        )
    return table
