"""StructuredLogger and configure_logging: JSON lines, context, redaction, opt-in setup."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from worker_core.logs import (
    StructuredLogger,
    configure_logging,
    is_configured,
    job_context,
    unconfigure_logging,
)
from worker_core.redact import Redactor

API_KEY = "sk-live-abcdef123456"
DB_PASSWORD = "Db-Pa55-word-77"
BEARER = "eyJhbGciOiJIUzI1NiJ9.payload.sig"
KV_PASSWORD = "kv-pass-value-99"
DSN = f"postgresql://ingest:{DB_PASSWORD}@db.internal:5432/docs"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    configure_logging("DEBUG", stream=out)
    try:
        yield out
    finally:
        unconfigure_logging()
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_every_line_is_json_with_the_header_first(stream: io.StringIO) -> None:
    log = StructuredLogger("worker_core.test", service="ingest")
    log.info("started", n=3)
    log.bind(job_id=7).warning("slow", seconds=1.5)
    logging.getLogger("psycopg.pool").error("pool %s exhausted", "main")
    records = lines(stream)
    assert len(records) == 3
    for record in records:
        assert list(record)[:4] == ["timestamp", "level", "logger", "event"]
        assert ISO_UTC.match(record["timestamp"])
        stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60
    assert records[0] == {**records[0], "level": "info", "logger": "worker_core.test",
                          "event": "started", "service": "ingest", "n": 3}  # fmt: skip
    assert records[1]["job_id"] == 7 and records[1]["level"] == "warning"
    assert records[2]["event"] == "pool main exhausted"
    assert records[2]["logger"] == "psycopg.pool" and records[2]["level"] == "error"


def test_levels_filter_and_fields_never_replace_the_header(stream: io.StringIO) -> None:
    logging.getLogger().setLevel("INFO")
    log = StructuredLogger("worker_core.test")
    log.debug("hidden")
    log.info("shown", level="mine", logger="x")
    (record,) = lines(stream)
    assert record["level"] == "info" and record["level_"] == "mine"
    assert record["logger"] == "worker_core.test" and record["logger_"] == "x"


def test_job_context_reaches_stdlib_records_and_extra(stream: io.StringIO) -> None:
    with job_context(correlation_id="corr-1", job_id=11, stage="parse"):
        logging.getLogger("botocore").info("retrying", extra={"attempt_no": 2})
        StructuredLogger("worker_core.worker").info("stage done")
    logging.getLogger("botocore").info("outside")
    inside, ours, outside = lines(stream)
    for record in (inside, ours):
        assert (record["correlation_id"], record["job_id"], record["stage"]) == (
            "corr-1",
            11,
            "parse",
        )
    assert inside["attempt_no"] == 2
    assert "job_id" not in outside


def test_secrets_never_appear(stream: io.StringIO) -> None:
    log = StructuredLogger("worker_core.test")
    log.info("calling api", api_key=API_KEY, headers={"Authorization": f"Bearer {BEARER}"})
    log.info(f"sending Authorization: Bearer {BEARER}")
    log.info("connect", dsn=DSN, nested=[{"password": KV_PASSWORD}])
    log.info(f"conninfo host=db password={KV_PASSWORD} user=x")
    logging.getLogger("psycopg").warning("connection to %s failed", DSN)
    logging.getLogger("app").info("params", extra={"secret_token": API_KEY})
    try:
        raise ConnectionError(f"cannot reach {DSN} with api_key={API_KEY}")
    except ConnectionError:
        log.exception("worker_core failed")
        logging.getLogger("app").exception("stdlib failed")
    text = stream.getvalue()
    for secret in (API_KEY, DB_PASSWORD, BEARER, KV_PASSWORD):
        assert secret not in text
    records = lines(stream)
    assert records[0]["api_key"] == "***"
    assert records[0]["headers"] == {"Authorization": "***"}
    assert "postgresql://ingest:***@db.internal:5432/docs" in records[2]["dsn"]
    assert (
        records[6]["exception"].startswith("Traceback")
        and "ConnectionError" in records[6]["exception"]
    )
    assert "Traceback" in records[7]["exception"]


def test_literal_secrets_and_extra_keys_are_masked() -> None:
    out = io.StringIO()
    configure_logging("INFO", stream=out, redact_keys=["ssn"], secrets=["plain-secret-xyz"])
    try:
        StructuredLogger("worker_core.test").info("got plain-secret-xyz", ssn="123-45", tokens=12)
    finally:
        unconfigure_logging()
    (record,) = lines(out)
    assert record["event"] == "got ***" and record["ssn"] == "***"
    assert record["tokens"] == 12  # counts under secret-sounding keys are not secrets


def test_odd_values_are_rendered_as_text_and_masked(stream: io.StringIO) -> None:
    class Leaky:
        def __str__(self) -> str:
            return f"client({DSN})"

    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    StructuredLogger("worker_core.test").info(
        "odd", obj=Leaky(), when=when, err=ValueError(f"bad {DSN}"), big=2**70, ids={3, 4}
    )
    (record,) = lines(stream)
    assert DB_PASSWORD not in json.dumps(record)
    assert record["when"] == "2024-05-01T12:00:00+00:00"
    assert record["err"].startswith("ValueError: bad postgresql://ingest:***@")
    assert record["big"] == 2**70 and sorted(record["ids"]) == [3, 4]


async def test_concurrent_jobs_keep_their_own_ids(stream: io.StringIO) -> None:
    log = StructuredLogger("worker_core.worker")
    a_logged, b_logged = asyncio.Event(), asyncio.Event()

    async def job(job_id: int, mine: asyncio.Event, other: asyncio.Event) -> None:
        with job_context(job_id=job_id, correlation_id=f"corr-{job_id}"):
            log.info("first")
            mine.set()
            await other.wait()  # the other job logs while this one is between lines
            logging.getLogger("thirdparty").info("second")

    await asyncio.gather(job(1, a_logged, b_logged), job(2, b_logged, a_logged))
    records = [r for r in lines(stream) if r["logger"] != "asyncio"]
    assert len(records) == 4
    for record in records:
        assert record["correlation_id"] == f"corr-{record['job_id']}"
    assert sorted(r["job_id"] for r in records) == [1, 1, 2, 2]


def test_configure_twice_installs_one_handler() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        first = configure_logging("INFO", stream=io.StringIO())
        second = configure_logging("DEBUG", stream=io.StringIO())
        ours = [h for h in root.handlers if h not in before]
        assert ours == [second] and first not in root.handlers
        assert is_configured()
    finally:
        unconfigure_logging()
        root.setLevel(level)
    assert root.handlers == before and not is_configured()


def test_console_format_is_readable() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out)
    try:
        with job_context(job_id=5):
            StructuredLogger("worker_core.test").info("hello", password=KV_PASSWORD)
    finally:
        unconfigure_logging()
    text = out.getvalue()
    assert "hello" in text and "job_id=5" in text and "password=***" in text
    assert KV_PASSWORD not in text
    with pytest.raises(ValueError, match="fmt"):
        configure_logging("INFO", "xml")  # type: ignore[arg-type]


def test_application_handlers_get_masked_text_without_configuration() -> None:
    # No configure_logging: an application's plain handler still sees no secret.
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("worker_core.apptest")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log = StructuredLogger("worker_core.apptest", queue="docs")
        log.info("connect", dsn=DSN, api_key=API_KEY)
        try:
            raise RuntimeError(f"boom password={KV_PASSWORD}")
        except RuntimeError:
            log.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    text = out.getvalue()
    assert "worker_core.apptest INFO connect" in text and "queue='docs'" in text
    assert "Traceback" in text and "RuntimeError: boom password=***" in text
    for secret in (DB_PASSWORD, API_KEY, KV_PASSWORD):
        assert secret not in text


def test_structlog_processor_formatter_of_an_application_sees_fields() -> None:
    from structlog.processors import JSONRenderer
    from structlog.stdlib import ProcessorFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        ProcessorFormatter(processors=[ProcessorFormatter.remove_processors_meta, JSONRenderer()])
    )
    logger = logging.getLogger("worker_core.structtest")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        StructuredLogger("worker_core.structtest", job_id=3).info("done", n=2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert json.loads(out.getvalue()) == {"job_id": 3, "n": 2, "event": "done"}


def test_disabled_levels_cost_nothing_visible() -> None:
    log = StructuredLogger("worker_core.quiet")
    assert not log.is_enabled_for(logging.DEBUG) or logging.getLogger().level <= logging.DEBUG
    log.debug("never", value=object())  # no handler, no formatting, no error
    assert (
        log.bind(a=1).context == {"a": 1} and repr(log) == "StructuredLogger('worker_core.quiet')"
    )


def test_redactor_caches_are_bounded() -> None:
    redactor = Redactor()
    for i in range(20_000):
        redactor.field(f"key{i}", f"value {i}")
    assert len(redactor._keys) <= 4096 and len(redactor._texts) <= 4096


def test_importing_configures_nothing() -> None:
    code = (
        "import logging, structlog, worker_core, worker_core.logs\n"
        "from worker_core.logs import StructuredLogger\n"
        "StructuredLogger('worker_core.x').warning('not shown anywhere')\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "assert not structlog.is_configured()\n"
        "assert logging.getLogger().level == logging.WARNING\n"
        "hs = logging.getLogger('worker_core').handlers\n"
        "assert [type(h).__name__ for h in hs] == ['NullHandler'], hs\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # the NullHandler swallows the warning: no last-resort output
