"""Reading the tables measured on a GPU and shipped beside the kernels (crossover.json, gemv_tiles.json)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Table = TypeVar("Table", bound=BaseModel)


def read_measured_table(model: type[Table], path: Path, empty: Table, remedy: str) -> Table:
    """The table in ``path``; ``empty`` (the built-in defaults everywhere) if there is none; a
    ValueError naming the file, its first problem and ``remedy`` if it does not parse."""
    if not path.exists():
        return empty
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(
            f"{path} is not a valid {model.__name__} ({err.error_count()} errors, first at "
            f"{'.'.join(map(str, first['loc'])) or 'top level'}: {first['msg']}); {remedy}, or delete it "
            "to use the built-in defaults"
        ) from err
