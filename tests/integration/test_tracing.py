"""OpenTelemetry across processes: one trace from the producer's span through the
job span of every attempt to each stage span (SDK with an in-memory exporter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from worker_core import Queue
from worker_core._tracing import TRACE_KEY

PROC = Path(__file__).with_name("otel_proc.py")


def run_proc(mode: str, out: Path, pg_dsn: str, schema: str) -> str:
    env = {**os.environ, "WC_DSN": pg_dsn, "WC_SCHEMA": schema}
    done = subprocess.run(
        [sys.executable, str(PROC), mode, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_one_trace_from_producer_to_every_stage(
    queue: Queue, pg_dsn: str, schema: str, tmp_path: Path
) -> None:
    job_id = int(run_proc("produce", tmp_path / "producer.jsonl", pg_dsn, schema))
    job = await queue.get(job_id)
    assert job is not None
    assert set(job.state) == {TRACE_KEY}
    assert job.state[TRACE_KEY]["traceparent"].startswith("00-")

    run_proc("work", tmp_path / "worker.jsonl", pg_dsn, schema)
    produced = spans(tmp_path / "producer.jsonl")
    worked = spans(tmp_path / "worker.jsonl")

    request = next(s for s in produced if s["name"] == "POST /uploads")
    send = next(s for s in produced if s["kind"] == "PRODUCER")
    trace_id = request["trace_id"]
    assert send["parent_id"] == request["span_id"] and send["trace_id"] == trace_id
    assert send["name"] == "send uploads"
    assert send["attributes"]["messaging.system"] == "worker_core"
    assert send["attributes"]["messaging.destination.name"] == "uploads"
    assert send["attributes"]["messaging.message.id"] == str(job_id)
    correlation_id = send["attributes"]["worker_core.correlation_id"]
    assert correlation_id

    jobs = sorted(
        (s for s in worked if s["kind"] == "CONSUMER"),
        key=lambda s: s["attributes"]["worker_core.job.attempt"],
    )
    assert [j["attributes"]["worker_core.job.attempt"] for j in jobs] == [1, 2]
    for job_span in jobs:
        assert job_span["trace_id"] == trace_id
        assert job_span["parent_id"] == send["span_id"]
        assert job_span["name"] == "process uploads"
        assert job_span["attributes"]["messaging.message.id"] == str(job_id)
        assert job_span["attributes"]["messaging.destination.name"] == "uploads"
    first, second = jobs
    assert first["status"] == "ERROR"
    assert [e["attributes"]["exception.type"] for e in first["events"]] == [
        "worker_core.errors.TransientError"
    ]
    assert second["status"] == "UNSET"
    assert first["events"][0]["attributes"]["exception.message"].startswith("storage hiccup at")
    assert "hunter2" not in (tmp_path / "worker.jsonl").read_text(encoding="utf-8")

    stages = [s for s in worked if s["kind"] == "INTERNAL"]
    by_parent = {
        j["span_id"]: [s["name"] for s in stages if s["parent_id"] == j["span_id"]] for j in jobs
    }
    # Attempt 1 ran parse, then store failed; attempt 2 resumed after parse's checkpoint.
    assert sorted(by_parent[first["span_id"]]) == ["stage parse", "stage store"]
    assert by_parent[second["span_id"]] == ["stage store"]
    failed = next(
        s for s in stages if s["parent_id"] == first["span_id"] and s["name"] == "stage store"
    )
    assert failed["status"] == "ERROR"
    assert any(e["name"] == "exception" for e in failed["events"])
    for span in [send, *jobs, *stages]:
        assert span["trace_id"] == trace_id
        assert span["attributes"]["worker_core.correlation_id"] == correlation_id
    assert all(s["attributes"]["messaging.system"] == "worker_core" for s in stages)

    done = await queue.get(job_id)
    assert done is not None and done.state["stored"] is True
