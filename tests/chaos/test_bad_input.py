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
    kwargs: dict[str, Any] = {section: value}
    with pytest.raises(ValidationError) as info:
        WorkerConfig(**kwargs)
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


def test_document_corpus_through_the_command_line(
    pg_dsn: str, schema: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad documents and payloads through `worker-core enqueue` and `run`: each is a
    dead letter with its reason, the good ones are ingested, the worker exits 0."""
    import io
    import json

    from worker_core.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("A perfectly fine document. " * 50)
    (docs / "empty.txt").write_bytes(b"")
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1") * 10)
    (docs / "nul.txt").write_bytes(b"text with a \x00 NUL byte" * 10)
    (docs / "binary.bin").write_bytes(bytes(range(256)) * 40)
    for key, value in {
        "DATABASE__DSN": pg_dsn, "DATABASE__SCHEMA": schema, "QUEUE__NAME": "docs",
        "QUEUE__POLL_INTERVAL": "0.2", "STORAGE__LOCAL_ROOT": str(docs),
        "LOGGING__LEVEL": "WARNING",
    }.items():  # fmt: skip
        monkeypatch.setenv(f"WORKER_CORE_{key}", value)
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"document_id": "good", "key": "good.txt"},
        {"document_id": "empty", "key": "empty.txt"},
        {"document_id": "latin1", "key": "latin1.txt"},
        {"document_id": "nul", "key": "nul.txt"},
        {"document_id": "binary", "key": "binary.bin"},
        {"document_id": "missing", "key": "nowhere.txt"},
        {"key": "good.txt"},
        {"document_id": 7, "key": "good.txt"},
        {"document_id": "escape", "key": "../../etc/passwd"},
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    assert cli("migrate")[0] == 0
    assert cli("enqueue", "--file", str(jobs))[0] == 0
    too_big = cli("enqueue", json.dumps({"document_id": "x", "key": "y" * (11 << 20)}))
    assert too_big[0] == 1
    assert "over the limit" in too_big[2]
    code, out, err = cli("run", "worker_core.ingest:DocumentWorker", "--until-empty")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["processed"], summary["dead_lettered"]) == (1, 8)
    code, out, _ = cli("dead-letters", "list", "--json", "--limit", "50")
    reasons = {str(d["payload"].get("document_id")): d["error"] for d in json.loads(out)}
    assert "empty document" in reasons["empty"]
    assert "UTF-8" in reasons["latin1"]
    assert "NUL" in reasons["nul"]
    assert "UTF-8" in reasons["binary"] or "NUL" in reasons["binary"]
    assert "nowhere.txt" in reasons["missing"]
    assert "document_id" in reasons["None"]
    assert "document_id" in reasons["7"]
    assert "escape" in reasons or any("etc/passwd" in r or "outside" in r for r in reasons.values())
    for reason in reasons.values():
        assert reason.startswith("PermanentError")
