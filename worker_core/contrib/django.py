"""Enqueue from Django, on Django's own connection and inside its transaction.

::

    from django.db import transaction
    from worker_core.contrib.django import enqueue

    with transaction.atomic():
        upload = Upload.objects.create(...)
        enqueue({"upload_id": upload.pk})   # gone again if the block rolls back

Needs Django's PostgreSQL backend on psycopg 3 (``pip install "psycopg[binary]"``);
another backend or psycopg2 raises ``ImproperlyConfigured``. The configuration is
``settings.WORKER_CORE`` (a ``WorkerConfig`` or a dict of its sections) when set,
else the ``WORKER_CORE_*`` environment; only ``database.schema``, ``queue`` and
``retry`` matter here, since the database connection is Django's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import psycopg
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections

from worker_core.config import WorkerConfig

from . import config_from, sync_queue

__all__ = ["enqueue", "enqueue_many", "psycopg_connection"]

#: [the WORKER_CORE setting, the WorkerConfig made from it]
_DEFAULT: list[Any] = []


def enqueue(
    payload: Mapping[str, Any],
    *,
    using: str | None = None,
    config: WorkerConfig | None = None,
    **kwargs: Any,
) -> int:
    """``SyncQueue.enqueue`` on Django's connection ``using`` (default: ``"default"``),
    in its current transaction (or committed at once in autocommit)."""
    conn = psycopg_connection(using)
    return sync_queue(_config(config)).enqueue(payload, connection=conn, **kwargs)


def enqueue_many(
    payloads: Sequence[Mapping[str, Any]],
    *,
    using: str | None = None,
    config: WorkerConfig | None = None,
    **kwargs: Any,
) -> list[int]:
    """``SyncQueue.enqueue_many`` on Django's connection, all or none."""
    conn = psycopg_connection(using)
    return sync_queue(_config(config)).enqueue_many(payloads, connection=conn, **kwargs)


def psycopg_connection(using: str | None = None) -> psycopg.Connection[Any]:
    """The psycopg 3 connection under Django's connection ``using``, opened if needed.

    Raises ``ImproperlyConfigured`` for a backend that is not PostgreSQL on psycopg 3,
    and Django's ``TransactionManagementError`` inside a broken atomic block.
    """
    alias = using or DEFAULT_DB_ALIAS
    wrapper = connections[alias]
    if wrapper.vendor != "postgresql":
        raise ImproperlyConfigured(
            f"worker_core.contrib.django needs PostgreSQL; database {alias!r} uses the "
            f"{wrapper.vendor!r} backend ({wrapper.settings_dict.get('ENGINE')})"
        )
    wrapper.validate_no_broken_transaction()
    wrapper.ensure_connection()
    raw = wrapper.connection
    if not isinstance(raw, psycopg.Connection):
        raise ImproperlyConfigured(
            f"worker_core.contrib.django needs Django's PostgreSQL backend on psycopg 3; "
            f"database {alias!r} runs on {type(raw).__module__} (install psycopg, and "
            "uninstall psycopg2 or make psycopg the one Django imports)"
        )
    return raw


def _config(config: WorkerConfig | None) -> WorkerConfig:
    if config is not None:
        return config
    # Rebuilt only when the setting object changes (override_settings in tests).
    value = getattr(settings, "WORKER_CORE", None)
    if not _DEFAULT or _DEFAULT[0] is not value:
        _DEFAULT[:] = [value, config_from(value)]
    return cast(WorkerConfig, _DEFAULT[1])
