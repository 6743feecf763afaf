"""Integrations with web frameworks and ORMs (each an optional import).

``worker_core.contrib.django`` and ``worker_core.contrib.sqlalchemy`` enqueue jobs
on the application's own database connection, inside its own transaction: a job
exists only if the transaction that created it commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker_core.config import WorkerConfig
from worker_core.queue import Queue
from worker_core.syncqueue import SyncQueue

__all__: list[str] = []

# One (unopened) queue per configuration: it renders its statements once and never
# opens a pool, since every call lends it the application's connection.
_SYNC: dict[int, tuple[WorkerConfig, SyncQueue]] = {}
_ASYNC: dict[int, tuple[WorkerConfig, Queue]] = {}


def sync_queue(config: WorkerConfig) -> SyncQueue:
    found = _SYNC.get(id(config))
    if found is None or found[0] is not config:
        found = _SYNC[id(config)] = (config, SyncQueue(config))
    return found[1]


def async_queue(config: WorkerConfig) -> Queue:
    found = _ASYNC.get(id(config))
    if found is None or found[0] is not config:
        found = _ASYNC[id(config)] = (config, Queue(config))
    return found[1]


def config_from(value: WorkerConfig | Mapping[str, Any] | None) -> WorkerConfig:
    """A ``WorkerConfig`` from itself, from a dict of its sections, or from the
    environment (``WORKER_CORE_*``) when ``None``."""
    if isinstance(value, WorkerConfig):
        return value
    if value is None:
        return WorkerConfig()
    if isinstance(value, Mapping):
        return WorkerConfig(**value)
    raise TypeError(f"config must be a WorkerConfig or a dict, not {type(value).__name__}")
