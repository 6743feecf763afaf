"""Every example in examples/ runs against the test database and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg import sql

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(name: str, pg_dsn: str, *args: str) -> str:
    env = {**os.environ, "WORKER_CORE_DATABASE__DSN": pg_dsn}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def drop_schema(pg_dsn: str, schema: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_quickstart(pg_dsn: str) -> None:
    try:
        out = run_example("quickstart.py", pg_dsn)
    finally:
        drop_schema(pg_dsn, "quickstart")
    assert "succeeded, 2 words" in out
    assert "dead (empty document)" in out


def test_markdown_sections(pg_dsn: str) -> None:
    try:
        out = run_example("markdown_sections.py", pg_dsn)
    finally:
        drop_schema(pg_dsn, "example_markdown")
    lines = out.strip().splitlines()
    assert "succeeded, 4 sections, written {'skipped': 0, 'inserted': 4}" in lines[0]
    assert "succeeded, 4 sections, written {'skipped': 4, 'inserted': 0}" in lines[1]
    assert "dead (ValidationError at stage parse)" in lines[2]


def test_http_enrichment(pg_dsn: str) -> None:
    try:
        out = run_example("http_enrichment.py", pg_dsn)
    finally:
        drop_schema(pg_dsn, "example_http")
    assert "18 invoices converted" in out
    assert "dead: 1" in out
    assert "unknown currency 'XYZ'" in out


def test_job_model(pg_dsn: str) -> None:
    try:
        out = run_example("job_model.py", pg_dsn)
    finally:
        drop_schema(pg_dsn, "example_job_model")
    lines = out.strip().splitlines()
    assert (
        "(document on uploads): succeeded, {'text': 'contents of report.txt', 'words': 3}"
        in (lines[0])
    )
    assert "(image on backfill): succeeded" in lines[1] and "cat.jpg.png" in lines[1]
    # The worker's on_cancelled and the producer's wait() both see the job end: either
    # may print first.
    hook, waited = sorted(lines[2:4], key=lambda line: "while running" not in line)
    assert hook.endswith("cancelled while running (stage done: None)")
    assert waited.endswith(": cancelled")
    assert lines[4].endswith("while paused: queued")
    assert lines[5].endswith("after resume: succeeded")


def test_scheduled_rescan(pg_dsn: str) -> None:
    try:
        out = run_example("scheduled_rescan.py", pg_dsn)
    finally:
        drop_schema(pg_dsn, "example_rescan")
    lines = out.strip().splitlines()
    assert lines[0] == "first re-scan: 3 objects, 3 ingest jobs waiting"
    assert lines[1] == "next re-scan: 3 objects, 3 ingest jobs waiting"
    assert lines[-1] == "re-scan after editing b.md: 3 objects, 4 ingest jobs waiting"
