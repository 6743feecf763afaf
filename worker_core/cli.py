"""The ``worker-core`` command (also ``python -m worker_core``).

Configuration comes from the environment (``WORKER_CORE_...``) and the flags,
which win. Every failure prints one clear line on stderr and exits non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNHEALTHY = 0, 1, 2, 3


class CommandError(Exception):
    """A failure the user can act on; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker-core",
        description="Operate worker_core queues: migrate, enqueue, run workers, inspect.",
    )
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: WORKER_CORE_DATABASE__DSN)")
    parser.add_argument("--schema", help="schema holding the tables (default: worker_core)")
    parser.add_argument("--queue", dest="queue_name", help="queue name (default: 'default')")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="install or upgrade the schema (idempotent)")
    vector = p.add_mutually_exclusive_group()
    vector.add_argument(
        "--vector",
        dest="vector",
        action="store_true",
        default=None,
        help="require pgvector for embeddings",
    )
    vector.add_argument(
        "--no-vector", dest="vector", action="store_false", help="store embeddings as real[]"
    )

    p = sub.add_parser(
        "enqueue",
        help="add jobs from JSON arguments, a file or stdin (all or nothing)",
        description="Every line is checked before anything is stored; then all jobs are "
        "added in one transaction (one statement per batch), so a bad line stores nothing.",
    )
    p.add_argument("payloads", nargs="*", metavar="JSON", help="one JSON object per job")
    p.add_argument("--file", "-f", help="a JSON-lines file (one object per line), or - for stdin")
    p.add_argument("--priority", type=_bounded_int(-(2**31), 2**31 - 1), default=0)
    p.add_argument(
        "--delay",
        type=_delay_seconds,
        default=None,
        help="seconds before the jobs are ready (finite, at most 100 years)",
    )
    p.add_argument("--max-attempts", type=_bounded_int(1, 10_000), default=None)
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--dedupe-key", default=None, help="for a single job")
    keys.add_argument(
        "--dedupe-key-field",
        metavar="FIELD",
        default=None,
        help="use each payload's FIELD as its dedupe key: lines whose key a job of the "
        "queue already holds (in any status) are skipped, so a retried import adds "
        "only what is missing",
    )
    p.add_argument("--kind", default="default", help="the jobs' kind (default: 'default')")
    p.add_argument(
        "--batch", type=_bounded_int(1, 1_000_000), default=10_000, help="jobs per statement"
    )

    p = sub.add_parser("run", help="run a worker class until stopped")
    p.add_argument("target", metavar="MODULE:CLASS", help="e.g. myapp.workers:IngestWorker")
    p.add_argument("--until-empty", action="store_true", help="exit when no job is ready")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ...")

    p = sub.add_parser("schedules", help="a worker class's schedules and their next runs")
    p.add_argument("target", metavar="MODULE:CLASS", help="e.g. myapp.workers:RescanWorker")
    p.add_argument("--count", type=int, default=5, help="next runs to show (1-100)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="counts by status and stage, oldest ready job")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all-queues", action="store_true")

    p = sub.add_parser("dead-letters", help="list or requeue dead jobs")
    dl = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = dl.add_parser("list", help="the newest dead jobs with their last error")
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("--json", action="store_true")
    q = dl.add_parser("requeue", help="move dead jobs back to queued")
    q.add_argument("ids", nargs="*", type=int)
    q.add_argument("--all", action="store_true", help="every dead job of the queue")

    p = sub.add_parser("health", help="check the database and queue; exit 3 when unhealthy")
    p.add_argument("--json", action="store_true")

    for name, text in (("pause", "stop workers claiming a queue's jobs (persistent)"),
                       ("resume", "let workers claim a paused queue again")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("queue", metavar="QUEUE")

    p = sub.add_parser("cancel", help="cancel a queued job, or stop a running one")
    p.add_argument("job_id", metavar="ID", type=int)
    p.add_argument(
        "--wait", type=float, default=None, metavar="SECONDS", help="wait for a running job to end"
    )

    p = sub.add_parser("dashboard", help="serve the operations console (web dashboard)")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: 8787)")
    p.add_argument("--read-only", action="store_true", help="no actions at all")

    p = sub.add_parser("demo", help="ingest sample documents on an embedded PostgreSQL")
    p.add_argument("--documents", type=int, default=12)
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="embedded PostgreSQL data directory (kept between runs)",
    )
    p.add_argument("--storage-dir", type=Path, default=None)

    p = sub.add_parser(
        "sync", help="enqueue ingest jobs for new and changed objects, deletes for vanished"
    )
    p.add_argument("prefix", metavar="PREFIX", help="a key prefix in storage ('' for all)")
    p.add_argument("--batch", type=int, default=1000, help="differences per transaction")
    p.add_argument("--json", action="store_true")
    return parser


def load_config(args: argparse.Namespace, **queue: Any) -> Any:
    """WorkerConfig from the environment, with the flags given on top (sections merge)."""
    from pydantic import ValidationError

    from .config import WorkerConfig

    overrides: dict[str, Any] = {}
    database = {k: v for k, v in (("dsn", args.dsn), ("schema", args.schema)) if v}
    if database:
        overrides["database"] = database
    queue_section = {k: v for k, v in queue.items() if v is not None}
    if args.queue_name:
        queue_section["name"] = args.queue_name
    if queue_section:
        overrides["queue"] = queue_section
    try:
        return WorkerConfig(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise CommandError(f"invalid configuration: {where}: {first['msg']}") from None


def require_dsn(config: Any) -> None:
    if config.database.dsn is None:
        raise CommandError("no database: pass --dsn or set WORKER_CORE_DATABASE__DSN")


# -- commands ------------------------------------------------------------------------
async def cmd_migrate(args: argparse.Namespace, out: IO[str]) -> int:
    from .queue import Queue

    config = load_config(args)
    require_dsn(config)
    async with Queue(config) as queue:
        applied = await queue.migrate(vector=args.vector)
        version = await queue.schema_version()
    if applied:
        out.write(
            f"schema {config.database.schema!r}: applied {applied}, now at version {version}\n"
        )
    else:
        out.write(f"schema {config.database.schema!r} is up to date (version {version})\n")
    return EXIT_OK


def read_payloads(args: argparse.Namespace, stdin: IO[str]) -> Iterator[tuple[str, str]]:
    """``(where, text)`` for every argument and non-blank line; ``where`` names the
    file and line (``jobs.jsonl line 4``) for error messages."""
    for i, text in enumerate(args.payloads, 1):
        yield f"argument {i}", text
    if not args.file:
        return
    if args.file == "-":
        for n, line in enumerate(stdin, 1):
            if line.strip():
                yield f"stdin line {n}", line
        return
    try:
        handle = Path(args.file).open("rb")  # noqa: SIM115
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    with handle:
        for n, raw in enumerate(handle, 1):
            where = f"{args.file} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandError(f"{where} is not valid UTF-8") from None
            if line.strip():
                yield where, line


def parse_payload(where: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"invalid JSON in {where}: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise CommandError(f"invalid JSON in {where}: nested too deeply") from None
    if not isinstance(value, dict):
        raise CommandError(f"{where} must be a JSON object, not {type(value).__name__}")
    return value


def check_payloads(
    lines: list[tuple[str, str]], *, max_bytes: int, key_field: str | None
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Parse and check every line before anything is stored: the payloads, and their
    dedupe keys when ``key_field`` is given. Errors name the file and line."""
    from ._inputs import MAX_DEDUPE_KEY_BYTES, refuse_surrogates, text_param
    from .errors import PayloadError
    from .jobs import dump_json

    payloads: list[dict[str, Any]] = []
    keys: list[str] | None = [] if key_field else None
    first_line: dict[str, str] = {}
    for where, text in lines:
        payload = parse_payload(where, text)
        try:
            refuse_surrogates(
                dump_json(payload, "payload", max_bytes=max_bytes), [payload], "payload", 0
            )
        except PayloadError as exc:
            raise CommandError(f"{where}: {exc}") from None
        if keys is not None and key_field is not None:
            value = payload.get(key_field)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value:
                raise CommandError(
                    f"{where} has no dedupe key: field {key_field!r} must be a non-empty "
                    "string or an integer"
                )
            try:
                text_param(value, f"field {key_field!r}", max_bytes=MAX_DEDUPE_KEY_BYTES)
            except ValueError as exc:
                raise CommandError(f"{where}: {exc}") from None
            if value in first_line:
                raise CommandError(
                    f"{where} repeats the dedupe key {value[:80]!r} of {first_line[value]}"
                )
            first_line[value] = where
            keys.append(value)
        payloads.append(payload)
    return payloads, keys


async def cmd_enqueue(args: argparse.Namespace, out: IO[str], stdin: IO[str]) -> int:
    from .jobs import check_label
    from .queue import Queue

    config = load_config(args)
    payloads, keys = check_payloads(
        list(read_payloads(args, stdin)),
        max_bytes=config.queue.max_payload_bytes,
        key_field=args.dedupe_key_field,
    )
    if not payloads:
        raise CommandError("nothing to enqueue: give JSON arguments, --file FILE or --file -")
    if args.dedupe_key and len(payloads) > 1:
        raise CommandError("--dedupe-key applies to a single job (see --dedupe-key-field)")
    if args.dedupe_key:
        keys = [args.dedupe_key]
    try:
        kind = check_label(args.kind, "--kind")
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    require_dsn(config)
    skipped = 0
    ids: list[int] = []
    async with Queue(config) as queue, queue.connection() as conn, conn.transaction():
        # One transaction for the whole input: a failure part-way stores nothing, so
        # the natural retry after fixing a line cannot enqueue the first lines twice.
        if args.dedupe_key_field and keys is not None:
            held: dict[str, int] = {}
            for start in range(0, len(keys), args.batch):
                held |= await queue.jobs_by_dedupe_key(
                    keys[start : start + args.batch], connection=conn
                )
            todo = [i for i, key in enumerate(keys) if key not in held]
            skipped = len(payloads) - len(todo)
            payloads = [payloads[i] for i in todo]
            keys = [keys[i] for i in todo]
        with _progress(len(payloads), "enqueue", enabled=len(payloads) > args.batch) as bar:
            for start in range(0, len(payloads), args.batch):
                chunk = payloads[start : start + args.batch]
                ids += await queue.enqueue_many(
                    chunk,
                    priority=args.priority,
                    run_at=args.delay,
                    max_attempts=args.max_attempts,
                    dedupe_keys=keys[start : start + args.batch] if keys else None,
                    connection=conn,
                    kind=kind,
                )
                bar.update(len(chunk))
    name = config.queue.primary
    if args.dedupe_key_field:
        out.write(
            f"enqueued {len(ids)} jobs on {name!r}; skipped {skipped} already enqueued "
            f"(field {args.dedupe_key_field!r})\n"
        )
    elif len(ids) <= 20:
        out.write(" ".join(str(i) for i in ids) + "\n")
    else:
        out.write(f"enqueued {len(ids)} jobs ({ids[0]}..{ids[-1]}) on {name!r}\n")
    return EXIT_OK


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _delay_seconds(text: str) -> float:
    from ._inputs import MAX_RUN_AT_SECONDS

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text!r}")
    if abs(value) > MAX_RUN_AT_SECONDS:
        raise argparse.ArgumentTypeError("must be at most 100 years (3155760000 seconds)")
    return value


def load_worker_class(target: str) -> type[Any]:
    from .worker import BaseWorker

    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise CommandError(f"expected MODULE:CLASS, got {target!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current directory is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise CommandError(f"module {module_name!r} has no attribute {class_name!r}")
    if not isinstance(cls, type) or not issubclass(cls, BaseWorker):
        raise CommandError(f"{target} is not a BaseWorker subclass")
    if getattr(cls, "__abstractmethods__", None):
        raise CommandError(f"{target} is abstract: implement stages()")
    return cls


async def cmd_run(args: argparse.Namespace, out: IO[str]) -> int:
    from .logs import configure_logging, unconfigure_logging

    cls = load_worker_class(args.target)
    config = load_config(args, concurrency=args.concurrency)
    require_dsn(config)
    root = logging.getLogger()
    level = root.level
    configure_logging(
        args.log_level or config.logging.level, config.logging.format, secrets=config.secrets()
    )
    try:
        worker = cls(config)
        await worker.run(until_empty=args.until_empty)
    finally:  # leave logging as found, for callers that run the command in-process
        unconfigure_logging()
        root.setLevel(level)
    out.write(json.dumps(worker.metrics.summary()) + "\n")
    return EXIT_OK


async def cmd_schedules(args: argparse.Namespace, out: IO[str]) -> int:
    from datetime import UTC, datetime

    from .schedules import validate_schedules

    if not 1 <= args.count <= 100:
        raise CommandError("--count must be from 1 to 100")
    cls = load_worker_class(args.target)
    config = load_config(args)
    try:  # the schedules as the worker would check them at start
        schedules = validate_schedules(cls(config).schedules())
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{args.target}: {exc}") from None
    now = datetime.now(UTC)
    rows = [
        {
            "name": s.name,
            "cron": s.cron,
            "timezone": s.timezone,
            "kind": s.kind,
            "queue": s.queue or config.queue.primary,
            "missed": s.missed,
            "next_runs": [t.astimezone(s.zone).isoformat() for t in s.next_runs(now, args.count)],
        }
        for s in schedules
    ]
    if args.json:
        out.write(json.dumps(rows) + "\n")
    elif not rows:
        out.write(f"{args.target} has no schedules\n")
    for row in rows if not args.json else ():
        out.write(
            f"{row['name']}: {row['cron']!r} in {row['timezone']}, kind {row['kind']!r} "
            f"on queue {row['queue']!r}, missed slots: {row['missed']}\n"
        )
        for when in row["next_runs"]:
            out.write(f"  {when}\n")
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, out: IO[str]) -> int:
    from .queue import Queue

    config = load_config(args)
    require_dsn(config)
    name = None if args.all_queues else config.queue.primary
    async with Queue(config) as queue:
        counts = await queue.stats(name)
        stages = await queue.stage_counts(name)
        depth = await queue.depth() if name else None
        dead = await queue.dead_letters(name, limit=5)
    report = {
        "schema": config.database.schema,
        "queue": name or "*",
        "counts": counts,
        "by_stage": [{"status": s, "stage": st, "jobs": n} for s, st, n in stages],
        "oldest_ready_seconds": round(depth["oldest_ready_age"], 3) if depth else None,
        "recent_dead_letters": [_dead_summary(job) for job in dead],
    }
    if args.json:
        out.write(json.dumps(report, default=str) + "\n")
        return EXIT_OK
    out.write(f"queue {report['queue']!r} in schema {report['schema']!r}\n")
    out.write("  " + "  ".join(f"{k}={v}" for k, v in counts.items()) + "\n")
    if depth:
        out.write(
            f"  ready={int(depth['ready'])} scheduled={int(depth['scheduled'])} "
            f"oldest ready job waited {depth['oldest_ready_age']:.1f}s\n"
        )
    for status, stage, n in stages:
        out.write(f"  {status:<10} last stage {stage:<20} {n}\n")
    for item in report["recent_dead_letters"]:
        out.write(f"  dead #{item['id']} at stage {item['stage']}: {item['error']}\n")
    return EXIT_OK


def _dead_summary(job: Any) -> dict[str, Any]:
    error = job.last_error or {}
    return {
        "id": job.id,
        "stage": error.get("stage") or job.stage,
        "attempt": job.attempt,
        "error": f"{error.get('type', '?')}: {error.get('message', '')}"[:300],
        "correlation_id": job.correlation_id,
    }


async def cmd_dead_letters(args: argparse.Namespace, out: IO[str]) -> int:
    from .queue import Queue

    config = load_config(args)
    require_dsn(config)
    async with Queue(config) as queue:
        if args.action == "list":
            jobs = await queue.dead_letters(config.queue.primary, limit=args.limit)
            if args.json:
                rows = [
                    {**_dead_summary(j), "payload": j.payload, "errors": j.errors} for j in jobs
                ]
                out.write(json.dumps(rows, default=str) + "\n")
            elif not jobs:
                out.write(f"no dead jobs on {config.queue.primary!r}\n")
            else:
                for job in jobs:
                    item = _dead_summary(job)
                    out.write(
                        f"#{item['id']} stage={item['stage']} attempt={item['attempt']} "
                        f"{item['error']}\n"
                    )
            return EXIT_OK
        if args.all == bool(args.ids):
            raise CommandError("give job ids to requeue, or --all (not both)")
        ids = list(args.ids)
        if args.all:
            ids = [j.id for j in await queue.dead_letters(config.queue.primary, limit=1_000_000)]
        moved = await queue.requeue(ids)
    out.write(f"requeued {moved} of {len(ids)} jobs\n")
    return EXIT_OK


async def cmd_health(args: argparse.Namespace, out: IO[str]) -> int:
    from .health import HealthStatus, health_report_for_config

    config = load_config(args)
    require_dsn(config)
    report = await health_report_for_config(config)
    data = report.to_dict()
    if args.json:
        out.write(json.dumps(data, default=str) + "\n")
    else:
        out.write(f"{data['status']}\n")
        for name, component in data.get("components", {}).items():
            detail = component.get("detail") or {}
            note = detail.get("error") or "; ".join(detail.get("problems") or ()) or ""
            latency = component.get("latency_ms")
            took = f" ({latency:.1f} ms)" if isinstance(latency, int | float) else ""
            out.write(f"  {name}: {component.get('status')}{took} {note}".rstrip() + "\n")
    return EXIT_UNHEALTHY if report.status == HealthStatus.UNHEALTHY else EXIT_OK


async def cmd_pause(args: argparse.Namespace, out: IO[str]) -> int:
    from .queue import Queue

    config = load_config(args)
    require_dsn(config)
    async with Queue(config) as queue:
        if args.command == "pause":
            changed = await queue.pause(args.queue, by="cli")
            state = "paused" if changed else "already paused"
        else:
            changed = await queue.resume(args.queue)
            state = "resumed" if changed else "not paused"
    out.write(f"queue {args.queue!r} {state}\n")
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace, out: IO[str]) -> int:
    from .jobs import JobStatus
    from .queue import Queue

    if args.wait is not None and not (0 <= args.wait <= 86_400):
        raise CommandError("--wait must be between 0 and 86400 seconds")
    config = load_config(args)
    require_dsn(config)
    async with Queue(config) as queue:
        if not await queue.cancel(args.job_id):
            raise CommandError(f"job {args.job_id} is not queued or running")
        job = await queue.get(args.job_id)
        if job is not None and job.status is JobStatus.RUNNING and args.wait is not None:
            try:
                job = await queue.wait(args.job_id, timeout=args.wait)
            except TimeoutError:
                raise CommandError(
                    f"job {args.job_id}: cancel requested, still running after {args.wait:g}s"
                ) from None
    if job is not None and job.status is JobStatus.RUNNING:
        out.write(f"job {args.job_id}: cancel requested; its worker stops the run\n")
    else:
        out.write(f"job {args.job_id}: {job.status.value if job else 'gone'}\n")
    return EXIT_OK


async def cmd_dashboard(args: argparse.Namespace, out: IO[str]) -> int:
    from .dashboard import serve

    config = load_config(args)
    require_dsn(config)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be from 0 to 65535, not {args.port}")

    def ready(url: str) -> None:
        mode = " (read-only)" if args.read_only or config.dashboard.read_only else ""
        out.write(f"dashboard on {url}{mode}; Ctrl-C stops it\n")
        out.flush()

    try:
        await serve(config, host=args.host, port=args.port, read_only=args.read_only, ready=ready)
    except PermissionError as exc:
        raise CommandError(str(exc)) from None
    return EXIT_OK


async def cmd_sync(args: argparse.Namespace, out: IO[str]) -> int:
    from .ingest.storage import storage_from_config
    from .ingest.sync import sync_prefix
    from .queue import Queue

    if args.batch < 1:
        raise CommandError("--batch must be at least 1")
    config = load_config(args)
    require_dsn(config)
    async with Queue(config) as queue, storage_from_config(config.storage) as storage:
        result = await sync_prefix(queue, storage, args.prefix, batch_size=args.batch)
    if args.json:
        out.write(json.dumps({**vars(result), "jobs": result.jobs}) + "\n")
    else:
        out.write(result.summary() + f" on {config.queue.primary!r}\n")
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from .demo import run_demo

    return await run_demo(args, out)


# -- entry point ---------------------------------------------------------------------
def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the command; returns the exit code."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    parser = build_parser()
    try:
        # argparse prints usage and errors on sys.stderr/stdout: send them where the
        # caller asked (an embedding application, a test).
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its usage line
        return int(exc.code or 0)
    commands: dict[str, Any] = {
        "migrate": lambda: cmd_migrate(args, out),
        "enqueue": lambda: cmd_enqueue(args, out, inp),
        "run": lambda: cmd_run(args, out),
        "schedules": lambda: cmd_schedules(args, out),
        "status": lambda: cmd_status(args, out),
        "dead-letters": lambda: cmd_dead_letters(args, out),
        "health": lambda: cmd_health(args, out),
        "demo": lambda: cmd_demo(args, out),
        "pause": lambda: cmd_pause(args, out),
        "cancel": lambda: cmd_cancel(args, out),
        "resume": lambda: cmd_pause(args, out),
        "dashboard": lambda: cmd_dashboard(args, out),
        "sync": lambda: cmd_sync(args, out),
    }
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return int(runner.run(commands[args.command]()))
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        err.write(f"worker-core {args.command}: {_one_line(exc)}\n")
        return EXIT_ERROR


def _loop_factory() -> Any:
    """uvloop's event loop when installed (the `fast` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _one_line(exc: BaseException) -> str:
    from .redact import redact_text

    if isinstance(exc, CommandError):
        text = str(exc)
    elif isinstance(exc, ConnectionError | OSError) or type(exc).__module__.startswith("psycopg"):
        text = f"database error: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact_text(" ".join(text.split()))[:500]


def _progress(total: int, what: str, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="job", disable=not enabled, file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
