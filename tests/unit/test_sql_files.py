"""The SQL shipped in the package: named queries, migrations and identifier quoting."""

from __future__ import annotations

from psycopg import sql

from worker_core.sql import load_queries, migrations, render


def test_named_queries_load() -> None:
    queries = load_queries()
    for name in ("claim", "heartbeat", "finish", "rescue", "enqueue", "requeue", "cancel", "stats"):
        assert name in queries
        assert queries[name].strip()


def test_migrations_are_numbered_once_each() -> None:
    found = migrations()
    versions = [m.version for m in found]
    assert versions == list(range(1, len(found) + 1))
    assert all(len(m.checksum) == 64 for m in found)


def test_render_quotes_the_schema() -> None:
    text = render("SELECT '{}'::jsonb FROM {schema}.jobs", 'x"; DROP TABLE y; --').as_string(None)
    assert text == 'SELECT \'{}\'::jsonb FROM "x""; DROP TABLE y; --".jobs'


def test_render_fills_named_parts_only() -> None:
    text = render("{schema}.t {part} {other}", "s", part=sql.SQL("X")).as_string(None)
    assert text == '"s".t X {other}'


def test_every_query_renders() -> None:
    for text in load_queries().values():
        assert "{schema}" not in render(text, "s", on_conflict=sql.SQL("")).as_string(None)
