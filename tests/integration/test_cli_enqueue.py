"""``worker-core enqueue``: every line checked first, the whole input in one
transaction, errors that name the file and line, and a retry that skips what is
already enqueued (issue 12)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from worker_core.cli import main

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(pg_dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("WORKER_CORE_DATABASE__DSN", pg_dsn)
    monkeypatch.setenv("WORKER_CORE_DATABASE__SCHEMA", schema)
    monkeypatch.setenv("WORKER_CORE_QUEUE__NAME", "import")

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    assert run("migrate")[0] == 0
    return run


def count_jobs(pg_dsn: str, schema: str) -> int:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema}".jobs').fetchone()
    assert row is not None
    return int(row[0])


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"doc": ', "invalid JSON in {file} line 5"),
        ("[1, 2]", "{file} line 5 must be a JSON object, not list"),
        ('{"n": NaN}', "{file} line 5: payload['n'] is nan"),
        ('{"t": "nul \\u0000"}', "{file} line 5: payload['t'] contains a NUL character"),
        ('{"t": "\\ud800"}', "{file} line 5: payload['t'] contains a lone UTF-16 surrogate"),
        ('{"blob": "' + "x" * 2_000_000 + '"}', "{file} line 5: payload is"),
    ],
)
def test_a_bad_line_after_good_batches_stores_nothing_and_is_named(
    cli: Run, tmp_path: Path, pg_dsn: str, schema: str, bad_line: str, message: str
) -> None:
    # Batches of 2: lines 1-4 are two good batches that a per-batch commit would keep.
    lines = [json.dumps({"doc": i}) for i in range(4)] + [bad_line, '{"doc": 9}']
    path = write_lines(tmp_path / "jobs.jsonl", lines)
    code, _, err = cli("enqueue", "--file", str(path), "--batch", "2")
    assert code == 1
    assert message.format(file=path) in err
    assert err.count("\n") == 1
    assert count_jobs(pg_dsn, schema) == 0


def test_invalid_utf8_names_the_line(cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n')
    code, _, err = cli("enqueue", "--file", str(path))
    assert code == 1 and f"{path} line 2 is not valid UTF-8" in err


def test_a_failure_inside_the_database_rolls_back_every_batch(
    cli: Run, tmp_path: Path, pg_dsn: str, schema: str
) -> None:
    """A line the checks accept but the database refuses part-way (here: a batch whose
    statement fails because a trigger refuses it) leaves nothing behind."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS '
            "$$ BEGIN IF NEW.payload ? 'poison' THEN RAISE 'poisoned'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            f'CREATE TRIGGER refuse BEFORE INSERT ON "{schema}".jobs '
            f'FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()'
        )
    lines = [json.dumps({"doc": i}) for i in range(6)] + ['{"poison": true}']
    path = write_lines(tmp_path / "jobs.jsonl", lines)
    code, _, err = cli("enqueue", "--file", str(path), "--batch", "2")
    assert code == 1 and "poisoned" in err
    assert count_jobs(pg_dsn, schema) == 0


def test_whole_file_in_one_transaction_one_statement_per_batch(
    cli: Run, tmp_path: Path, pg_dsn: str, schema: str
) -> None:
    path = write_lines(tmp_path / "jobs.jsonl", [json.dumps({"doc": i}) for i in range(25)])
    code, out, err = cli("enqueue", "--file", str(path), "--batch", "10")
    assert code == 0, err
    assert out.startswith("enqueued 25 jobs")
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            f'SELECT xmin::text::bigint, count(*) FROM "{schema}".jobs GROUP BY 1'
        ).fetchall()
    assert [n for _, n in rows] == [25]  # one transaction wrote every row


def test_dedupe_key_field_lets_a_retried_import_skip_what_is_enqueued(
    cli: Run, tmp_path: Path, pg_dsn: str, schema: str
) -> None:
    first = write_lines(tmp_path / "part.jsonl", [json.dumps({"id": i}) for i in range(3)])
    code, out, err = cli("enqueue", "--file", str(first), "--dedupe-key-field", "id")
    assert code == 0, err
    assert "enqueued 3 jobs" in out and "skipped 0" in out
    # One of them has already run to completion: a retry must skip it too.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f"""UPDATE "{schema}".jobs SET status = 'succeeded', finished_at = now()
            WHERE dedupe_key = '0'"""
        )
    full = write_lines(tmp_path / "full.jsonl", [json.dumps({"id": i}) for i in range(5)])
    code, out, err = cli("enqueue", "--file", str(full), "--dedupe-key-field", "id")
    assert code == 0, err
    assert "enqueued 2 jobs" in out and "skipped 3 already enqueued" in out
    assert count_jobs(pg_dsn, schema) == 5
    # Run again: nothing new.
    code, out, _ = cli("enqueue", "--file", str(full), "--dedupe-key-field", "id")
    assert "enqueued 0 jobs" in out and "skipped 5" in out
    assert count_jobs(pg_dsn, schema) == 5


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a"}', '{"other": 1}'], "line 2 has no dedupe key: field 'id'"),
        (['{"id": "a"}', '{"id": ""}'], "line 2 has no dedupe key"),
        (['{"id": "a"}', '{"id": [1]}'], "line 2 has no dedupe key"),
        (['{"id": "a"}', '{"id": "b"}', '{"id": "a"}'], "line 3 repeats the dedupe key 'a' of"),
    ],
)
def test_dedupe_key_field_problems_name_the_line(
    cli: Run, tmp_path: Path, pg_dsn: str, schema: str, lines: list[str], message: str
) -> None:
    path = write_lines(tmp_path / "keys.jsonl", lines)
    code, _, err = cli("enqueue", "--file", str(path), "--dedupe-key-field", "id")
    assert code == 1 and message in err, err
    assert count_jobs(pg_dsn, schema) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--delay", "inf"], "argument --delay: must be a finite number of seconds"),
        (["--delay", "nan"], "argument --delay: must be a finite number"),
        (["--delay", "1e300"], "argument --delay: must be at most 100 years"),
        (["--priority", "99999999999"], "argument --priority: must be between"),
        (["--max-attempts", "0"], "argument --max-attempts: must be between 1"),
        (["--batch", "0"], "argument --batch: must be between 1"),
    ],
)
def test_numeric_flags_are_checked(
    cli: Run, pg_dsn: str, schema: str, flags: list[str], message: str
) -> None:
    code, _, err = cli("enqueue", '{"a": 1}', *flags)
    assert code == 2 and message in err
    assert count_jobs(pg_dsn, schema) == 0


def test_delay_is_applied(cli: Run, pg_dsn: str, schema: str) -> None:
    code, _, err = cli("enqueue", '{"a": 1}', "--delay", "3600")
    assert code == 0, err
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            f'SELECT extract(epoch FROM run_at - now()) FROM "{schema}".jobs'
        ).fetchone()
    assert row is not None and 3500 < float(row[0]) <= 3600
