"""The producer and operator methods as plans of statements, shared by ``Queue``
(asyncio) and ``SyncQueue`` (blocking).

A method of ``Statements`` checks every argument at once (before any connection is
taken, so a refused call stores nothing) and returns a ``Plan``: a generator that
yields each ``Statement`` to run and receives its rows back, and finally returns the
method's result. The two queues only drive plans on their own kind of connection;
the checks, the SQL text and the dialogue (an enqueue that meets a dedupe key held
by a job finishing right then asks again) exist once, here.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from psycopg import sql
from psycopg.pq import TransactionStatus

from . import _inputs
from .config import WorkerConfig
from .jobs import (
    DEFERRED,
    REFUNDED,
    RUN_EVENTS,
    TRANSITIONS,
    Job,
    JobStatus,
    check_label,
    dump_json,
    dump_json_objects,
    effective_event,
)
from .outcomes import MAX_ERROR_RECORDS
from .sql import load_queries, render

__all__ = ["Plan", "Statement", "Statements", "drive_step", "own_transaction"]

T = TypeVar("T")

_ON_CONFLICT = sql.SQL(
    "ON CONFLICT (queue, dedupe_key) "
    "WHERE dedupe_key IS NOT NULL AND status IN ('queued', 'running') DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement to run; its rows (tuples, or dicts with ``dict_rows``) go back."""

    query: bytes
    params: Mapping[str, Any]
    dict_rows: bool = False


@dataclass(slots=True)
class Plan(Generic[T]):
    """The statements of one call. ``atomic``: run them in one transaction (a
    savepoint inside the caller's transaction)."""

    steps: Generator[Statement, list[Any], T]
    atomic: bool = False
    #: Set by the driver: what the plan returned.
    result: Any = field(default=None)


def drive_step(plan: Plan[T], rows: list[Any] | None) -> Statement | None:
    """Advance ``plan`` with the rows of its last statement (``None`` to start);
    the next statement, or ``None`` once it returned (its value in ``plan.result``)."""
    try:
        return next(plan.steps) if rows is None else plan.steps.send(rows)
    except StopIteration as done:
        plan.result = done.value
        return None


def own_transaction(conn: Any) -> bool:
    """Whether an atomic plan must open its own transaction block on ``conn``.

    In autocommit it must (each statement would commit alone); inside a transaction
    it opens a savepoint. A connection out of autocommit but idle is a transaction
    the caller (Django, SQLAlchemy) has begun but not yet used: the plan's
    statements begin it implicitly and the caller commits or rolls back. A block of
    our own there would commit it early.
    """
    return bool(conn.autocommit) or conn.info.transaction_status == TransactionStatus.INTRANS


class Statements:
    """The SQL of one schema, rendered once, and the plans that use it."""

    def __init__(self, config: WorkerConfig) -> None:
        from .queue import channel_name, control_channel_name, done_channel_name

        self.config = config
        self.schema = config.database.schema
        self.channel = channel_name(self.schema)
        self.control_channel = control_channel_name(self.schema)
        self.done_channel = done_channel_name(self.schema)
        queries = load_queries()
        parts = {
            "on_conflict": sql.SQL(""),
            "transitions": _transitions(),
            "cancel_pair": _CANCEL_INDEX,
            "lease_token": _LEASE_TOKEN,
        }
        self.sql: dict[str, bytes] = {
            name: render(text, self.schema, **parts).as_bytes(None)
            for name, text in queries.items()
        }
        self.sql["enqueue_dedupe"] = render(
            queries["enqueue"], self.schema, on_conflict=_ON_CONFLICT
        ).as_bytes(None)

    def queue_name(self, queue: str | None) -> str:
        name = self.config.queue.primary if queue is None else queue
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError(f"queue name {name!r} must be a non-blank string of at most 200 chars")
        if any(ord(c) < 32 for c in name):
            raise ValueError(f"queue name {name!r} must not contain control characters")
        return _inputs.text_param(name, "queue name", max_bytes=800)

    # -- producing ---------------------------------------------------------------
    def enqueue(
        self,
        payloads: Sequence[Mapping[str, Any]],
        *,
        queue: str | None,
        priority: int,
        run_at: datetime | timedelta | float | None,
        max_attempts: int | None,
        dedupe_keys: Sequence[str | None] | None,
        correlation_ids: Sequence[str | None] | None,
        label: str,
        state: str | None = None,
        kind: str = "default",
    ) -> Plan[list[int]]:
        """Check everything, serialise the payloads, and plan the inserts.

        ``state``: the JSON object every new job starts with (the trace context);
        ``kind``: which pipeline runs the jobs.
        """
        if isinstance(payloads, Mapping):
            raise TypeError("payloads must be a sequence of dicts; use enqueue() for one job")
        n = len(payloads)
        queue_name = self.queue_name(queue)
        keys = _inputs.column(dedupe_keys, n, "dedupe_keys")
        cids = _inputs.column(correlation_ids, n, "correlation_ids")
        # Every argument is checked before the payloads are serialised, and all of
        # it before any SQL: a refused call stores nothing.
        params: dict[str, Any] = {
            "queue": queue_name,
            "kind": check_label(kind, "kind"),
            "priority": _inputs.int_param(priority, "priority"),
            "max_attempts": _inputs.int_param(
                self.config.retry.max_attempts if max_attempts is None else max_attempts,
                "max_attempts",
                minimum=1,
                maximum=10_000,
            ),
            "channel": self.channel,
            "state": state,
            **_inputs.run_at_params(run_at),
        }
        for key in keys:
            if key is not None:
                _inputs.text_param(key, "dedupe_key", max_bytes=_inputs.MAX_DEDUPE_KEY_BYTES)
        for cid in cids:
            if cid is not None:
                _inputs.text_param(cid, "correlation_id", max_bytes=200)
                if len(cid) > 200:
                    raise ValueError("correlation_id must be a string of 1 to 200 characters")
        batches = self._payload_batches(payloads, label) if n else []
        return Plan(self._enqueue_steps(params, batches, keys, cids), atomic=len(batches) > 1)

    def _enqueue_steps(
        self,
        params: dict[str, Any],
        batches: list[tuple[list[Any], str]],
        keys: list[str | None],
        cids: list[str | None],
    ) -> Generator[Statement, list[Any], list[int]]:
        ids: list[int] = []
        start = 0
        for items, text in batches:
            end = start + len(items)
            ids += yield from self._insert(params, items, text, keys[start:end], cids[start:end])
            start = end
        return ids

    def _payload_batches(
        self, payloads: Sequence[Mapping[str, Any]], label: str
    ) -> list[tuple[list[Any], str]]:
        """Batches of (payloads, their JSON array), every payload checked before any SQL."""
        limit = self.config.queue.max_payload_bytes
        if label == "payload":  # a single job: name it "payload" in errors
            payload = payloads[0]
            if not isinstance(payload, Mapping):
                raise TypeError(
                    f"payload must be a dict (a JSON object), not {type(payload).__name__}"
                )
            text = dump_json(payload, "payload", max_bytes=limit)
            _inputs.refuse_surrogates(text, [payload], "payload", 0)
            return [([dict(payload)], f"[{text}]")]
        size = self.config.queue.enqueue_batch_size
        batches = []
        for start in range(0, len(payloads), size):
            part = payloads[start : start + size]
            text = dump_json_objects(part, label, max_bytes=limit, offset=start)
            _inputs.refuse_surrogates(text, part, label, start)
            batches.append(([p if type(p) is dict else dict(p) for p in part], text))
        return batches

    def _insert(
        self,
        params: dict[str, Any],
        items: list[Any],
        text: str,
        keys: list[str | None],
        cids: list[str | None],
    ) -> Generator[Statement, list[Any], list[int]]:
        ids: list[int | None] = [None] * len(items)
        pending = list(range(len(items)))
        for _ in range(5):
            everything = len(pending) == len(items)
            rows_keys = keys if everything else [keys[i] for i in pending]
            rows_cids = cids if everything else [cids[i] for i in pending]
            dedupe = any(k is not None for k in rows_keys)
            rows = yield Statement(
                self.sql["enqueue_dedupe" if dedupe else "enqueue"],
                {
                    **params,
                    # Checked and serialised up front; a retry of some rows re-serialises them.
                    "payloads": text
                    if everything
                    else json.dumps([items[i] for i in pending], ensure_ascii=False),
                    # NULL instead of a list of NULLs: nothing to adapt item by item.
                    "dedupe_keys": rows_keys if dedupe else None,
                    "correlation_ids": rows_cids if any(c is not None for c in rows_cids) else None,
                },
            )
            # Identity values follow the statement's ORDER BY, so the key-less rows'
            # ids, ascending, belong to the key-less inputs in order.
            keyless = iter([r[0] for r in rows if r[1] is None])
            by_key = {r[1]: r[0] for r in rows if r[1] is not None}
            missing: list[int] = []
            for i in pending:
                if keys[i] is None:
                    ids[i] = next(keyless)
                elif keys[i] in by_key:
                    ids[i] = by_key[keys[i]]
                else:
                    missing.append(i)
            if not missing:
                break
            wanted = sorted({k for i in missing if (k := keys[i]) is not None})
            rows = yield Statement(
                self.sql["active_by_dedupe_key"], {"queue": params["queue"], "keys": wanted}
            )
            held = {r[1]: r[0] for r in rows}
            pending = []
            for i in missing:
                if keys[i] in held:
                    ids[i] = held[keys[i]]
                else:  # the holder finished between the two statements: insert again
                    pending.append(i)
            if not pending:
                break
        if any(i is None for i in ids):
            raise RuntimeError("could not resolve dedupe keys under heavy contention; retry")
        return [i for i in ids if i is not None]

    # -- inspecting and operating ------------------------------------------------
    def get(self, job_id: int) -> Plan[Job | None]:
        params = {"id": _inputs.job_id(job_id)}

        def steps() -> Generator[Statement, list[Any], Job | None]:
            rows = yield Statement(self.sql["get"], params, dict_rows=True)
            return Job.from_row(rows[0]) if rows else None

        return Plan(steps())

    def stats(self, queue: str | None) -> Plan[dict[str, int]]:
        def steps() -> Generator[Statement, list[Any], dict[str, int]]:
            counts = {status.value: 0 for status in JobStatus}
            for status, n in (yield Statement(self.sql["stats"], {"queue": queue})):
                counts[status] = int(n)
            return counts

        return Plan(steps())

    def dead_letters(self, queue: str | None, limit: int) -> Plan[list[Job]]:
        params = {"queue": queue, "limit": _inputs.int_param(limit, "limit", minimum=0)}

        def steps() -> Generator[Statement, list[Any], list[Job]]:
            rows = yield Statement(self.sql["dead_letters"], params, dict_rows=True)
            return [Job.from_row(row) for row in rows]

        return Plan(steps())

    def requeue(self, job_ids: int | Sequence[int]) -> Plan[int]:
        ids = (
            [_inputs.job_id(job_ids)]
            if isinstance(job_ids, int)
            else [_inputs.job_id(i) for i in job_ids]
        )

        def steps() -> Generator[Statement, list[Any], int]:
            if not ids:
                return 0
            rows = yield Statement(self.sql["requeue"], {"ids": ids, "channel": self.channel})
            return len(rows)

        return Plan(steps())

    def cancel(self, job_id: int) -> Plan[bool]:
        """Cancel a queued job at once; a running one gets a cancel request its worker
        hears on the control channel (or at its next heartbeat)."""
        params = {
            "id": _inputs.job_id(job_id),
            "control": self.control_channel,
            "done": self.done_channel,
        }

        def steps() -> Generator[Statement, list[Any], bool]:
            return bool((yield Statement(self.sql["cancel"], params)))

        return Plan(steps())

    def rescue(self, limit: int) -> Plan[list[tuple[int, str, JobStatus]]]:
        params = {
            "limit": _inputs.int_param(limit, "limit", minimum=0),
            "keep_errors": MAX_ERROR_RECORDS,
            "done_channel": self.done_channel,
        }

        def steps() -> Generator[Statement, list[Any], list[tuple[int, str, JobStatus]]]:
            found = yield Statement(self.sql["rescue"], params)
            rows = [(r[0], r[1], JobStatus(r[2])) for r in found]
            for queue in sorted({q for _, q, s in rows if s is JobStatus.QUEUED}):
                yield Statement(self.sql["notify"], {"channel": self.channel, "queue": queue})
            return rows

        return Plan(steps())


def _transitions() -> sql.Composable:
    """The rows of ``jobs.TRANSITIONS`` a run may write (``RUN_EVENTS``) as a VALUES
    list, one row per event: (from, event, to, refund, deferral), each of the last
    three a pair [without, with a standing cancel request]; see
    ``jobs.effective_event``. ``finish`` indexes the pairs with ``_CANCEL_INDEX``."""
    rows = []
    for event in sorted(RUN_EVENTS):
        targets, refunds, deferrals = [], [], []
        for requested in (False, True):
            actual = effective_event(event, requested)
            targets.append(sql.Literal(TRANSITIONS[(JobStatus.RUNNING, actual)].value))
            refunds.append(sql.Literal(int(actual in REFUNDED)))
            deferrals.append(sql.Literal(int(actual in DEFERRED)))
        rows.append(
            sql.SQL("({}, {}, ARRAY[{}], ARRAY[{}], ARRAY[{}])").format(
                sql.Literal(JobStatus.RUNNING.value),
                sql.Literal(event.value),
                sql.SQL(", ").join(targets),
                sql.SQL(", ").join(refunds),
                sql.SQL(", ").join(deferrals),
            )
        )
    return sql.SQL("(VALUES {})").format(sql.SQL(", ").join(rows))


#: The fresh lease token of each job a claim takes: the md5 of one random uuid drawn
#: for the whole statement (an InitPlan) and the job's id. Tokens of one claim differ
#: by id, those of two claims of a job by 122 random bits, and none can be guessed.
#: gen_random_uuid() per row reads the server's strong random source once per job:
#: on a server built without OpenSSL that is an open/read/close of /dev/urandom
#: (about 1.3 us a job, a sixth of the claim), here once per claim.
_LEASE_TOKEN = sql.SQL("md5((SELECT gen_random_uuid()::text) || j.id::text)::uuid")

#: Which element of a ``_transitions`` pair applies to the job ``j``: 1 without, 2
#: with a standing cancel request.
_CANCEL_INDEX = sql.SQL("1 + (j.cancel_requested_at IS NOT NULL)::int")
