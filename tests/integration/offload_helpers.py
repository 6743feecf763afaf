"""Module-level functions for ``ctx.offload(..., process=True)`` tests: a process pool
imports them by name in its children."""

from __future__ import annotations

import os


def sum_of_squares(n: int) -> tuple[int, int]:
    """CPU-bound work; returns the result and the pid of the process that did it."""
    return sum(i * i for i in range(n)), os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)
