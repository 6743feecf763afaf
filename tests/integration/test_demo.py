"""`worker-core demo` with no server installed: ingests, then writes nothing new."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from worker_core.cli import main


@pytest.mark.timeout(180)
def test_demo_twice_on_an_embedded_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKER_CORE_DATABASE__DSN", raising=False)
    argv = ["demo", "--documents", "4", "--data-dir", str(tmp_path / "pg" / "data")]
    first, second = io.StringIO(), io.StringIO()
    assert main(argv, stdout=first, stderr=io.StringIO()) == 0
    assert main(argv, stdout=second, stderr=io.StringIO()) == 0
    assert "jobs: 4 succeeded, 1 dead-lettered" in first.getvalue()
    assert "dead letter" in first.getvalue()
    assert "empty document" in first.getvalue()
    assert "documents: 4 new, 0 re-ingested (0 chunks replaced), 0 unchanged" in first.getvalue()
    chunks = [line for line in first.getvalue().splitlines() if line.startswith("chunks:")]
    current, written = re.fullmatch(
        r"chunks: (\d+) current, (\d+) written by this run", chunks[0]
    ).groups()  # type: ignore[union-attr]
    assert current == written != "0"
    # The second run revises one document: only that one is read and written again.
    assert "revised doc-000.txt (revision 1) since the last run" in second.getvalue()
    summary = re.search(
        r"documents: 0 new, 1 re-ingested \((\d+) chunks replaced\), 3 unchanged", second.getvalue()
    )
    assert summary is not None and int(summary.group(1)) > 0
    again = re.search(r"chunks: (\d+) current, (\d+) written by this run", second.getvalue())
    assert again is not None and 0 < int(again.group(2)) < int(written)
    assert not (tmp_path / "pg" / "data" / "postmaster.pid").exists()  # server stopped


def test_demo_uses_a_given_database(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    out = io.StringIO()
    argv = [
        "--dsn",
        pg_dsn,
        "--schema",
        schema,
        "demo",
        "--documents",
        "2",
        "--storage-dir",
        str(tmp_path / "docs"),
    ]
    assert main(argv, stdout=out, stderr=io.StringIO()) == 0
    assert "starting embedded PostgreSQL" not in out.getvalue()
    assert "jobs: 2 succeeded" in out.getvalue()
