"""Loading and rendering of the SQL files shipped with worker_core.

``queries.sql`` holds named queries (``-- name: claim``); ``migrations/`` holds
numbered, forward-only schema versions. Both use ``{schema}`` for the schema,
rendered as a quoted identifier with ``psycopg.sql``, and may use other
``{placeholders}`` that the caller fills with SQL it builds itself (never user text).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from psycopg import sql

__all__ = ["Migration", "load_queries", "migrations", "render"]

_NAME = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
#: A line that is only a comment: the files explain each statement at length, but
#: the text sent stays short. psycopg caches the parsing of a statement only up to
#: 4 KiB (finish, with its comments, was longer: re-parsed at every call), and the
#: server parses every statement not prepared yet.
_COMMENT_LINE = re.compile(r"^[ \t]*--[^\n]*\n", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _read(name: str) -> str:
    return (resources.files(__package__) / name).read_text(encoding="utf-8")


@cache
def load_queries(filename: str = "queries.sql") -> dict[str, str]:
    """Named queries of a ``.sql`` file: each starts at a ``-- name: x`` line."""
    text = _read(filename)
    marks = list(_NAME.finditer(text))
    queries: dict[str, str] = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = _COMMENT_LINE.sub("", text[mark.end() : end]).strip()
        if mark["name"] in queries:
            raise ValueError(f"{filename}: query {mark['name']!r} is defined twice")
        queries[mark["name"]] = body.rstrip(";").strip()
    return queries


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped, in version order."""
    found: list[Migration] = []
    folder = resources.files(__package__) / "migrations"
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(
                Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbered 1..n with no gap and no number twice: a gap means a file is missing
    # from the package, and the schema check compares the set of applied versions.
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"worker_core migrations are not numbered 1..n: {versions}")
    return tuple(found)


def render(text: str, schema: str, **parts: sql.Composable) -> sql.Composed:
    """Fill ``{schema}`` with a quoted identifier and ``{name}`` with ``parts[name]``.

    Braces that are not a known placeholder (JSON literals such as ``'{}'``) are
    left alone, so SQL files read as plain SQL.
    """
    pieces: list[sql.Composable] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        key = match.group(1)
        if key == "schema":
            value: sql.Composable = sql.Identifier(schema)
        elif key in parts:
            value = parts[key]
        else:
            continue
        pieces.append(sql.SQL(text[pos : match.start()]))
        pieces.append(value)
        pos = match.end()
    pieces.append(sql.SQL(text[pos:]))
    return sql.Composed(pieces)
