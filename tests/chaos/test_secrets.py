"""Credentials everywhere they can be, through success, failure and dead letters:
none may appear in logs, error records, metrics or reprs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from worker_core import (
    BaseWorker,
    PermanentError,
    Queue,
    StageContext,
    TransientError,
    WorkerConfig,
    configure_logging,
)
from worker_core.logs import unconfigure_logging

DB_PASSWORD = "Db-Pa55w0rd-zq81"
S3_KEY_ID = "AKIAZZTESTKEY81"
S3_SECRET = "s3-secret-wJalrXUtnFEMI-zq81"
API_KEY = "sk-live-apikey-zq81"
SECRETS = (DB_PASSWORD, S3_KEY_ID, S3_SECRET, API_KEY)


def dsn_with_password(dsn: str) -> str:
    """The test DSN with a user password (trust auth ignores it, the string carries it)."""
    parts = urlsplit(dsn)
    netloc = f"postgres:{DB_PASSWORD}@{parts.netloc.split('@')[-1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Leaky:
    """A stage that does everything wrong with secrets."""

    name = "leaky"

    async def run(self, ctx: StageContext) -> None:
        cfg = ctx.worker.config
        dsn = cfg.dsn()
        kind = ctx.job.payload["kind"]
        ctx.logger.info(
            "calling api", api_key=API_KEY, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        ctx.logger.info(f"connecting to {dsn}")
        logging.getLogger("thirdparty.http").warning(
            "request failed: Authorization: Bearer %s for %s", API_KEY, dsn
        )
        if kind == "transient":
            raise TransientError(f"could not reach {dsn}", dsn=dsn, api_key=API_KEY)
        if kind == "permanent":
            raise PermanentError(
                f"rejected with key {API_KEY} secret={S3_SECRET}",
                aws_secret_access_key=S3_SECRET,
            )
        if kind == "crash":
            raise RuntimeError(f"boom password={DB_PASSWORD} {S3_KEY_ID}")
        ctx.state["ok"] = True


class LeakyWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Leaky()]


@pytest.mark.timeout(120)
async def test_no_secret_leaks_anywhere(
    make_config: Callable[..., WorkerConfig], pg_dsn: str, schema: str
) -> None:
    if urlsplit(pg_dsn).password:
        pytest.skip("the test server DSN already has a password")
    config = make_config(
        database={"dsn": dsn_with_password(pg_dsn), "schema": schema},
        storage={
            "backend": "s3",
            "bucket": "b",
            "endpoint_url": "http://127.0.0.1:9",
            "access_key_id": S3_KEY_ID,
            "secret_access_key": S3_SECRET,
        },
        embedding={"provider": "http", "endpoint": "http://127.0.0.1:9/v1", "api_key": API_KEY},
    )
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream, secrets=config.secrets())
    try:
        async with Queue(config) as queue:
            await queue.migrate()
            await queue.enqueue_many(
                [{"kind": k} for k in ("ok", "transient", "permanent", "crash")], max_attempts=2
            )
            worker = LeakyWorker(config)
            await worker.run(until_empty=True, install_signal_handlers=False)
            stats = await queue.stats()
            dead = await queue.dead_letters()
    finally:
        unconfigure_logging()
    assert stats["succeeded"] == 1
    assert stats["dead"] == 3
    logs = stream.getvalue()
    for line in logs.splitlines():
        json.loads(line)
    assert "calling api" in logs and "job dead-lettered" in logs
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT payload::text, state::text, errors::text, last_error::text FROM {}.jobs"
            ).format(sql.Identifier(schema))
        ).fetchall()
    stored = json.dumps(rows)
    surfaces = {
        "logs": logs,
        "error records": stored,
        "dead letters": repr(dead),
        "metrics": json.dumps(worker.metrics.summary()),
        "config repr": repr(config) + str(config) + config.model_dump_json(),
        "worker repr": repr(worker) + repr(queue),
    }
    for where, text in surfaces.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into {where}"
    assert "***" in stored  # the records were masked, not dropped
    assert "Traceback" in stored
