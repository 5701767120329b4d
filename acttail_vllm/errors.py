"""Failures a user can fix, and how a starting server shows them.

An ``ActTailError``'s message names the problem, where the bad input came from (a flag, an
environment variable, a file) and the fix. vLLM wraps what a quantization config raises: while it
builds its config, in a pydantic ``ValidationError`` of ``VllmConfig``; in an engine process,
behind a generic ``Engine core initialization failed``. ``logs_startup_errors`` therefore logs the
message first, as one ERROR line in the exception's own words, where vLLM prints its log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it

F = TypeVar("F", bound=Callable)


class ActTailError(Exception):
    """A failure the user can fix; the message says what is wrong, where it came from and the fix."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (messages are written wrapped in the source)."""
    return " ".join(str(exc).split())


def logs_startup_errors(fn: F) -> F:
    """Wrap a method vLLM calls during startup: an ``ActTailError`` it raises is logged as one
    ERROR line, then raised on unchanged."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ActTailError as exc:
            logger.error("%s", one_line(exc))
            raise

    return wrapper  # type: ignore[return-value]
