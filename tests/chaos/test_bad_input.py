"""A corpus of bad input through the real Queue and worker: each case gets a clear
error (refused before any SQL, or a dead letter with its reason), the worker keeps
going, and no other job is affected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from worker_core import BaseWorker, JobStatus, Queue, StageContext, WorkerConfig
from worker_core.errors import PayloadError


class Document(BaseModel):
    document_id: str
    key: str


class Validate:
    name = "validate"

    async def run(self, ctx: StageContext) -> None:
        doc = Document.model_validate(ctx.job.payload)
        ctx.state["doc"] = doc.document_id


class Echo:
    name = "echo"

    async def run(self, ctx: StageContext) -> None:
        ctx.state["echo"] = ctx.job.payload


class StrictWorker(BaseWorker):
    def stages(self) -> list[Any]:
        return [Validate(), Echo()]


SQL_LOOKING = [
    "'; DROP TABLE jobs; --",
    "1 OR 1=1",
    "$$; SELECT pg_sleep(10); $$",
    "\\x00\\'",
    "%(queue)s %s {schema}",
]


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"blob": "x" * (10 << 20)}, "over the limit"),
        (nested(5000), "nested more than"),
        ({"text": "nul \x00 byte"}, "contains a NUL character"),
        ({"when": object()}, r"payload\['when'\] is a object"),
        ({"n": float("nan")}, r"payload\['n'\] is nan"),
    ],
)
async def test_refused_before_any_sql(queue: Queue, payload: dict[str, Any], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        await queue.enqueue(payload)
    assert sum((await queue.stats()).values()) == 0


async def test_mistyped_and_missing_keys_become_dead_letters_with_reasons(
    queue: Queue, config: WorkerConfig
) -> None:
    good = await queue.enqueue_many([{"document_id": f"d{i}", "key": f"k{i}"} for i in range(5)])
    bad = {
        "missing key": await queue.enqueue({"document_id": "d9"}),
        "mistyped": await queue.enqueue({"document_id": 42, "key": ["not", "a", "string"]}),
        "empty": await queue.enqueue({}),
    }
    sql_like = await queue.enqueue_many(
        [{"document_id": s, "key": s} for s in SQL_LOOKING], queue="test"
    )
    await StrictWorker(config).run(until_empty=True, install_signal_handlers=False)
    for job_id in good + sql_like:
        job = await queue.get(job_id)
        assert job is not None
        assert job.status is JobStatus.SUCCEEDED
    for what, job_id in bad.items():
        job = await queue.get(job_id)
        assert job is not None, what
        assert job.status is JobStatus.DEAD, what
        assert job.attempt == 1, what  # permanent: no retries wasted
        assert job.last_error is not None
        assert job.last_error["stage"] == "validate"
        assert job.last_error["type"] == "ValidationError"
        assert "document_id" in job.last_error["message"] or "key" in job.last_error["message"]
    echoed = await queue.get(sql_like[0])
    assert echoed is not None
    assert echoed.state["echo"]["key"] == SQL_LOOKING[0]  # stored verbatim, never executed


@pytest.mark.parametrize("name", SQL_LOOKING)
async def test_sql_looking_queue_names_are_data(
    queue: Queue, config: WorkerConfig, name: str
) -> None:
    job_id = await queue.enqueue({"document_id": "x", "key": "y"}, queue=name)
    worker_config = config.model_copy(
        update={"queue": config.queue.model_copy(update={"name": name})}
    )
    await StrictWorker(worker_config).run(until_empty=True, install_signal_handlers=False)
    job = await queue.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("database", {"schema": "jobs; DROP SCHEMA public"}, "database.schema"),
        ("database", {"schema": "Upper"}, "database.schema"),
        ("database", {"dsn": "postgresql://user:pw@host:notaport/db"}, "database.dsn"),
        ("database", {"dsn": "http://example.com"}, "database.dsn"),
        ("database", {"dsn": "host=x port=="}, "database.dsn"),
        ("queue", {"name": "line\nbreak"}, "queue.name"),
        ("queue", {"name": ""}, "queue.name"),
    ],
)
def test_bad_names_and_dsns_are_refused_config(
    section: str, value: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerConfig(**{section: value})
    assert field in {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert "user:pw@" not in str(info.value)


async def test_queue_name_with_control_characters_refused_at_enqueue(queue: Queue) -> None:
    with pytest.raises(ValueError, match="control characters"):
        await queue.enqueue({}, queue="bad\x00name")


async def test_a_bad_job_does_not_hold_up_the_others(
    queue: Queue, make_config: Callable[..., WorkerConfig]
) -> None:
    ids = [await queue.enqueue({"document_id": "a", "key": "b"}) for _ in range(3)]
    poison = await queue.enqueue({"oops": True}, priority=100)  # claimed first
    await StrictWorker(make_config(queue={"concurrency": 1})).run(
        until_empty=True, install_signal_handlers=False
    )
    assert (await queue.get(poison)).status is JobStatus.DEAD  # type: ignore[union-attr]
    for job_id in ids:
        assert (await queue.get(job_id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
