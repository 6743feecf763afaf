"""worker_core.contrib.django with a real (minimal) Django project on the test database:
a committed atomic block leaves exactly one job, a rolled-back one none."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import django
import psycopg
import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.db.utils import ConnectionHandler
from django.test.utils import override_settings

from worker_core import Queue, SyncQueue, WorkerConfig
from worker_core.contrib import django as wc_django


def django_database(dsn: str) -> dict[str, Any]:
    """Django's DATABASES entry for a libpq DSN (URL or key=value)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname", ""),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
    }


@pytest.fixture
def django_project(pg_dsn: str, config: WorkerConfig) -> Iterator[WorkerConfig]:
    """Django configured on the test server (once per process), with WORKER_CORE
    pointing at this test's schema; the schema is migrated."""
    if not settings.configured:
        settings.configure(
            DATABASES={"default": django_database(pg_dsn)},
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()

    async def migrate() -> None:
        async with Queue(config) as queue:
            await queue.migrate()

    asyncio.run(migrate())
    with override_settings(WORKER_CORE={"database": {"schema": config.database.schema}}):
        try:
            yield config
        finally:
            connections.close_all()


def stats(config: WorkerConfig) -> dict[str, int]:
    with SyncQueue(config) as queue:
        return queue.stats()


def test_committed_block_leaves_exactly_one_job(django_project: WorkerConfig) -> None:
    with transaction.atomic():
        job_id = wc_django.enqueue({"upload": 1}, correlation_id="req-1")
        with connection.cursor() as cur:  # the job is visible in Django's own transaction
            cur.execute(
                f'SELECT correlation_id FROM "{django_project.database.schema}".jobs WHERE id = %s',
                [job_id],
            )
            assert cur.fetchone() == ("req-1",)
    assert stats(django_project)["queued"] == 1
    with SyncQueue(django_project) as queue:
        job = queue.get(job_id)
    assert job is not None and job.payload == {"upload": 1}


def test_rolled_back_block_leaves_none(django_project: WorkerConfig) -> None:
    class Abort(Exception):
        pass

    def view() -> None:
        with transaction.atomic():
            wc_django.enqueue({"upload": 1})
            wc_django.enqueue_many([{"upload": 2}, {"upload": 3}])
            raise Abort

    with pytest.raises(Abort):
        view()
    with transaction.atomic():
        with transaction.atomic():  # a savepoint rolled back inside a kept transaction
            wc_django.enqueue({"upload": "inner"})
            transaction.set_rollback(True)
        wc_django.enqueue({"upload": "outer"})
    assert stats(django_project)["queued"] == 1


def test_many_batches_inside_atomic_are_one_unit(
    django_project: WorkerConfig, make_config: Any
) -> None:
    small = make_config(queue={"name": "test", "enqueue_batch_size": 2})

    def view() -> None:
        with transaction.atomic():
            wc_django.enqueue_many([{"n": i} for i in range(5)], config=small)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        view()
    assert stats(django_project)["queued"] == 0
    assert len(wc_django.enqueue_many([{"n": i} for i in range(5)], config=small)) == 5
    assert stats(django_project)["queued"] == 5


def test_autocommit_outside_atomic(django_project: WorkerConfig) -> None:
    wc_django.enqueue({"upload": 1})
    assert stats(django_project)["queued"] == 1


def test_from_plain_threads(django_project: WorkerConfig) -> None:
    errors: list[BaseException] = []

    def view(n: int) -> None:
        try:
            with transaction.atomic():
                wc_django.enqueue({"n": n})
                if n % 2:
                    transaction.set_rollback(True)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()  # each thread has its own Django connection

    threads = [threading.Thread(target=view, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert stats(django_project)["queued"] == 3


def test_other_backends_get_a_clear_error(
    django_project: WorkerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real SQLite connection of Django's, under its own handler: the process-wide
    # settings may have been configured by the docs page before this test.
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    handler = ConnectionHandler({"default": sqlite, "other": sqlite})
    monkeypatch.setattr(wc_django, "connections", handler)
    try:
        with pytest.raises(ImproperlyConfigured, match="needs PostgreSQL; database 'other'"):
            wc_django.enqueue({"x": 1}, using="other")
    finally:
        handler.close_all()
    assert sum(stats(django_project).values()) == 0


def test_refusals_are_those_of_the_queue(django_project: WorkerConfig) -> None:
    with pytest.raises(ValueError, match="finite"), transaction.atomic():
        wc_django.enqueue({"x": 1}, run_at=float("inf"))
    assert sum(stats(django_project).values()) == 0
