"""Job kinds on a real PostgreSQL: enqueue, get, claim, the command line and the index."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from psycopg import sql

from worker_core import BaseWorker, JobStatus, Queue, StageContext, WorkerConfig
from worker_core.cli import main


async def test_kind_round_trips_through_enqueue_and_get(queue: Queue) -> None:
    plain = await queue.get(await queue.enqueue({"n": 1}))
    assert plain is not None and plain.kind == "default"
    one = await queue.get(await queue.enqueue({"n": 2}, kind="rescan"))
    assert one is not None and one.kind == "rescan"
    ids = await queue.enqueue_many([{"n": 3}, {"n": 4}], kind="embed")
    for job_id in ids:
        job = await queue.get(job_id)
        assert job is not None and job.kind == "embed"
    unicode = await queue.get(await queue.enqueue({}, kind="ré-scan 📄"))
    assert unicode is not None and unicode.kind == "ré-scan 📄"


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("", ValueError, "kind must not be blank"),
        ("   ", ValueError, "kind must not be blank"),
        ("x" * 201, ValueError, "over the limit of 200"),
        ("a\x00b", ValueError, "control characters"),
        ("line\nbreak", ValueError, "control characters"),
        ("bad\ud800", ValueError, "lone surrogate"),
        (None, TypeError, "kind must be a str"),
        (7, TypeError, "kind must be a str"),
    ],
)
async def test_a_bad_kind_is_refused_before_any_row(
    queue: Queue, kind: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await queue.enqueue({"n": 1}, kind=kind)
    with pytest.raises(error, match=message):
        await queue.enqueue_many([{"n": 1}], kind=kind)
    assert (await queue.stats())["queued"] == 0


class RecordKind:
    name = "record"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["kind"] = ctx.job.kind


class KindWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [RecordKind()]


async def test_a_claimed_job_carries_its_kind(queue: Queue, config: WorkerConfig) -> None:
    ids = [await queue.enqueue({}, kind="rescan"), await queue.enqueue({})]
    await KindWorker(config).run(until_empty=True, install_signal_handlers=False)
    jobs = [await queue.get(i) for i in ids]
    assert [(j.status, j.state["kind"]) for j in jobs if j] == [
        (JobStatus.SUCCEEDED, "rescan"),
        (JobStatus.SUCCEEDED, "default"),
    ]


def test_cli_enqueue_kind(pg_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", pg_dsn)
    monkeypatch.setenv("WORKER_CORE_DATABASE__SCHEMA", schema)

    def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdin=io.StringIO(), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    assert cli("migrate")[0] == 0
    code, out, err = cli("enqueue", "--kind", "rescan", '{"bucket": "b"}')
    assert code == 0, err
    job_id = int(out.split()[0])
    code, out, err = cli("enqueue", "--kind", "", "{}")
    assert (code, out) == (1, "")
    assert err == "worker-core enqueue: --kind must not be blank\n"
    code, _, err = cli("enqueue", "--kind", "a\tb", "{}")
    assert code == 1 and "control characters" in err and "Traceback" not in err

    async def kind_of() -> str | None:
        config = WorkerConfig(database={"dsn": pg_dsn, "schema": schema})
        async with Queue(config) as queue:
            job = await queue.get(job_id)
        return None if job is None else job.kind

    assert asyncio.run(kind_of()) == "rescan"


async def test_the_kind_index_serves_a_claim_by_kind(queue: Queue) -> None:
    # Many ready jobs of another kind ahead of the two a kind-filtered claim wants:
    # the planner reaches them through the kind index, not by walking the others.
    await queue.enqueue_many([{"i": i} for i in range(5000)], kind="bulk", priority=5)
    await queue.enqueue_many([{"i": 1}, {"i": 2}], kind="rare")
    schema = sql.Identifier(queue.schema)
    async with queue.connection() as conn:
        await conn.execute(sql.SQL("ANALYZE {}.jobs").format(schema))
        cur = await conn.execute(
            sql.SQL(
                "EXPLAIN (FORMAT JSON) SELECT id FROM {}.jobs "
                "WHERE queue = %s AND kind = ANY(%s::text[]) AND status = 'queued' "
                "AND run_at <= now() ORDER BY priority DESC, run_at, id LIMIT 10"
            ).format(schema),
            (queue.config.queue.name, ["rare"]),
        )
        row = await cur.fetchone()
    assert row is not None
    assert "jobs_claim_kind_idx" in json.dumps(row[0])
