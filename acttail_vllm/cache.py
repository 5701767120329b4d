"""Where acttail keeps what it computes once and reuses: ``$ACTTAIL_CACHE`` or ``~/.cache/acttail``
(``profiles/``: budgets the loader hook built, by model fingerprint; ``models/``: converted demo
models)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "ACTTAIL_CACHE"


def cache_root() -> Path:
    """``$ACTTAIL_CACHE`` or ``~/.cache/acttail``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "acttail"
